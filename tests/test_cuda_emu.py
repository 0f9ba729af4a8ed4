"""The CUDA C++ kernels (csrc/cuda/kernels) run on the CPU by the host emulation (csrc/emu, make cuda-emu).

Run by `make cuda-emu` (LORAXS_CUDA_EMU_TESTS=1); skipped in a plain pytest run so CI pays for it once.

- The PTX twins against fragments computed by hand from the PTX ISA (ldmatrix .x4 / .trans,
  mma.m16n8k16 f16 and bf16, cp.async deferral and zero-fill).
- Every kernel through the torch-free launch API (kernels/launch.h), composed the way the binding
  (csrc/cuda/linear_cuda.cpp) composes them: forward (decoding path and tiled path), backward
  (u, v, grad_x fused, grad_R), in fp16, bf16, fp32, fp64, against loraxs_kernels.reference in fp64.
  All of it under memcheck (AddressSanitizer + alignment), a subset under racecheck (ThreadSanitizer).
- Every split count decode_splits picks for a shape (by varying the SM count), both tile configs of
  the tensor-core GEMM, PDL in its worst legal order, misaligned, padded and transposed operands.

Tolerances are per element: |out − ref| ≤ (c·u + n·u_acc)·bound + c·η + n·η_acc, where bound is
the same computation on absolute values (tests/common.py's abs_bounds idea), u the unit roundoff of
the dtype, u_acc that of the accumulator (fp32, fp64 for fp64), η the underflow units, n the longest
sum, and c the number of roundings to the dtype on the way (stated at each use). Shared memory, workspaces and outputs start
as NaN, so a read of anything never written fails as "stale data" rather than passing by luck.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from loraxs_kernels import reference
from loraxs_kernels.tools import cuda_emu

pytestmark = pytest.mark.skipif(
    os.environ.get("LORAXS_CUDA_EMU_TESTS") != "1",
    reason="the CUDA host emulation runs in `make cuda-emu` (set LORAXS_CUDA_EMU_TESTS=1 to run it here)",
)

HALF = [torch.float16, torch.bfloat16]
ALL = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Underflow: a rounding may also err by half the smallest subnormal (fl(x) = x(1 + δ) + η).
ETA = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float32: 2.0**-150, torch.float64: 2.0**-1074}
M_LIST = list(range(1, 18)) + [31, 33, 65]
RANKS = [1, 7, 16, 20, 64, 100, 256]
SCALING = 0.75
NUM_SMS = 132  # H100 / H200


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_within(out, ref, bound, dtype, n_terms, c_round, what):
    """|out − ref| ≤ (c_round·u + n_terms·u_acc)·bound + c_round·η + n_terms·η_acc, element by element
    (u, η: unit roundoff and underflow unit of dtype; u_acc, η_acc: those of its accumulator)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o = out.detach().to(torch.float64)
    nan = torch.isnan(o)
    if nan.any():
        idx = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{what}: stale data: {int(nan.sum())} NaN elements (first at {idx})")
    acc = acc_dtype(dtype)
    tol = (c_round * UNIT[dtype] + n_terms * UNIT[acc]) * bound + c_round * ETA[dtype] + n_terms * ETA[acc]
    err = (o - ref).abs()
    bad = err > tol
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        ratio = (err / tol.clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"{what}: wrong result: {int(bad.sum())} of {o.numel()} elements over the bound (worst err/tol {ratio:.3g});"
            f" first at {idx}: got {o[idx].item():.6g}, reference {ref[idx].item():.6g}, tol {tol[idx].item():.3g}"
        )


