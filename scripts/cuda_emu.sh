#!/usr/bin/env bash
# make cuda-emu: build the host emulation of csrc/cuda/kernels (memcheck and racecheck flavours, in
# parallel) and run tests/test_cuda_emu.py and tests/test_cuda_emu_multi.py (issue 11) against it.
# Needs g++ with libasan and libtsan (Debian's g++ ships both) and the CUDA toolkit's headers
# (cuda_fp16.h, cuda_bf16.h; CUDA_HOME, nvcc on PATH, or /usr/local/cuda). No GPU, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
t0=$(date +%s)
"$PY" loraxs_kernels/tools/cuda_emu.py build
t1=$(date +%s)
LORAXS_CUDA_EMU_TESTS=1 "$PY" -m pytest tests/test_cuda_emu.py tests/test_cuda_emu_multi.py -q -p no:cacheprovider
t2=$(date +%s)
echo "cuda-emu: build $((t1 - t0)) s, tests $((t2 - t1)) s"
