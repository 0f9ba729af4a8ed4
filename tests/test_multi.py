"""Many adapters in one batch (issue 11): loraxs_linear_multi / torch.ops.loraxs.linear_multi against
the fp64 reference (reference.loraxs_linear_multi) per element, row by row against the single-adapter
op, -1 rows, gradients per adapter, bad input, opcheck, torch.compile, MultiLoRAXSLinear with
use_adapters and apply_loraxs, the bank's slots, and a planted fault the parity check must catch."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import loraxs_kernels
from common import (DTYPES, allow_no_native, assert_close, assert_within_bound, aten_op_names, depths, make_inputs,
                    native_reason)
from loraxs_kernels import reference

pytestmark = pytest.mark.skipif(native_reason() is not None and allow_no_native(),
                                reason=f"the C++ extension is missing: {native_reason()}")


def make_multi(lead, in_f, out_f, r, n, dtype=torch.float32, *, seed=0, bias=True, r_dtype=None, minus_one=True,
               id_dtype=torch.int64):
    """make_inputs' layer and x, a bank of n R ~ N(0, 1/r) and random ids in [-1, n - 2] (or [0, n - 2]): the
    last adapter is never used, so its gradient must come back zero."""
    x, w, b, A, _, B = make_inputs(lead, in_f, out_f, r, dtype=dtype, bias=bias, seed=seed, requires_grad=False)
    g = torch.Generator().manual_seed(seed + 100)
    R = (torch.randn(n, r, r, generator=g, dtype=torch.float64) / math.sqrt(r)).to(r_dtype or dtype)
    ids = torch.randint(-1 if minus_one else 0, n - 1, lead, generator=g).to(id_dtype)
    return x.requires_grad_(), w, b, A, R.requires_grad_(), B, ids


def _d(t):
    return None if t is None else t.detach().to(torch.float64)


def _abs(t):
    return None if t is None else t.detach().to(torch.float64).abs()


def reference_and_bounds(x, w, b, A, R, B, ids, s, grad_out):
    """(y, grad_x, grad_R) of the fp64 reference and their per-element bounds as (base, low-rank) parts:
    the reference evaluated on absolute values, whose gradients against the non-negative |g| are exactly
    |g||W| + |s|((|g||B|ᵀ)|R_id|ᵀ)|A|ᵀ and |s|·Σ_rows (|x||A|)ᵀ(|g||B|ᵀ), the textbook yardsticks."""
    s64 = s.detach().to(torch.float64) if isinstance(s, torch.Tensor) else s
    x64, R64 = _d(x).requires_grad_(), _d(R).requires_grad_()
    y = reference.loraxs_linear_multi(x64, _d(w), _d(b), _d(A), R64, _d(B), ids, s64)
    gx, gR = torch.autograd.grad(y, (x64, R64), _d(grad_out))
    s_abs = s64.abs() if isinstance(s64, torch.Tensor) else abs(s64)
    xb = _abs(x).requires_grad_()
    yb = F.linear(xb, _abs(w), _abs(b))
    (gxb,) = torch.autograd.grad(yb, xb, _abs(grad_out))
    xl, Rl = _abs(x).requires_grad_(), _abs(R).requires_grad_()
    yl = reference.loraxs_linear_multi(xl, torch.zeros_like(_abs(w)), None, _abs(A), Rl, _abs(B), ids, s_abs)
    gxl, gRl = torch.autograd.grad(yl, (xl, Rl), _abs(grad_out))
    return (y, gx, gR), ((yb.detach(), yl.detach()), (gxb, gxl), (torch.zeros_like(gRl), gRl))


def check_multi(fn, inputs, s, dtype, what=""):
    """fn(x, R) → y; forward and backward against the fp64 reference, every element within the
    tolerance of tests/common.py (elementwise_tolerance); returns (y, grad_x, grad_R)."""
    x, w, b, A, R, B, ids = inputs
    x.grad = R.grad = None
    y = fn(x, R)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0]), f"{what}: y {y.dtype} {tuple(y.shape)}"
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    y.backward(g)
    (y_ref, gx_ref, gR_ref), (sy, sx, sR) = reference_and_bounds(x, w, b, A, R, B, ids, s, g)
    dy, dx, dR = depths(w.shape[1], w.shape[0], A.shape[1], ids.numel())
    assert_within_bound(y, y_ref, sy, dtype, f"{what} y", dy)
    assert x.grad.dtype == x.dtype and R.grad.dtype == R.dtype
    assert_within_bound(x.grad, gx_ref, sx, dtype, f"{what} grad_x", dx)
    assert_within_bound(R.grad, gR_ref, sR, dtype, f"{what} grad_R", dR)
    return y, x.grad, R.grad


def multi(w, b, A, B, ids, s):
    return lambda x, R: loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, s)


# (leading dims, in, out, r, n adapters)
CASES = [
    ((64,), 128, 96, 16, 7),
    ((4, 33), 64, 80, 8, 5),      # 3-D x: ids (4, 33)
    ((17,), 31, 45, 1, 3),        # odd sizes, r = 1
    ((300,), 40, 30, 12, 40),     # more adapters than rows per adapter
    ((1,), 48, 40, 4, 2),         # one row
    ((0,), 32, 16, 4, 3),         # empty batch
    ((600,), 48, 40, 32, 3),      # few adapters with many rows each: the grouped schedule (the others run per row)
]


def case_id(c):
    lead, i, o, r, n = c
    return "x".join(map(str, lead)) + f"-{i}-{o}-r{r}-n{n}"


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(dtype, case):
    lead, i, o, r, n = case
    inputs = make_multi(lead, i, o, r, n, dtype)
    x, w, b, A, R, B, ids = inputs
    _, _, gR = check_multi(multi(w, b, A, B, ids, 0.75), inputs, 0.75, dtype, f"{dtype} {case_id(case)}")
    unused = [k for k in range(n) if not bool((ids == k).any())]
    assert n - 1 in unused
    assert torch.equal(gR[unused], torch.zeros_like(gR[unused])), "an adapter no row used got a gradient"


@pytest.mark.parametrize("variant", ["int32-ids", "no-bias", "fp32-master-R", "scaling-tensor", "no-minus-one"])
def test_parity_variants(variant):
    dtype = torch.bfloat16 if variant == "fp32-master-R" else torch.float32
    inputs = make_multi((2, 24), 48, 40, 8, 6, dtype, bias=variant != "no-bias", seed=3,
                        r_dtype=torch.float32 if variant == "fp32-master-R" else None,
                        id_dtype=torch.int32 if variant == "int32-ids" else torch.int64,
                        minus_one=variant != "no-minus-one")
    x, w, b, A, R, B, ids = inputs
    s = torch.tensor([0.5, -2.0, 1.0, 3.0, 0.25, 7.0]) if variant == "scaling-tensor" else 1.5
    check_multi(multi(w, b, A, B, ids, s), inputs, s, dtype, variant)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_every_row_equals_its_adapter_alone(dtype):
    """Row by row: the batch of mixed adapters gives what each adapter's rows give through the
    single-adapter op (loraxs_linear) with that adapter's R, gradients included; -1 rows give F.linear."""
    n = 5
    x, w, b, A, R, B, ids = make_multi((3, 20), 64, 48, 8, n, dtype, seed=5)
    g = torch.randn(3, 20, 48, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y = loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, 0.5)
    y.backward(g)
    for k in range(-1, n):
        rows = ids == k
        xk = x.detach()[rows].requires_grad_()
        if k == -1:
            yk = F.linear(xk, w, b)
            yk.backward(g[rows])
        else:
            Rk = R.detach()[k].clone().requires_grad_()
            yk = loraxs_kernels.loraxs_linear(xk, w, b, A, Rk, B, 0.5, backend="cpp")
            yk.backward(g[rows])
            if rows.any():
                assert_close(R.grad[k], Rk.grad, dtype, f"grad_R[{k}]")
        assert_close(y.detach()[rows], yk.detach(), dtype, f"y rows of adapter {k}", scale=y)
        assert_close(x.grad[rows], xk.grad, dtype, f"grad_x rows of adapter {k}", scale=x.grad)


