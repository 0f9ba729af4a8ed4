"""Tile configurations of the Triton backend: the autotune tables, kept apart from the kernels.

One table per (architecture, regime, schedule), for 16-bit dtypes; fp32 with TF32 derives its list
from it (see _for_fp32), and fp64 and fp32 without TF32 run one fixed config. The launcher autotunes over the list for the
running GPU; tools/aot_report.py compiles exactly these lists for sm_80 and sm_90, so what the report
checks (registers, spills, shared memory, wgmma) is what the autotuner can pick.

Regimes:
  "decode": M <= DECODE_MAX_M. Reading W dominates; tiles are narrow in N so that enough programs
            stream W at once, with deep pipelines (many bytes in flight per SM).
  "gemm":   everything else; compute-bound tiles.
Schedules (gemm_rank_r.py): "fused" (padded rank RP <= FUSED_MAX_RP, one launch) and "split"
(U = X·P from low_rank_projection.py, then the GEMM forms T = s·U·Q per tile and takes it as extra
K columns).

Every entry here compiled without a spill and within shared memory in the AOT report
(`python -m loraxs_kernels.tools.aot_report --check`); entries that spilled were dropped.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

DECODE_MAX_M = 16
FUSED_MAX_RP = 64
SPLIT_T_CHUNK = 32  # split schedule: columns of T formed per step (gemm_rank_r._add_t_from_u)
GROUP_M = 8  # programs along M that walk the same W columns back to back (L2 reuse of W tiles)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_n: int  # N tiles per program; the fused schedule forms T once per program
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_N": self.group_n}

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProjConfig:
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_K": self.block_k}

    def as_dict(self) -> dict:
        return asdict(self)


C = GemmConfig
P = ProjConfig

# 16-bit (fp16/bf16) tables, keyed (arch, regime, schedule).
_TABLES_16BIT = {
    # Hopper: BLOCK_M is a multiple of 64 everywhere (one wgmma is 64 rows per warpgroup), also for
    # decoding, where the masked rows cost tensor-core time that a memory-bound tile has to spare.
    ("sm90", "gemm", "fused"): [
        C(128, 256, 64, 1, 8, 3),
        C(128, 128, 64, 2, 8, 4),
        C(128, 128, 64, 4, 8, 4),
        C(128, 128, 64, 8, 8, 4),
        C(64, 256, 64, 2, 8, 4),
        C(64, 128, 64, 4, 4, 4),
    ],
    ("sm90", "gemm", "split"): [
        C(128, 256, 64, 1, 8, 3),
        C(128, 256, 64, 1, 8, 4),
        C(128, 128, 64, 1, 8, 4),
    ],
    ("sm90", "decode", "fused"): [
        C(64, 64, 64, 1, 4, 6),
        C(64, 32, 128, 1, 4, 5),
        C(64, 64, 128, 2, 4, 4),
        C(64, 128, 64, 1, 4, 5),
    ],
    ("sm90", "decode", "split"): [
        C(64, 64, 64, 1, 4, 6),
        C(64, 32, 128, 1, 4, 5),
        C(64, 128, 64, 1, 4, 5),
    ],
    # Ampere: mma.sync keeps both operands of a dot in registers, so tiles are smaller and BLOCK_K
    # is 32; 163 KiB of shared memory (the smallest entry of each list also fits the 99 KiB of
    # sm_86/sm_89, where the autotuner skips what does not fit).
    ("sm80", "gemm", "fused"): [
        C(128, 128, 32, 1, 8, 4),
        C(64, 256, 32, 1, 8, 4),
        C(64, 128, 32, 1, 4, 4),
    ],
    ("sm80", "gemm", "split"): [
        C(128, 256, 32, 1, 8, 3),
        C(128, 128, 32, 1, 8, 4),
        C(64, 128, 32, 1, 4, 4),
    ],
    ("sm80", "decode", "fused"): [
        C(16, 64, 128, 1, 4, 4),
        C(16, 32, 128, 2, 4, 5),
        C(16, 128, 64, 1, 4, 4),
        C(32, 64, 128, 1, 4, 3),
    ],
    ("sm80", "decode", "split"): [
        C(16, 64, 128, 1, 4, 4),
        C(16, 32, 128, 1, 4, 5),
        C(16, 128, 64, 1, 4, 4),
    ],
}

# x_p_kernel (U = X·P): memory-bound on X, keyed (arch, rank class).
_PROJ_TABLES_16BIT = {
    ("sm90", "r64"): [P(64, 128, 4, 4), P(128, 64, 8, 4), P(64, 64, 4, 6)],
    ("sm90", "r256"): [P(64, 64, 8, 3), P(64, 32, 8, 4), P(128, 32, 8, 3)],
    ("sm80", "r64"): [P(64, 64, 4, 4), P(128, 32, 8, 4), P(32, 128, 4, 4)],
    ("sm80", "r256"): [P(64, 32, 8, 3), P(32, 64, 4, 3), P(64, 32, 4, 3)],
}

# fp64, and fp32 with TF32 off (torch's default), run their dots on the FMA units: correctness paths
# with one config each, no autotune. Keyed (element size, schedule). Chosen by the AOT report under
# triton 3.6.0, 3.8.0 and 3.9.0: fp32 fused 32×64×16 (8 warps, 2 stages) spilled 184-232 bytes under
# 3.6.0 and 3.8.0 (the fused kernel holds x·A's BLOCK_M × 64 accumulator beside the main one, at the
# 255-register cap); 16×64×16 does not. fp64 split spilled 8-48 bytes in some version for every
# 2-stage tile tried (32×64, 16×64, 32×32, 16×32; 4 or 8 warps), at 80-128 registers; 16×32×16 with
# one stage spilled in none.
EXACT_CONFIG = {
    (4, "fused"): C(16, 64, 16, 1, 8, 2), (4, "split"): C(32, 64, 16, 1, 8, 2),
    (8, "fused"): C(16, 64, 16, 1, 8, 2), (8, "split"): C(16, 32, 16, 1, 8, 1),
}
# fp64 projection: 16×32 (8 warps) spilled 24 bytes on sm_90 at r = 64 under triton 3.6.0; 32×32 spills in
# none of 3.6.0, 3.8.0, 3.9.0.
EXACT_PROJ_CONFIG = {4: P(32, 32, 8, 3), 8: P(32, 32, 8, 2)}

# The interpreter runs programs one by one in numpy: small tiles, two N tiles per program so that the
# GROUP_N path (T formed once, reused by the next tile) is exercised by the CPU tests.
INTERPRET_CONFIG = C(32, 32, 32, 2, 4, 1)
INTERPRET_PROJ_CONFIG = P(32, 32, 4, 1)

# grad_R = s·(x A)ᵀ u: fixed tiles (no autotune, so the split and the summation order depend on M
# and r only, which keeps grad_R bitwise reproducible). BLOCK_I = 64 rows for one wgmma.
GRAD_R_BLOCK_I = 64
GRAD_R_BLOCK_M = 64
GRAD_R_NUM_STAGES = 3
GRAD_R_MIN_ROWS_PER_SPLIT = 256
GRAD_R_MAX_PROGRAMS = 128
SUM_SPLITS_BLOCK = 1024
SUM_SPLITS_NUM_WARPS = 4

ARCHS = ("sm80", "sm90")
REGIMES = ("gemm", "decode")
SCHEDULES = ("fused", "split")
RANK_CLASSES = ("r64", "r256")
# LORAXS_TRITON_SCHEDULE=fused|split overrides the choice (benchmarks compare the two); fused still
# needs RP <= FUSED_MAX_RP (it keeps U and T in registers).
SCHEDULE_ENV = "LORAXS_TRITON_SCHEDULE"


def rank_class(rp: int) -> str:
    return "r64" if rp <= 64 else "r256"


def regime(M: int) -> str:
    return "decode" if M <= DECODE_MAX_M else "gemm"


def schedule(rp: int) -> str:
    forced = os.environ.get(SCHEDULE_ENV, "auto")
    if forced not in ("auto", "fused", "split"):
        raise ValueError(f"{SCHEDULE_ENV}={forced!r}; use auto, fused or split")
    if forced == "split" or rp > FUSED_MAX_RP:
        return "split"
    return "fused"


def arch_name(capability: tuple[int, int]) -> str:
    """sm90 for Hopper; every other GPU gets the Ampere tables (mma.sync, smaller shared memory)."""
    return "sm90" if capability[0] == 9 else "sm80"


def _for_fp32(table):
    """fp32 (TF32) variant of a 16-bit table: half the BLOCK_K (the same bytes per stage; >= 16 for
    tl.dot), and one N tile per program: fp32 operands double the registers T takes, and the AOT
    report showed GROUP_N > 1 spilling on sm_90 in fp32."""
    out = []
    for c in table:
        d = c.as_dict()
        d["block_k"] = max(16, c.block_k // 2)
        if "group_n" in d:
            d["group_n"] = 1
        c32 = type(c)(**d)
        if c32 not in out:
            out.append(c32)
    return out


def gemm_configs(arch: str, regime_: str, schedule_: str, element_size: int, precision: str) -> list[GemmConfig]:
    """The configs the autotuner tries for this case (one fixed config for fp64 and for fp32 without
    TF32, whose dots run on the FMA units: correctness paths)."""
    if element_size == 8 or (element_size == 4 and precision == "ieee"):
        return [EXACT_CONFIG[(element_size, schedule_)]]
    table = _TABLES_16BIT[(arch, regime_, schedule_)]
    return _for_fp32(table) if element_size == 4 else list(table)


def proj_configs(arch: str, rclass: str, element_size: int, precision: str) -> list[ProjConfig]:
    if element_size == 8 or (element_size == 4 and precision == "ieee"):
        return [EXACT_PROJ_CONFIG[element_size]]
    table = _PROJ_TABLES_16BIT[(arch, rclass)]
    return _for_fp32(table) if element_size == 4 else list(table)


def grad_r_num_warps(element_size: int, precision: str) -> int:
    """8 warps for the FMA dots (fp64, fp32 without TF32): with 4, fp32 spilled 256-352 bytes on sm_80."""
    return 8 if element_size == 8 or (element_size == 4 and precision == "ieee") else 4


def grad_r_block_j(rp: int) -> int:
    return min(rp, 64)
