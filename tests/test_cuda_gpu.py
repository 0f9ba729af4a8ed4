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


# ------------------------------------------------------------- many adapters in one batch (issue 11)
# torch.ops.loraxs.linear_multi on backend "cuda" (csrc/cuda/multi_cuda.cpp): the tiled path (any M, all
# dtypes) and the decoding path (M <= 16, half types) with per-row R, the backward's transposed per-row
# R and the segmented grad_R, against reference.loraxs_linear_multi in fp64 (tests/multi_bounds.py).
from loraxs_kernels import loraxs_linear_multi  # noqa: E402
from multi_bounds import multi_bounds, multi_reference  # noqa: E402
from common import depths  # noqa: E402


def multi_inputs(M, i, o, r, n, dtype, *, r_dtype=None, ids_dtype=torch.int64, pool=None, minus=5, scale=False,
                 seed=0):
    """inputs() for the layer, a bank R (n, r, r) ~ N(0, 1/r), ids from `pool` with every `minus`-th row -1,
    and optionally an (n,) per-adapter scaling with mixed signs."""
    x, w, b, A, _, B = inputs((M,), i, o, r, dtype, requires_grad=False)
    g = torch.Generator().manual_seed(seed + 1)
    R = (torch.randn(n, r, r, generator=g) * r**-0.5).to(device="cuda", dtype=r_dtype or dtype).requires_grad_()
    pool = torch.arange(n) if pool is None else torch.tensor(pool)
    ids = pool[torch.randint(len(pool), (M,), generator=g)]
    if minus:
        ids[::minus] = -1
    sa = None
    if scale:
        sa = torch.rand(n, generator=g, dtype=torch.float64) * 1.75 + 0.25
        sa[::3] *= -1
        sa = sa.to(device="cuda", dtype=torch.float32)
    return x.requires_grad_(), w, b, A, R, B, ids.to(device="cuda", dtype=ids_dtype), sa


def check_multi(x, w, b, A, R, B, ids, sa, dtype, what, backend="cuda"):
    """Forward + backward through loraxs_linear_multi vs the fp64 reference, per element."""
    x.grad = None
    R.grad = None
    scaling = SCALING if sa is None else sa * SCALING
    y = loraxs_linear_multi(x, w, b, A, R, B, ids, scaling, backend=backend)
    assert y.dtype == x.dtype and y.device.type == "cuda", what
    gy = grad_like(y)
    y.backward(gy)
    assert R.grad.dtype == R.dtype and R.grad.shape == R.shape, what
    s_tensor = None if sa is None else sa.double() * SCALING
    y_ref, gx_ref, gR_ref = multi_reference(x, w, b, A, R, B, ids, 1.0 if sa is not None else SCALING, s_tensor, gy)
    by, bx, bR = multi_bounds(x, w, b, A, R, B, ids, 1.0 if sa is not None else SCALING, s_tensor, gy)
    dy, dx, dR = depths(w.shape[1], w.shape[0], A.shape[1], x.shape[0])
    assert_within_bound(y.cpu(), y_ref, by, dtype, f"{what} y", dy)
    assert_within_bound(x.grad.cpu(), gx_ref, bx, dtype, f"{what} grad_x", dx)
    assert_within_bound(R.grad.cpu(), gR_ref, bR, dtype, f"{what} grad_R", dR)
    used = torch.zeros(R.shape[0], dtype=torch.bool)
    used[ids.cpu().long()[ids.cpu() >= 0]] = True
    assert torch.equal(R.grad[~used.cuda()], torch.zeros_like(R.grad[~used.cuda()])), f"{what}: unused adapters"
    return y.detach(), x.grad.clone(), R.grad.clone()


MULTI_CASES = [
    # (M, in, out, r, n, options)
    (1, 256, 192, 16, 300, dict(scale=True, minus=0)),
    (16, 72, 136, 20, 5, dict(pool=[0, 2, 3], ids_dtype=torch.int32)),
    (37, 64, 80, 1, 1, dict(minus=2)),
    (300, 1024, 768, 64, 300, dict(scale=True)),
    (1100, 512, 1024, 32, 3, dict(minus=7)),
    (65, 31, 45, 7, 10, dict(ids_dtype=torch.int32)),
    (40, 320, 288, 256, 4, dict()),
]


