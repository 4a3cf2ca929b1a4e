#!/usr/bin/env bash
# Install hybrimoe-kt and everything its tests use on a fresh CPU-only machine.
# torch first (the CPU build 2.13.0; a bare torch requirement would pull a multi-GB CUDA build), then
# kt-kernel without its torch pin (the CPU expert kernels), then the project with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
if ! "$PY" -c "import kt_kernel" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-deps "kt-kernel==0.7.2" || echo "kt-kernel not installed: the torch CPU backend will be used" >&2
fi
"$PY" -m pip install --quiet -e ".[torch,serve,test]"
"$PY" -c "import hybrimoe_kt, torch; print('hybrimoe-kt', hybrimoe_kt.__version__, 'with torch', torch.__version__)"
