"""The Triton backend on a CUDA device, against the fp64 reference, per element (tests/common.py).
Skipped without CUDA; on a machine with a CUDA device, a missing or broken Triton FAILS this file
(collection error) instead of skipping it.

Most tests set LORAXS_TRITON_AUTOTUNE=0 (the first entry of each autotune table, no benchmarking) so
that every new shape costs a compile, not a tuning sweep; test_autotuned_goal_shapes and
test_every_config cover the autotuner and the other table entries.
"""

import math

import pytest
import torch

from common import SHAPES, assert_close, assert_matches_reference, make_inputs

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from loraxs_kernels import loraxs_linear  # noqa: E402

try:
    import loraxs_kernels.backends.triton as tb  # noqa: E402
except ImportError as e:  # a GPU is here: the Triton tests must not vanish as skips
    raise ImportError(f"a CUDA device is present but the Triton backend cannot be imported ({e}); install triton "
                      "(requirements/gpu.txt) to run these tests") from e
from loraxs_kernels.backends.triton import configs  # noqa: E402
from loraxs_kernels.backends.triton import gemm_rank_r as gemm_mod  # noqa: E402

if tb.INTERPRETED:
    pytest.skip("the Triton backend was imported under TRITON_INTERPRET=1", allow_module_level=True)

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# fp32 tests run with TF32 off (torch's default), so fp32 is held to the fp32 tolerance.


@pytest.fixture(autouse=True)
def no_autotune(monkeypatch):
    monkeypatch.setenv("LORAXS_TRITON_AUTOTUNE", "0")
    monkeypatch.delenv(configs.SCHEDULE_ENV, raising=False)


