"""Many adapters in one batch on the Triton backend (backends/triton/multi.py), on CPU tensors through
Triton's interpreter: forward_multi / backward_multi against the fp64 reference
(reference.loraxs_linear_multi, gradients by its autograd) per element, in fp64, fp32, fp16 and bf16
(bf16 through the interpreter_bf16 fixture, as in test_triton_interpret.py), with planted faults that
the tolerances must catch in every dtype. Shapes stay small: the interpreter runs every program in numpy.
"""

import pytest
import torch
import torch.nn.functional as F

from common import assert_close, assert_within_bound, depths
from test_multi import make_multi, reference_and_bounds
from triton_interpreted import tb  # first: the backend's kernels under the interpreter
from loraxs_kernels.backends.triton import configs
from loraxs_kernels.backends.triton import multi

pytestmark = pytest.mark.usefixtures("interpreter_bf16")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def case(lead, in_f, out_f, r, n, dtype, *, seed=0, ids=None, ascale=False, r_dtype=None, bias=True,
         id_dtype=torch.int64):
    """(x, w, b, A, R, B, ids (M,), adapter_scaling or None, g) with x flattened to (M, in); R ~ N(0, 1/r),
    ids in [-1, n - 2] unless given (adapter n - 1 is never used), g ~ N(0, 1)."""
    x, w, b, A, R, B, ids_ = make_multi(lead, in_f, out_f, r, n, dtype, seed=seed, bias=bias, r_dtype=r_dtype,
                                        id_dtype=id_dtype)
    x = x.detach().reshape(-1, in_f)
    ids = (ids_ if ids is None else ids).reshape(-1).to(id_dtype)
    gen = torch.Generator().manual_seed(seed + 7)
    # Per-adapter scalings away from 1 (0.5..2.5, alternating sign): a scaling applied twice shows.
    asc = ((torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.5)
           * torch.tensor([1.0, -1.0]).repeat(n)[:n]).to(dtype) if ascale else None
    g = torch.randn(x.shape[0], out_f, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, A, R.detach(), B, ids, asc, g


def check(inputs, scaling, dtype, what="", *, run=None, need_x=True, need_R=True, ref_inputs=None):
    """forward_multi + backward_multi (or `run`, a planted fault) vs the fp64 reference per element.
    ref_inputs: the inputs the reference sees (default: the same)."""
    x, w, b, A, R, B, ids, asc, g = inputs
    y, xa, gx, gR = (run or run_multi)(x, w, b, A, R, B, ids, scaling, asc, g, need_x, need_R)
    x0, w0, b0, A0, R0, B0, ids0, asc0, g0 = ref_inputs or inputs
    s = scaling if asc0 is None else scaling * asc0.double()
    (y_ref, gx_ref, gR_ref), (sy, sx, sR) = reference_and_bounds(x0, w0, b0, A0, R0, B0, ids0, s, g0)
    dy, dx, dR = depths(w.shape[1], w.shape[0], A.shape[1], x.shape[0])
    assert y.dtype == dtype and y.shape == y_ref.shape and xa.shape == (x.shape[0], A.shape[1])
    assert_within_bound(y, y_ref, sy, dtype, f"{what} y", dy)
    xa_ref = x0.double() @ A0.double()
    assert_within_bound(xa, xa_ref, x0.double().abs() @ A0.double().abs(), dtype, f"{what} xa", w.shape[1])
    if need_x:
        assert gx.dtype == dtype
        assert_within_bound(gx, gx_ref, sx, dtype, f"{what} grad_x", dx)
    else:
        assert gx is None
    if need_R:
        assert gR.dtype == R.dtype and gR.shape == R.shape
        assert_within_bound(gR, gR_ref, sR, dtype, f"{what} grad_R", dR)
    else:
        assert gR is None
    return y, gx, gR


def run_multi(x, w, b, A, R, B, ids, scaling, asc, g, need_x=True, need_R=True):
    y, xa = multi.forward_multi(x, w, b, A, R, B, ids, scaling, asc)
    gx, gR = multi.backward_multi(g, xa, w, A, R, B, ids, scaling, asc, need_x, need_R)
    return y, xa, gx, gR


def _all(value):
    return lambda lead, n: torch.full(lead, value, dtype=torch.int64)


# (name, leading dims, in, out, r, n, ids maker or None, adapter_scaling)
CASES = [
    ("odd-sizes", (45,), 37, 19, 7, 5, None, False),
    ("M1", (1,), 24, 20, 4, 3, _all(0), False),
    ("empty", (0,), 24, 20, 4, 3, None, False),
    ("r1", (20,), 24, 18, 1, 4, None, True),
    ("r20", (33,), 40, 36, 20, 6, None, False),
    ("r100", (9,), 112, 104, 100, 3, None, False),   # RP = 128
    ("one-adapter", (30,), 40, 24, 8, 4, _all(2), True),
    ("all-minus-one", (12,), 24, 20, 4, 3, _all(-1), False),
    ("n1", (20,), 24, 20, 4, 1, _all(0), False),
    ("n300", (40,), 32, 24, 4, 300, lambda lead, n: torch.randint(-1, n - 1, lead,
                                                                   generator=torch.Generator().manual_seed(9)), True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,lead,in_f,out_f,r,n,ids,ascale", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(name, lead, in_f, out_f, r, n, ids, ascale, dtype):
    inputs = case(lead, in_f, out_f, r, n, dtype, ids=ids(lead, n) if ids else None, ascale=ascale)
    _, _, gR = check(inputs, 0.75, dtype, name)
    used = set(inputs[6].tolist())
    unused = [k for k in range(n) if k not in used]
    if n > 1:
        assert unused, "every case leaves an adapter unused"
    assert torch.equal(gR[unused], torch.zeros_like(gR[unused])), "an adapter no row used got a gradient"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_master_R_with_16bit_layer(dtype):
    _, _, gR = check(case((29,), 40, 24, 6, 4, dtype, r_dtype=torch.float32, ascale=True), 1.5, dtype, "fp32 R")
    assert gR.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_x_and_grad_and_int32_ids(dtype):
    """x with K stride 2, grad_out transposed (stride along M of 1), ids int32 with stride 3."""
    x, w, b, A, R, B, ids, asc, g = case((26,), 24, 20, 5, 4, dtype, id_dtype=torch.int32, seed=2)
    wide = torch.zeros(26, 48, dtype=dtype)
    wide[:, ::2] = x
    ids3 = torch.zeros(26, 3, dtype=torch.int32)
    ids3[:, 0] = ids
    x_k2, g_t, ids_s = wide[:, ::2], g.t().contiguous().t(), ids3[:, 0]
    assert x_k2.stride() == (48, 2) and g_t.stride() == (1, 26) and ids_s.stride() == (3,)
    check((x_k2, w, b, A, R, B, ids_s, asc, g_t), 0.5, dtype, "strided")


@pytest.mark.parametrize("need_x,need_R", [(True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_gradient(need_x, need_R, dtype):
    check(case((35,), 32, 28, 6, 5, dtype, ascale=True, seed=3), 0.6, dtype, "one grad", need_x=need_x,
          need_R=need_R)


def test_neither_gradient():
    x, w, b, A, R, B, ids, asc, g = case((5,), 16, 12, 4, 3, torch.float32)
    assert multi.backward_multi(g, x @ A, w, A, R, B, ids, 1.0, asc, False, False) == (None, None)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on the inf row's x A
def test_minus_one_row_with_inf_leaks_nothing():
    """A -1 row's low-rank term is never added and its rows are in no grad_R segment: inf in its x stays
    in its own base output (inf·0 would be NaN if T were masked by a product with zero), and y, grad_x
    and grad_R of the other rows are what the reference gives without that row."""
    inputs = case((20,), 24, 20, 4, 3, torch.float32, ids=torch.arange(20) % 3 - 1, ascale=True)
    x, w, b, A, R, B, ids, asc, g = inputs
    x = x.clone()
    x[0, 0] = float("inf")  # row 0 has id -1
    y, xa, gx, gR = run_multi(x, w, b, A, R, B, ids, 0.5, asc, g)
    assert torch.isinf(y[0]).all() and not torch.isnan(y[0]).any()
    check(tuple(t[1:] for t in inputs[:1]) + inputs[1:6] + (ids[1:], asc, g[1:]), 0.5, torch.float32,
          "rows after the inf row", run=lambda *a: (y[1:], xa[1:], gx[1:], gR))


def test_no_bias():
    check(case((21,), 32, 24, 6, 4, torch.float32, bias=False), 0.9, torch.float32, "no bias")


def test_int64_offsets(monkeypatch):
    """The IDX64 variants (taken when a tensor spans > 2**31 elements) compute the same numbers."""
    assert multi._span((2**15, 2**16), (2**16, 1)) == 2**31 - 1
    assert multi._span((3, 0), (5, 1)) == 0
    monkeypatch.setattr(multi, "_INT32_LIMIT", -1)  # every span counts as too large
    monkeypatch.setattr(tb, "_needs_int64", lambda *views: True)
    calls = _launches(monkeypatch, record_kwargs=True)
    check(case((23,), 24, 20, 5, 4, torch.float32, ascale=True), 0.5, torch.float32, "idx64")
    assert all(kw["IDX64"] for kw in calls["kwargs"])


# ------------------------------------------------------------------------------ launches, bits, rows
def _launches(monkeypatch, record_kwargs=False):
    calls = {"kwargs": []} if record_kwargs else {}
    for kernel in (multi.gemm_rank_r_kernel, multi.x_p_per_row_q_kernel, multi.grad_r_segments_kernel):
        original = kernel.run

        def counted(*args, _orig=original, _name=kernel.__name__, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            if record_kwargs:
                calls["kwargs"].append(kwargs)
            return _orig(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    return calls


@pytest.mark.parametrize("need_x,need_R,expected", [
    (True, True, {"x_p_per_row_q_kernel": 1, "gemm_rank_r_kernel": 1, "grad_r_segments_kernel": 1}),
    (True, False, {"x_p_per_row_q_kernel": 1, "gemm_rank_r_kernel": 1}),
    (False, True, {"x_p_per_row_q_kernel": 1, "grad_r_segments_kernel": 1}),
])
def test_launches(monkeypatch, need_x, need_R, expected):
    calls = _launches(monkeypatch)
    x, w, b, A, R, B, ids, asc, g = case((30,), 24, 20, 4, 3, torch.float32)
    _, xa = multi.forward_multi(x, w, b, A, R, B, ids, 0.5, asc)
    assert calls == {"x_p_per_row_q_kernel": 1, "gemm_rank_r_kernel": 1}
    calls.clear()
    multi.backward_multi(g, xa, w, A, R, B, ids, 0.5, asc, need_x, need_R)
    assert calls == expected


def test_empty_batch_launches_nothing(monkeypatch):
    calls = _launches(monkeypatch)
    x, w, b, A, R, B, ids, asc, g = case((0,), 24, 20, 4, 3, torch.float32)
    y, xa = multi.forward_multi(x, w, b, A, R, B, ids, 0.5, asc)
    gx, gR = multi.backward_multi(g, xa, w, A, R, B, ids, 0.5, asc, True, True)
    assert y.shape == (0, 20) and xa.shape == (0, 4) and gx.shape == (0, 24)
    assert torch.equal(gR, torch.zeros(3, 4, 4)) and calls == {}


def test_segments_keep_row_order():
    """The reduction's order: each adapter's rows contiguous and in their original order, -1 rows first
    and outside every segment; the same ids give the same permutation."""
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0, 3, 2], dtype=torch.int32)
    perm, bounds = multi.segments(ids, 5)
    assert perm.tolist() == [1, 5, 2, 6, 0, 3, 4, 8, 7]
    assert bounds.tolist() == [2, 4, 4, 8, 9, 9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_R_bitwise_identical_across_calls(dtype):
    """Two calls give grad_R bit for bit. (On the interpreter programs run one after another, so this
    checks the host side, the sort and the fixed tiles; test_triton_gpu.py checks it on a device.)"""
    x, w, b, A, R, B, ids, asc, g = case((150,), 32, 24, 6, 7, dtype, ascale=True, seed=4)
    _, xa = multi.forward_multi(x, w, b, A, R, B, ids, 0.5, asc)
    first = multi.backward_multi(g, xa, w, A, R, B, ids, 0.5, asc, False, True)[1]
    second = multi.backward_multi(g, xa, w, A, R, B, ids, 0.5, asc, False, True)[1]
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_row_equals_its_adapter_alone(dtype):
    """Rows of adapter k equal the single-adapter Triton forward (backends/triton forward) with R[k] and
    s_k on those rows alone; -1 rows equal the base layer."""
    x, w, b, A, R, B, ids, asc, g = case((40,), 32, 24, 6, 4, dtype, ascale=True, seed=6)
    y, _ = multi.forward_multi(x, w, b, A, R, B, ids, 0.8, asc)
    for k in range(-1, 4):
        rows = ids == k
        if not rows.any():
            continue
        if k == -1:
            alone = F.linear(x[rows].double(), w.double(), b.double())
        else:
            alone, _ = tb.forward(x[rows], w, b, A, R[k], B, 0.8 * float(asc[k]))
        assert_close(y[rows], alone, dtype, f"rows of adapter {k}", scale=y)


def _split_first_entries():
    """The GEMM configs a GPU runs for the multi forward/backward: each table's first split entry."""
    seen = {}
    for arch in configs.ARCHS:
        for regime in configs.REGIMES:
            for size, precision, dtype in ((2, "ieee", torch.bfloat16), (4, "tf32", torch.float32),
                                           (4, "ieee", torch.float32), (8, "ieee", torch.float64)):
                c = multi.gemm_table_config(arch, regime, size, precision)
                seen.setdefault((c, dtype), None)
    return list(seen)


@pytest.mark.parametrize("config,dtype", _split_first_entries(),
                         ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype)
                         else f"{v.block_m}x{v.block_n}x{v.block_k}g{v.group_n}")
def test_gemm_gpu_configs_at_their_real_size(config, dtype):
    """The GEMM's GPU configs (T given) at their real tile sizes, forward and grad_x; the last tiles partial
    in M, N and K. The interpreter ignores warps and stages; the AOT report compiles those."""
    with tb.forced_config(config):
        check(case((37,), 72, 40, 9, 4, dtype, ascale=True, seed=8), 0.7, dtype, f"config {config}")


def _per_row_gpu_configs():
    seen = {}
    for arch in configs.ARCHS:
        for size, precision, dtype in ((2, "ieee", torch.bfloat16), (4, "tf32", torch.float32),
                                       (4, "ieee", torch.float32), (8, "ieee", torch.float64)):
            for rp, r in ((16, 9), (64, 40), (256, 130)):
                for M in (64, 8192):
                    c = multi.per_row_config(M, rp, size, precision, arch, interpreted=False)
                    seen.setdefault((c, r, dtype), None)
    return list(seen)


@pytest.mark.parametrize("config,r,dtype", _per_row_gpu_configs(),
                         ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else str(v) if isinstance(v, int)
                         else f"{v.block_m}x{v.block_k}c{v.block_c}w{v.num_warps}")
def test_per_row_gpu_configs_at_their_real_size(monkeypatch, config, r, dtype):
    """Each tile config the per-row kernel runs on a GPU, at its real size and the padded rank it serves, on
    rows spanning several row blocks with the last one partial (150 rows; 40 at RP = 256, where the
    interpreter's gather loop is slowest)."""
    monkeypatch.setattr(multi, "per_row_config", lambda *a, **k: config)
    M = 150 if r < 128 else 40
    assert M > config.block_m and M % config.block_m
    check(case((M,), max(40, r + 6), max(24, r + 2), r, 5, dtype, ascale=True, seed=12), 0.7, dtype,
          f"per-row config {config}")


def test_per_row_config_budget():
    """BLOCK_M·RP·BLOCK_C stays within the gather budget for every padded rank (the AOT report's spill
    check relies on it)."""
    for es, prec in ((2, "ieee"), (4, "tf32"), (4, "ieee"), (8, "ieee")):
        for rp in (16, 32, 64, 128, 256):
            for M in (16, 64, 8192):
                for arch in configs.ARCHS:
                    c = multi.per_row_config(M, rp, es, prec, arch, interpreted=False)
                    assert c.block_c >= 1 and c.block_m * rp * c.block_c <= multi.per_row_budget(es, c.num_warps)


# ----------------------------------------------------------------------------------- planted faults
def _neighbour_R(k):
    """Adapter k's rows get adapter k + 1's R (the kernel is handed shifted ids)."""
    def run(x, w, b, A, R, B, ids, scaling, asc, g, need_x, need_R):
        wrong = torch.where(ids == k, k + 1, ids)
        return run_multi(x, w, b, A, R, B, wrong, scaling, asc, g, need_x, need_R)
    return run


def _scaling_twice(k):
    """Adapter k's s applied twice: its adapter_scaling entry multiplied by s_k."""
    def run(x, w, b, A, R, B, ids, scaling, asc, g, need_x, need_R):
        wrong = asc.clone()
        wrong[k] = asc[k] * scaling * asc[k]
        return run_multi(x, w, b, A, R, B, ids, scaling, wrong, g, need_x, need_R)
    return run


def _bias_dropped(x, w, b, A, R, B, ids, scaling, asc, g, need_x, need_R):
    return run_multi(x, w, None, A, R, B, ids, scaling, asc, g, need_x, need_R)


def _grad_R_to_next(k):
    """grad_R of adapter k written to slot k + 1 (and k + 1's to k)."""
    def run(*args):
        y, xa, gx, gR = run_multi(*args)
        gR = gR.clone()
        gR[[k, k + 1]] = gR[[k + 1, k]]
        return y, xa, gx, gR
    return run


FAULTS = [("neighbour-R", _neighbour_R(1), "y"), ("scaling-twice", _scaling_twice(1), "y"),
          ("bias-dropped", _bias_dropped, "y"), ("grad_R-to-next", _grad_R_to_next(1), "grad_R")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,fault,where", FAULTS, ids=[f[0] for f in FAULTS])
def test_planted_fault_is_caught(name, fault, where, dtype):
    inputs = case((48,), 40, 32, 8, 4, dtype, ascale=True, seed=11,
                  ids=torch.arange(48) % 4 - 1)  # adapters 0, 1, 2 used, 3 not, -1 rows
    check(inputs, 0.75, dtype, "correct")  # the same inputs pass without the fault
    with pytest.raises(AssertionError, match=f"{where}: max error beyond"):
        check(inputs, 0.75, dtype, name, run=fault)


# ------------------------------------------------------------------- issue 19: the GPU defects found by reading
def test_fp32_bank_beside_fp64_layer():
    """An fp32 bank beside an fp64 layer runs here as on every backend (the contract accepts it): y and
    grad_x within fp64's bounds, grad_R in fp32 within fp32's (one more rounding, to the bank's dtype)."""
    inputs = case((29,), 40, 24, 6, 4, torch.float64, r_dtype=torch.float32, ascale=True)
    check(inputs, 1.5, torch.float64, "fp32 bank, fp64 layer", need_R=False)
    x, w, b, A, R, B, ids, asc, g = inputs
    _, _, _, gR = run_multi(x, w, b, A, R, B, ids, 1.5, asc, g, False, True)
    (_, _, gR_ref), (_, _, sR) = reference_and_bounds(x, w, b, A, R, B, ids, 1.5 * asc.double(), g)
    assert gR.dtype == torch.float32
    assert_within_bound(gR, gR_ref, sR, torch.float32, "grad_R", depths(40, 24, 6, 29)[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_unused_adapter_gradient_is_zero_whatever_its_scaling(dtype):
    """inf and NaN in adapter_scaling slots no row uses: their grad_R is exactly 0, the rest as usual."""
    x, w, b, A, R, B, ids, asc, g = case((30,), 24, 20, 5, 5, dtype, ascale=True, seed=4)
    ids = torch.where(ids % 5 == 1, 0, ids)  # adapter 1 unused (and 4: make_multi never draws n - 1)
    asc = asc.clone()
    asc[1], asc[4] = float("inf"), float("nan")
    _, _, gR = check((x, w, b, A, R, B, ids, asc, g), 0.75, dtype, "inf/NaN unused")
    assert torch.equal(gR[[1, 4]], torch.zeros_like(gR[[1, 4]]))
