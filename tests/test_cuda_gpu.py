"""The CUDA C++ backend (csrc/cuda, backend "cuda") against the fp64 reference, on a GPU.

Skipped without a CUDA device; with one, a missing CUDA build of the extension fails every test.
Every case runs forward and backward through loraxs_linear(..., backend="cuda") and compares y,
grad_x and grad_R with the fp64 reference, per element (tests/common.py). Small-M cases run twice:
on the decoding kernels (M <= 16, half types) and, with LORAXS_CUDA_DECODE=0, on the tiled GEMMs.

    python -m pytest tests/test_cuda_gpu.py -q
    compute-sanitizer --tool memcheck python -m pytest tests/test_cuda_gpu.py -q -k sanitizer
"""

from __future__ import annotations

import pytest
import torch

from common import assert_matches_reference, assert_within_bound, make_inputs
from loraxs_kernels import backends, loraxs_linear

DEVICE = torch.device("cuda")
REASON = backends.unavailable_reason("cuda", DEVICE)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda_backend_present():
    # Without a GPU conftest.py skips these tests; with one, a missing CUDA build is a failure, not a skip.
    if REASON is not None:
        pytest.fail(f"a CUDA device is present but backend 'cuda' is unavailable: {REASON}", pytrace=False)

HALF = [torch.float16, torch.bfloat16]
ALL = [torch.float32, torch.float16, torch.bfloat16]
SCALING = 0.75


def grad_like(y, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)


def check(x, w, b, A, R, B, dtype, what, scaling=SCALING, grad_out=None):
    """Forward + backward on backend "cuda" vs the fp64 reference; returns (y, grad_x, grad_R)."""
    x.grad = None
    R.grad = None
    y = loraxs_linear(x, w, b, A, R, B, scaling, backend="cuda")
    assert y.dtype == x.dtype and y.device.type == "cuda", what
    g = grad_like(y) if grad_out is None else grad_out
    y.backward(g)
    if x.requires_grad:
        assert x.grad is not None and x.grad.dtype == x.dtype, what
    if R.requires_grad:
        assert R.grad is not None and R.grad.dtype == R.dtype, what
    assert_matches_reference(y, x.grad if x.requires_grad else None, R.grad if R.requires_grad else None,
                             (x, w, b, A, R, B), scaling, dtype, what, grad_out=g)
    return y.detach(), (None if x.grad is None else x.grad.clone()), (None if R.grad is None else R.grad.clone())


@pytest.fixture(params=["decode", "tiled"])
def small_m_path(request, monkeypatch):
    """For M <= 16: the decoding kernels (default) or the tiled GEMMs (LORAXS_CUDA_DECODE=0)."""
    if request.param == "tiled":
        monkeypatch.setenv("LORAXS_CUDA_DECODE", "0")
    else:
        monkeypatch.delenv("LORAXS_CUDA_DECODE", raising=False)
    return request.param


def inputs(lead, i, o, r, dtype, **kw):
    """tests/common.py's inputs on the GPU; for LLM-sized layers, random factors of the same scale
    instead of the SVD of W (a 4096×4096 fp64 SVD on the CPU would dominate the test time)."""
    if i * o < 2**21:
        return make_inputs(lead, i, o, r, dtype=dtype, device="cuda", **kw)
    g = torch.Generator().manual_seed(kw.get("seed", 0))
    bound = i**-0.5
    w = (torch.rand(o, i, generator=g) * 2 - 1) * bound
    b = (torch.rand(o, generator=g) * 2 - 1) * bound if kw.get("bias", True) else None
    x = torch.randn(*lead, i, generator=g)
    A = torch.randn(i, r, generator=g) * bound          # x A ~ N(0, 1)
    R = torch.randn(r, r, generator=g) * r**-0.5
    B = torch.randn(r, o, generator=g) * (3 * r) ** -0.5  # the rank-r term ~ the base term (var 1/3)
    to = dict(device="cuda", dtype=dtype)
    x, w, A, B = x.to(**to), w.to(**to), A.to(**to), B.to(**to)
    b = b.to(**to) if b is not None else None
    R = R.to(device="cuda", dtype=kw.get("r_dtype") or dtype)
    if kw.get("requires_grad", True):
        x.requires_grad_()
        R.requires_grad_()
    return x, w, b, A, R, B


