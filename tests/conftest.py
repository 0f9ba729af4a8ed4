"""Test-session set-up shared by every test file.

- Without a CUDA device, Triton kernels run on Triton's interpreter: TRITON_INTERPRET must be in the
  environment before anything imports triton, so it is set here, at conftest import time (torch itself
  does not import triton, so checking for CUDA first is safe).
- Intra-op CPU threads: 1 unless LORAXS_TEST_THREADS says otherwise. The tests' tensors are tiny
  (a 128×16 GEMM takes ~0.01 ms on one thread), and on a 2-core machine shared with other jobs
  OpenMP's spinning workers made the same GEMM take 12-24 ms with 2 threads (measured), turning
  a 40-step training test into 3 s. Results do not depend on the thread count beyond rounding.
- Tests marked `gpu` (the marker is declared in pyproject.toml) are skipped when no CUDA device exists.
- LORAXS_TEST_SHARD=i/n runs every n-th collected test from the i-th, so that scripts/gpu_check.sh can
  run n pytest processes side by side (Triton compiles are CPU-bound and single-threaded).
- The `interpreter_bf16` fixture makes bf16 Triton kernels run correctly on the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ.get("LORAXS_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("LORAXS_TEST_SHARD")  # "i/n": keep every n-th test from the i-th (scripts/gpu_check.sh)
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        if not 0 <= i < n:
            raise pytest.UsageError(f"LORAXS_TEST_SHARD={shard!r}: want i/n with 0 <= i < n")
        config.hook.pytest_deselected(items=[t for k, t in enumerate(items) if k % n != i])
        items[:] = [t for k, t in enumerate(items) if k % n == i]
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def interpreter_bf16():
    """bf16 on Triton's CPU interpreter (tests/interpreter_bf16.py): installs the patch, or fails naming
    the Triton version whose interpreter it does not fit. Harmless for fp16/fp32/fp64 programs."""
    import interpreter_bf16 as patch

    patch.install()
