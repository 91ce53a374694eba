#!/usr/bin/env bash
# Replay an image's set-up as its user would run it, without Docker (no daemon here) or a GPU:
# a fresh non-root user, the files the Dockerfile copies in a directory it owns, then the
# Dockerfile's RUN steps (torch from this machine's pinned file instead of PyTorch's index,
# which these machines cannot reach), then `import distrec`.
#   sudo bash docker/replay.sh cpu|gpu      # as root: it creates the user distrec-replay
# gpu: the DeepSpeed step as the GPU image runs it (--no-build-isolation against the installed
# torch, DS_ACCELERATOR=cuda), without the DS_BUILD_* CUDA ops (no nvcc needed here).
set -euo pipefail
kind=${1:?cpu|gpu}
repo=$(cd "$(dirname "$0")/.." && pwd)
user=distrec-replay
id -u "$user" >/dev/null 2>&1 || useradd --create-home "$user"
work=$(mktemp -d /tmp/replay.XXXX) && chmod 755 "$work"
mkdir -p "$work/opt/distrec" && chown "$user:$user" "$work/opt/distrec"    # RUN mkdir ... && chown
for path in pyproject.toml README.md launch distrec configs benchmarks; do    # COPY --chown=distrec:distrec
  cp -r "$repo/$path" "$work/opt/distrec/"
done
chown -R "$user:$user" "$work/opt/distrec"
steps='bash launch/install.sh'
if [[ $kind == gpu ]]; then
  steps="bash launch/install.sh faiss && .venv/bin/python -m pip install -q setuptools wheel ninja \
    && DS_ACCELERATOR=cuda .venv/bin/python -m pip install -q --no-build-isolation deepspeed==0.19.8 \
    && .venv/bin/python -c 'import deepspeed, faiss; print(\"deepspeed\", deepspeed.__version__)'"
fi
su "$user" -s /bin/bash -c "cd $work/opt/distrec && export HOME=/home/$user PIP_CACHE_DIR=/home/$user/.cache/pip \
  && $steps && .venv/bin/distrec --help >/dev/null && .venv/bin/python -c 'import distrec, torch; print(\"replayed: distrec\", distrec.__version__, \"torch\", torch.__version__, \"as\", __import__(\"getpass\").getuser())'"
echo "replay of the $kind image's set-up ok in $work/opt/distrec"
