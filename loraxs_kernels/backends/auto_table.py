"""Which GPU backend "auto" runs for a shape, from measured data.

The table lives beside this file (auto_table.json) and is written from a benchmark run by

    python -m loraxs_kernels.tools.tune_auto benchmarks/results/<run>/results.json

For each (GPU name, dtype, M bucket, rank bucket) it records the fastest backend in `full` mode
(forward + backward, median time). The op reads it in C++ (csrc/backend.cpp; loraxs_kernels.ops hands
it over when the library loads); a shape with no measurement gets the rule there (Triton for
fp16/bf16 and TF32 fp32, cuBLAS for fp64 and strict fp32, cuBLAS below sm_80). The table ships
empty until a GPU run has measured it: no entry is guessed.
"""

from __future__ import annotations

import functools
import json
import os

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")
M_BUCKETS = (1, 16, 128, 2048, 8192)  # the benchmark suite's token counts
R_BUCKETS = (4, 16, 64, 256)  # the benchmark suite's ranks, and the largest rank the op takes


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket at or above value (the largest for anything bigger)."""
    return next((b for b in buckets if value <= b), buckets[-1])


def key(device_name: str, dtype: str, M: int, rank: int) -> str:
    return f"{device_name}|{dtype}|M<={bucket(M, M_BUCKETS)}|r<={bucket(rank, R_BUCKETS)}"


@functools.lru_cache(maxsize=None)
def load(path: str = TABLE_PATH) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("choices", {})


def entries(path: str = TABLE_PATH) -> list[tuple[tuple[str, str, int, int], str]]:
    """Every measured entry as ((device name, dtype, M bucket, rank bucket), backend), for the C++ op."""
    out = []
    for k, choice in load(path).items():
        device_name, dtype, m, r = k.rsplit("|", 3)
        out.append(((device_name, dtype, int(m.removeprefix("M<=")), int(r.removeprefix("r<="))), choice))
    return out


def choose(device_name: str, dtype: str, M: int, rank: int, default: str = "triton") -> str:
    return load().get(key(device_name, dtype, M, rank), default)