@pytest.mark.parametrize("dtype", ALL + [torch.float64], ids=str)
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: f"M{c[0]}_{c[1]}x{c[2]}_r{c[3]}_n{c[4]}")
def test_multi(small_m_path, dtype, case):
    M, i, o, r, n, kw = case
    check_multi(*multi_inputs(M, i, o, r, n, dtype, **kw), dtype, f"multi {small_m_path} {case[:5]}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("M", [4, 200])
def test_multi_fp32_master_bank(small_m_path, dtype, M):
    args = multi_inputs(M, 128, 96, 16, 7, dtype, r_dtype=torch.float32, scale=True)
    assert args[4].dtype == torch.float32
    check_multi(*args, dtype, f"multi fp32 bank M={M}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_multi_10000_adapters(small_m_path, dtype):
    """The serving regime: a bank of 10,000 adapters, 64 rows over 64 distinct ones (tiled) and 16 rows
    (decoding)."""
    for M in (16, 64):
        x, w, b, A, R, B, _, _ = multi_inputs(M, 1024, 1024, 16, 10_000, dtype, minus=0)
        ids = torch.randperm(10_000, generator=torch.Generator().manual_seed(M))[:M].cuda()
        check_multi(x, w, b, A, R, B, ids, None, dtype, f"10k adapters M={M}")


def _assert_multi_grad_R_bitwise_repeatable(dtype, backend):
    x, w, b, A, R, B, ids, _ = multi_inputs(5000, 128, 96, 32, 12, dtype)
    runs, g = [], None
    for _ in range(3):
        R.grad = None
        y = loraxs_linear_multi(x, w, b, A, R, B, ids, SCALING, backend=backend)
        g = grad_like(y) if g is None else g
        y.backward(g)
        runs.append(R.grad.clone())
    assert all(torch.equal(runs[0], r) for r in runs[1:]), f"grad_R differs between runs on backend {backend!r}"


@pytest.mark.parametrize("dtype", ALL + [torch.float64], ids=str)
def test_multi_grad_R_is_deterministic(dtype):
    """grad_R sums each adapter's rows in batch order (one CTA per adapter and tile): bitwise equal run to run."""
    _assert_multi_grad_R_bitwise_repeatable(dtype, "cuda")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_multi_other_cuda_backends(backend):
    """"torch" (the grouped ATen schedule through cuBLAS) and "auto" through the same CUDA dispatch kernel."""
    check_multi(*multi_inputs(50, 96, 64, 8, 6, torch.float32, scale=True), torch.float32, backend, backend=backend)


def test_multi_out_of_range_id_raises_before_any_kernel():
    x, w, b, A, R, B, ids, _ = multi_inputs(9, 64, 48, 8, 4, torch.bfloat16)
    ids[5] = 4
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 4\).*got 4 at index \(5\)"):
        loraxs_linear_multi(x, w, b, A, R, B, ids, SCALING, backend="cuda")
    torch.cuda.synchronize()  # nothing ran that could have faulted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_sanitizer_small(small_m_path, dtype):
    """Small enough for compute-sanitizer: decode or tiled forward with per-row R, both backward kernels."""
    check_multi(*multi_inputs(3, 40, 24, 4, 3, dtype, scale=True, minus=2), dtype, f"sanitizer multi {small_m_path}")
    check_multi(*multi_inputs(19, 40, 24, 4, 3, dtype), dtype, "sanitizer multi M=19")


# ------------------------------------------------------------- issue 19: the many-adapter op's GPU defects
def _cuda_multi_backends():
    out = ["cuda", "torch", "auto"]
    if backends.unavailable_reason("triton", DEVICE) is None:
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _cuda_multi_backends())
def test_multi_fp32_bank_beside_fp64_layer(backend):
    """The contract takes an fp32 bank beside an fp64 layer; every CUDA backend runs it (backend "cuda"
    failed with "CUDA error: invalid argument"). Checked within fp32's bounds (grad_R is fp32)."""
    args = multi_inputs(50, 96, 64, 8, 6, torch.float64, r_dtype=torch.float32, scale=True)
    check_multi(*args, torch.float32, f"fp32 bank beside fp64, {backend}", backend=backend)