def test_minus_one_rows_are_the_base_layer_bit_for_bit():
    x, w, b, A, R, B, ids = make_multi((50,), 32, 24, 4, 3, torch.float32, seed=2)
    ids[::2] = -1
    x = x.detach().clone()
    x[0, 0] = float("inf")  # a -1 row's low-rank term is never formed, so nothing from it leaks in
    y = loraxs_kernels.loraxs_linear_multi(x, w, b, A, R.detach(), B, ids, 2.0)
    base = F.linear(x, w, b)
    assert torch.equal(y[ids == -1], base[ids == -1])
    assert not torch.equal(y[ids >= 0], base[ids >= 0])
    all_base = loraxs_kernels.loraxs_linear_multi(x, w, b, A, R.detach(), B, torch.full_like(ids, -1), 2.0)
    assert torch.equal(all_base, base)


def _aten_ops(fn):
    return set(aten_op_names(fn))


# (M, r, n) picking each CPU schedule by csrc/cpu/multi_aten.cpp's rule used·6000 > active·r²
SCHEDULES = {"per-row": (400, 8, 9), "grouped": (600, 32, 3)}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_cpu_schedule_choice(schedule):
    """The cases above that claim a schedule run it: per row sums grad_R per adapter by segment_reduce
    over the outer products (bmm) of the rows sorted by adapter (its forward at this r and dtype is the
    loop of the next test); grouped sorts the rows and runs a GEMM per adapter (forward and backward)."""
    M, r, n = SCHEDULES[schedule]
    x, w, b, A, R, B, ids = make_multi((M,), 48, 40, r, n, torch.float32)
    ops = _aten_ops(lambda: loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids).sum().backward())
    per_row = schedule == "per-row"
    assert ("aten::bmm" in ops) == per_row and ("aten::segment_reduce" in ops) == per_row, ops
    assert "aten::sort" in ops, ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_forward_is_one_loop_for_fp32_and_fp64_at_small_rank(dtype):
    """The per-row forward on the host: one loop over the rows (no gather, no batched product) for fp32
    and fp64 at r <= 16; the gather + bmm for half inputs and for r > 16. test_parity checks its values
    (cases at r = 1, 4, 8, 12, 16 run it), the grad_x path (R transposed) included."""
    for r, n, loop_rank in ((8, 9, True), (24, 60, False)):
        x, w, b, A, R, B, ids = make_multi((400,), 48, 40, r, n, dtype)
        with torch.no_grad():
            ops = _aten_ops(lambda: loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids))
        loop = loop_rank and dtype in (torch.float32, torch.float64)
        assert ("aten::bmm" in ops) != loop and ("aten::index_select" in ops) != loop, (r, ops)


