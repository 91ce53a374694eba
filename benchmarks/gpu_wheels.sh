#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py installs on a GPU machine with no package index
# (Python 3.12, torch already there; no deepspeed, webdataset or their small dependencies).
#   bash benchmarks/gpu_wheels.sh            # -> benchmarks/gpu_wheels/ (git-ignored, ~3.5 MB)
# DeepSpeed ships only an sdist: built here into a py3 wheel with no compiled ops (they JIT-build
# on first use; gpu_check uses torch's AdamW, so none is needed). The rest are downloaded as
# the cp312 manylinux wheels the GPU machine takes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/gpu_wheels
mkdir -p "$out"
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w "$out" "deepspeed==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
pip download --no-deps -d "$out" --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" pydantic-core annotated-types \
  typing-inspection typing-extensions hjson "webdataset==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("webdataset"))')" braceexpand
du -sh "$out"; ls "$out"
