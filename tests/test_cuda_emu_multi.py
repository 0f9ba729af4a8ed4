"""Many adapters in one batch (issue 11): the CUDA C++ kernels run on the CPU by the host emulation.

Run by `make cuda-emu` (LORAXS_CUDA_EMU_TESTS=1) next to tests/test_cuda_emu.py, whose build it shares
(the runner is cached by content in build/cuda-emu); skipped in a plain pytest run.

Every kernel path of torch.ops.loraxs.linear_multi's CUDA backend, composed the way the binding
(csrc/cuda/multi_cuda.cpp) composes them through the torch-free launch API (kernels/launch.h):
- tiled forward: xa = x A (gemm); t_i = s_i·xa_i R[id_i] (multi_rows); y = x Wᵀ + t B + b (gemm, K2 = r);
- decoding forward (fp16/bf16, M <= 16): decode_partial + decode_epilogue with per-row R (DecodeArgs::ids);
- backward: u = g Bᵀ; v_i = s_i·u_i R[id_i]ᵀ (multi_rows, transposed); grad_x = g W + v Aᵀ;
  grad_R by the segmented kernel over the rows sorted by adapter (multi_grad_r).
In fp16, bf16, fp32 and fp64, against reference.loraxs_linear_multi in fp64 with tests/common.py's
per-element bounds (elementwise_tolerance on the (base, low-rank) absolute-value bounds, evaluated per
row with that row's R and scaling). Shapes: M = 1, 16, 37, 300; in/out not multiples of 16; r = 1, 7,
20, 40; banks of n = 1, 5 and 300 adapters; rows with id -1; adapters no row uses; a per-adapter
scaling; an fp32 master bank beside half layers; int32 and int64 ids. All under memcheck (ASan +
alignment; outputs, shared memory and workspaces start as NaN, so a missed write is "stale data"),
a few under racecheck (TSan). grad_R bitwise identical across two runs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from common import assert_within_bound, depths
from loraxs_kernels.tools import cuda_emu
from multi_bounds import d64, multi_bounds, multi_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("LORAXS_CUDA_EMU_TESTS") != "1",
    reason="the CUDA host emulation runs in `make cuda-emu` (set LORAXS_CUDA_EMU_TESTS=1 to run it here)",
)

HALF = [torch.float16, torch.bfloat16]
ALL = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SCALING = 0.75
NUM_SMS = 132  # H100 / H200


def rand(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def place(t, layout):
    """t (2-D) in a chosen memory layout (as tests/test_cuda_emu.py): contiguous, misaligned (storage
    offset 1: no 16-byte copies), padded (row stride a multiple of 8, wider than the row), transposed."""
    rows, cols = t.shape
    if layout == "contiguous":
        return t.clone().contiguous()
    if layout == "misaligned":
        out = torch.empty(rows * cols + 1, dtype=t.dtype)[1:].view(rows, cols)
    elif layout == "padded":
        out = torch.empty(rows, (cols + 7) // 8 * 8 + 8, dtype=t.dtype)[:, :cols]
    elif layout == "transposed":
        out = torch.empty(cols, rows, dtype=t.dtype).t()
    else:
        raise ValueError(layout)
    out.copy_(t)
    return out


class MultiLayer:
    """One many-adapter layer case: x, W, b, A, B in `dtype`, a bank R (n, r, r) in dtype or fp32,
    ids (M,) in [-1, n) drawn from `pool` (adapters outside it stay unused) with every `minus`-th row
    -1 (minus = 0: none), an optional per-adapter scaling, and g = ∂L/∂y."""

    def __init__(self, M, in_f, out_f, r, n, dtype, *, bias=True, r_master=False, adapter_scaling=False,
                 ids_dtype=torch.int64, pool=None, minus=5, layout="contiguous", seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.M, self.in_f, self.out_f, self.r, self.n, self.dtype = M, in_f, out_f, r, n, dtype
        self.x = place(rand((M, in_f), dtype, gen), layout)
        self.W = place(rand((out_f, in_f), dtype, gen, in_f**-0.5), "contiguous" if layout == "misaligned" else layout)
        self.b = rand((out_f,), dtype, gen) if bias else None
        self.A = rand((in_f, r), dtype, gen, in_f**-0.5)
        self.B = rand((r, out_f), dtype, gen, (3 * r) ** -0.5)
        self.R = rand((n, r, r), torch.float32 if r_master else dtype, gen, r**-0.5)
        pool = torch.arange(n) if pool is None else torch.tensor(pool)
        ids = pool[torch.randint(len(pool), (M,), generator=gen)]
        if minus:  # rows minus-1, 2·minus-1, ...: row 0 keeps an adapter unless minus = 1
            ids[minus - 1::minus] = -1
        self.ids = ids.to(ids_dtype)
        # A scaling per adapter in (0.25, 2), sign flipped for some: a row scaled by its neighbour's shows.
        self.sa = None
        if adapter_scaling:
            sa = torch.rand(n, generator=gen, dtype=torch.float64) * 1.75 + 0.25
            sa[::3] *= -1
            self.sa = sa.to(torch.float32)
        self.g = rand((M, out_f), dtype, gen)

        # What the binding passes the kernels: adapter_scale in double (None without one), and the rows
        # grouped by adapter. Kept alive here: a Request keys buffers by storage address, so a freed
        # temporary's address reused by an output would alias it.
        self.sa64 = None if self.sa is None else self.sa.to(torch.float64).contiguous()
        self.perm, self.seg = sort_rows(self.ids, n)

    def scale64(self):
        return self.sa64

    def reference(self):
        """y, grad_x, grad_R of reference.loraxs_linear_multi in fp64."""
        return multi_reference(self.x, self.W, self.b, self.A, self.R, self.B, self.ids, SCALING, self.sa, self.g)

    def bounds(self):
        """Per-element yardsticks (tests/multi_bounds.py): each row with its own R and |s_i|."""
        return multi_bounds(self.x, self.W, self.b, self.A, self.R, self.B, self.ids, SCALING, self.sa, self.g)


def check(out, ref, bound, dtype, depth, what):
    """tests/common.py's per-element bound; a NaN (never-written output or shared memory) is reported
    as "stale data", anything else over the bound as "wrong result" (the mutation script reads these)."""
    o = out.detach().to(torch.float64)
    if torch.isnan(o).any():
        idx = tuple(int(i) for i in torch.isnan(o).nonzero()[0])
        raise AssertionError(f"{what}: stale data: {int(torch.isnan(o).sum())} NaN elements (first at {idx})")
    try:
        assert_within_bound(o, ref, bound, dtype, what, depth)
    except AssertionError as e:
        raise AssertionError(f"wrong result: {e}") from None


def sort_rows(ids, n):
    """The binding's grouping: a stable sort of the ids and searchsorted for the segment starts
    (adapter k's rows are perm[seg[k]:seg[k+1]]; the -1 rows sort first, before seg[0])."""
    srt, perm = torch.sort(ids.long(), stable=True)
    seg = torch.searchsorted(srt, torch.arange(n + 1, dtype=torch.int64))
    return perm.contiguous(), seg.contiguous()


# ------------------------------------------------------------------------------------ compositions
def forward_tiled(req, L):
    """multi_cuda.cpp's forward for M > 16, fp32/fp64, or decode off: gemm, multi_rows, gemm."""
    M, r, dt = L.M, L.r, L.dtype
    xa = torch.empty(M, r, dtype=dt)
    cuda_emu.gemm_call(req, xa, L.x, L.A.t(), order=1, num_sms=NUM_SMS)                # xa = x A
    t = torch.empty(M, r, dtype=dt)
    cuda_emu.multi_rows_call(req, t, xa, L.R, L.ids, SCALING, L.scale64())             # t_i = s_i·xa_i R[id_i]
    y = torch.empty(M, L.out_f, dtype=dt)
    cuda_emu.gemm_call(req, y, L.x, L.W, t, L.B.t(), L.b, order=0, num_sms=NUM_SMS)    # y = x Wᵀ + t B + b
    return y, xa


def forward_decode(req, L, num_sms=NUM_SMS):
    y = torch.empty(L.M, L.out_f, dtype=L.dtype)
    xa = torch.empty(L.M, L.r, dtype=L.dtype)
    cuda_emu.decode_call(req, y, xa, L.x, L.W, L.A, L.R, L.B, L.b, SCALING, num_sms=num_sms, pdl=True,
                         ids=L.ids, adapter_scale=L.scale64())
    return y, xa


def backward(req, L, xa, need_x=True, need_R=True):
    """u = g Bᵀ; v_i = s_i·u_i R[id_i]ᵀ; grad_x = g W + v Aᵀ; grad_R segmented over the sorted rows."""
    M, r, dt = L.M, L.r, L.dtype
    u = torch.empty(M, r, dtype=dt)
    cuda_emu.gemm_call(req, u, L.g, L.B, order=0, num_sms=NUM_SMS)
    gx = gR = None
    if need_x:
        v = torch.empty(M, r, dtype=dt)
        cuda_emu.multi_rows_call(req, v, u, L.R, L.ids, SCALING, L.scale64(), transpose_R=True)
        gx = torch.empty(M, L.in_f, dtype=dt)
        cuda_emu.gemm_call(req, gx, L.g, L.W.t(), v, L.A, order=1, num_sms=NUM_SMS)
    if need_R:
        gR = torch.empty(L.n, r, r, dtype=L.R.dtype)
        cuda_emu.multi_grad_r_call(req, gR, xa, u, L.perm, L.seg, SCALING, L.scale64())
    return gx, gR


def check_layer(L, y, xa, gx, gR, what):
    y_ref, gx_ref, gR_ref = L.reference()
    by, bx, bR = L.bounds()
    dy, dx, dR = depths(L.in_f, L.out_f, L.r, L.M)
    dt = L.dtype
    check(y, y_ref, by, dt, dy, f"{what} y")
    xa_ref = d64(L.x) @ d64(L.A)
    check(xa, xa_ref, d64(L.x).abs() @ d64(L.A).abs(), dt, L.in_f, f"{what} xa")
    if gx is not None:
        check(gx, gx_ref, bx, dt, dx, f"{what} grad_x")
    if gR is not None:
        assert gR.dtype == L.R.dtype
        check(gR, gR_ref, bR, dt, dR, f"{what} grad_R")
        unused = torch.ones(L.n, dtype=torch.bool)
        unused[L.ids.long()[L.ids >= 0]] = False
        assert torch.equal(gR[unused], torch.zeros_like(gR[unused])), f"{what}: grad_R of unused adapters is not 0"


# ------------------------------------------------------------------------------------ cases
# (M, in, out, r, n, options): each one a property the kernels must get right.
CASES = [
    # 300 adapters, 37 rows: mostly distinct adapters, -1 rows, a per-adapter scaling, int64 ids.
    dict(M=37, in_f=45, out_f=37, r=20, n=300, adapter_scaling=True, layout="contiguous"),
    # n = 1, r = 1, int32 ids, no bias: the single-slot bank; half the rows -1.
    dict(M=16, in_f=31, out_f=40, r=1, n=1, bias=False, ids_dtype=torch.int32, minus=2, layout="padded"),
    # M = 1 (the one row has an adapter), r = 7, adapter 1 of 3.
    dict(M=1, in_f=64, out_f=24, r=7, n=3, pool=[1], minus=0, layout="contiguous"),
    # r = 40 (two 32-wide tiles of grad_R, two columns per lane), unused adapters 1 and 4, fp32 master
    # bank beside the half layers, strided operands.
    dict(M=37, in_f=70, out_f=33, r=40, n=5, pool=[0, 2, 3], r_master=True, adapter_scaling=True,
         ids_dtype=torch.int32, layout="transposed"),
    # 300 rows over 3 adapters: each adapter's segment spans several 32-row steps of grad_R.
    dict(M=300, in_f=24, out_f=20, r=20, n=3, minus=7, layout="misaligned"),
]


def case_id(c, dt):
    opts = [k for k in ("adapter_scaling", "r_master") if c.get(k)]
    ids = "i32" if c.get("ids_dtype") == torch.int32 else "i64"
    return (f"{str(dt)[6:]}-M{c['M']}_in{c['in_f']}_out{c['out_f']}_r{c['r']}_n{c['n']}_{ids}_{c.get('layout')}"
            + "".join(f"_{o}" for o in opts))


def layer(c, dt, seed):
    kw = dict(c)
    if dt not in HALF:
        kw["r_master"] = False  # an fp32 master bank exists only beside the 16-bit layers
    return MultiLayer(dtype=dt, seed=seed, **kw)


TILED = [pytest.param(c, dt, id=case_id(c, dt)) for i, c in enumerate(CASES) for dt in ALL]


@pytest.mark.parametrize("case,dtype", TILED)
def test_multi_tiled(case, dtype):
    """Tiled forward, backward grad_x (multi_rows transposed) and the segmented grad_R."""
    L = layer(case, dtype, seed=CASES.index(case))
    req = cuda_emu.Request()
    y, xa = forward_tiled(req, L)
    gx, gR = backward(req, L, xa)
    req.run()
    check_layer(L, y, xa, gx, gR, "tiled")


DECODE_CASES = [
    dict(M=1, in_f=1000, out_f=70, r=40, n=300, adapter_scaling=True, minus=0, layout="padded"),
    dict(M=16, in_f=72, out_f=45, r=20, n=5, pool=[0, 2, 3], r_master=True, adapter_scaling=True,
         ids_dtype=torch.int32, layout="padded"),
    dict(M=9, in_f=64, out_f=37, r=1, n=1, minus=3, bias=False, layout="contiguous"),
]
DECODE = [pytest.param(c, dt, id=case_id(c, dt)) for c in DECODE_CASES for dt in HALF]


@pytest.mark.parametrize("case,dtype", DECODE)
def test_multi_decode(case, dtype):
    """M <= 16, fp16/bf16: decode_partial + the epilogue with per-row R (PDL in its worst order), then
    the backward from the xa it wrote. in = 1000 with 8 SMs: 4 K splits."""
    L = layer(case, dtype, seed=100 + DECODE_CASES.index(case))
    req = cuda_emu.Request()
    y, xa = forward_decode(req, L, num_sms=8 if L.in_f >= 1000 else NUM_SMS)
    gx, gR = backward(req, L, xa)
    req.run()
    check_layer(L, y, xa, gx, gR, "decode")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_multi_grad_r_bitwise_reproducible(dtype):
    """The segmented grad_R twice, in two processes: the same bits (fixed order, no atomics)."""
    L = MultiLayer(300, 24, 20, 40, 3, dtype, minus=7, adapter_scaling=True, seed=42)
    runs = []
    for _ in range(2):
        req = cuda_emu.Request()
        _, xa = forward_tiled(req, L)
        _, gR = backward(req, L, xa, need_x=False)
        req.run()
        runs.append(gR)
    assert torch.equal(runs[0], runs[1])
    _, _, gR_ref = L.reference()
    check(runs[0], gR_ref, L.bounds()[2], dtype, depths(L.in_f, L.out_f, L.r, L.M)[2], "grad_R")


def test_multi_no_adapter_rows():
    """Every row -1: y is the base layer, grad_x is g W, and grad_R is zero for every adapter."""
    L = MultiLayer(20, 40, 24, 8, 4, torch.float16, minus=1, seed=5)
    assert bool((L.ids == -1).all())
    req = cuda_emu.Request()
    y, xa = forward_tiled(req, L)
    gx, gR = backward(req, L, xa)
    req.run()
    check_layer(L, y, xa, gx, gR, "all -1")
    assert torch.equal(gR, torch.zeros_like(gR))


RACE = [
    ("tiled", dict(M=37, in_f=45, out_f=37, r=20, n=300, adapter_scaling=True), torch.float16),
    ("tiled", dict(M=40, in_f=31, out_f=24, r=40, n=5, pool=[0, 2, 3], r_master=False), torch.float64),
    ("decode", dict(M=16, in_f=1000, out_f=70, r=20, n=5, r_master=True, ids_dtype=torch.int32), torch.bfloat16),
]


@pytest.mark.parametrize("kind,case,dtype", RACE, ids=lambda v: v if isinstance(v, str) else None)
def test_multi_racecheck(kind, case, dtype):
    """The same compositions under ThreadSanitizer: every shared value written and read across a barrier."""
    L = MultiLayer(dtype=dtype, seed=7, **case)
    req = cuda_emu.Request()
    y, xa = forward_decode(req, L, num_sms=8) if kind == "decode" else forward_tiled(req, L)
    gx, gR = backward(req, L, xa)
    req.run("racecheck")
    check_layer(L, y, xa, gx, gR, f"racecheck {kind}")


# ------------------------------------------------------------------- issue 19: the GPU defects found by reading
def test_multi_fp32_bank_beside_fp64_layer():
    """The contract takes an fp32 R beside an fp64 layer; the kernels now do too (bank_dtype_ok refused it:
    "CUDA error: invalid argument"). The bank is widened as it is read; grad_R comes back in fp32."""
    L = MultiLayer(37, 45, 37, 20, 5, torch.float64, r_master=True, adapter_scaling=True, pool=[0, 2, 3], seed=11)
    assert L.R.dtype == torch.float32
    req = cuda_emu.Request()
    y, xa = forward_tiled(req, L)
    gx, gR = backward(req, L, xa)
    req.run()
    check_layer(L, y, xa, gx, None, "fp32 bank, fp64 layer")
    _, _, gR_ref = L.reference()
    assert gR.dtype == torch.float32
    # One more rounding than the fp64 sum: to the bank's fp32.
    check(gR, gR_ref, L.bounds()[2], torch.float32, depths(L.in_f, L.out_f, L.r, L.M)[2], "grad_R (fp32)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_multi_unused_adapter_gradient_is_zero_whatever_its_scaling(dtype):
    """adapter_scaling may hold inf or NaN in slots no row uses (a torch.empty tensor): multi_grad_r stored
    s_k·0 = NaN there before; now exact zeros, and the used adapters are unchanged."""
    L = MultiLayer(40, 24, 20, 8, 5, dtype, pool=[0, 2, 3], adapter_scaling=True, seed=3)
    L.sa[1], L.sa[4] = math.inf, math.nan
    L.sa64 = L.sa.to(torch.float64).contiguous()
    req = cuda_emu.Request()
    y, xa = forward_tiled(req, L)
    gx, gR = backward(req, L, xa)
    req.run()
    check_layer(L, y, xa, gx, gR, "inf/NaN scaling in unused slots")  # asserts grad_R[1], grad_R[4] == 0
    assert torch.equal(gR[[1, 4]], torch.zeros_like(gR[[1, 4]]))


@pytest.mark.parametrize("bad_id", [5, 1 << 40, -7], ids=["n", "huge", "below-minus-one"])
def test_multi_rows_out_of_range_id_reads_nothing(bad_id):
    """An id outside [-1, n) reaches the kernels only inside a CUDA-graph capture (the binding then
    checks the ids on the device with torch._assert_async instead of on the host). The kernel maps it
    to the base row: zeros, no read past the bank (memcheck), the other rows unchanged."""
    L = MultiLayer(20, 24, 20, 8, 5, torch.float32, minus=0, seed=9)
    ids = L.ids.clone()
    ids[3] = bad_id
    xa = d64(L.x).to(torch.float32) @ L.A
    t = torch.empty(L.M, L.r, dtype=torch.float32)
    req = cuda_emu.Request()
    cuda_emu.multi_rows_call(req, t, xa, L.R, ids, SCALING, None)
    req.run()
    assert torch.equal(t[3], torch.zeros(L.r)), t[3]
    ok = torch.arange(L.M) != 3
    expected = SCALING * torch.bmm(xa[ok].double().unsqueeze(1), L.R.double()[ids[ok]]).squeeze(1)
    bound = abs(SCALING) * torch.bmm(xa[ok].double().abs().unsqueeze(1), L.R.double().abs()[ids[ok]]).squeeze(1)
    assert_within_bound(t[ok], expected, bound, torch.float32, "multi_rows, the other rows", L.r)
