#!/usr/bin/env bash
# make gpu-check: one prepared run on a GPU machine whose image already has torch, triton, pytest,
# pytest-benchmark and nvcc, with no network. It installs nothing. Budget: under 10 minutes on an H200
# (the step limits below add up to 590 s).
#   1. build the C++/CUDA extension in place for this GPU's architecture
#   2. the GPU tests (pytest -m gpu), slow ones included but the >2^31-element case: Triton and CUDA
#      backends against the reference, every autotune entry, the autotuner on the goal shapes, the
#      mutation tests; in 8 processes side by side (scripts/pytest_shards.sh)
#   3. compute-sanitizer memcheck on a small forward+backward of each GPU backend
#   4. the overhead preset (µs per call, eager and CUDA-graph replay), the quick benchmark preset,
#      the many-adapter preset (issue 11's decode and prefill goals), the e2e preset on two Llama-3-8B-shaped
#      blocks (needs transformers and peft in the image), then print their results.md
# Each step has its own time limit; the script carries on after a failed step and exits non-zero
# at the end if any step failed, so one run shows everything. Copies results to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
failed=()
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s) ==="
  local t0=$SECONDS
  if timeout "$secs" "$@"; then echo "=== $name: ok ($((SECONDS - t0)) s)"; else
    echo "=== $name: FAILED (exit $?, $((SECONDS - t0)) s)"; failed+=("$name"); fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
arch=$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")')

step build 120 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace
# Only the GPU test files (test_mutations.py runs its triton/cuda cases on the GPU): the CPU suite
# needs hypothesis, which the GPU image may not have, and the interpreter tests would switch Triton to
# its CPU interpreter. The >2^31-element case (tens of GiB, minutes) is left to a longer session. -rs
# lists every skip with its reason. 8 processes: Triton compiles one kernel per thread; the H200
# machine has 16 cores. (Step limit not yet measured on a GPU.)
step gpu-tests 150 env PYTHON="$PY" bash scripts/pytest_shards.sh 8 -m gpu -k "not more_than_2_31" \
  tests/test_triton_gpu.py tests/test_cuda_gpu.py tests/test_mutations.py tests/test_host_path.py \
  -q -p no:cacheprovider -rs
if command -v compute-sanitizer >/dev/null; then
  step memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" scripts/sanitizer_case.py
else
  echo "=== memcheck: skipped (no compute-sanitizer on PATH)"
fi
# compiled_unfused is left out here: it compiles once per case (24 in the quick preset), which does
# not fit the 8-minute budget; `make bench` on a GPU includes it.
# The host's cost per call (issue 8): eager bf16 decode at M = 1, 4096², and its CUDA-graph replay.
step overhead 40 "$PY" -m benchmarks --preset overhead --out benchmarks/results/gpu-overhead
step bench-quick 100 "$PY" -m benchmarks --preset quick --no-plots --out benchmarks/results/gpu-check \
  --providers nn_linear,unfused,peft_lora,torch,triton,cuda
# Many adapters (issue 11): decode 64 rows over 64 of 10,000 adapters vs nn_linear, prefill 8192 rows
# over 1,000 vs the single-adapter op. The per-adapter loop (1,000 launches a call) is left out.
step bench-multi 50 "$PY" -m benchmarks --preset multi --no-plots --out benchmarks/results/gpu-multi \
  --providers nn_linear,triton,cuda,multi,multi_triton,multi_cuda,peft_lora_mixed
# Whole-model training steps (issue 20): Llama-3-8B-shaped blocks (hidden 4096, intermediate 14336, GQA 32/8),
# bf16, seq 2048, two blocks only so that the SVD-initialised providers' SVDs fit the budget.
step e2e 75 env LORAXS_E2E_GPU_LAYERS=2 "$PY" -m benchmarks --preset e2e --out benchmarks/results/gpu-e2e
# The measured Triton-vs-CUDA choice per shape for "auto" (commit the table it writes).
step tune-auto 10 "$PY" -m loraxs_kernels.tools.tune_auto benchmarks/results/gpu-check/results.json
[ -n "${OUT:-}" ] && cp loraxs_kernels/backends/auto_table.json "$OUT/" 2>/dev/null
cat benchmarks/results/gpu-check/results.md 2>/dev/null || true
cat benchmarks/results/gpu-multi/results.md 2>/dev/null || true
if [ -n "${OUT:-}" ] && [ -d benchmarks/results/gpu-multi ]; then cp -r benchmarks/results/gpu-multi "$OUT/"; fi
if [ -n "${OUT:-}" ] && [ -d benchmarks/results/gpu-check ]; then cp -r benchmarks/results/gpu-check "$OUT/"; fi
if [ -n "${OUT:-}" ] && [ -d benchmarks/results/gpu-overhead ]; then cp -r benchmarks/results/gpu-overhead "$OUT/"; fi
if [ -n "${OUT:-}" ] && [ -d benchmarks/results/gpu-e2e ]; then cp -r benchmarks/results/gpu-e2e "$OUT/"; fi

if [ ${#failed[@]} -gt 0 ]; then echo "gpu-check FAILED: ${failed[*]}"; exit 1; fi
echo "gpu-check passed"