def per_sequence_ids(batch, seq, n, seed, minus_one_every=0):
    """One adapter per sequence (the serving layout), broadcast over its tokens: every adapter's rows are
    one run of consecutive rows when no adapter serves two sequences; every minus_one_every-th sequence -1."""
    g = torch.Generator().manual_seed(seed)
    per_seq = torch.randperm(n, generator=g)[:batch]
    if minus_one_every:
        per_seq[::minus_one_every] = -1
    return per_seq[:, None].expand(batch, seq)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_minus_one", [False, True], ids=["all-adapted", "minus-one-sequences"])
def test_runs_schedule(dtype, with_minus_one):
    """Each adapter's rows one run (one adapter per sequence, few adapters with many rows: the grouped
    rule): the GEMMs run on the runs in place, no sort, gather or scatter, forward and backward; values
    and gradients within the bounds of check_multi, unused adapters' gradients exactly zero."""
    batch, seq, r, n = 6, 40, 32, 9
    x, w, b, A, R, B, _ = make_multi((batch, seq), 48, 40, r, n, dtype, seed=5)
    ids = per_sequence_ids(batch, seq, n, seed=2, minus_one_every=3 if with_minus_one else 0)
    inputs = (x, w, b, A, R, B, ids)
    ops = _aten_ops(lambda: loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, 0.75).sum().backward())
    assert not {"aten::sort", "aten::bmm", "aten::index_copy_", "aten::index_select"} & ops, ops
    _, _, gR = check_multi(multi(w, b, A, B, ids, 0.75), inputs, 0.75, dtype, f"runs {dtype}")
    unused = sorted(set(range(n)) - set(ids[ids >= 0].tolist()))
    assert unused and torch.equal(gR[unused], torch.zeros_like(gR[unused]))


def test_runs_schedule_gives_the_grouped_schedules_values():
    """The same rows as one run each or scattered over the batch (the sorted grouped schedule): the same
    per-row outputs and the same grad_R up to rounding, grad_R twice the same bits."""
    batch, seq, r, n = 6, 40, 32, 9
    x, w, b, A, R, B, _ = make_multi((batch, seq), 48, 40, r, n, torch.float64, seed=6)
    ids = per_sequence_ids(batch, seq, n, seed=4, minus_one_every=4)
    perm = torch.randperm(batch * seq, generator=torch.Generator().manual_seed(1))
    g = torch.randn(batch * seq, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outs = []
    for rows in (torch.arange(batch * seq), perm, torch.arange(batch * seq)):
        R.grad = None
        xr = x.detach().reshape(-1, 48)[rows].requires_grad_()
        y = loraxs_kernels.loraxs_linear_multi(xr, w, b, A, R, B, ids.reshape(-1)[rows], 0.75)
        y.backward(g[rows])
        inv = torch.empty_like(rows)
        inv[rows] = torch.arange(rows.numel())
        outs.append((y.detach()[inv], xr.grad[inv], R.grad.clone()))
    (y0, gx0, gR0), (y1, gx1, gR1), (_, _, gR2) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gR1, gR0, rtol=1e-12, atol=1e-12)
    assert torch.equal(gR2, gR0)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_grad_R_is_reproducible_and_per_adapter(schedule):
    """Two runs give the same bits; adapter k's gradient depends on its own rows only: the batch with
    other adapters' rows removed gives the same grad_R[k] up to rounding."""
    M, r, n = SCHEDULES[schedule]
    x, w, b, A, R, B, ids = make_multi((M,), 64, 64, r, n, torch.float32, seed=4)
    g = torch.randn(M, 64, generator=torch.Generator().manual_seed(3))
    runs = []
    for _ in range(2):
        R.grad = None
        loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, 1.0).backward(g)
        runs.append(R.grad.clone())
    assert torch.equal(runs[0], runs[1])
    for k in (0, n - 2):
        rows = ids == k
        R.grad = None
        loraxs_kernels.loraxs_linear_multi(x.detach()[rows], w, b, A, R, B, ids[rows], 1.0).backward(g[rows])
        assert_close(R.grad[k], runs[0][k], torch.float32, f"grad_R[{k}] from its rows alone")
        others = [j for j in range(n) if j != k]
        assert torch.equal(R.grad[others], torch.zeros_like(R.grad[others]))


