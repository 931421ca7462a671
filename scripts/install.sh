#!/usr/bin/env bash
# Prepares .venv (torch 2.14.1, pytest, ninja) and builds gaze_ext in place.
# The CUDA kernels are compiled when nvcc and a CUDA build of torch are present
# (force with GAZE_BUILD_CUDA=0|1; targets: TORCH_CUDA_ARCH_LIST, default "8.0;9.0").
# Re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==2.14.1" numpy pytest ninja
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python setup.py -q build_ext --inplace
.venv/bin/python -c "import gaze_ext; print('gaze_ext built:', gaze_ext.build_info())"
