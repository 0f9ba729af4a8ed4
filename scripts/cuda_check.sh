#!/usr/bin/env bash
# make cuda-check: build the CUDA extension (csrc/cuda) for sm_80 and sm_90 on a machine without a
# GPU, and fail on a compile error, a register spill, a kernel over its shared-memory budget, or a
# library that does not load with its CUDA and CPU kernels registered. Prints the resource table.
#
# - Uses its own venv (.venv-cuda, the CUDA 13 torch wheel, pinned) and builds with setup.py into
#   build/cuda (build/cuda-temp for objects), so the CPU build that `make build` put into
#   loraxs_kernels/_C*.so for .venv is never touched (checked: its checksum must not change).
# - Always a clean build: ptxas prints resource usage only for what it compiles, and the check must
#   see every kernel.
# - CUDA_CHECK_CMAKE=1 also configures and builds the CMake path (-DLORAXS_WITH_CUDA=ON) into
#   build/cuda-cmake and runs the same checks on it.
# - MAX_JOBS (default 2) sets the parallel compile jobs; CUDA_HOME defaults to /usr/local/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${CUDA_VENV:-.venv-cuda}
PY="$VENV/bin/python"
REQS="torch==2.14.1 numpy ninja setuptools wheel pytest"
OUT=build/cuda-check
LIB_DIR=build/cuda
TMP_DIR=build/cuda-temp
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"  # + compute_90 PTX: newer GPUs JIT it (setup.py's default)
export MAX_JOBS=${MAX_JOBS:-2}

fail() {
  echo "cuda-check: FAIL: $*" >&2
  exit 1
}
now() { date +%s; }
t0=$(now)

# ---- nvcc
NVCC=$(command -v nvcc || true)
[ -n "$NVCC" ] || NVCC="$CUDA_HOME/bin/nvcc"
[ -x "$NVCC" ] || fail "nvcc not found on PATH or in CUDA_HOME=$CUDA_HOME"
echo "== nvcc: $("$NVCC" --version | tail -1)"

# ---- venv with the CUDA torch (created once; recreated when the requirement line changes)
stamp="$VENV/.cuda-check-requirements"
if [ ! -x "$PY" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$REQS" ]; then
  echo "== creating $VENV ($REQS)"
  "$PYTHON" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $REQS
  echo "$REQS" >"$stamp"
fi
"$PY" - <<'EOF' || fail "$VENV does not hold the CUDA build of torch 2.14.1"
import torch
assert torch.__version__.split("+")[0] == "2.14.1" and torch.version.cuda, (torch.__version__, torch.version.cuda)
print(f"== torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
t_venv=$(now)

# ---- the CPU build of the main venv, fingerprinted before and after
cpu_sum() { (ls loraxs_kernels/_C*.so >/dev/null 2>&1 && sha256sum loraxs_kernels/_C*.so) || echo "none"; }
cpu_before=$(cpu_sum)

# ---- build with setup.py, out of tree, ptxas -v on
mkdir -p "$OUT"
rm -rf "$LIB_DIR" "$TMP_DIR"
echo "== building the CUDA extension for sm_80 and sm_90 (MAX_JOBS=$MAX_JOBS), log: $OUT/build.log"
if ! LORAXS_NVCC_FLAGS="-Xptxas -v ${LORAXS_NVCC_FLAGS:-}" \
  "$PY" setup.py build_ext --build-lib "$LIB_DIR" --build-temp "$TMP_DIR" >"$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | grep -v "^ptxas info" | head -30 >&2 || true
  if grep -q "C++20 or later compatible compiler is required" "$OUT/build.log"; then
    echo "hint: torch 2.14's headers need C++20 and setup.py passes -std=c++17 (docs/cuda.md, 'Build')" >&2
  fi
  fail "the setup.py build failed (full log: $OUT/build.log)"
fi
t_build=$(now)
LIB=$(ls "$LIB_DIR"/loraxs_kernels/_C*.so 2>/dev/null | head -1)
[ -n "$LIB" ] || fail "the build produced no $LIB_DIR/loraxs_kernels/_C*.so"
echo "== built $LIB in $((t_build - t_venv)) s"

cpu_after=$(cpu_sum)
[ "$cpu_before" = "$cpu_after" ] || fail "the CPU build in loraxs_kernels/ changed during the CUDA build"

# ---- resources (ptxas -v, cross-checked against the SASS in the library) and the load check
CUOBJDUMP=$(command -v cuobjdump || true)
[ -n "$CUOBJDUMP" ] || CUOBJDUMP=$(ls "$VENV"/lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1 || true)
status=0
echo "== resource usage (ptxas -v)"
"$PY" loraxs_kernels/tools/cuda_check.py resources --log "$OUT/build.log" --so "$LIB" ${CUOBJDUMP:+--cuobjdump "$CUOBJDUMP"} \
  | tee "$OUT/resources.txt" || status=1
echo "== loading $LIB into torch (no GPU needed)"
"$PY" loraxs_kernels/tools/cuda_check.py load "$LIB" || status=1

# ---- the GPU tests collect against this build (and run when a GPU is present)
echo "== tests/test_cuda_gpu.py with this build"
LORAXS_NATIVE_LIB="$PWD/$LIB" "$PY" -m pytest tests/test_cuda_gpu.py -q -p no:cacheprovider 2>&1 | tail -3 || status=1

# ---- optional: the CMake path
if [ "${CUDA_CHECK_CMAKE:-0}" = "1" ]; then
  echo "== CMake build (-DLORAXS_WITH_CUDA=ON) into build/cuda-cmake, log: $OUT/cmake.log"
  rm -rf build/cuda-cmake
  prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  # torch's CMake config links nvrtc; this toolkit has only cudart, the CUDA torch wheel ships nvrtc.
  nvrtc=()
  if ! ls "$CUDA_HOME"/lib64/libnvrtc.so* >/dev/null 2>&1; then
    lib=$(ls "$VENV"/lib/python*/site-packages/nvidia/cu*/lib/libnvrtc.so.* 2>/dev/null | grep -v builtins | head -1 || true)
    [ -n "$lib" ] && nvrtc=(-DCUDA_nvrtc_LIBRARY="$lib")
  fi
  if cmake -S . -B build/cuda-cmake -G Ninja -DLORAXS_WITH_CUDA=ON -DCMAKE_PREFIX_PATH="$prefix" \
    -DPython_EXECUTABLE="$PY" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME" \
    -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" "${nvrtc[@]}" -DCMAKE_CUDA_FLAGS="-Xptxas -v" >"$OUT/cmake.log" 2>&1 \
    && cmake --build build/cuda-cmake -j "$MAX_JOBS" >>"$OUT/cmake.log" 2>&1; then
    "$PY" loraxs_kernels/tools/cuda_check.py resources --log "$OUT/cmake.log" --so build/cuda-cmake/libloraxs_C.so \
      ${CUOBJDUMP:+--cuobjdump "$CUOBJDUMP"} >"$OUT/resources-cmake.txt" || status=1
    tail -1 "$OUT/resources-cmake.txt"
    "$PY" loraxs_kernels/tools/cuda_check.py load build/cuda-cmake/libloraxs_C.so || status=1
  else
    grep -E "error|Error" "$OUT/cmake.log" | head -20 >&2 || true
    echo "cuda-check: FAIL: the CMake build failed (log: $OUT/cmake.log)" >&2
    status=1
  fi
fi

echo "== cuda-check took $(($(now) - t0)) s (venv $((t_venv - t0)) s, build $((t_build - t_venv)) s)"
[ "$status" -eq 0 ] || fail "see the messages above"
echo "cuda-check: OK"
