"""Many adapters in one batch on the Triton backend: row i uses adapter ids[i] of the bank R (n, r, r).

    y_i      = x_i Wᵀ + b + s_i·((x_i A) R[id_i]) B          xa = x A
    grad_x_i = g_i W + s_i·((g_i Bᵀ) R[id_i]ᵀ) Aᵀ              grad_R[k] = s_k Σ_{id_i = k} (x_i A)ᵀ (g_i Bᵀ)

with s_i = scaling·adapter_scaling[id_i] (or scaling), and id -1 the base layer alone.

forward: two launches. x_p_per_row_q_kernel (per_row_r.py) writes xa = x A and T_i = s_i·xa_i R[id_i]
    (M×r, each row gathering its own R from the bank); gemm_rank_r_kernel's split schedule with T_GIVEN
    writes y = [x | T]·[Wᵀ ; B] + b.
backward: the same two launches on (g, W, Bᵀ, Rᵀ, Aᵀ) give u = g Bᵀ, T and grad_x (only u when grad_x
    is not wanted); grad_R by grad_r_segments_kernel over the rows grouped by adapter (a stable device
    sort of the ids and a searchsorted for the segment bounds: no device-to-host copy, no atomics,
    bitwise reproducible).

Launch configs are fixed, not autotuned: the GEMM takes the first entry of the split schedule's table
for the architecture and regime (gemm_table_config; fp64 its own), the two new kernels the rules in
per_row_config / GRAD_R_SEGMENTS_*; tools/aot_report.py compiles exactly these. The interpreter takes
small fixed tiles (configs.INTERPRET_CONFIG for the GEMM).

Inputs are validated by the op (csrc/multi_contract.cpp, ops/multi.py) before this module is called:
ids in [-1, n), shapes and dtypes consistent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import triton

from . import INTERPRETED, _arch, _device_guard, _precision, _split_scaling, configs, padded_rank, zero_feature_forward
from . import backward_launch_args, forward_launch_args
from .gemm_rank_r import gemm_rank_r_kernel
from .grad_r_segments import grad_r_segments_kernel
from .per_row_r import x_p_per_row_q_kernel

_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class PerRowConfig:
    block_m: int
    block_k: int
    block_c: int  # columns of T per gather step
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_K": self.block_k, "BLOCK_C": self.block_c}

    def as_dict(self) -> dict:
        return asdict(self)


# The gather step holds a BLOCK_M × RP × BLOCK_C slab of the bank and its products with U in the
# accumulator type: 64 values per thread (fp64: 32), 8,192 over 4 warps; per_row_config derives
# BLOCK_C from it. Measured in the AOT report (sm_80 and sm_90, every dtype): no spill at RP = 16..256
# with these rules; 64-row tiles (what wgmma needs) fit at RP <= 64 with 8 warps (191 registers at RP = 64)
# and spilled 384 bytes at RP = 128 and 256 (4 or 8 warps), so those ranks keep 16/32-row tiles and
# mma.sync (the projection is memory-bound on x there anyway: 2·RP FLOPs per element of x).
PER_ROW_VALUES_PER_THREAD = {4: 64, 8: 32}
# Few rows (decoding): 16-row tiles, for more programs streaming x (M = 64: 4 programs).
PER_ROW_SMALL_M = 128
GRAD_R_SEGMENTS_BLOCK_M = 32


def per_row_budget(element_size: int, num_warps: int) -> int:
    return PER_ROW_VALUES_PER_THREAD[8 if element_size == 8 else 4] * 32 * num_warps


def per_row_config(M: int, rp: int, element_size: int, precision: str, arch: str = "sm80", *,
                   interpreted: bool = INTERPRETED) -> PerRowConfig:
    """The per-row kernel's tiles: fixed rules, no autotune. Under the interpreter, small tiles."""
    fma = element_size == 8 or (element_size == 4 and precision == "ieee")
    if interpreted or M <= PER_ROW_SMALL_M:
        block_m, num_warps = 16, 4
    elif arch == "sm90" and rp <= 64 and not fma:
        block_m, num_warps = 64, 8  # one wgmma is 64 rows per warpgroup
    else:
        num_warps = 8 if fma else 4
        # RP = 256: 16 rows (fp32 without TF32 spilled 40 bytes on sm_80 with 32 rows and BLOCK_C 2).
        block_m = 32 if rp < 256 and 32 * rp * 2 <= per_row_budget(element_size, num_warps) else 16
    block_c = max(1, min(rp, per_row_budget(element_size, num_warps) // (block_m * rp)))
    if interpreted:
        return PerRowConfig(block_m, 32, block_c, num_warps, 1)
    block_k = 64 if element_size == 2 else 32
    return PerRowConfig(block_m, block_k, block_c, num_warps, 2 if element_size == 8 else 3)


def grad_r_segments_config(rp: int, element_size: int, precision: str) -> dict:
    block = min(rp, 64)
    return dict(BLOCK_I=block, BLOCK_J=block, BLOCK_M=GRAD_R_SEGMENTS_BLOCK_M,
                num_warps=configs.grad_r_num_warps(element_size, precision), num_stages=2)


# fp64 with T given: the split schedule's fixed 16×32×16 (8 warps, 1 stage) spilled 8 bytes in the
# forward on sm_90 under triton 3.6.0; 32×32×16 spills under none of 3.6.0, 3.8.0, 3.9.0 (AOT report).
T_GIVEN_FP64_CONFIG = configs.GemmConfig(32, 32, 16, 1, 8, 1)


def gemm_table_config(arch: str, regime: str, element_size: int, precision: str) -> configs.GemmConfig:
    """The GEMM config a GPU runs with T given: the split table's first entry (no autotuning)."""
    if element_size == 8:
        return T_GIVEN_FP64_CONFIG
    return configs.gemm_configs(arch, regime, "split", element_size, precision)[0]


def gemm_config(x: torch.Tensor, M: int, precision: str) -> configs.GemmConfig:
    """The GEMM's fixed config: forced (tests), the interpreter's, or gemm_table_config."""
    from . import _forced

    if _forced is not None:
        return _forced
    if INTERPRETED:
        return configs.INTERPRET_CONFIG
    return gemm_table_config(_arch(x.device), configs.regime(M), x.element_size(), precision)


def _span(shape, strides) -> int:
    """The largest element offset a view reaches (0 for an empty one)."""
    if any(n == 0 for n in shape):
        return 0
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides))


