"""The C++ CPU kernel (backend "cpp", torch.ops.loraxs.linear_fwd / linear_bwd) against the reference.

Runs on the package's build (loraxs_kernels/_C*.so) or, when LORAXS_NATIVE_LIB names a library (the
CMake build: `make cmake-check`), on that one. A missing extension FAILS these tests: CI must never
skip the native build silently. Set LORAXS_ALLOW_NO_NATIVE=1 where a missing build is expected.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

import loraxs_kernels
from common import (
    DTYPES,
    SHAPES,
    allow_no_native,
    assert_matches_reference,
    assert_within_bound,
    check_against_reference,
    make_inputs,
    native_reason,
)
from loraxs_kernels.backends import native

pytestmark = pytest.mark.native

REASON = native_reason()  # loads the library (from LORAXS_NATIVE_LIB when set)
PACKAGE_DIR = os.path.dirname(os.path.abspath(loraxs_kernels.__file__))


@pytest.fixture(autouse=True)
def _require_native():
    if REASON is None:
        return
    if allow_no_native():
        pytest.skip(f"C++ extension unavailable (allowed by LORAXS_ALLOW_NO_NATIVE=1): {REASON}")
    pytest.fail(f"the C++ extension is unavailable: {REASON}. Build it (`make build`), or set "
                f"LORAXS_ALLOW_NO_NATIVE=1 if this machine is not meant to have it.", pytrace=False)


def shape_id(s):
    lead, i, o, r = s
    return "x".join(map(str, lead)) + f"-{i}-{o}-r{r}"


# ------------------------------------------------------------------------------- which library runs
def test_library_is_the_requested_build():
    loaded = {os.path.realpath(p) for p in torch.ops.loaded_libraries}
    package_builds = {os.path.realpath(p) for p in glob.glob(os.path.join(PACKAGE_DIR, "_C*.so"))}
    requested = os.environ.get("LORAXS_NATIVE_LIB")
    if requested:
        assert os.path.realpath(requested) in loaded, f"LORAXS_NATIVE_LIB={requested} is not loaded: {sorted(loaded)}"
        assert not (package_builds & loaded), f"the package build was loaded instead of/beside {requested}"
        assert os.path.realpath(native.library_path()) == os.path.realpath(requested)
    else:
        assert package_builds & loaded, f"no loraxs_kernels/_C*.so among the loaded libraries {sorted(loaded)}"
        assert os.path.realpath(native.library_path()) in package_builds


def test_cpu_kernels_registered():
    """The op is C++ end to end: device kernels and the autograd formula (no Python kernel)."""
    for op in ("loraxs::linear_fwd", "loraxs::linear_bwd"):
        for key in ("CPU", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("loraxs::linear", "CompositeImplicitAutograd")
    assert loraxs_kernels.backends.unavailable_reason("cpp", torch.device("cpu")) is None


# ----------------------------------------------------------------------------- parity, direct calls
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_ops_direct(dtype, shape, bias):
    lead, i, o, r = shape
    x, w, b, A, R, B = make_inputs(lead, i, o, r, dtype=dtype, bias=bias, requires_grad=False)
    s = -0.8
    x2 = x.reshape(-1, i)
    y, xa = torch.ops.loraxs.linear_fwd(x2, w, b, A, R, B, s, "cpp")
    g = torch.randn(*lead, o, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert y.dtype == dtype and xa.dtype == dtype
    assert_matches_reference(y, None, None, (x, w, b, A, R, B), s, dtype, "native_fwd")
    assert_within_bound(xa, x2.double() @ A.double(), x2.double().abs() @ A.double().abs(), dtype, "native_fwd xa", i)
    for need_x, need_R in [(True, True), (True, False), (False, True)]:
        gx, gR = torch.ops.loraxs.linear_bwd(g.reshape(-1, o), xa, w, A, R, B, s, need_x, need_R, "cpp")
        if need_x:
            assert gx.dtype == dtype
            assert_matches_reference(None, gx, None, (x, w, b, A, R, B), s, dtype, "native_bwd", grad_out=g)
        else:
            assert gx.numel() == 0
        if need_R:
            assert gR.dtype == R.dtype
            assert_matches_reference(None, None, gR, (x, w, b, A, R, B), s, dtype, "native_bwd", grad_out=g)
        else:
            assert gR.numel() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_native_fp32_master_R(dtype):
    x, w, b, A, R, B = make_inputs((50,), 24, 20, 4, dtype=dtype, r_dtype=torch.float32, requires_grad=False)
    y, xa = torch.ops.loraxs.linear_fwd(x, w, b, A, R, B, 0.5, "cpp")
    g = torch.randn(50, 20).to(dtype)
    gx, gR = torch.ops.loraxs.linear_bwd(g, xa, w, A, R, B, 0.5, True, True, "cpp")
    assert (y.dtype, gx.dtype, gR.dtype) == (dtype, dtype, torch.float32)
    assert_matches_reference(y, gx, gR, (x, w, b, A, R, B), 0.5, dtype, "fp32 R", grad_out=g)


def test_native_strided_inputs():
    """x transposed and grad_out expanded (stride 0), as autograd may hand them in."""
    x, w, b, A, R, B = make_inputs((9,), 24, 20, 4, requires_grad=False)
    xt = x.t().contiguous().t()
    y, xa = torch.ops.loraxs.linear_fwd(xt, w, b, A, R, B, 0.5, "cpp")
    g = torch.ones(1, 1).expand(9, 20)
    gx, gR = torch.ops.loraxs.linear_bwd(g, xa, w, A, R, B, 0.5, True, True, "cpp")
    assert_matches_reference(y, gx, gR, (x, w, b, A, R, B), 0.5, torch.float32, "strided", grad_out=g)


# ------------------------------------------------------------------------- parity, through the op
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_backend_via_op(dtype, shape):
    lead, i, o, r = shape
    inputs = make_inputs(lead, i, o, r, dtype=dtype)
    x, w, b, A, R, B = inputs
    fn = lambda x, R: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 1.7, backend="cpp")  # noqa: E731
    check_against_reference(fn, inputs, 1.7, dtype, "cpp")


def test_cpp_gradcheck():
    for lead in [(2,), (6,), (2, 3)]:  # in = out = 8: M = 2 low-rank, M = 6 merged
        x, w, b, A, R, B = make_inputs(lead, 8, 8, 3, dtype=torch.float64)
        fn = lambda x, R: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.7, backend="cpp")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, R))


# ---------------------------------------------------------------- TORCH_CHECKs for direct callers
def _fwd_args(**replace):
    x, w, b, A, R, B = make_inputs((5,), 16, 12, 4, requires_grad=False)
    args = dict(x=x, weight=w, bias=b, A=A, R=R, B=B)
    args.update(replace)
    return args


FWD_CASES = [  # the contract's own words (csrc/contract.cpp), for direct callers of linear_fwd too
    ("x features", dict(x=torch.randn(5, 15)), ValueError, r"x has 15 features \(shape \(5, 15\)\) but weight expects 16"),
    ("x 0-D", dict(x=torch.tensor(1.0)), ValueError, r"x must have at least one dimension"),
    ("weight 1-D", dict(weight=torch.randn(16)), ValueError, r"weight must be 2-D .* got shape \(16\)"),
    ("A rows", dict(A=torch.randn(15, 4)), ValueError, r"A must have shape \(in_features=16, r\), got \(15, 4\)"),
    ("R shape", dict(R=torch.randn(4, 5)), ValueError, r"R must have shape \(r, r\) = \(4, 4\) .* got \(4, 5\)"),
    ("B shape", dict(B=torch.randn(4, 11)), ValueError, r"B must have shape \(r, out_features\) = \(4, 12\) .* got \(4, 11\)"),
    ("bias shape", dict(bias=torch.randn(11)), ValueError, r"bias must have shape \(12,\) .* got \(11\)"),
    ("weight dtype", dict(weight=torch.randn(12, 16, dtype=torch.float64)), TypeError,
     r"weight has dtype torch.float64 but x has dtype torch.float32"),
    ("R dtype", dict(R=torch.randn(4, 4, dtype=torch.float64)), TypeError, r"R has dtype torch.float64"),
    ("bias dtype", dict(bias=torch.randn(12, dtype=torch.float64)), TypeError, r"bias has dtype torch.float64"),
]


@pytest.mark.parametrize("replace,exc,match", [c[1:] for c in FWD_CASES], ids=[c[0] for c in FWD_CASES])
def test_native_fwd_rejects(replace, exc, match):
    a = _fwd_args(**replace)
    with pytest.raises(exc, match=match):
        torch.ops.loraxs.linear_fwd(a["x"], a["weight"], a["bias"], a["A"], a["R"], a["B"], 1.0, "cpp")


BWD_CASES = [
    ("grad_out features", dict(grad_out=torch.randn(5, 11)), ValueError, r"grad_out \(5, 11\) must be \(\.\.\., 12\)"),
    ("grad_out 0-D", dict(grad_out=torch.tensor(1.0)), ValueError, r"grad_out \(\) must be \(\.\.\., 12\)"),
    ("xa rows", dict(xa=torch.randn(4, 4)), ValueError, r"xa must be \(5, 4\), got \(4, 4\)"),
    ("xa rank", dict(xa=torch.randn(5, 3)), ValueError, r"xa must be \(5, 4\), got \(5, 3\)"),
    ("xa dtype", dict(xa=torch.randn(5, 4, dtype=torch.float64)), TypeError,
     r"xa has dtype torch.float64 but grad_out has dtype torch.float32"),
    ("B shape", dict(B=torch.randn(4, 13)), ValueError, r"inconsistent layer: .* B \(4, 13\)"),
    ("R dtype", dict(R=torch.randn(4, 4, dtype=torch.bfloat16)), TypeError, r"R torch.bfloat16"),
]


@pytest.mark.parametrize("replace,exc,match", [c[1:] for c in BWD_CASES], ids=[c[0] for c in BWD_CASES])
def test_native_bwd_rejects(replace, exc, match):
    x, w, b, A, R, B = make_inputs((5,), 16, 12, 4, requires_grad=False)
    a = dict(grad_out=torch.randn(5, 12), xa=x @ A, weight=w, A=A, R=R, B=B)
    a.update(replace)
    with pytest.raises(exc, match=match):
        torch.ops.loraxs.linear_bwd(a["grad_out"], a["xa"], a["weight"], a["A"], a["R"], a["B"], 1.0, True, True, "cpp")
