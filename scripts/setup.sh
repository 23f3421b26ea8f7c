#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment (.venv) idempotently.
# Installs the CPU build of torch where no CUDA GPU is visible, never a CUDA build there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
stamp_src=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)
stamp="$VENV/.axon-setup-$stamp_src"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA GPU visible: installing torch==$TORCH_VERSION (CUDA build)"
    $pip install "torch==$TORCH_VERSION"
  else
    echo "[setup] no CUDA GPU visible: installing the CPU build of torch==$TORCH_VERSION"
    # A local wheel (pip's find-links) first, then PyTorch's CPU-only index; never PyPI's CUDA build.
    rm -rf "$VENV/wheels"
    if $pip download -q --no-deps --no-index "torch==$TORCH_VERSION" -d "$VENV/wheels" 2>/dev/null \
        && ls "$VENV"/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
      $pip install "$VENV"/wheels/torch-*+cpu-*.whl
    else
      $pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
    rm -rf "$VENV/wheels"
  fi
fi
$pip install -q -e ".[dev]"
rm -f "$VENV"/.axon-setup-*
touch "$stamp"