# ------------------------------------------------------------------------- decoding sizes (M <= 16)
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("i,o,r", [(256, 192, 16), (4096, 512, 64), (40, 24, 7), (72, 136, 1)])
def test_small_m(small_m_path, dtype, M, i, o, r):
    # (72, 136): one full 64-k chunk and a partial one in the decoding kernel; out not a multiple of 64.
    check(*inputs((M,), i, o, r, dtype), dtype, f"{small_m_path} M={M} {i}x{o} r={r}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_decode_llm_layer(small_m_path, dtype):
    """The target regime: in = out = 4096, r = 64, M = 16 (several K splits)."""
    check(*inputs((16,), 4096, 4096, 64, dtype), dtype, f"{small_m_path} 4096x4096 r=64")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_small_m_k_tail_with_strided_rows(small_m_path, dtype):
    """in = 100 with 16-byte-aligned row strides (104): the decoding kernel's vector loads for the full
    chunk and its element-wise tail (36 k, not a multiple of 8) for x and W."""
    x, w, b, A, R, B = inputs((5,), 100, 48, 8, dtype)
    wide_w = torch.zeros(48, 104, dtype=dtype, device="cuda")
    wide_w[:, :100] = w
    wide_x = torch.zeros(5, 104, dtype=dtype, device="cuda")
    wide_x[:, :100] = x.detach()
    xs = wide_x[:, :100].requires_grad_()
    assert xs.stride() == (104, 1)
    check(xs, wide_w[:, :100], b, A, R, B, dtype, f"{small_m_path} strided rows")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_decode_rank_256(small_m_path, dtype):
    check(*inputs((8,), 320, 288, 256, dtype), dtype, f"{small_m_path} r=256")


# ------------------------------------------------------------------------------ tiled sizes (M > 16)
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize(
    "lead,i,o,r",
    [
        ((17,), 64, 80, 8),        # M just past the decoding path
        ((300,), 1024, 768, 64),   # several k tiles, small tile config
        ((1100,), 512, 1024, 32),  # enough CTAs for the large tile config
        ((4, 33), 64, 80, 8),      # 3-D x
        ((2, 3, 5), 40, 24, 7),    # 4-D x, r = 7
        ((65,), 31, 45, 1),        # odd in/out (element-wise tile copies), r = 1
        ((40,), 320, 288, 256),    # r = 256
    ],
)
def test_tiled(dtype, lead, i, o, r):
    check(*inputs(lead, i, o, r, dtype), dtype, f"{lead} {i}x{o} r={r}")


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_no_bias(dtype):
    check(*inputs((50,), 96, 64, 8, dtype, bias=False), dtype, "no bias")
    check(*inputs((4,), 96, 64, 8, dtype, bias=False), dtype, "no bias, small M")


def test_float64():
    check(*inputs((37,), 64, 48, 8, torch.float64), torch.float64, "fp64")
    check(*inputs((3,), 64, 48, 8, torch.float64), torch.float64, "fp64 small M")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("M", [4, 200])
def test_fp32_master_R(dtype, M):
    """R in fp32 beside a half-precision layer: computed in the layer's dtype, grad_R in fp32."""
    x, w, b, A, R, B = inputs((M,), 128, 96, 16, dtype, r_dtype=torch.float32)
    assert R.dtype == torch.float32
    check(x, w, b, A, R, B, dtype, f"fp32 R, M={M}")


# ----------------------------------------------------------------------------------- input strides
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("M", [6, 90])
def test_strided_x(dtype, M):
    x, w, b, A, R, B = inputs((M,), 64, 48, 8, dtype)
    every_other = torch.stack([x.detach(), x.detach()], dim=-1).reshape(M, 128)[:, ::2].requires_grad_()
    assert every_other.stride() == (128, 2)
    check(every_other, w, b, A, R, B, dtype, "x with k stride 2")
    transposed = x.detach().t().contiguous().t().requires_grad_()
    assert transposed.stride() == (1, M)
    check(transposed, w, b, A, R, B, dtype, "column-major x")
    buf = torch.empty(M * 64 + 1, dtype=dtype, device="cuda")
    shifted = buf[1:].view(M, 64)  # contiguous, but one element past a 16-byte boundary
    shifted.copy_(x.detach())
    check(shifted.requires_grad_(), w, b, A, R, B, dtype, "x at an odd offset")


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("M", [5, 70])
def test_transposed_weight_and_expanded_grad(dtype, M):
    """A weight stored transposed (k stride = out) and an expanded, stride-0 grad_out (y.sum())."""
    x, w, b, A, R, B = inputs((M,), 64, 48, 8, dtype)
    wt = w.t().contiguous().t()
    assert wt.stride() == (1, 48)
    y = loraxs_linear(x, wt, b, A, R, B, SCALING, backend="cuda")
    y.sum().backward()
    assert_matches_reference(y, x.grad, R.grad, (x, w, b, A, R, B), SCALING, dtype, "transposed W",
                             grad_out=torch.ones_like(y))


# ---------------------------------------------------------------------------------------- edges
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_empty_batch(dtype):
    x, w, b, A, R, B = inputs((0,), 32, 16, 4, dtype)
    y = loraxs_linear(x, w, b, A, R, B, SCALING, backend="cuda")
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 32)
    assert torch.equal(R.grad, torch.zeros_like(R))  # a sum over no tokens


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_only_one_gradient(dtype):
    x, w, b, A, R, B = inputs((20,), 64, 48, 8, dtype)
    x.requires_grad_(False)
    check(x, w, b, A, R, B, dtype, "grad_R only")
    x, w, b, A, R, B = inputs((20,), 64, 48, 8, dtype)
    R.requires_grad_(False)
    check(x, w, b, A, R, B, dtype, "grad_x only")