# ------------------------------------------------------------------------------------ planted fault
def neighbour_fault(w, b, A, B, ids, s, k):
    """A wrong implementation: adapter k's rows get adapter k + 1's R."""
    wrong = torch.where(ids == k, k + 1, ids)
    return lambda x, R: reference.loraxs_linear_multi(x, w, b, A, R, B, wrong, s)


class _SwapGradSlots(torch.autograd.Function):
    """Identity forward; the backward hands adapter k's gradient to k + 1 and back."""

    @staticmethod
    def forward(ctx, R, k):
        ctx.k = k
        return R.view_as(R)

    @staticmethod
    def backward(ctx, g):
        k = ctx.k
        return g[torch.tensor([*range(k), k + 1, k, *range(k + 2, g.shape[0])])], None


@pytest.mark.parametrize("fault", ["neighbour-R-forward", "grad_R-to-neighbour"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_check_catches_a_neighbours_R(dtype, fault):
    inputs = make_multi((64,), 128, 96, 16, 7, dtype, seed=0)
    x, w, b, A, R, B, ids = inputs
    assert bool((ids == 2).any())
    if fault == "neighbour-R-forward":
        fn, where = neighbour_fault(w, b, A, B, ids, 0.75, 2), "y"
    else:
        op = multi(w, b, A, B, ids, 0.75)
        fn, where = (lambda x, R: op(x, _SwapGradSlots.apply(R, 2))), "grad_R"
    with pytest.raises(AssertionError, match=f"{where}: max error beyond"):
        check_multi(fn, inputs, 0.75, dtype, "neighbour")


# ----------------------------------------------------------------------------------------- bad input
def _bad_cases():
    def base():
        x, w, b, A, R, B, ids = make_multi((4, 6), 16, 12, 4, 3, seed=1)
        return dict(x=x.detach(), weight=w, bias=b, A=A, R=R.detach(), B=B, adapter_ids=ids, scaling=1.0)

    def with_(**kw):
        return lambda: {**base(), **{k: (v(base()) if callable(v) else v) for k, v in kw.items()}}

    return [
        ("id-too-large", with_(adapter_ids=lambda a: a["adapter_ids"].index_put((torch.tensor([2]), torch.tensor([5])),
                                                                                 torch.tensor(3))),
         ValueError, r"adapter_ids must be in \[-1, 3\) for a bank of 3 adapters \(R \(3, 4, 4\)\), got 3 at index \(2, 5\)"),
        ("id-below-minus-one", with_(adapter_ids=lambda a: a["adapter_ids"].index_put((torch.tensor([0]), torch.tensor([1])),
                                                                                       torch.tensor(-2))),
         ValueError, r"got -2 at index \(0, 1\)"),
        ("float-ids", with_(adapter_ids=lambda a: a["adapter_ids"].float()), TypeError,
         r"adapter_ids has dtype torch.float32; it must be torch.int32 or torch.int64"),
        ("ids-shape", with_(adapter_ids=lambda a: a["adapter_ids"][:, :5]), ValueError,
         r"adapter_ids must have shape x.shape\[:-1\] = \(4, 6\) \(one id per row\), got \(4, 5\)"),
        ("ids-flat", with_(adapter_ids=lambda a: a["adapter_ids"].reshape(-1)), ValueError, r"got \(24\)"),
        ("ids-device", with_(adapter_ids=lambda a: a["adapter_ids"].to("meta")), RuntimeError,
         r"adapter_ids is on meta but x is on cpu"),
        ("R-2d", with_(R=lambda a: a["R"][0]), ValueError,
         r"R must be a bank of shape \(n, r, r\) with n >= 1 adapters, got \(4, 4\)"),
        ("R-rank", with_(R=lambda a: a["R"][:, :3, :3]), ValueError,
         r"R must have shape \(n, r, r\) = \(3, 4, 4\) to match A \(16, 4\), got \(3, 3, 3\)"),
        ("R-empty-bank", with_(R=lambda a: a["R"][:0]), ValueError, r"with n >= 1 adapters, got \(0, 4, 4\)"),
        ("scaling-length", with_(scaling=torch.ones(2)), ValueError,
         r"adapter_scaling must have shape \(n,\) = \(3\) to match R \(3, 4, 4\), got \(2\)"),
        ("scaling-int", with_(scaling=torch.ones(3, dtype=torch.int64)), TypeError,
         r"adapter_scaling has dtype torch.int64; it must be a floating dtype"),
        ("x-features", with_(x=lambda a: a["x"][..., :15]), ValueError, r"x has 15 features"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(make, exc, match):
    a = make()
    with pytest.raises(exc, match=match):
        loraxs_kernels.loraxs_linear_multi(**a)
    # The registered op checks the same before its kernel, with the same words.
    s = a.pop("scaling")
    st = (1.0, s) if isinstance(s, torch.Tensor) else (s, None)
    with pytest.raises(exc, match=match):
        torch.ops.loraxs.linear_multi(*a.values(), *st)


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_python_contract_reads_the_same(make, exc, match):
    """ops/multi.py's checks (the fake kernels' and the build-less path's) word each error as the C++ ones."""
    from loraxs_kernels.ops.multi import check_multi_inputs

    a = make()
    s = a.pop("scaling")
    with pytest.raises(exc, match=match):
        check_multi_inputs(*a.values(), s if isinstance(s, torch.Tensor) else None)


@pytest.mark.parametrize("name", ["ids-shape", "R-rank", "scaling-length", "float-ids"])
def test_bad_input_reads_the_same_under_fake_tensors(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    make, exc, match = next(c[1:] for c in BAD if c[0] == name)
    a = make()
    s = a.pop("scaling")
    st = (1.0, s) if isinstance(s, torch.Tensor) else (s, None)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc, match=match):
        torch.ops.loraxs.linear_multi_fwd(*a.values(), *st, "auto")


def test_frozen_tensors_and_backends():
    x, w, b, A, R, B, ids = make_multi((5,), 16, 12, 4, 3)
    with pytest.raises(RuntimeError, match=r"A \(16, 4\) requires grad"):
        loraxs_kernels.loraxs_linear_multi(x, w, b, A.clone().requires_grad_(), R, B, ids)
    with pytest.raises(RuntimeError, match=r"adapter_scaling \(3\) requires grad"):
        loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, torch.ones(3, requires_grad=True))
    # The CUDA kernels need CUDA tensors ("triton" on CPU tensors: tests/test_triton_multi_interpret.py).
    with pytest.raises(loraxs_kernels.BackendUnavailable, match="needs CUDA tensors"):
        loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, backend="cuda")
    # The op itself refuses them too (a direct call skips the Python check).
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        torch.ops.loraxs.linear_multi(x, w, b, A, R, B, ids, backend="cuda")
    # "cpp" and "torch" are the grouped schedule on the CPU: the same bits.
    torch.testing.assert_close(loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, backend="torch"),
                               loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, backend="cpp"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown backend"):
        loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, backend="nope")


# ------------------------------------------------------------------------------- opcheck and compile
def _samples():
    out = []
    for lead, kw, scale in [((8,), {}, 0.5), ((8,), {"bias": False}, 0.5), ((2, 3), {}, "tensor"),
                            ((0,), {}, 0.5), ((), {}, 0.5),
                            ((6,), {"dtype": torch.bfloat16, "r_dtype": torch.float32}, 0.5)]:
        x, w, b, A, R, B, ids = make_multi(lead, 16, 12, 4, 3, **kw)
        st = (1.0, torch.tensor([0.5, 2.0, -1.0])) if scale == "tensor" else (scale, None)
        out.append((x, w, b, A, R, B, ids, *st))
    x, w, b, A, R, B, ids = make_multi((8,), 16, 12, 4, 3)
    out.append((x.detach(), w, b, A, R.detach(), B, ids, 1.0, None))  # nothing to differentiate
    return out


@pytest.mark.parametrize("i", range(7))
def test_opcheck(i):
    opcheck(torch.ops.loraxs.linear_multi.default, _samples()[i])


def test_compile_fullgraph():
    x, w, b, A, R, B, ids = make_multi((4, 10), 32, 24, 8, 5, seed=6)

    def f(x, R, ids):
        return loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, 0.5).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gx, gR = torch.autograd.grad(compiled(x, R, ids), (x, R))
    ex, eR = torch.autograd.grad(f(x, R, ids), (x, R))
    assert_close(gx, ex, torch.float32, "compiled grad_x")
    assert_close(gR, eR, torch.float32, "compiled grad_R")
    ids2 = torch.randint(-1, 5, (4, 10), generator=torch.Generator().manual_seed(9))
    assert_close(compiled(x, R, ids2), f(x, R, ids2), torch.float32, "compiled, other ids")