# ------------------------------------------------------------------------------------- launchers
# Used by tools/aot_report.py on meta tensors too.
def per_row_launch_args(direction, x, weight, A, R, B, ids, adapter_scaling, scaling, u, t):
    """Arguments of x_p_per_row_q_kernel: U = X·P into u (None: not stored), T_i = s_i·U_i·Q[id_i] into
    t (None: not formed). forward: P = A, Q = R; backward: P = Bᵀ, Q = Rᵀ (strides swapped)."""
    M, K = x.shape
    r = A.shape[1]
    if direction == "forward":
        p, p_kr, q_nij = A, (A.stride(0), A.stride(1)), (R.stride(0), R.stride(1), R.stride(2))
    else:
        p, p_kr, q_nij = B, (B.stride(1), B.stride(0)), (R.stride(0), R.stride(2), R.stride(1))
    idx64 = max(_span((M, K), x.stride()), _span((K, r), p_kr), _span(R.shape, q_nij), _span((M,), ids.stride()),
                _span((M, r), u.stride()) if u is not None else 0,
                _span((M, r), t.stride()) if t is not None else 0) > _INT32_LIMIT
    hi, lo = _split_scaling(scaling)
    kwargs = dict(
        M=M, K=K, R=r, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_pk=p_kr[0], stride_pr=p_kr[1],
        stride_qn=q_nij[0], stride_qi=q_nij[1], stride_qj=q_nij[2], stride_ids=ids.stride(0),
        stride_as=adapter_scaling.stride(0) if adapter_scaling is not None else 0,
        stride_um=u.stride(0) if u is not None else 0, stride_ur=u.stride(1) if u is not None else 0,
        stride_tm=t.stride(0) if t is not None else 0, stride_tr=t.stride(1) if t is not None else 0,
        scaling=hi, scaling_lo=lo,
        STORE_U=u is not None, FORM_T=t is not None, HAS_ASCALE=adapter_scaling is not None,
        RP=padded_rank(r), PRECISION=_precision(x.dtype), IDX64=idx64,
    )
    # Unused pointer slots get a live tensor; the constexpr flags keep them untouched.
    args = (x, p, R, ids, adapter_scaling if adapter_scaling is not None else x,
            u if u is not None else x, t if t is not None else x)
    return args, kwargs


def multi_gemm_launch_args(direction, x, weight, bias, A, R, B, scaling, out, t):
    """gemm_rank_r_kernel's split schedule with T given: out = [X | T]·[Wt ; S] (+ b)."""
    R0 = R[0]  # Q is not read when T is given; R0 only gives the builders r and a live pointer.
    if direction == "forward":
        args, kwargs = forward_launch_args(x, weight, bias, A, R0, B, scaling, out, t, u_given=True)
    else:
        args, kwargs = backward_launch_args(x, weight, A, R0, B, scaling, out, t, u_given=True)
    kwargs["T_GIVEN"] = True
    return args, kwargs


def grad_r_segments_launch_args(xa, u, perm, bounds, adapter_scaling, scaling, grad_R):
    M, r = xa.shape
    hi, lo = _split_scaling(scaling)
    idx64 = max(_span((M, r), xa.stride()), _span((M, r), u.stride()), _span(grad_R.shape, grad_R.stride())) \
        > _INT32_LIMIT
    args = (xa, u, perm, bounds, adapter_scaling if adapter_scaling is not None else xa, grad_R, r,
            xa.stride(0), xa.stride(1), u.stride(0), u.stride(1),
            adapter_scaling.stride(0) if adapter_scaling is not None else 0,
            grad_R.stride(0), grad_R.stride(1), grad_R.stride(2), hi, lo)
    cfg = grad_r_segments_config(padded_rank(r), xa.element_size(), _precision(xa.dtype))
    kwargs = dict(HAS_ASCALE=adapter_scaling is not None, PRECISION=_precision(xa.dtype), IDX64=idx64,
                  BLOCK_I=cfg["BLOCK_I"], BLOCK_J=cfg["BLOCK_J"], BLOCK_M=cfg["BLOCK_M"])
    return args, kwargs, cfg