def wide_inputs(lead, in_f, out_f, r, dtype, seed=0):
    """Like make_inputs, without its CPU fp64 SVD (seconds at 4096²): random A and B of the same scale,
    generated on the device. The kernels do not care where A and B came from."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    kw = dict(device=DEV, dtype=torch.float32, generator=g)
    bound = 1 / math.sqrt(in_f)
    w = (torch.rand(out_f, in_f, **kw) * 2 - 1) * bound
    b = (torch.rand(out_f, **kw) * 2 - 1) * bound
    A = torch.randn(in_f, r, **kw) / math.sqrt(in_f)
    B = torch.randn(r, out_f, **kw) / math.sqrt(r)
    R = torch.randn(r, r, **kw) / math.sqrt(r)
    x = torch.randn(*lead, in_f, **kw)
    x, w, b, A, R, B = (t.to(dtype) for t in (x, w, b, A, R, B))
    return x.requires_grad_(), w, b, A, R.requires_grad_(), B


def run(lead, in_f, out_f, r, dtype, scaling=0.7, bias=True, r_dtype=None, seed=0, grad=None, tol_dtype=None):
    if in_f * out_f >= 1 << 20:
        x, w, b, A, R, B = wide_inputs(lead, in_f, out_f, r, dtype, seed)
    else:
        x, w, b, A, R, B = make_inputs(lead, in_f, out_f, r, dtype=dtype, device=DEV, bias=bias, r_dtype=r_dtype,
                                       seed=seed)
    y = loraxs_linear(x, w, b, A, R, B, scaling, backend="triton")
    g = (torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
         .to(device=DEV, dtype=dtype)) if grad is None else grad
    gx, gR = torch.autograd.grad(y, (x, R), g)
    assert y.dtype == dtype and gx.dtype == dtype and gR.dtype == R.dtype
    assert_matches_reference(y, gx, gR, (x, w, b, A, R, B), scaling, tol_dtype or dtype, f"triton {dtype}", grad_out=g)
    return y, gx, gR


GPU_SHAPES = SHAPES + [
    ((33,), 72, 88, 20),
    ((9,), 128, 112, 100),     # split schedule (RP = 128)
    ((300,), 256, 264, 256),   # r = 256
    ((5, 7), 4096, 1000, 64),  # decode-sized M per call, wide layer
    ((16,), 4096, 4096, 16),   # decode regime at the goal width
    ((1,), 4096, 4096, 64),
]
# bf16 over every shape; fp16 and fp32 over a few unless slow tests run (each new dtype × shape
# specialisation is a compile, seconds each on a cold Triton cache).
_QUICK = {0, 3, 8, 11}
PARITY_CASES = [
    pytest.param(dtype, shape, marks=() if dtype == torch.bfloat16 or i in _QUICK else pytest.mark.slow,
                 id=f"{dtype}-{shape}")
    for dtype in DTYPES for i, shape in enumerate(GPU_SHAPES)
]


@pytest.mark.parametrize("dtype,shape", PARITY_CASES)
def test_matches_reference(dtype, shape):
    run(*shape, dtype)


@pytest.mark.parametrize("schedule", configs.SCHEDULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_schedules(monkeypatch, schedule, dtype):
    monkeypatch.setenv(configs.SCHEDULE_ENV, schedule)
    run((257,), 384, 320, 24, dtype)


def test_fp32_master_R_with_bf16_layer():
    _, _, gR = run((300,), 256, 192, 16, torch.bfloat16, r_dtype=torch.float32)
    assert gR.dtype == torch.float32


def test_fp64():
    run((33,), 64, 48, 7, torch.float64, scaling=1 / 3)


def test_tf32(monkeypatch):
    """With TF32 on, fp32 dots round their inputs to 10 stored mantissa bits (u = 2^-11, fp16's, with fp32
    accumulation): the fp16 per-element tolerance."""
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert tb._precision(torch.float32) == "tf32"
        run((256,), 512, 384, 16, torch.float32, tol_dtype=torch.float16)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_and_expanded(dtype):
    x, w, b, A, R, B = make_inputs((200,), 96, 80, 8, dtype=dtype, device=DEV, requires_grad=False)
    R.requires_grad_()
    wide = torch.zeros(200, 192, dtype=dtype, device=DEV)
    wide[:, ::2] = x
    g = torch.randn(1, 80, dtype=torch.float64, device=DEV).to(dtype).expand(200, 80)
    for xs in (wide[:, ::2].requires_grad_(), x.t().contiguous().t().requires_grad_()):
        y = loraxs_linear(xs, w, b, A, R, B, 0.5, backend="triton")
        gx, gR = torch.autograd.grad(y, (xs, R), g)
        assert_matches_reference(y, gx, gR, (x, w, b, A, R, B), 0.5, dtype, f"strides {xs.stride()}", grad_out=g)


@pytest.mark.parametrize("r", [16, 100])
def test_grad_R_is_bitwise_deterministic(r):
    x, w, b, A, R, B = make_inputs((8192,), 512, 512, r, dtype=torch.bfloat16, device=DEV, r_dtype=torch.float32)
    assert tb.grad_r_splits(8192, r)[0] > 1
    g = torch.randn(8192, 512, device=DEV, dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        y = loraxs_linear(x, w, b, A, R, B, 0.5, backend="triton")
        grads.append(torch.autograd.grad(y, (R,), g)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_forward_is_one_launch(monkeypatch):
    x, w, b, A, R, B = make_inputs((512,), 256, 256, 16, dtype=torch.bfloat16, device=DEV, requires_grad=False)
    tb.forward(x, w, b, A, R, B, 0.5)  # compile first
    calls = []
    original = gemm_mod.gemm_rank_r_kernel.run
    monkeypatch.setattr(gemm_mod.gemm_rank_r_kernel, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    y, _ = tb.forward(x, w, b, A, R, B, 0.5)
    assert len(calls) == 1


def test_other_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, w, b, A, R, B = make_inputs((64,), 64, 48, 8, dtype=torch.bfloat16, device="cuda:1")
    y = loraxs_linear(x, w, b, A, R, B, 0.5, backend="triton")
    assert_matches_reference(y, None, None, (x, w, b, A, R, B), 0.5, torch.bfloat16, "y on cuda:1")


@pytest.mark.slow
@pytest.mark.parametrize("r", [16, 64])
def test_autotuned_goal_shapes(monkeypatch, r):
    """The benchmark's shapes (M = 8192, in = out = 4096, bf16) through the autotuner."""
    monkeypatch.setenv("LORAXS_TRITON_AUTOTUNE", "1")
    run((8192,), 4096, 4096, r, torch.bfloat16)


def _this_gpus_entries():
    arch = tb._arch(torch.device(DEV))
    gemm = [(schedule, regime, c) for schedule in configs.SCHEDULES for regime in configs.REGIMES
            for c in configs.gemm_configs(arch, regime, schedule, 2, "ieee")]
    proj = [(rclass, p) for rclass in configs.RANK_CLASSES for p in configs.proj_configs(arch, rclass, 2, "ieee")]
    return gemm, proj