def test_compile_module_dynamic():
    _, layer = _layer()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (6, 11):
        x = torch.randn(2, rows, 32)
        ids = torch.randint(-1, 4, (2, rows), generator=torch.Generator().manual_seed(rows))
        assert_close(compiled(x, ids), layer(x, ids), torch.float32, f"compiled module, {rows} rows")


# -------------------------------------------------------------------------------------------- module
def _layer(n=4, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(32, 24)
    layer = loraxs_kernels.MultiLoRAXSLinear.from_linear(lin, rank=8, num_adapters=n, scaling=0.5)
    with torch.no_grad():
        layer.lora_R.copy_(torch.randn(n, 8, 8) / math.sqrt(8))
    return lin, layer


def test_module_forward_matches_reference():
    lin, layer = _layer()
    assert layer.lora_R.shape == (4, 8, 8) and layer.lora_R.requires_grad
    assert not (layer.weight.requires_grad or layer.bias.requires_grad)
    assert torch.equal(layer.weight, lin.weight)
    x = torch.randn(3, 7, 32)
    ids = torch.tensor([[0, 1, 2, 3, -1, 0, 1]] * 3)
    ref = reference.loraxs_linear_multi(x, layer.weight, layer.bias, layer.lora_A, layer.lora_R, layer.lora_B, ids, 0.5)
    assert_close(layer(x, ids), ref, torch.float32, "layer(x, ids)")
    seq = torch.tensor([2, -1, 1])  # one id per sequence, broadcast over the 7 tokens
    ref_seq = reference.loraxs_linear_multi(x, layer.weight, layer.bias, layer.lora_A, layer.lora_R, layer.lora_B,
                                            seq[:, None].expand(3, 7), 0.5)
    assert_close(layer(x, seq), ref_seq, torch.float32, "layer(x, per-sequence ids)")
    with pytest.raises(RuntimeError, match="needs adapter ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"fit neither the rows of x, \(3, 7\)"):
        layer(x, torch.zeros(7, dtype=torch.long))


def _model(n=3):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    plain = [m for m in model if isinstance(m, nn.Linear)]
    weights = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in plain]
    loraxs_kernels.apply_loraxs(model, rank=4, target_modules=["0", "2"], num_adapters=n, r_init="zeros")
    return model, weights


def test_apply_loraxs_num_adapters_and_use_adapters():
    model, weights = _model()
    assert all(isinstance(model[i], loraxs_kernels.MultiLoRAXSLinear) for i in (0, 2))
    assert [p for p in model.parameters() if p.requires_grad] == [model[0].lora_R, model[2].lora_R]
    x = torch.randn(4, 5, 16)

    def plain(x):
        return F.linear(F.relu(F.linear(x, *weights[0])), *weights[1])

    with loraxs_kernels.use_adapters(model, torch.tensor([0, 1, -1, 2])):
        assert_close(model(x), plain(x), torch.float32, "zero banks give the base model")
    for layer in (model[0], model[2]):
        with torch.no_grad():
            layer.lora_R[1].normal_()
    ids = torch.tensor([0, 1, -1, 1])
    with loraxs_kernels.use_adapters(model, ids):
        y = model(x)
        with loraxs_kernels.use_adapters(model, torch.zeros(4, 5, dtype=torch.long)):  # (batch, seq), nested
            assert_close(model(x), plain(x), torch.float32, "inner block: adapter 0 everywhere")
        assert model[0].active_adapter_ids is ids  # the outer ids are back
    assert model[0].active_adapter_ids is None
    assert_close(y[[0, 2]], plain(x)[[0, 2]], torch.float32, "rows of adapter 0 and -1")
    assert (y[[1, 3]] - plain(x)[[1, 3]]).abs().max() > 1e-2  # adapter 1 changes its rows
    y.square().sum().backward()  # after the block: the forward kept its ids
    for layer in (model[0], model[2]):
        assert layer.lora_R.grad[0].abs().sum() > 0 and layer.lora_R.grad[1].abs().sum() > 0
        assert torch.equal(layer.lora_R.grad[2], torch.zeros(4, 4))  # no row used adapter 2
    with pytest.raises(ValueError, match="adapter_ids reach 3 but 0 holds 3 adapters"):
        with loraxs_kernels.use_adapters(model, torch.tensor([3])):
            pass
    with pytest.raises(TypeError, match="int32 or int64"):
        with loraxs_kernels.use_adapters(model, torch.tensor([0.0])):
            pass


def test_bank_slots_read_write_reset():
    model, _ = _model(n=4)
    bank_ptrs = [model[i].lora_R.data_ptr() for i in (0, 2)]
    new = {p: torch.randn(4, 4) for p in ("0", "2")}
    before = {p: loraxs_kernels.read_adapter_slot(model, k) for k, p in [(0, "a"), (1, "b"), (3, "d")]}
    loraxs_kernels.write_adapter_slot(model, 2, new)
    got = loraxs_kernels.read_adapter_slot(model, 2)
    assert all(torch.equal(got[p], new[p]) for p in new)
    for k, p in [(0, "a"), (1, "b"), (3, "d")]:
        now = loraxs_kernels.read_adapter_slot(model, k)
        assert all(torch.equal(now[q], before[p][q]) for q in now)
    assert [model[i].lora_R.data_ptr() for i in (0, 2)] == bank_ptrs
    got["0"].add_(1)  # a read is a copy
    assert torch.equal(model[0].lora_R[2], new["0"])
    loraxs_kernels.reset_adapter_slot(model, 2)
    assert torch.equal(model[0].lora_R[2], torch.zeros(4, 4))
    with pytest.raises(IndexError, match=r"in \[0, 4\), got 4"):
        loraxs_kernels.read_adapter_slot(model, 4)
    with pytest.raises(ValueError, match=r"missing \['2'\]"):
        loraxs_kernels.write_adapter_slot(model, 1, {"0": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"must have shape \(4, 4\), got \(3, 3\)"):
        loraxs_kernels.write_adapter_slot(model, 1, {"0": torch.zeros(4, 4), "2": torch.zeros(3, 3)})
    assert torch.equal(model[0].lora_R[1], before["b"]["0"])  # the failed write touched nothing



# ------------------------------------------- issue 19: the op's own words, and the fallback raising them
FROZEN = ["weight", "bias", "A", "B", "adapter_scaling"]


def _frozen_call(name):
    x, w, b, A, R, B, ids = make_multi((5,), 16, 12, 4, 3)
    args = dict(weight=w, bias=b, A=A, B=B, adapter_scaling=torch.ones(3))
    args[name] = args[name].clone().requires_grad_()
    return x, args["weight"], args["bias"], args["A"], R, args["B"], ids, args["adapter_scaling"]


def _raised(fn):
    try:
        fn()
    except Exception as e:  # the exception under test
        return type(e), str(e).split("\n")[0]
    raise AssertionError("no exception")


@pytest.mark.parametrize("name", FROZEN)
def test_frozen_messages_name_linear_multi_and_fallback_raises_the_same(name):
    """check_multi_frozen names loraxs.linear_multi and reference.loraxs_linear_multi (not the single op's
    words), and the build-less path (ops/multi.py _fallback) raises the same exception, word for word,
    where it used to detach a scaling tensor that requires grad."""
    from loraxs_kernels.ops import multi as multi_op

    x, w, b, A, R, B, ids, s = _frozen_call(name)
    op = _raised(lambda: torch.ops.loraxs.linear_multi(x, w, b, A, R, B, ids, 1.0, s))
    public = _raised(lambda: loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, s))
    with warnings.catch_warnings():  # its once-only "runs the plain-PyTorch reference" notice
        warnings.simplefilter("ignore", RuntimeWarning)
        fallback = _raised(lambda: multi_op._fallback(x, w, b, A, R, B, ids, 1.0, s))
    assert op == public == fallback, (op, public, fallback)
    exc, msg = op
    assert exc is RuntimeError and re.match(r"loraxs\.linear_multi computes gradients for x and R only, but "
                                            + re.escape(name), msg), msg
    if name != "adapter_scaling":
        assert msg.endswith("or use loraxs_kernels.reference.loraxs_linear_multi"), msg
        # What it suggests exists and takes the bank.
        y = reference.loraxs_linear_multi(x, w, b, A, R, B, ids, s)
        assert y.shape == (5, 12)


def test_single_op_frozen_message_is_unchanged():
    from loraxs_kernels.ops import fallback

    x, w, b, A, R, B = make_inputs((5,), 16, 12, 4, requires_grad=False)
    A = A.clone().requires_grad_()
    cpp = _raised(lambda: loraxs_kernels.loraxs_linear(x, w, b, A, R, B))
    py = _raised(lambda: fallback.linear(x, w, b, A, R, B, 1.0, "torch"))
    assert cpp == py and cpp[1].endswith("or use loraxs_kernels.reference.loraxs_linear") and \
        cpp[1].startswith("loraxs.linear computes"), (cpp, py)


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_fallback_raises_what_the_op_raises(make, exc, match):
    """The build-less path and the C++ op held to the same regexes on every bad input above."""
    from loraxs_kernels.ops import multi as multi_op

    a = make()
    s = a.pop("scaling")
    st = (1.0, s) if isinstance(s, torch.Tensor) else (s, None)
    with pytest.raises(exc, match=match):
        multi_op._fallback(*a.values(), *st)
    with pytest.raises(exc, match=match):
        torch.ops.loraxs.linear_multi(*a.values(), *st)


# -------------------------------------------------- issue 19: the ATen schedules' GPU defects, checked on the CPU
# "device": the plan the ATen schedule runs off the CPU (cuBLAS), forced here by LORAXS_MULTI_DEVICE_PLAN=1.
PLANS = {"per-row": ((400, 8, 9), False), "grouped": ((600, 32, 3), False), "device": ((400, 8, 9), True)}


def _ops_of(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(e.key if hasattr(e, "key") else e.name, e.input_shapes) for e in prof.events()]


@pytest.mark.parametrize("plan", list(PLANS))
def test_bank_gradient_has_no_index_add_and_no_host_plan_off_the_cpu(plan, monkeypatch):
    """No index_add_ in any schedule (on CUDA it sums with float atomics: other bits each run); the
    device plan reads nothing back to the host (no bincount, no nonzero, no .item() beyond the ids check)
    and still matches the reference, with grad_R the same bits on every run."""
    (M, r, n), device = PLANS[plan]
    if device:
        monkeypatch.setenv("LORAXS_MULTI_DEVICE_PLAN", "1")
    x, w, b, A, R, B, ids = make_multi((M,), 40, 36, r, n)
    s = torch.linspace(0.5, 2.0, n)
    runs = []

    def step():
        x.grad = R.grad = None
        y = loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, s)
        y.backward(torch.ones_like(y))
        runs.append(R.grad.clone())

    names = [name for name, _ in _ops_of(step)]
    assert "aten::index_add_" not in names and "aten::index_add" not in names, names
    if device:
        assert not {"aten::bincount", "aten::nonzero"} & set(names), names
        assert names.count("aten::_local_scalar_dense") <= 4, names  # aminmax of the ids: fwd and bwd
    step()
    assert torch.equal(runs[0], runs[1])
    check_multi(multi(w, b, A, B, ids, s), (x, w, b, A, R, B, ids), s, torch.float32, plan)


