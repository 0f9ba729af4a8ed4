"""The reference is the truth every backend is compared to, so it is checked against the formulas
of docs/loraxs.md written out independently, and the test helpers are checked to be able to fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common import SHAPES, TOL, abs_bounds, assert_close, check_against_reference, make_inputs, reference_fp64
from loraxs_kernels import reference

F64 = torch.float64


def _explicit(x, w, b, A, R, B, s):
    """y = x Wᵀ + b + s·((x A) R) B with einsum, no F.linear, no matmul broadcasting."""
    y = torch.einsum("...i,oi->...o", x, w) + s * torch.einsum("...i,ir,rq,qo->...o", x, A, R, B)
    return y + b if b is not None else y


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}")
def test_reference_forward_matches_formula(shape, bias):
    lead, i, o, r = shape
    x, w, b, A, R, B = make_inputs(lead, i, o, r, dtype=F64, bias=bias, requires_grad=False)
    for s in (1.0, 0.0, -0.75):
        y = reference.loraxs_linear(x, w, b, A, R, B, s)
        assert y.shape == (*lead, o) and y.dtype == F64
        assert_close(y, _explicit(x, w, b, A, R, B, s), F64, f"reference s={s}")
        assert_close(reference.unfused_linear(x, w, b, A, R, B, s), y, F64, "unfused")
        assert_close(F.linear(x, reference.merged_weight(w, A, R, B, s), b), y, F64, "merged weight")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}")
def test_closed_form_grads_match_autograd(shape):
    """docs/loraxs.md: grad_x = g W + s (u Rᵀ) Aᵀ, grad_R = s (x A)ᵀ u with u = g Bᵀ."""
    lead, i, o, r = shape
    x, w, b, A, R, B = make_inputs(lead, i, o, r, dtype=F64)
    s = 0.6
    g = torch.randn(*lead, o, dtype=F64, generator=torch.Generator().manual_seed(3))
    gx, gR = reference.loraxs_grads(g, x.detach(), w, A, R.detach(), B, s)
    _, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, s, g)
    assert_close(gx, gx_ref, F64, "grad_x")
    assert_close(gR, gR_ref, F64, "grad_R")
    # Written out once more by hand, for the 2-D view.
    x2, g2 = x.detach().reshape(-1, i), g.reshape(-1, o)
    u = g2 @ B.t()
    assert_close(gx.reshape(-1, i), g2 @ w + s * (u @ R.detach().t()) @ A.t(), F64, "grad_x by hand")
    assert_close(gR, s * (x2 @ A).t() @ u, F64, "grad_R by hand")


def test_reference_gradcheck():
    x, w, b, A, R, B = make_inputs((2, 3), 7, 5, 3, dtype=F64)
    assert torch.autograd.gradcheck(lambda x, R: reference.loraxs_linear(x, w, b, A, R, B, 0.7), (x, R))


def test_reference_fp32_master_R_computes_in_x_dtype():
    x, w, b, A, R, B = make_inputs((8,), 16, 12, 4, dtype=torch.bfloat16, r_dtype=torch.float32)
    y = reference.loraxs_linear(x, w, b, A, R, B, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert R.grad.dtype == torch.float32


def test_make_inputs_low_rank_term_is_visible():
    """The helper's R ~ N(0, 1/r) makes the low-rank term of the base term's order, so a backend that
    drops or mis-scales it fails assert_close by several times the widest tolerance (bf16's)."""
    for lead, i, o, r in SHAPES:
        if lead[0] == 0:
            continue
        x, w, b, A, R, B = make_inputs(lead, i, o, r, dtype=F64, requires_grad=False)
        base = F.linear(x, w, b)
        low = (x @ A @ R) @ B
        ratio = low.norm() / base.norm()
        assert 0.05 < ratio < 20, f"{(lead, i, o, r)}: |low-rank| / |base| = {ratio:.3g}"
        # Dropping the low-rank term or doubling the scaling must break every tolerance in TOL.
        y = reference.loraxs_linear(x, w, b, A, R, B, 1.0)
        for wrong in (base, reference.loraxs_linear(x, w, b, A, R, B, 2.0)):
            err = (wrong - y).abs().max() / y.abs().max()
            assert err > 5 * max(TOL.values()), f"{(lead, i, o, r)}: a wrong low-rank path differs by only {err:.3g}"


def test_make_inputs_A_B_are_the_svd_factors():
    x, w, b, A, R, B = make_inputs((4,), 24, 20, 6, dtype=F64)
    U, S, Vh = torch.linalg.svd(w.t(), full_matrices=False)
    assert_close(A @ B, (U[:, :6] * S[:6]) @ Vh[:6], F64, "A B = rank-6 truncation of Wᵀ")
    assert x.requires_grad and R.requires_grad and not w.requires_grad and not A.requires_grad


@pytest.mark.parametrize("dtype", list(TOL))
def test_assert_close_can_fail(dtype):
    ref = torch.linspace(-2, 3, 50, dtype=F64)
    assert_close(ref + 0.5 * TOL[dtype] * 3, ref, dtype, "inside")
    with pytest.raises(AssertionError, match="max error"):
        assert_close(ref + 2 * TOL[dtype] * 3, ref, dtype, "outside")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(ref[:-1], ref, dtype, "shape")
    zeros = torch.zeros(3, dtype=F64)
    with pytest.raises(AssertionError):
        assert_close(torch.full((3,), 1e-6, dtype=F64), zeros, dtype, "zero reference demands zero")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cancellation_safe_check_still_catches_wrong_math(dtype):
    """The abs_bounds yardstick (used by the property tests) is looser than max|expected| but still
    far below the error of a wrong formula: wrong scaling, a dropped term, a transposed R."""
    inputs = make_inputs((9,), 40, 30, 6, dtype=dtype)
    x, w, b, A, R, B = inputs
    s = 0.8
    right = lambda x, R: reference.loraxs_linear(x, w, b, A, R, B, s)  # noqa: E731
    check_against_reference(right, inputs, s, dtype, "right", cancellation_safe=True)
    for name, wrong in {
        "scaling twice": lambda x, R: reference.loraxs_linear(x, w, b, A, R, B, 2 * s),
        "no low-rank": lambda x, R: F.linear(x, w, b) + 0 * R.sum(),
        "R transposed": lambda x, R: reference.loraxs_linear(x, w, b, A, R.t(), B, s),
    }.items():
        with pytest.raises(AssertionError, match="max error"):
            check_against_reference(wrong, inputs, s, dtype, name, cancellation_safe=True)
    y, gx, gR = abs_bounds(x, w, b, A, R, B, s, torch.ones(9, 30))
    assert y.shape == (9, 30) and gx.shape == (9, 40) and gR.shape == (6, 6) and (gR >= 0).all()
