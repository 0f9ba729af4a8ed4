"""The C++ CPU kernel (backend "cpp", torch.ops.loraxs.native_fwd / native_bwd) against the reference.

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
    assert_close,
    check_against_reference,
    make_inputs,
    native_reason,
    reference_fp64,
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
    for op in ("loraxs::native_fwd", "loraxs::native_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
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
    y, xa = torch.ops.loraxs.native_fwd(x2, w, b, A, R, B, s)
    g = torch.randn(*lead, o, generator=torch.Generator().manual_seed(4)).to(dtype)
    y_ref, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, s, g)
    assert y.dtype == dtype and xa.dtype == dtype
    assert_close(y, y_ref.reshape(-1, o), dtype, "native_fwd y")
    assert_close(xa, x2.double() @ A.double(), dtype, "native_fwd xa")
    for need_x, need_R in [(True, True), (True, False), (False, True)]:
        gx, gR = torch.ops.loraxs.native_bwd(g.reshape(-1, o), xa, w, A, R, B, s, need_x, need_R)
        if need_x:
            assert gx.dtype == dtype
            assert_close(gx, gx_ref.reshape(-1, i), dtype, "native_bwd grad_x")
        else:
            assert gx.numel() == 0
        if need_R:
            assert gR.dtype == R.dtype
            assert_close(gR, gR_ref, dtype, "native_bwd grad_R")
        else:
            assert gR.numel() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_native_fp32_master_R(dtype):
    x, w, b, A, R, B = make_inputs((50,), 24, 20, 4, dtype=dtype, r_dtype=torch.float32, requires_grad=False)
    y, xa = torch.ops.loraxs.native_fwd(x, w, b, A, R, B, 0.5)
    g = torch.randn(50, 20).to(dtype)
    gx, gR = torch.ops.loraxs.native_bwd(g, xa, w, A, R, B, 0.5, True, True)
    y_ref, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, 0.5, g)
    assert (y.dtype, gx.dtype, gR.dtype) == (dtype, dtype, torch.float32)
    assert_close(y, y_ref, dtype, "y")
    assert_close(gx, gx_ref, dtype, "grad_x")
    assert_close(gR, gR_ref, dtype, "grad_R")


def test_native_strided_inputs():
    """x transposed and grad_out expanded (stride 0), as autograd may hand them in."""
    x, w, b, A, R, B = make_inputs((9,), 24, 20, 4, requires_grad=False)
    xt = x.t().contiguous().t()
    y, xa = torch.ops.loraxs.native_fwd(xt, w, b, A, R, B, 0.5)
    g = torch.ones(1, 1).expand(9, 20)
    gx, gR = torch.ops.loraxs.native_bwd(g, xa, w, A, R, B, 0.5, True, True)
    y_ref, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, 0.5, g)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(gx, gx_ref, torch.float32, "grad_x")
    assert_close(gR, gR_ref, torch.float32, "grad_R")


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


FWD_CASES = [
    ("x 3-D", dict(x=torch.randn(2, 3, 16)), r"x \[2, 3, 16\] must be \(M, 16\)"),
    ("x features", dict(x=torch.randn(5, 15)), r"x \[5, 15\] must be \(M, 16\)"),
    ("weight 1-D", dict(weight=torch.randn(16)), r"weight must be 2-D .*\[16\]"),
    ("A rows", dict(A=torch.randn(15, 4)), r"A must be \(16, r\), got \[15, 4\]"),
    ("R shape", dict(R=torch.randn(4, 5)), r"R must be \(4, 4\), got \[4, 5\]"),
    ("B shape", dict(B=torch.randn(4, 11)), r"B must be \(4, 12\), got \[4, 11\]"),
    ("bias shape", dict(bias=torch.randn(11)), r"bias must be \(12\), got \[11\]"),
    ("weight dtype", dict(weight=torch.randn(12, 16, dtype=torch.float64)), r"dtype Double does not match Float"),
    ("R dtype", dict(R=torch.randn(4, 4, dtype=torch.float64)), r"R must be the layer's dtype or float32, got Double"),
    ("bias dtype", dict(bias=torch.randn(12, dtype=torch.float64)), r"bias must match x's dtype"),
]


@pytest.mark.parametrize("replace,match", [c[1:] for c in FWD_CASES], ids=[c[0] for c in FWD_CASES])
def test_native_fwd_rejects(replace, match):
    a = _fwd_args(**replace)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.loraxs.native_fwd(a["x"], a["weight"], a["bias"], a["A"], a["R"], a["B"], 1.0)


BWD_CASES = [
    ("grad_out features", dict(grad_out=torch.randn(5, 11)), r"grad_out \[5, 11\] must be \(M, 12\)"),
    ("grad_out 3-D", dict(grad_out=torch.randn(1, 5, 12)), r"grad_out \[1, 5, 12\] must be \(M, 12\)"),
    ("xa rows", dict(xa=torch.randn(4, 4)), r"xa must be \(5, 4\), got \[4, 4\]"),
    ("xa rank", dict(xa=torch.randn(5, 3)), r"xa must be \(5, 4\), got \[5, 3\]"),
    ("xa dtype", dict(xa=torch.randn(5, 4, dtype=torch.float64)), r"xa must match grad_out's dtype"),
    ("B shape", dict(B=torch.randn(4, 13)), r"B must be \(4, 12\), got \[4, 13\]"),
    ("R dtype", dict(R=torch.randn(4, 4, dtype=torch.bfloat16)), r"R must be the layer's dtype or float32, got BFloat16"),
]


@pytest.mark.parametrize("replace,match", [c[1:] for c in BWD_CASES], ids=[c[0] for c in BWD_CASES])
def test_native_bwd_rejects(replace, match):
    x, w, b, A, R, B = make_inputs((5,), 16, 12, 4, requires_grad=False)
    a = dict(grad_out=torch.randn(5, 12), xa=x @ A, weight=w, A=A, R=R, B=B)
    a.update(replace)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.loraxs.native_bwd(a["grad_out"], a["xa"], a["weight"], a["A"], a["R"], a["B"], 1.0, True, True)