@pytest.mark.parametrize("plan", list(PLANS))
def test_no_whole_bank_conversion_per_call(plan, monkeypatch):
    """An fp32 master bank of many adapters beside a bf16 layer: only the gathered rows' R are converted,
    never the (n, r, r) bank (n·r² copied twice per step before)."""
    (M, r, _), device = PLANS[plan]
    if device:
        monkeypatch.setenv("LORAXS_MULTI_DEVICE_PLAN", "1")
    n = 997  # a size no other tensor has
    x, w, b, A, R, B, ids = make_multi((M,), 40, 36, r, n, torch.bfloat16, r_dtype=torch.float32)
    ids = ids % (3 if plan == "grouped" else n)

    def step():
        y = loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids)
        y.backward(torch.ones_like(y))

    whole = [(name, shapes) for name, shapes in _ops_of(step)
             if name in ("aten::to", "aten::_to_copy", "aten::copy_") and shapes and list(shapes[0]) == [n, r, r]]
    assert whole == [], whole


@pytest.mark.parametrize("plan", list(PLANS))
def test_unused_adapter_gradient_is_zero_whatever_its_scaling(plan, monkeypatch):
    """inf and NaN in adapter_scaling slots no row uses (a torch.empty tensor's garbage) leave their
    gradient exactly 0 and everything else as with finite values there."""
    (M, r, n), device = PLANS[plan]
    if device:
        monkeypatch.setenv("LORAXS_MULTI_DEVICE_PLAN", "1")
    x, w, b, A, R, B, ids = make_multi((M,), 40, 36, r, n)
    ids = torch.where(ids == 1, 0, ids)  # adapters 1 and n - 1 unused
    finite = torch.linspace(0.5, 2.0, n)
    poisoned = finite.clone()
    poisoned[1], poisoned[n - 1] = math.inf, math.nan
    out = []
    for s in (finite, poisoned):
        x.grad = R.grad = None
        y = loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, s)
        y.backward(torch.ones_like(y))
        out.append((y.detach(), x.grad.clone(), R.grad.clone()))
    assert torch.equal(out[1][2][[1, n - 1]], torch.zeros(2, r, r))
    assert all(torch.equal(a, b) for a, b in zip(out[0], out[1]))


def test_fp32_bank_beside_fp64_layer_runs_on_the_cpu():
    """The contract takes an fp32 R beside any layer dtype; the many-adapter op runs it on every backend
    (the CUDA kernels' bank_dtype_ok refused it: tests/test_cuda_emu_multi.py checks them now)."""
    inputs = make_multi((40,), 24, 20, 6, 4, torch.float64, r_dtype=torch.float32)
    x, w, b, A, R, B, ids = inputs
    y = loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, 0.5)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y.backward(g)
    (y_ref, gx_ref, gR_ref), (sy, sx, sR) = reference_and_bounds(x, w, b, A, R, B, ids, 0.5, g)
    dy, dx, dR = depths(24, 20, 6, 40)
    assert_within_bound(y, y_ref, sy, torch.float64, "y", dy)
    assert_within_bound(x.grad, gx_ref, sx, torch.float64, "grad_x", dx)
    assert R.grad.dtype == torch.float32
    assert_within_bound(R.grad, gR_ref, sR, torch.float32, "grad_R", dR)
