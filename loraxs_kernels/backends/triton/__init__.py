"""The "triton" backend: LoRA-XS as fused Triton kernels (design and measurements: docs/triton.md).

forward, padded rank RP <= 64 ("fused"): one launch of gemm_rank_r_kernel writes y = x Wᵀ + b +
    s·((x A) R) B once, and x A.
forward, RP > 64 ("split"): x_p_kernel writes x A, then gemm_rank_r_kernel writes
    y = [x | T]·[Wᵀ ; B] + b with T = s·(x A) R formed per tile (r extra K columns). Two launches.
backward: the same kernels on the transposed operands give grad_x = g W + s·((g Bᵀ) Rᵀ) Aᵀ and
    u = g Bᵀ (from the same read of g when fused); then grad_R = s·(x A)ᵀ u by a split reduction in
    fixed order (xa_t_u_splits_kernel, plus sum_splits_kernel when M needs more than one split).

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
this module is imported). fp16, bf16 and fp32 are tuned (fp32 honours torch's TF32 matmul switch);
fp64 runs with one fixed config, for correctness only.

The op reaches this module from the C++ kernels of torch.ops.loraxs.linear_fwd / linear_bwd (opaque
ops: Inductor sees one node and never splits the fused kernel; see docs/triton.md) through
loraxs::py_fwd / py_bwd, only when the call runs "triton".
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct

import torch
import triton

from . import configs
from .configs import GemmConfig, ProjConfig
from .gemm_rank_r import gemm_rank_r_kernel
from .grad_r import sum_splits_kernel, xa_t_u_splits_kernel
from .low_rank_projection import x_p_kernel

NAME = "triton"

# triton.jit picks the interpreter when the kernel modules are imported, so what counts is the
# environment at that moment, not at call time.
INTERPRETED = type(gemm_rank_r_kernel).__name__ == "InterpretedFunction"

_INT32_LIMIT = 2**31 - 1
# LORAXS_TRITON_AUTOTUNE=0: take the first entry of each table instead of timing them all on the first
# call of each shape (the GPU tests use it so that a new shape costs a compile, not a tuning sweep).
AUTOTUNE_ENV = "LORAXS_TRITON_AUTOTUNE"
_forced: GemmConfig | None = None
_forced_proj: ProjConfig | None = None


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "backend 'triton' needs a CUDA device, and torch sees none"
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("backend 'triton' on CPU tensors needs the Triton interpreter, but TRITON_INTERPRET=1 was set "
                    "after the backend was imported; set it before importing loraxs_kernels' Triton backend")
        return ("backend 'triton' runs CPU tensors only under the Triton interpreter (set TRITON_INTERPRET=1 "
                "before importing triton); use backend 'cpp' or 'torch' on the CPU")
    return f"backend 'triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); tensors are on {device}"


@contextlib.contextmanager
def forced_config(config: GemmConfig | None = None, proj: ProjConfig | None = None):
    """Run the kernels with these configs instead of autotuning (tests use it to cover the tables)."""
    global _forced, _forced_proj
    previous = _forced, _forced_proj
    _forced, _forced_proj = config, proj
    try:
        yield
    finally:
        _forced, _forced_proj = previous


# --------------------------------------------------------------------------------------- helpers
def _next_pow2(n: int) -> int:
    # Not triton.next_power_of_2: a constexpr_function, ~6 µs a call from host code (measured).
    return 1 << max(0, n - 1).bit_length()


def padded_rank(r: int) -> int:
    """r rounded up to a power of two >= 16: tl.dot tiles are powers of two with sides >= 16."""
    return max(16, _next_pow2(r))


def _split_scaling(s: float) -> tuple[float, float]:
    """s as fp32 hi + lo: Triton passes Python floats as fp32, and fp64 kernels need all of s."""
    hi = struct.unpack("f", struct.pack("f", s))[0]
    return hi, struct.unpack("f", struct.pack("f", s - hi))[0]


def _tf32_allowed() -> bool:
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy flag once the new API was used
        return False


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and not INTERPRETED and _tf32_allowed() else "ieee"


def _needs_int64(*views) -> bool:
    """True when some 2-D view, given as ((rows, cols), (row stride, col stride)), reaches an element
    offset beyond int32."""
    for (n0, n1), (s0, s1) in views:
        if n0 > 0 and n1 > 0 and (n0 - 1) * abs(s0) + (n1 - 1) * abs(s1) > _INT32_LIMIT:
            return True
    return False


def _device_guard(t: torch.Tensor):
    # Triton launches on the current device; the tensors may live on another one.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _arch(device: torch.device) -> str:
    return configs.arch_name(torch.cuda.get_device_capability(device))


_GEMM_KEY = ["M_BUCKET", "N", "K", "RP", "U_GIVEN", "HAS_BIAS", "STORE_U", "W_KMAJOR"]
_PROJ_KEY = ["M_BUCKET", "K", "RP"]


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, cfgs: tuple):
    kernel, key = (gemm_rank_r_kernel, _GEMM_KEY) if kind == "gemm" else (x_p_kernel, _PROJ_KEY)
    return triton.autotune(
        configs=[triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs],
        key=key,
    )(kernel)


def _launch(kind, grid, args, kwargs, x, cfgs_fn):
    """Launch with the forced or interpreter config, the only config, or the autotuner."""
    config = _forced if kind == "gemm" else _forced_proj
    if config is None and INTERPRETED:
        config = configs.INTERPRET_CONFIG if kind == "gemm" else configs.INTERPRET_PROJ_CONFIG
    if config is None:
        cfgs = tuple(cfgs_fn(_arch(x.device)))
        # Autotuning times every config with synchronising launches, which a CUDA graph capture
        # forbids: inside a capture each kernel takes its table's first config.
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if len(cfgs) > 1 and os.environ.get(AUTOTUNE_ENV, "1") != "0" and not capturing:
            _autotuned(kind, cfgs)[grid](*args, **kwargs)
            return
        config = cfgs[0]
    kernel = gemm_rank_r_kernel if kind == "gemm" else x_p_kernel
    kernel[grid](*args, **kwargs, **config.meta(), num_warps=config.num_warps, num_stages=config.num_stages)


# ------------------------------------------------------------------------------------- launchers
# The *_launch_args builders are also used by tools/aot_report.py on meta tensors, so the report
# compiles the specialisations these launchers produce.
def gemm_launch_args(x, w, w_kn, bias, p, p_kr, q, q_ij, s, s_rn, N, y, u, u_given, scaling):
    """Arguments of gemm_rank_r_kernel (minus the tile config) for Y = X·Wt + b + T·S, T = s·((X·P)·Q).
    u_given False (fused): U = X·P is formed in the kernel and stored into u unless u is None.
    u_given True (split): U is read from u. Operands come as (tensor, its strides in the kernel's
    (row, column) order)."""
    M, K = x.shape
    r = q.shape[0]
    rp = padded_rank(r)
    idx64 = _needs_int64(((M, K), x.stride()), ((K, N), w_kn), ((M, N), y.stride()), ((r, N), s_rn),
                         ((M, r), u.stride() if u is not None else (0, 0)))
    hi, lo = _split_scaling(scaling)
    kwargs = dict(
        M=M, N=N, K=K, R=r,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wk=w_kn[0], stride_wn=w_kn[1],
        stride_b=bias.stride(0) if bias is not None else 0,
        stride_pk=p_kr[0], stride_pr=p_kr[1], stride_qi=q_ij[0], stride_qj=q_ij[1],
        stride_sr=s_rn[0], stride_sn=s_rn[1], stride_ym=y.stride(0), stride_yn=y.stride(1),
        stride_um=u.stride(0) if u is not None else 0, stride_ur=u.stride(1) if u is not None else 0,
        scaling=hi, scaling_lo=lo,
        M_BUCKET=min(_next_pow2(M), 1 << 16), W_KMAJOR=int(w_kn[0] == 1),
        U_GIVEN=u_given, HAS_BIAS=bias is not None, STORE_U=u is not None and not u_given,
        RP=rp, BLOCK_T=min(rp, configs.SPLIT_T_CHUNK), PRECISION=_precision(x.dtype), IDX64=idx64,
        GROUP_M=configs.GROUP_M,
    )
    # Unused pointer slots get a live tensor of the right dtype; the constexpr flags keep them untouched.
    args = (x, w, bias if bias is not None else x, p, q, s, y, u if u is not None else x)
    return args, kwargs


def proj_launch_args(x, p, p_kr, r, u):
    """Arguments of x_p_kernel: U = X·P into u."""
    M, K = x.shape
    idx64 = _needs_int64(((M, K), x.stride()), ((M, r), u.stride()))
    kwargs = dict(
        M=M, K=K, R=r, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_pk=p_kr[0], stride_pr=p_kr[1],
        stride_um=u.stride(0), stride_ur=u.stride(1), M_BUCKET=min(_next_pow2(M), 1 << 16),
        RP=padded_rank(r), PRECISION=_precision(x.dtype), IDX64=idx64,
    )
    return (x, p, u), kwargs


def _operands(direction, weight, A, R, B):
    """(Wt, P, Q, S) as (tensor, strides) for the forward (Wᵀ, A, R, B) or grad_x (W, Bᵀ, Rᵀ, Aᵀ)."""
    if direction == "forward":
        return ((weight, (weight.stride(1), weight.stride(0))), (A, (A.stride(0), A.stride(1))),
                (R, (R.stride(0), R.stride(1))), (B, (B.stride(0), B.stride(1))))
    return ((weight, (weight.stride(0), weight.stride(1))), (B, (B.stride(1), B.stride(0))),
            (R, (R.stride(1), R.stride(0))), (A, (A.stride(1), A.stride(0))))


def forward_launch_args(x, weight, bias, A, R, B, scaling, y, xa, u_given=False):
    (w, w_kn), (p, p_kr), (q, q_ij), (s, s_rn) = _operands("forward", weight, A, R, B)
    return gemm_launch_args(x, w, w_kn, bias, p, p_kr, q, q_ij, s, s_rn, weight.shape[0], y, xa, u_given, scaling)


def backward_launch_args(grad_out, weight, A, R, B, scaling, grad_x, u, u_given=False):
    (w, w_kn), (p, p_kr), (q, q_ij), (s, s_rn) = _operands("backward", weight, A, R, B)
    return gemm_launch_args(grad_out, w, w_kn, None, p, p_kr, q, q_ij, s, s_rn, weight.shape[1], grad_x, u,
                            u_given, scaling)


def projection_launch_args(direction, x, weight, A, R, B, u):
    _, (p, p_kr), _, _ = _operands(direction, weight, A, R, B)
    return proj_launch_args(x, p, p_kr, A.shape[1], u)


def _launch_gemm(args, kwargs):
    x = args[0]
    M, N = kwargs["M"], kwargs["N"]
    schedule = "split" if kwargs["U_GIVEN"] else "fused"

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * max(1, triton.cdiv(N, meta["BLOCK_N"] * meta["GROUP_N"])),)

    _launch("gemm", grid, args, kwargs, x,
            lambda arch: configs.gemm_configs(arch, configs.regime(M), schedule, x.element_size(), kwargs["PRECISION"]))


def _launch_projection(args, kwargs):
    x = args[0]
    M = kwargs["M"]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    _launch("proj", grid, args, kwargs, x,
            lambda arch: configs.proj_configs(arch, configs.rank_class(kwargs["RP"]), x.element_size(),
                                              kwargs["PRECISION"]))


def grad_r_splits(M: int, r: int) -> tuple[int, int]:
    """(number of splits, rows per split) of the grad_R reduction: a function of M and r only, so the
    order of the additions, and hence grad_R's bits, never change between calls."""
    rp = padded_rank(r)
    tiles = triton.cdiv(r, configs.GRAD_R_BLOCK_I) * triton.cdiv(r, configs.grad_r_block_j(rp))
    max_splits = max(1, configs.GRAD_R_MAX_PROGRAMS // tiles)
    rows_per_split = max(configs.GRAD_R_MIN_ROWS_PER_SPLIT,
                         triton.cdiv(triton.cdiv(M, max_splits), configs.GRAD_R_BLOCK_M) * configs.GRAD_R_BLOCK_M)
    return triton.cdiv(M, rows_per_split), rows_per_split


def grad_r_launch_args(xa, u, out, rows_per_split, final, scaling):
    """Arguments of xa_t_u_splits_kernel; `out` is grad_R (final) or the fp32 partials [splits, r, r]."""
    M, r = xa.shape
    hi, lo = _split_scaling(scaling)
    args = (xa, u, out, M, r, rows_per_split, xa.stride(0), xa.stride(1), u.stride(0), u.stride(1), hi, lo)
    kwargs = dict(FINAL=final, PRECISION=_precision(xa.dtype),
                  IDX64=_needs_int64(((M, r), xa.stride()), ((M, r), u.stride())),
                  BLOCK_I=configs.GRAD_R_BLOCK_I, BLOCK_J=configs.grad_r_block_j(padded_rank(r)),
                  BLOCK_M=configs.GRAD_R_BLOCK_M)
    return args, kwargs


def sum_splits_launch_args(partials, grad_R, scaling):
    hi, lo = _split_scaling(scaling)
    return (partials, grad_R, grad_R.numel(), partials.shape[0], hi, lo), dict(BLOCK=configs.SUM_SPLITS_BLOCK)


def _grad_r(xa, u, grad_R, scaling):
    """grad_R = s·xaᵀ u (r×r, R's dtype), reduced over M in fp32 (fp64 for fp64) in a fixed order."""
    M, r = xa.shape
    splits, rows_per_split = grad_r_splits(M, r)
    final = splits == 1
    acc_dtype = torch.float64 if xa.dtype == torch.float64 else torch.float32
    out = grad_R if final else torch.empty((splits, r, r), device=xa.device, dtype=acc_dtype)
    args, kwargs = grad_r_launch_args(xa, u, out, rows_per_split, final, scaling)
    grid = (splits, triton.cdiv(r, kwargs["BLOCK_I"]), triton.cdiv(r, kwargs["BLOCK_J"]))
    num_warps = configs.grad_r_num_warps(xa.element_size(), kwargs["PRECISION"])
    xa_t_u_splits_kernel[grid](*args, **kwargs, num_warps=num_warps, num_stages=configs.GRAD_R_NUM_STAGES)
    if not final:
        args, kwargs = sum_splits_launch_args(out, grad_R, scaling)
        grid = (triton.cdiv(r * r, kwargs["BLOCK"]),)
        sum_splits_kernel[grid](*args, **kwargs, num_warps=configs.SUM_SPLITS_NUM_WARPS)


# ------------------------------------------------------------------------------------ interface
def zero_feature_forward(x, A, bias, y, xa):
    """A layer with in or out features = 0 launches nothing (a zero-width grid and an empty K loop are
    corner cases the kernels were not written for). in = 0: x A is exactly 0; out = 0: y is empty. Either
    way y = b and the rank-r term vanishes."""
    if A.shape[0] == 0:
        xa.zero_()
    else:
        torch.mm(x, A, out=xa)
    if bias is not None:
        y.copy_(bias.expand_as(y))
    else:
        y.zero_()
    return y, xa


def forward(x, weight, bias, A, R, B, scaling):
    """x: (M, in), any strides → (y (M, out), x A (M, r)), both in x's dtype.

    One kernel launch for padded rank <= 64, two above (see configs.schedule)."""
    M, r = x.shape[0], A.shape[1]
    out_features = weight.shape[0]
    y = torch.empty((M, out_features), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, r), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, xa
    if 0 in weight.shape:
        return zero_feature_forward(x, A, bias, y, xa)
    if x.stride(1) * 256 > _INT32_LIMIT:
        # The K loop steps pointers by BLOCK_K·stride in int32; a K stride this large only comes from a
        # transposed view of a huge x, where one copy is cheaper than int64 arithmetic in every step.
        x = x.contiguous()
    with _device_guard(x):
        if configs.schedule(padded_rank(r)) == "fused":
            _launch_gemm(*forward_launch_args(x, weight, bias, A, R, B, scaling, y, xa))
        else:
            _launch_projection(*projection_launch_args("forward", x, weight, A, R, B, xa))
            _launch_gemm(*forward_launch_args(x, weight, bias, A, R, B, scaling, y, xa, u_given=True))
    return y, xa


def backward(grad_out, xa, weight, A, R, B, scaling, need_x: bool, need_R: bool):
    """grad_out: (M, out), any strides → (grad_x (M, in) in grad_out's dtype or None, grad_R (r, r)
    in R's dtype or None). xa is read only for grad_R."""
    M = grad_out.shape[0]
    in_features, r = weight.shape[1], A.shape[1]
    dev = grad_out.device
    if not (need_x or need_R):
        return None, None
    grad_x = torch.empty((M, in_features), device=dev, dtype=grad_out.dtype) if need_x else None
    if M == 0:
        return grad_x, (torch.zeros((r, r), device=dev, dtype=R.dtype) if need_R else None)
    if 0 in weight.shape:  # x A = 0 (in = 0) or g Bᵀ = 0 (out = 0): both gradients are zero
        grad_R = torch.zeros((r, r), device=dev, dtype=R.dtype) if need_R else None
        return (grad_x.zero_() if need_x else None), grad_R
    fused = need_x and configs.schedule(padded_rank(r)) == "fused"
    grad_R = torch.empty((r, r), device=dev, dtype=R.dtype) if need_R else None
    # u = g Bᵀ: grad_R's input, and the split GEMM's (it forms T = s·u Rᵀ from it).
    u = torch.empty((M, r), device=dev, dtype=grad_out.dtype) if (need_R or not fused) else None
    if grad_out.stride(1) * 256 > _INT32_LIMIT:  # as in forward
        grad_out = grad_out.contiguous()
    g = grad_out
    with _device_guard(g):
        if fused:  # grad_x and u from one read of g
            _launch_gemm(*backward_launch_args(g, weight, A, R, B, scaling, grad_x, u))
        else:
            _launch_projection(*projection_launch_args("backward", g, weight, A, R, B, u))
            if need_x:
                _launch_gemm(*backward_launch_args(g, weight, A, R, B, scaling, grad_x, u, u_given=True))
        if need_R:
            _grad_r(xa, u, grad_R, scaling)
    return grad_x, grad_R