@pytest.mark.parametrize("backend", _cuda_multi_backends())
def test_multi_unused_slot_with_inf_and_nan_scaling(backend):
    """inf and NaN in adapter_scaling slots no row uses: their gradient is exactly 0 (check_multi asserts
    it for every unused adapter) and the rest matches the reference."""
    x, w, b, A, R, B, ids, sa = multi_inputs(64, 96, 64, 8, 5, torch.float32, pool=[0, 2, 3], scale=True)
    sa[1], sa[4] = float("inf"), float("nan")
    check_multi(x, w, b, A, R, B, ids, sa, torch.float32, f"inf/NaN unused, {backend}", backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_multi_grad_R_is_deterministic_on_the_aten_schedule(dtype):
    """Backend "torch" (what "auto" runs for fp64 and strict fp32): grad_R by segment_reduce over the
    sorted rows, no index_add_ (float atomics): the same bits run to run."""
    _assert_multi_grad_R_bitwise_repeatable(dtype, "torch")


@pytest.mark.parametrize("backend", _cuda_multi_backends())
def test_multi_captured_in_a_cuda_graph(backend):
    """Forward and backward of linear_multi captured in a CUDA graph (no host sync on any backend), replayed:
    the eager bits; new ids written into the static ids tensor are followed by the replay."""
    dtype = torch.float64 if backend in ("torch", "auto") else torch.bfloat16
    x, w, b, A, R, B, ids, sa = multi_inputs(24, 64, 48, 8, 6, dtype, scale=True)
    s = sa * SCALING
    g = torch.randn(24, 48, device="cuda", dtype=dtype)

    def step():
        y = loraxs_linear_multi(x, w, b, A, R, B, ids, s, backend=backend)
        return (y, *torch.autograd.grad(y, (x, R), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles Triton kernels, warms the allocator
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for new_ids in (ids.clone(), torch.flip(ids, (0,)).clone()):
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for a, e in zip(static, eager):
            assert torch.equal(a, e), backend


def test_multi_out_of_range_id_inside_a_captured_graph_still_raises():
    """Inside a capture the ids are checked on the device (torch._assert_async before every kernel): an id
    written past the bank before a replay raises at the next sync and reads nothing past R. In a child
    process: a device-side assert leaves that process's CUDA context unusable."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, loraxs_kernels as lk
        d = "cuda"
        x = torch.randn(8, 32, device=d); w = torch.randn(24, 32, device=d); A = torch.randn(32, 4, device=d)
        B = torch.randn(4, 24, device=d); R = torch.randn(3, 4, 4, device=d)
        ids = torch.zeros(8, dtype=torch.long, device=d)
        for _ in range(2):
            lk.loraxs_linear_multi(x, w, None, A, R, B, ids, backend="cuda")
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = lk.loraxs_linear_multi(x, w, None, A, R, B, ids, backend="cuda")
        ids[5] = 3
        try:
            g.replay()
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("RAISED", str(e).splitlines()[0])
        else:
            print("NO ERROR")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "RAISED" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize("backend", _cuda_multi_backends())
@pytest.mark.parametrize("M,i,o", [(0, 16, 12), (5, 0, 12), (5, 16, 0)])
def test_zero_size_layers(backend, M, i, o):
    """M, in or out = 0 on every CUDA backend, both ops: y = the bias broadcast, zero gradients (no kernel
    launched with a zero-width grid, no division by zero)."""
    from loraxs_kernels import loraxs_linear as single

    d = "cuda"
    for multi in (False, True):
        x = torch.randn(M, i, device=d, requires_grad=True)
        w, bias = torch.randn(o, i, device=d), torch.randn(o, device=d)
        A, B = torch.randn(i, 4, device=d), torch.randn(4, o, device=d)
        R = torch.randn(*((3,) if multi else ()), 4, 4, device=d, requires_grad=True)
        if multi:
            y = loraxs_linear_multi(x, w, bias, A, R, B, torch.zeros(M, dtype=torch.long, device=d), backend=backend)
        else:
            y = single(x, w, bias, A, R, B, backend="triton" if backend == "triton" else backend)
        assert torch.equal(y, bias.expand(M, o)), (backend, multi)
        y.backward(torch.ones_like(y))
        assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(R.grad, torch.zeros_like(R)), (backend, multi)