def test_native_op_outputs_not_needed_are_empty():
    x, w, b, A, R, B = inputs((9,), 64, 48, 8, torch.bfloat16, requires_grad=False)
    y, xa = torch.ops.loraxs.linear_fwd(x, w, b, A, R, B, SCALING, "cuda")
    g = torch.randn_like(y)
    gx, gR = torch.ops.loraxs.linear_bwd(g, xa, w, A, R, B, SCALING, False, True, "cuda")
    assert gx.numel() == 0 and gR.shape == R.shape
    gx, gR = torch.ops.loraxs.linear_bwd(g, xa, w, A, R, B, SCALING, True, False, "cuda")
    assert gx.shape == x.shape and gR.numel() == 0


def test_xa_is_returned():
    """xa = x A comes back from the forward in x's dtype on both paths (the backward relies on it)."""
    for M in (7, 40):
        x, w, b, A, R, B = inputs((M,), 128, 96, 16, torch.bfloat16, requires_grad=False)
        _, xa = torch.ops.loraxs.linear_fwd(x, w, b, A, R, B, SCALING, "cuda")
        ref = x.double() @ A.double()
        assert xa.dtype == torch.bfloat16 and xa.shape == (M, 16)
        assert_within_bound(xa, ref, x.double().abs() @ A.double().abs(), torch.bfloat16, f"xa M={M}", 128)


# ---------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_grad_R_is_deterministic(dtype):
    """grad_R sums 5000 tokens in a fixed split order: bitwise equal run to run."""
    x, w, b, A, R, B = inputs((5000,), 128, 96, 32, dtype)
    g = None
    runs = []
    for _ in range(3):
        R.grad = None
        y = loraxs_linear(x, w, b, A, R, B, SCALING, backend="cuda")
        g = grad_like(y) if g is None else g
        y.backward(g)
        runs.append(R.grad.clone())
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert_matches_reference(None, None, runs[0], (x, w, b, A, R, B), SCALING, dtype, "grad_R", grad_out=g)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_decode_is_deterministic_with_and_without_pdl(dtype, monkeypatch):
    """The split-K decoding kernels reduce in a fixed order; PDL changes scheduling, not results."""
    monkeypatch.delenv("LORAXS_CUDA_DECODE", raising=False)
    x, w, b, A, R, B = inputs((16,), 4096, 1024, 32, dtype, requires_grad=False)
    outs = []
    for pdl in ("1", "0", "1"):
        monkeypatch.setenv("LORAXS_CUDA_PDL", pdl)
        outs.append(torch.ops.loraxs.linear_fwd(x, w, b, A, R, B, SCALING, "cuda"))
    for y, xa in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(xa, outs[0][1])


# -------------------------------------------------------------------------- sanitizer-sized case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sanitizer_small(small_m_path, dtype):
    """Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck) in seconds, and
    covering every kernel: decode or tiled forward, the three backward GEMMs, grad_R."""
    check(*inputs((3,), 40, 24, 4, dtype), dtype, f"sanitizer {small_m_path} M=3")
    check(*inputs((19,), 40, 24, 4, dtype), dtype, "sanitizer M=19")
