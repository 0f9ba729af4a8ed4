"""Shared test inputs and tolerances. Every backend is compared to the fp64 reference.

Tolerances are relative to the largest reference magnitude: max|out - ref| <= TOL[dtype] * max|ref|.
They cover one rounding of the output plus fp32-accumulated dot products of a few thousand terms
in the compute dtype (fp16: 2^-11 ≈ 4.9e-4 per rounding; bf16: 2^-8 ≈ 3.9e-3).
"""

from __future__ import annotations

import math

import torch

from loraxs_kernels import reference

TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

# (leading dims of x, in, out, r): normal shapes first, then the weird ones.
SHAPES = [
    ((64,), 128, 96, 16),
    ((4, 33), 64, 80, 8),       # 3-D x
    ((1,), 48, 40, 4),          # M = 1 (decoding)
    ((17,), 31, 45, 1),         # odd sizes, r = 1
    ((2, 3, 5), 40, 24, 7),     # 4-D x, r not a power of two
    ((0,), 32, 16, 4),          # empty batch
    ((300,), 40, 30, 12),       # M large enough that the merged schedule runs
]


def make_inputs(lead=(64,), in_features=128, out_features=96, rank=16, dtype=torch.float32, device="cpu",
                bias=True, r_dtype=None, seed=0, requires_grad=True):
    """x ~ N(0, 1); W, b like nn.Linear; A, B from the SVD of Wᵀ (as the module builds them); R ~ N(0, 1/r)
    so the low-rank term is of the same order as the base term and a wrong low-rank path shows."""
    from loraxs_kernels.modules.svd_init import svd_factors

    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)
    w = (torch.rand(out_features, in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(out_features, generator=g, dtype=torch.float64) * 2 - 1) * bound if bias else None
    A, B = svd_factors(w, rank)
    x = torch.randn(*lead, in_features, generator=g, dtype=torch.float64)
    R = torch.randn(rank, rank, generator=g, dtype=torch.float64) / math.sqrt(rank)
    to = dict(device=device, dtype=dtype)
    x, w, A, B = x.to(**to), w.to(**to), A.to(**to), B.to(**to)
    b = b.to(**to) if b is not None else None
    R = R.to(device=device, dtype=r_dtype or dtype)
    x.requires_grad_(requires_grad)
    R.requires_grad_(requires_grad)
    return x, w, b, A, R, B


def reference_fp64(x, w, b, A, R, B, scaling, grad_out=None):
    """(y, grad_x, grad_R) of the reference in fp64, for inputs of any dtype."""
    d = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
    x64, R64 = d(x).requires_grad_(), d(R).requires_grad_()
    y = reference.loraxs_linear(x64, d(w), d(b), d(A), R64, d(B), scaling)
    if grad_out is None:
        return y, None, None
    gx, gR = torch.autograd.grad(y, (x64, R64), d(grad_out))
    return y, gx, gR


def assert_close(actual, expected, dtype, what="", scale=None):
    """max|actual - expected| <= TOL[dtype] * max(max|expected|, 1e-30).

    scale: a tensor (or float) whose max magnitude replaces max|expected| as the yardstick, e.g. the
    rounding-error bound from abs_bounds() where the result may cancel (see there)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max().item()
    if scale is None:
        scale = expected
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().abs().max().item() if scale.numel() else 0.0
    scale = max(scale, 1e-30)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} > {TOL[dtype]:.1e} * {scale:.3e} ({dtype})"


# ------------------------------------------------------------------------------------------------
# Additions for the core suite (test_op.py, test_native.py, test_properties.py, ...).

import os  # noqa: E402

import pytest  # noqa: E402

# Every dtype the op takes on CPU, widest first.
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def native_reason():
    """None when the C++ extension (backend "cpp") is loaded and has a CPU kernel, else why not."""
    from loraxs_kernels import backends

    return backends.unavailable_reason("cpp", torch.device("cpu"))


def allow_no_native() -> bool:
    """CI must never skip the C++ build silently: a missing extension fails the native tests unless
    LORAXS_ALLOW_NO_NATIVE=1 says that is expected on this machine."""
    return os.environ.get("LORAXS_ALLOW_NO_NATIVE") == "1"


def cpu_backends():
    """pytest params for the CPU backends: "torch" always, "cpp" unless it is missing and that is
    explicitly allowed (then skipped with the reason; otherwise it runs, and fails loudly)."""
    reason = native_reason()
    cpp_marks = [pytest.mark.skip(reason=reason)] if (reason is not None and allow_no_native()) else []
    return [pytest.param("torch", id="torch"), pytest.param("cpp", id="cpp", marks=cpp_marks)]


def run_fwd_bwd(fn, x, R, grad_out=None, seed=1):
    """y = fn(x, R); backward with grad_out (random N(0,1) of y's shape when None).
    Returns (y, grad_out, x.grad, R.grad); x and R are leaves that may or may not require grad."""
    x.grad = None
    R.grad = None
    y = fn(x, R)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    if y.requires_grad:
        y.backward(grad_out)
    return y, grad_out, x.grad, R.grad


def abs_bounds(x, w, b, A, R, B, scaling, grad_out):
    """The textbook rounding-error yardsticks of y, grad_x and grad_R: each formula evaluated on
    absolute values (|fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γ·Σ|aᵢ||bᵢ|), in fp64.

        |y|     ≤ |x||W|ᵀ + |b| + |s|·((|x||A|)|R|)|B|
        |g_x|   ≤ |g||W| + |s|·((|g||B|ᵀ)|R|ᵀ)|A|ᵀ
        |g_R|   ≤ |s|·(|x||A|)ᵀ(|g||B|ᵀ)

    max|expected| is the wrong yardstick where the result cancels: at r = min(in, out), A B = Wᵀ
    exactly, so R ≈ −I/s makes W + s·(A R B)ᵀ ≈ 0, and grad_R is a sum over M tokens of products of
    x A and g Bᵀ rounded to the compute dtype. Random tiny shapes (in = out = r = 1) hit both; any
    correct implementation then errs by ~eps times these bounds, not times the result.
    """
    d = lambda t: None if t is None else t.detach().to(torch.float64).abs()  # noqa: E731
    x2 = d(x).reshape(-1, w.shape[1])
    g2 = d(grad_out).reshape(-1, w.shape[0])
    W, A_, R_, B_, s = d(w), d(A), d(R), d(B), abs(scaling)
    xa, u = x2 @ A_, g2 @ B_.t()
    y = x2 @ W.t() + s * (xa @ R_) @ B_
    if b is not None:
        y = y + d(b)
    gx = g2 @ W + s * (u @ R_.t()) @ A_.t()
    gR = s * xa.t() @ u
    return y, gx, gR


def check_against_reference(fn, inputs, scaling, dtype, what="", grad_out=None, cancellation_safe=False):
    """fn(x, R) vs the fp64 reference: forward, grad_x and grad_R (when x / R require grad).

    cancellation_safe: measure errors against abs_bounds() instead of max|expected| (for random
    shapes where the result may cancel; see abs_bounds)."""
    x, w, b, A, R, B = inputs
    y, g, gx, gR = run_fwd_bwd(fn, x, R, grad_out)
    assert y.dtype == x.dtype, f"{what}: output dtype {y.dtype} != x dtype {x.dtype}"
    y_ref, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, scaling, g)
    sy = sx = sR = None
    if cancellation_safe:
        sy, sx, sR = abs_bounds(x, w, b, A, R, B, scaling, g)
    assert_close(y, y_ref, dtype, f"{what} y", scale=sy)
    if x.requires_grad:
        assert gx is not None and gx.dtype == x.dtype, f"{what}: grad_x {None if gx is None else gx.dtype}"
        assert_close(gx, gx_ref, dtype, f"{what} grad_x", scale=sx)
    if R.requires_grad:
        assert gR is not None and gR.dtype == R.dtype, f"{what}: grad_R {None if gR is None else gR.dtype}"
        assert_close(gR, gR_ref, dtype, f"{what} grad_R", scale=sR)
    return y