# ------------------------------------------------------------------------------------ layouts
def place(t, layout):
    """A copy of t (2-D) held in a chosen memory layout:
    contiguous; misaligned (storage offset 1 element: 16-byte copies impossible); padded (row stride
    rounded up to a multiple of 8 plus 8: 16-byte rows at any width); transposed (column-major)."""
    rows, cols = t.shape
    if layout == "contiguous":
        return t.clone().contiguous()
    if layout == "misaligned":
        base = torch.empty(rows * cols + 1, dtype=t.dtype)
        out = base[1:].view(rows, cols)
    elif layout == "padded":
        base = torch.empty(rows, (cols + 7) // 8 * 8 + 8, dtype=t.dtype)
        out = base[:, :cols]
    elif layout == "transposed":
        out = torch.empty(cols, rows, dtype=t.dtype).t()
    else:
        raise ValueError(layout)
    out.copy_(t)
    return out


def rand(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def d64(t):
    return None if t is None else t.detach().to(torch.float64)


# ------------------------------------------------------------------------------------ PTX twins
def test_ldmatrix_x4_hand_fragments():
    """ldmatrix.x4 and .x4.trans on a 16×16 b16 matrix with M[row][col] = 100·row + col, each lane
    giving the row address gemm_mma.cuh's P operand uses (row l % 16, k offset 8·(l / 16))."""
    mat = torch.tensor([[100 * r + c for c in range(16)] for r in range(16)], dtype=torch.int16)
    rows = torch.tensor([(lane % 16) * 16 + (lane // 16) * 8 for lane in range(32)], dtype=torch.int32)
    got = {}
    for trans in (0, 1):
        out = torch.empty(32 * 4, dtype=torch.int32)
        req = cuda_emu.Request()
        req.call("selftest_ldmatrix", src=req.ptr(mat), n=256, rows=req.ptr(rows), out=req.ptr(out, out=True), trans=trans)
        req.run()
        regs = out.view(32, 4).to(torch.int64) & 0xFFFFFFFF
        got[trans] = [[(int(v) & 0xFFFF, int(v) >> 16) for v in lane] for lane in regs.tolist()]
    # By hand (PTX ISA, ldmatrix fragment figure): lane 5 is g = 1, t = 1.
    #   no .trans: matrix i, row g, elements 2t, 2t+1; matrices 0..3 = rows 0-7|8-15 × k 0-7|8-15 here.
    assert got[0][5] == [(102, 103), (902, 903), (110, 111), (910, 911)]
    assert got[0][0] == [(0, 1), (800, 801), (8, 9), (808, 809)]
    assert got[0][31] == [(706, 707), (1506, 1507), (714, 715), (1514, 1515)]
    #   .trans: matrix i, element g of its rows 2t and 2t+1.
    assert got[1][5] == [(201, 301), (1001, 1101), (209, 309), (1009, 1109)]
    assert got[1][31] == [(607, 707), (1407, 1507), (615, 715), (1415, 1515)]
    # Every lane, from the rule as stated.
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            r0, c0 = 8 * (i % 2), 8 * (i // 2)
            assert got[0][lane][i] == (100 * (r0 + g) + c0 + 2 * t, 100 * (r0 + g) + c0 + 2 * t + 1)
            assert got[1][lane][i] == (100 * (r0 + 2 * t) + c0 + g, 100 * (r0 + 2 * t + 1) + c0 + g)


def _pack(lo, hi):
    return (lo & 0xFFFF) | ((hi & 0xFFFF) << 16)


def _bits(v, dtype):
    return int(torch.tensor([v], dtype=dtype).view(torch.int16).item()) & 0xFFFF


def _mma_fragments(A, B, dtype):
    """A (16×16), B (16×8) into the 32 lanes' registers, from the PTX ISA's m16n8k16 tables."""
    a = torch.zeros(32, 4, dtype=torch.int64)
    b = torch.zeros(32, 2, dtype=torch.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (row, k) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            a[lane, reg] = _pack(_bits(A[row][k], dtype), _bits(A[row][k + 1], dtype))
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            b[lane, reg] = _pack(_bits(B[k][g], dtype), _bits(B[k + 1][g], dtype))
    to32 = lambda x: torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)  # noqa: E731
    return to32(a), to32(b)


def _run_mma(A, B, C, dtype):
    a, b = _mma_fragments(A, B, dtype)
    c = torch.zeros(32, 4, dtype=torch.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        c[lane] = torch.tensor([C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1]])
    out = torch.empty(32, 4, dtype=torch.float32)
    req = cuda_emu.Request()
    req.call("selftest_mma", dtype=cuda_emu.dtype_code(dtype), a=req.ptr(a), b=req.ptr(b), c=req.ptr(c),
             out=req.ptr(out, out=True))
    req.run()
    return out


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
def test_mma_16816_hand_fragments(dtype):
    # A = I (16×16), B[k][n] = 8k + n, C[i][n] = 1000: D = B + 1000 (rows 0..15), exact in both types.
    A = [[1.0 if k == i else 0.0 for k in range(16)] for i in range(16)]
    B = [[float(8 * k + n) for n in range(8)] for k in range(16)]
    C = [[1000.0] * 8 for _ in range(16)]
    d = _run_mma(A, B, C, dtype)
    # By hand: lane 5 (g = 1, t = 1) holds D[1][2], D[1][3], D[9][2], D[9][3] = 1010, 1011, 1074, 1075.
    assert d[5].tolist() == [1010.0, 1011.0, 1074.0, 1075.0]
    assert d[0].tolist() == [1000.0, 1001.0, 1064.0, 1065.0]
    assert d[31].tolist() == [1062.0, 1063.0, 1126.0, 1127.0]
    # Random operands: every lane against A·B + C in fp64 (the twin rounds once, to fp32).
    g = torch.Generator().manual_seed(3)
    A = rand((16, 16), dtype, g).double()
    B = rand((16, 8), dtype, g).double()
    C = torch.randn(16, 8, generator=g, dtype=torch.float64).float().double()
    d = _run_mma(A.tolist(), B.tolist(), C.tolist(), dtype)
    D = A @ B + C
    for lane in range(32):
        gg, t = lane // 4, lane % 4
        want = torch.tensor([D[gg, 2 * t], D[gg, 2 * t + 1], D[gg + 8, 2 * t], D[gg + 8, 2 * t + 1]])
        assert torch.allclose(d[lane].double(), want, rtol=2**-23, atol=0), (lane, d[lane], want)


def test_cp_async_lands_only_at_wait_group():
    src = torch.arange(1, 33, dtype=torch.uint8)
    out = torch.empty(96, dtype=torch.uint8)
    req = cuda_emu.Request()
    req.call("selftest_cp_async", src=req.ptr(src), out=req.ptr(out, out=True))
    req.run()
    before, after1, after0 = out[:32].tolist(), out[32:64].tolist(), out[64:].tolist()
    assert before == [0xFF] * 32  # nothing lands before a wait: the stale (poisoned) bytes remain
    assert after1 == list(range(1, 17)) + [0xFF] * 16  # wait_group 1: the older group only
    assert after0 == list(range(1, 17)) + [17, 18, 19, 20, 21, 22] + [0] * 10  # src-size 6: zero-filled


def test_memcheck_reports_out_of_bounds_operand():
    """memcheck fires, naming the kernel, when an operand is shorter than the arguments say: Q1 holds
    N - 1 rows of a GEMM with N columns, so the tile copy reads one row past the allocation."""
    g = torch.Generator().manual_seed(0)
    M, N, K = 16, 40, 32
    P1 = rand((M, K), torch.float16, g)
    Q1 = rand((N - 1, K), torch.float16, g)
    C = torch.empty(M, N, dtype=torch.float16)
    req = cuda_emu.Request()
    kv = dict(dtype=0, order=0, num_sms=NUM_SMS, M=M, N=N, K1=K, K2=0, C=req.ptr(C, out=True), s_cm=N, s_cn=1,
              bias="null", alpha="1.0")
    kv.update(P1=req.ptr(P1), **{"P1.s_row": K, "P1.s_k": 1})
    kv.update(Q1=req.ptr(Q1), **{"Q1.s_row": K, "Q1.s_k": 1})
    req.call("gemm", **kv)
    with pytest.raises(cuda_emu.EmuError) as e:
        req.run()
    assert e.value.checker == "memcheck", e.value.output[-2000:]
    assert "heap-buffer-overflow" in e.value.output and "gemm_mma_kernel" in e.value.output


# ------------------------------------------------------------------------------------ GEMM
def gemm_reference(P1, Q1, P2, Q2, bias, alpha):
    ref = d64(P1) @ d64(Q1).t()
    bound = d64(P1).abs() @ d64(Q1).abs().t()
    if P2 is not None:
        ref = ref + d64(P2) @ d64(Q2).t()
        bound = bound + d64(P2).abs() @ d64(Q2).abs().t()
    ref, bound = alpha * ref, abs(alpha) * bound
    if bias is not None:
        ref, bound = ref + d64(bias), bound + d64(bias).abs()
    return ref, bound


GEMM_CASES = [
    # (M, N, K1, K2, layout of P, layout of Q, bias, num_sms): num_sms = 1 makes launch_gemm_mma pick
    # the 128×64 tile (it does once the grid covers every SM), 132 the 64×64 one for these sizes.
    (1, 45, 31, 1, "contiguous", "contiguous", True, NUM_SMS),
    (17, 37, 70, 7, "padded", "padded", False, NUM_SMS),
    (33, 13, 40, 20, "misaligned", "transposed", True, NUM_SMS),
    (65, 70, 45, 16, "transposed", "misaligned", False, NUM_SMS),
    (130, 67, 64, 100, "contiguous", "contiguous", True, 1),
    (31, 100, 24, 0, "padded", "contiguous", True, 1),
]


@pytest.mark.parametrize("order", [0, 1], ids=["Q1k_Q2n", "Q1n_Q2k"])
@pytest.mark.parametrize("dtype", ALL, ids=["f16", "bf16", "f32", "f64"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: f"M{c[0]}N{c[1]}K{c[2]}+{c[3]}_{c[4]}_{c[5]}_sms{c[7]}")
def test_gemm(case, dtype, order):
    M, N, K1, K2, lp, lq, has_bias, sms = case
    g = torch.Generator().manual_seed(M * 1000 + N)
    # QOrder: which Q is k-contiguous. A transposed view of a k-contiguous weight is n-contiguous.
    q1_shape, q2_shape = (N, K1), (N, K2)

    def q(shape, k_contig, layout):
        t = rand(shape, dtype, g)
        if not k_contig:  # store it as the transpose of an (k, rows) matrix, the binding's transposed(W)
            return place(t.t().contiguous(), layout).t()
        return place(t, layout)

    P1 = place(rand((M, K1), dtype, g), lp)
    Q1 = q(q1_shape, order == 0, lq)
    P2 = place(rand((M, K2), dtype, g), lp) if K2 else None
    Q2 = q(q2_shape, order == 1, lq) if K2 else None
    bias = rand((N,), dtype, g) if has_bias else None
    C = torch.empty(M, N, dtype=dtype)
    req = cuda_emu.Request()
    cuda_emu.gemm_call(req, C, P1, Q1, P2, Q2, bias, alpha=SCALING, order=order, num_sms=sms)
    req.run()
    ref, bound = gemm_reference(P1, Q1, P2, Q2, bias, SCALING)
    # c = 2: the output rounding and alpha·acc in the accumulator; n = K1 + K2 + 1 terms.
    assert_within(C, ref, bound, dtype, K1 + K2 + 1, 2, f"gemm {dtype}")


# ------------------------------------------------------------------------------------ the layer
class Layer:
    """Inputs of one layer case in the kernels' dtype (R possibly an fp32 master), plus g = ∂L/∂y."""

    def __init__(self, M, in_f, out_f, r, dtype, bias, r_master, seed, layout="contiguous"):
        gen = torch.Generator().manual_seed(seed)
        self.dtype, self.M, self.in_f, self.out_f, self.r = dtype, M, in_f, out_f, r
        self.x = place(rand((M, in_f), dtype, gen), layout)
        self.W = place(rand((out_f, in_f), dtype, gen, in_f**-0.5), layout if layout != "misaligned" else "contiguous")
        self.b = rand((out_f,), dtype, gen, in_f**-0.5) if bias else None
        self.A = rand((in_f, r), dtype, gen, in_f**-0.5)
        self.B = rand((r, out_f), dtype, gen, (3 * r) ** -0.5)
        self.R = rand((r, r), torch.float32 if r_master else dtype, gen, r**-0.5)
        self.g = rand((M, out_f), dtype, gen)

    def reference(self):
        """y, grad_x, grad_R of loraxs_kernels.reference in fp64, and their abs bounds."""
        x = d64(self.x).requires_grad_()
        R = d64(self.R).requires_grad_()
        y = reference.loraxs_linear(x, d64(self.W), d64(self.b), d64(self.A), R, d64(self.B), SCALING)
        gx, gR = torch.autograd.grad(y, (x, R), d64(self.g))
        ab = lambda t: None if t is None else d64(t).abs()  # noqa: E731
        xa = ab(self.x) @ ab(self.A)
        u = ab(self.g) @ ab(self.B).t()
        by = ab(self.x) @ ab(self.W).t() + SCALING * (xa @ ab(self.R)) @ ab(self.B)
        if self.b is not None:
            by = by + ab(self.b)
        bx = ab(self.g) @ ab(self.W) + SCALING * (u @ ab(self.R).t()) @ ab(self.A).t()
        bR = SCALING * xa.t() @ u
        return (y.detach(), by), (gx, bx), (gR, bR)


def forward_tiled(req, L):
    """csrc/cuda/linear_cuda.cpp's forward for M > 16 (or decode off): three GEMMs."""
    M, r, dt = L.M, L.r, L.dtype
    xa = torch.empty(M, r, dtype=dt)
    cuda_emu.gemm_call(req, xa, L.x, L.A.t(), order=1, num_sms=NUM_SMS)                 # xa = x A
    Rt = L.R.to(dt).contiguous()
    t = torch.empty(M, r, dtype=dt)
    cuda_emu.gemm_call(req, t, xa, Rt.t(), alpha=SCALING, order=1, num_sms=NUM_SMS)     # t = s·xa R
    y = torch.empty(M, L.out_f, dtype=dt)
    cuda_emu.gemm_call(req, y, L.x, L.W, t, L.B.t(), L.b, order=0, num_sms=NUM_SMS)     # y = x Wᵀ + t B + b
    return y, xa


def backward(req, L, xa):
    """The binding's backward: u = g Bᵀ; v = s·u Rᵀ; grad_x = g W + v Aᵀ; grad_R = s·xaᵀ u."""
    M, r, dt = L.M, L.r, L.dtype
    u = torch.empty(M, r, dtype=dt)
    cuda_emu.gemm_call(req, u, L.g, L.B, order=0, num_sms=NUM_SMS)
    Rt = L.R.to(dt).contiguous()
    v = torch.empty(M, r, dtype=dt)
    cuda_emu.gemm_call(req, v, u, Rt, alpha=SCALING, order=0, num_sms=NUM_SMS)
    gx = torch.empty(M, L.in_f, dtype=dt)
    cuda_emu.gemm_call(req, gx, L.g, L.W.t(), v, L.A, order=1, num_sms=NUM_SMS)
    gR = torch.empty(r, r, dtype=L.R.dtype)
    cuda_emu.grad_r_call(req, gR, xa, u, SCALING)
    return gx, gR


def check_layer(L, y, xa, gx, gR, splits_terms=0):
    (y_ref, by), (gx_ref, bx), (gR_ref, bR) = L.reference()
    dt, K, N, r, M = L.dtype, L.in_f, L.out_f, L.r, L.M
    # c = 4 roundings to the dtype: xa, R (an fp32 master is rounded, the fp64 reference is not), t, y.
    assert_within(y, y_ref, by, dt, K + 2 * r + splits_terms + 2, 4, f"y {dt}")
    xa_ref = d64(L.x) @ d64(L.A)
    assert_within(xa, xa_ref, d64(L.x).abs() @ d64(L.A).abs(), dt, K + splits_terms, 1, f"xa {dt}")
    if gx is not None:
        # c = 4: u, R, v, grad_x.
        assert_within(gx, gx_ref, bx, dt, N + 2 * r + 2, 4, f"grad_x {dt}")
    if gR is not None:
        # c = 3: xa, u, grad_R (in R's dtype; an fp32 master gets fp32 rounding, within the bound).
        assert_within(gR, gR_ref, bR, dt, M + N + K + 2, 3, f"grad_R {dt}")


SHAPES = [(45, 37), (64, 72), (31, 100), (130, 67)]  # (in, out), mostly not multiples of 8
LAYOUTS = ["contiguous", "misaligned", "transposed", "padded"]


def layer_case(i, M, dtype):
    in_f, out_f = SHAPES[i % len(SHAPES)]
    r = RANKS[i % len(RANKS)]
    return dict(M=M, in_f=in_f, out_f=out_f, r=r, dtype=dtype, bias=i % 2 == 0,
                r_master=dtype in HALF and i % 3 == 0, seed=i, layout=LAYOUTS[i % len(LAYOUTS)])


def _id(c):
    return f"M{c['M']}_in{c['in_f']}_out{c['out_f']}_r{c['r']}_{c['layout']}{'_bias' if c['bias'] else ''}{'_Rf32' if c['r_master'] else ''}"


TILED = [layer_case(i, M, dt) for dt in ALL for i, M in enumerate(M_LIST)]


@pytest.mark.parametrize("case", TILED, ids=lambda c: f"{str(c['dtype'])[6:]}-{_id(c)}")
def test_layer_tiled(case):
    """Forward and backward through the GEMMs (mma.sync for half types, SIMT for fp32/fp64) and grad_R."""
    L = Layer(**case)
    req = cuda_emu.Request()
    y, xa = forward_tiled(req, L)
    gx, gR = backward(req, L, xa)
    req.run()
    check_layer(L, y, xa, gx, gR)


def decode_layer(i, M, dtype):
    c = layer_case(i, M, dtype)
    c["layout"] = "padded" if c["in_f"] % 8 else "contiguous"  # what the decoding kernel reads (16-byte rows)
    return c


DECODE = [decode_layer(i, M, dt) for dt in HALF for i, M in enumerate(range(1, 17))]


@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"{str(c['dtype'])[6:]}-{_id(c)}")
def test_layer_decode(case):
    """M ≤ 16: decode_partial + decode_epilogue (PDL, worst order) for y and xa, then the backward."""
    L = Layer(**case)
    req = cuda_emu.Request()
    y = torch.empty(L.M, L.out_f, dtype=L.dtype)
    xa = torch.empty(L.M, L.r, dtype=L.dtype)
    cuda_emu.decode_call(req, y, xa, L.x, L.W, L.A, L.R, L.B, L.b, SCALING, num_sms=NUM_SMS, pdl=True)
    gx, gR = backward(req, L, xa)
    info = req.run()
    splits = info[0]["splits"]
    check_layer(L, y, xa, gx, gR, splits_terms=splits)


def decode_split_counts(L, sms_range):
    """{splits: num_sms} for every split count decode_splits() picks for this shape."""
    req = cuda_emu.Request()
    for sms in sms_range:
        cuda_emu.decode_call(req, None, None, L.x, L.W, L.A, L.R, L.B, L.b, SCALING, num_sms=sms, query_only=True)
    picks = {}
    for sms, info in zip(sms_range, req.run()):
        picks.setdefault(info["splits"], sms)
    return picks


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
def test_decode_every_split_count(dtype):
    # in = 1999: 32 chunks of 64, the last one partial (a 15-element tail); out = 37, r = 20.
    L = Layer(M=5, in_f=1999, out_f=37, r=20, dtype=dtype, bias=True, r_master=False, seed=7, layout="padded")
    picks = decode_split_counts(L, list(range(1, 200)))
    assert sorted(picks) == [1, 2, 3, 4, 8], picks  # 32 chunks, >= 4 per split, a multiple of 4 each
    for splits, sms in sorted(picks.items()):
        for pdl in (True, False):
            req = cuda_emu.Request()
            y = torch.empty(L.M, L.out_f, dtype=dtype)
            xa = torch.empty(L.M, L.r, dtype=dtype)
            cuda_emu.decode_call(req, y, xa, L.x, L.W, L.A, L.R, L.B, L.b, SCALING, num_sms=sms, pdl=pdl)
            assert req.run()[0]["splits"] == splits
            check_layer(L, y, xa, None, None, splits_terms=splits)


@pytest.mark.parametrize("M", [1, 300, 600, 1100])
@pytest.mark.parametrize("dtype", ALL, ids=["f16", "bf16", "f32", "f64"])
def test_grad_r_splits(dtype, M):
    """grad_R alone over M rows: grad_r_splits gives 1, 2, 3 and 5 splits here (~256 rows each)."""
    r = 33
    g = torch.Generator().manual_seed(M)
    xa = place(rand((M, r), dtype, g), "transposed" if M % 2 else "contiguous")
    u = rand((M, r), dtype, g)
    out_dtype = torch.float32 if dtype in HALF and M > 500 else dtype
    out = torch.empty(r, r, dtype=out_dtype)
    req = cuda_emu.Request()
    cuda_emu.grad_r_call(req, out, xa, u, SCALING)
    info = req.run()
    assert info[0]["splits"] == math.ceil(M / math.ceil(M / math.ceil(M / 256)))
    ref = SCALING * d64(xa).t() @ d64(u)
    bound = SCALING * d64(xa).abs().t() @ d64(u).abs()
    # c = 1: the final rounding (to fp32 for an fp32 output); n = M terms plus the split sum.
    assert_within(out, ref, bound, out_dtype, M + 8, 1, f"grad_R {dtype}")


# ------------------------------------------------------------------------------------ racecheck
RACE_CASES = [
    ("tiled", dict(M=33, in_f=45, out_f=37, r=20, dtype=torch.float16, bias=True, r_master=False, seed=1, layout="contiguous")),
    ("tiled", dict(M=17, in_f=64, out_f=72, r=16, dtype=torch.bfloat16, bias=False, r_master=True, seed=2, layout="padded")),
    ("tiled", dict(M=31, in_f=31, out_f=45, r=7, dtype=torch.float32, bias=True, r_master=False, seed=3, layout="transposed")),
    ("tiled", dict(M=9, in_f=40, out_f=24, r=64, dtype=torch.float64, bias=True, r_master=False, seed=4, layout="misaligned")),
    ("decode", dict(M=16, in_f=1000, out_f=70, r=40, dtype=torch.bfloat16, bias=True, r_master=True, seed=5, layout="padded")),
    ("decode", dict(M=3, in_f=45, out_f=37, r=100, dtype=torch.float16, bias=False, r_master=False, seed=6, layout="padded")),
]


@pytest.mark.parametrize("kind,case", RACE_CASES, ids=lambda v: v if isinstance(v, str) else f"{str(v['dtype'])[6:]}-{_id(v)}")
def test_racecheck(kind, case):
    """The same kernels under ThreadSanitizer: no shared (or global) address touched by two threads
    without a barrier between them, and still the right answer."""
    L = Layer(**case)
    req = cuda_emu.Request()
    if kind == "decode":
        y = torch.empty(L.M, L.out_f, dtype=L.dtype)
        xa = torch.empty(L.M, L.r, dtype=L.dtype)
        # 1000 inputs = 16 chunks; num_sms 8 gives 4 splits (PDL worst order).
        cuda_emu.decode_call(req, y, xa, L.x, L.W, L.A, L.R, L.B, L.b, SCALING, num_sms=8, pdl=True)
    else:
        y, xa = forward_tiled(req, L)
    gx, gR = backward(req, L, xa)
    info = req.run("racecheck")
    check_layer(L, y, xa, gx, gR, splits_terms=info[0].get("splits", 0))


@pytest.mark.parametrize("M", [300])
def test_racecheck_grad_r_and_large_tile(M):
    g = torch.Generator().manual_seed(11)
    r = 40
    xa, u = rand((M, r), torch.bfloat16, g), rand((M, r), torch.bfloat16, g)
    out = torch.empty(r, r, dtype=torch.float32)
    P1, Q1 = rand((M, 40), torch.float16, g), rand((24, 40), torch.float16, g)
    C = torch.empty(M, 24, dtype=torch.float16)
    req = cuda_emu.Request()
    cuda_emu.grad_r_call(req, out, xa, u, SCALING)
    cuda_emu.gemm_call(req, C, P1, Q1, order=0, num_sms=1)  # the 128×64 tile, 3 M-tiles
    info = req.run("racecheck")
    assert info[0]["splits"] == 2
    assert_within(out, SCALING * d64(xa).t() @ d64(u), SCALING * d64(xa).abs().t() @ d64(u).abs(), torch.float32,
                  M + 8, 1, "grad_R")
    ref, bound = gemm_reference(P1, Q1, None, None, None, 1.0)
    assert_within(C, ref, bound, torch.float16, 41, 2, "gemm large tile")
