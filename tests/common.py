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


def assert_close(actual, expected, dtype, what=""):
    """max|actual - expected| <= TOL[dtype] * max(max|expected|, 1e-30)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max().item()
    scale = max(expected.detach().abs().max().item(), 1e-30)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} > {TOL[dtype]:.1e} * {scale:.3e} ({dtype})"