_GEMM_ENTRIES, _PROJ_ENTRIES = _this_gpus_entries()


@pytest.mark.slow
@pytest.mark.parametrize("schedule,regime,config", _GEMM_ENTRIES, ids=str)
def test_every_config(monkeypatch, schedule, regime, config):
    """Each entry of this GPU's tables, bf16, forward and backward (the AOT report only compiles them).
    One test per entry, so that scripts/gpu_check.sh can spread them over processes."""
    monkeypatch.setenv(configs.SCHEDULE_ENV, schedule)
    with tb.forced_config(config):
        run((300,) if regime == "gemm" else (7,), 200, 520, 16 if schedule == "fused" else 80, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("rclass,config", _PROJ_ENTRIES, ids=str)
def test_every_projection_config(monkeypatch, rclass, config):
    monkeypatch.setenv(configs.SCHEDULE_ENV, "split")
    with tb.forced_config(proj=config):
        run((300,), 256, 264, 40 if rclass == "r64" else 200, torch.bfloat16)


@pytest.mark.slow
def test_more_than_2_31_elements():
    """x and y of 2**31 + 2**12 elements: the int64 offset path, checked on the rows at the far end."""
    M, in_f, out_f, r = 2**25 + 64, 64, 64, 16
    need = M * (2 * in_f + 2 * out_f + 3 * r) * 2 + (4 << 30)  # x, y, g, grad_x, xa, u (bf16) + fp64 chunks
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free on the device")
    _, w, b, A, R, B = make_inputs((1,), in_f, out_f, r, dtype=torch.bfloat16, device=DEV, requires_grad=False)
    x = torch.randn(M, in_f, device=DEV, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    y, xa = tb.forward(x, w, b, A, R, B, 0.5)
    tail = slice(M - 300, M)
    assert_matches_reference(y[tail], None, None, (x[tail], w, b, A, R, B), 0.5, torch.bfloat16, "last rows")
    assert_close(xa[tail], (x[tail].double() @ A.double()), torch.bfloat16, "x A, last rows")
    g = torch.randn(M, out_f, device=DEV, dtype=torch.bfloat16)
    gx, gR = tb.backward(g, xa, w, A, R, B, 0.5, True, True)
    assert_matches_reference(None, gx[tail], None, (x[tail], w, b, A, R, B), 0.5, torch.bfloat16, "last rows",
                             grad_out=g[tail])
    gR_ref = torch.zeros(r, r, dtype=torch.float64, device=DEV)
    for start in range(0, M, 1 << 22):  # fp64 in chunks: all of g in fp64 would be 17 GiB
        rows = slice(start, start + (1 << 22))
        gR_ref += xa[rows].double().t() @ (g[rows].double() @ B.double().t())
    assert_close(gR, 0.5 * gR_ref, torch.bfloat16, "grad_R")  # global: the per-element bound needs all of g


# ------------------------------------------------------------------ many adapters (backends/triton/multi.py)
def multi_inputs(M, in_f, out_f, r, n, dtype, ids=None, seed=0, r_dtype=None, ascale=True):
    """A layer, a bank of n R ~ N(0, 1/r), ids in [-1, n - 2] unless given, per-adapter scalings, g; on the
    device, random A and B of the SVD factors' scale (no 4096² SVD)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    kw = dict(device=DEV, dtype=torch.float32, generator=g)
    w = (torch.rand(out_f, in_f, **kw) * 2 - 1) / math.sqrt(in_f)
    b = torch.rand(out_f, **kw) * 2 - 1
    A = torch.randn(in_f, r, **kw) / math.sqrt(in_f)
    B = torch.randn(r, out_f, **kw) / math.sqrt(r)
    R = (torch.randn(n, r, r, **kw) / math.sqrt(r)).to(r_dtype or dtype)
    x = torch.randn(M, in_f, **kw)
    grad = torch.randn(M, out_f, **kw)
    asc = (torch.rand(n, **kw) * 2 + 0.5).to(dtype) if ascale else None
    if ids is None:
        ids = torch.randint(-1, n - 1, (M,), device=DEV, generator=g)
    x, w, b, A, B, grad = (t.to(dtype) for t in (x, w, b, A, B, grad))
    return x, w, b, A, R, B, ids, asc, grad


def check_multi_on_device(inputs, scaling, dtype, what, tol_dtype=None):
    from test_multi import reference_and_bounds

    from common import assert_within_bound, depths
    from loraxs_kernels.backends.triton import multi

    x, w, b, A, R, B, ids, asc, g = inputs
    y, xa = multi.forward_multi(x, w, b, A, R, B, ids, scaling, asc)
    gx, gR = multi.backward_multi(g, xa, w, A, R, B, ids, scaling, asc, True, True)
    s = scaling if asc is None else scaling * asc.double()
    (y_ref, gx_ref, gR_ref), (sy, sx, sR) = reference_and_bounds(x, w, b, A, R, B, ids, s, g)
    dy, dx, dR = depths(w.shape[1], w.shape[0], A.shape[1], x.shape[0])
    tol = tol_dtype or dtype
    assert y.dtype == dtype and gx.dtype == dtype and gR.dtype == R.dtype
    assert_within_bound(y, y_ref, sy, tol, f"{what} y", dy)
    assert_within_bound(gx, gx_ref, sx, tol, f"{what} grad_x", dx)
    assert_within_bound(gR, gR_ref, sR, tol, f"{what} grad_R", dR)
    return y, gx, gR


def _decode_ids(M=64, distinct=64, n=10_000):
    """The issue's decode goal: M rows over `distinct` adapters of n resident."""
    g = torch.Generator(device=DEV).manual_seed(5)
    chosen = torch.randperm(n, device=DEV, generator=g)[:distinct]
    return chosen[torch.arange(M, device=DEV) % distinct]


# (M, in, out, r, n)
MULTI_SHAPES = [
    (300, 256, 264, 16, 40),
    (37, 72, 88, 20, 5),       # odd sizes, r not a power of two
    (1, 48, 40, 4, 2),
    (9, 128, 112, 100, 3),     # RP = 128
    (200, 512, 384, 256, 8),   # r = 256
    (64, 4096, 4096, 16, 10_000),  # decode: 64 rows over 64 adapters of 10,000
    (2048, 1024, 1024, 64, 1000),  # prefill-like: more rows per program, 64-row tiles on sm_90
]
MULTI_CASES = [
    pytest.param(dtype, shape, marks=() if dtype == torch.bfloat16 or i in (0, 5) else pytest.mark.slow,
                 id=f"{dtype}-{shape}")
    for dtype in DTYPES for i, shape in enumerate(MULTI_SHAPES)
]


@pytest.mark.parametrize("dtype,shape", MULTI_CASES)
def test_multi_matches_reference(dtype, shape):
    M, in_f, out_f, r, n = shape
    ids = _decode_ids() if n == 10_000 else None
    check_multi_on_device(multi_inputs(M, in_f, out_f, r, n, dtype, ids=ids), 0.7, dtype, f"multi {shape}")


def test_multi_fp64_and_fp32_master_R():
    check_multi_on_device(multi_inputs(45, 64, 48, 7, 4, torch.float64), 1 / 3, torch.float64, "fp64")
    _, _, gR = check_multi_on_device(multi_inputs(300, 256, 192, 16, 9, torch.bfloat16, r_dtype=torch.float32),
                                     0.5, torch.bfloat16, "fp32 master R")
    assert gR.dtype == torch.float32


def test_multi_grad_R_is_bitwise_deterministic():
    from loraxs_kernels.backends.triton import multi

    x, w, b, A, R, B, ids, asc, g = multi_inputs(8192, 512, 512, 16, 1000, torch.bfloat16, r_dtype=torch.float32)
    _, xa = multi.forward_multi(x, w, b, A, R, B, ids, 0.5, asc)
    grads = [multi.backward_multi(g, xa, w, A, R, B, ids, 0.5, asc, False, True)[1] for _ in range(3)]
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    everything = torch.zeros_like(ids)  # one adapter owns every row: the longest segment
    grads = [multi.backward_multi(g, xa, w, A, R, B, everything, 0.5, asc, False, True)[1] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_multi_rows_equal_single_adapter():
    from loraxs_kernels.backends.triton import multi

    x, w, b, A, R, B, ids, asc, _ = multi_inputs(256, 384, 320, 16, 6, torch.bfloat16)
    y, _ = multi.forward_multi(x, w, b, A, R, B, ids, 0.8, asc)
    for k in range(5):
        rows = ids == k
        alone, _ = tb.forward(x[rows], w, b, A, R[k], B, 0.8 * float(asc[k]))
        assert_close(y[rows], alone, torch.bfloat16, f"rows of adapter {k}", scale=y)