def _launch_per_row(args, kwargs):
    M = kwargs["M"]
    x = args[0]
    c = per_row_config(M, kwargs["RP"], x.element_size(), kwargs["PRECISION"], _arch(x.device) if x.is_cuda else "sm80")
    x_p_per_row_q_kernel[(triton.cdiv(M, c.block_m),)](*args, **kwargs, **c.meta(), num_warps=c.num_warps,
                                                       num_stages=c.num_stages)


def _launch_gemm(args, kwargs):
    x = args[0]
    M, N = kwargs["M"], kwargs["N"]
    c = gemm_config(x, M, kwargs["PRECISION"])
    grid = (triton.cdiv(M, c.block_m) * max(1, triton.cdiv(N, c.block_n * c.group_n)),)
    gemm_rank_r_kernel[grid](*args, **kwargs, **c.meta(), num_warps=c.num_warps, num_stages=c.num_stages)


def segments(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, bounds): rows grouped by adapter, each group in the rows' original order (stable sort),
    and adapter k's rows perm[bounds[k]:bounds[k+1]] (-1 rows sort first, outside every group). On the
    device, no synchronisation."""
    sorted_ids, perm = torch.sort(ids, stable=True)
    bounds = torch.searchsorted(sorted_ids, torch.arange(n + 1, device=ids.device, dtype=ids.dtype))
    return perm, bounds


def _grad_r(xa, u, ids, adapter_scaling, scaling, grad_R):
    perm, bounds = segments(ids, grad_R.shape[0])
    args, kwargs, cfg = grad_r_segments_launch_args(xa, u, perm, bounds, adapter_scaling, scaling, grad_R)
    r = xa.shape[1]
    grid = (grad_R.shape[0], triton.cdiv(r, cfg["BLOCK_I"]), triton.cdiv(r, cfg["BLOCK_J"]))
    grad_r_segments_kernel[grid](*args, **kwargs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _rows_operand(t: torch.Tensor) -> torch.Tensor:
    # The K loop steps pointers by BLOCK_K·stride in int32 (as in the single-adapter backend).
    return t.contiguous() if t.stride(1) * 256 > _INT32_LIMIT else t


# ------------------------------------------------------------------------------------ interface
def forward_multi(x, weight, bias, A, R, B, ids, scaling: float, adapter_scaling):
    """x (M, in) any strides, R (n, r, r), ids (M,) int32/int64 in [-1, n) → (y (M, out), x A (M, r)),
    both in x's dtype. Two launches."""
    M, r = x.shape[0], A.shape[1]
    y = torch.empty((M, weight.shape[0]), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, r), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, xa
    if 0 in weight.shape:
        return zero_feature_forward(x, A, bias, y, xa)
    x = _rows_operand(x)
    t = torch.empty((M, r), device=x.device, dtype=x.dtype)
    with _device_guard(x):
        _launch_per_row(*per_row_launch_args("forward", x, weight, A, R, B, ids, adapter_scaling, scaling, xa, t))
        _launch_gemm(*multi_gemm_launch_args("forward", x, weight, bias, A, R, B, scaling, y, t))
    return y, xa


def backward_multi(grad_out, xa, weight, A, R, B, ids, scaling: float, adapter_scaling, need_x: bool,
                   need_R: bool):
    """grad_out (M, out) any strides → (grad_x (M, in) in grad_out's dtype or None, grad_R (n, r, r) in R's
    dtype or None; zeros for adapters no row used). xa is read only for grad_R."""
    if not (need_x or need_R):
        return None, None
    M = grad_out.shape[0]
    r = A.shape[1]
    dev = grad_out.device
    grad_x = torch.empty((M, weight.shape[1]), device=dev, dtype=grad_out.dtype) if need_x else None
    if M == 0:
        return grad_x, (torch.zeros(R.shape, device=dev, dtype=R.dtype) if need_R else None)
    if 0 in weight.shape:  # as in the single-adapter backward: both gradients are zero
        grad_R = torch.zeros(R.shape, device=dev, dtype=R.dtype) if need_R else None
        return (grad_x.zero_() if need_x else None), grad_R
    g = _rows_operand(grad_out)
    u = torch.empty((M, r), device=dev, dtype=g.dtype) if need_R else None
    t = torch.empty((M, r), device=dev, dtype=g.dtype) if need_x else None
    grad_R = torch.empty(R.shape, device=dev, dtype=R.dtype) if need_R else None
    with _device_guard(g):
        _launch_per_row(*per_row_launch_args("backward", g, weight, A, R, B, ids, adapter_scaling, scaling, u, t))
        if need_x:
            _launch_gemm(*multi_gemm_launch_args("backward", g, weight, None, A, R, B, scaling, grad_x, t))
        if need_R:
            _grad_r(xa, u, ids, adapter_scaling, scaling, grad_R)
    return grad_x, grad_R
