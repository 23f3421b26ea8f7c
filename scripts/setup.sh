#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment (.venv) idempotently, with the torch
# build this node (or AXON_TORCH) asks for; launch/torch_build.py makes the decision.
#   AXON_TORCH=cpu|cuda|rocm   the build (empty: detect this node's GPUs; on a login node, set it)
#   AXON_ROCM=X.Y              the ROCm version of the rocm build (default: the node's /opt/rocm)
# CPU: a local wheel (pip's find-links) first, then PyTorch's CPU index, never PyPI's CUDA build.
# CUDA: PyPI's default build (x86_64 and aarch64/GH200). ROCm: download.pytorch.org/whl/rocmX.Y.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
REQUEST=${AXON_TORCH:-}
ROCM=${AXON_ROCM:-}
stamp_src=$(cat pyproject.toml scripts/setup.sh launch/torch_build.py | sha1sum | cut -c1-16)
stamp="$VENV/.axon-setup-$stamp_src-${REQUEST:-auto}"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
choice=$("$VENV/bin/python" -m launch.torch_build --request "$REQUEST" --rocm "$ROCM") || exit 2
read -r build index reason <<<"$choice"
have=$("$VENV/bin/python" -c "import torch; print('rocm' if torch.version.hip else 'cuda' if torch.version.cuda else 'cpu')" 2>/dev/null || true)
if [ -n "$have" ] && { [ -z "$REQUEST" ] || [ "$have" = "$build" ]; }; then
  echo "[setup] keeping the installed $have build of torch (set AXON_TORCH=cpu|cuda|rocm to change it)"
else
  echo "[setup] installing the $build build of torch==$TORCH_VERSION ($reason)"
  [ -z "$have" ] || $pip uninstall -q -y torch
  if [ "$build" = "cpu" ]; then
    rm -rf "$VENV/wheels"
    if $pip download -q --no-deps --no-index "torch==$TORCH_VERSION" -d "$VENV/wheels" 2>/dev/null \
        && ls "$VENV"/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then
      $pip install "$VENV"/wheels/torch-*+cpu-*.whl
    else
      $pip install "torch==$TORCH_VERSION" --index-url "$index"
    fi
    rm -rf "$VENV/wheels"
  elif [ "$index" = "pypi" ]; then  # pip's configured index (PyPI by default)
    $pip install "torch==$TORCH_VERSION"
  else
    $pip install "torch==$TORCH_VERSION" --index-url "$index"
  fi
  have=$("$VENV/bin/python" -c "import torch; print('rocm' if torch.version.hip else 'cuda' if torch.version.cuda else 'cpu')")
  if [ "$have" != "$build" ]; then
    echo "[setup] asked for the $build build but the index gave the $have build; install it by hand" \
         "(see https://pytorch.org/get-started/locally/) and rerun" >&2
    exit 1
  fi
fi
"$VENV/bin/python" -c "import torch; print('[setup] torch', torch.__version__, '(' + ('ROCm ' + torch.version.hip if torch.version.hip else 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU') + ' build)')"
$pip install -q -e ".[dev]"
rm -f "$VENV"/.axon-setup-*
touch "$stamp"
