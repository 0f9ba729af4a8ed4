"""The Triton backend on CPU tensors through Triton's interpreter, against the fp64 reference, per
element (tests/common.py).

Every dtype, bf16 included: the interpreter_bf16 fixture (conftest.py, tests/interpreter_bf16.py)
fixes the interpreter's bf16 dot and fp32 → bf16 cast (triton#11584) and fails naming the Triton
version if the interpreter's internals moved. Every autotune table entry runs at its real tile sizes
(test_every_table_entry_at_its_real_size) and at a quarter of them on shapes that span several tiles
(test_tile_configs). Shapes stay small: the interpreter runs every program in numpy, one after another.
"""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import SHAPES, assert_matches_reference, make_inputs
from triton_interpreted import tb  # first: the backend's kernels under the interpreter
from loraxs_kernels import backends, loraxs_linear
from loraxs_kernels.backends.triton import configs
from loraxs_kernels.backends.triton import gemm_rank_r as gemm_mod
from loraxs_kernels.backends.triton import grad_r as grad_r_mod
from loraxs_kernels.backends.triton import low_rank_projection as proj_mod

pytestmark = pytest.mark.usefixtures("interpreter_bf16")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(lead, in_f, out_f, r, dtype, scaling=0.7, bias=True, r_dtype=None, seed=0, grad=None):
    """Forward and backward through loraxs_linear(backend="triton"); asserts all three against fp64."""
    x, w, b, A, R, B = make_inputs(lead, in_f, out_f, r, dtype=dtype, bias=bias, r_dtype=r_dtype, seed=seed)
    y = loraxs_linear(x, w, b, A, R, B, scaling, backend="triton")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype) \
        if grad is None else grad
    gx, gR = torch.autograd.grad(y, (x, R), g)
    assert y.dtype == dtype and gx.dtype == dtype and gR.dtype == R.dtype
    assert_matches_reference(y, gx, gR, (x, w, b, A, R, B), scaling, dtype, "triton", grad_out=g)
    return y, gx, gR


# ----------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    run(*shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "lead,in_f,out_f,r",
    [
        ((33,), 72, 88, 20),     # r not a power of two, padded to 32
        ((9,), 128, 112, 100),   # RP = 128: the split schedule
        ((3,), 20, 300, 5),      # N spans several GROUP_N groups, the last one partial
        ((40,), 17, 19, 16),     # K and N below one tile
    ],
    ids=str,
)
def test_weird_shapes(lead, in_f, out_f, r, dtype):
    run(lead, in_f, out_f, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias(dtype):
    run((21,), 48, 40, 6, dtype, bias=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_master_R_with_16bit_layer(dtype):
    _, _, gR = run((37,), 64, 48, 12, dtype, r_dtype=torch.float32)
    assert gR.dtype == torch.float32


def test_fp64():
    run((19,), 40, 36, 7, torch.float64, scaling=1 / 3)  # 1/3 is not an fp32 number: s must arrive whole


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_x(dtype):
    """Non-unit stride along K, and a transposed x (stride along M of 1)."""
    x, w, b, A, R, B = make_inputs((50,), 32, 40, 8, dtype=dtype, requires_grad=False)
    wide = torch.zeros(50, 64, dtype=dtype)
    wide[:, ::2] = x
    x_k2 = wide[:, ::2].requires_grad_()
    x_t = x.t().contiguous().t().requires_grad_()
    assert x_k2.stride() == (64, 2) and x_t.stride() == (1, 50)
    R.requires_grad_()
    g = torch.randn(50, 40, dtype=torch.float64).to(dtype)
    for xs in (x_k2, x_t):
        y = loraxs_linear(xs, w, b, A, R, B, 0.5, backend="triton")
        gx, gR = torch.autograd.grad(y, (xs, R), g)
        assert_matches_reference(y, gx, gR, (x, w, b, A, R, B), 0.5, dtype, f"strides {xs.stride()}", grad_out=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expanded_grad_out(dtype):
    """autograd can hand in a stride-0 grad (e.g. from y.sum()); the kernel reads it through its strides."""
    g = torch.randn(1, 24, dtype=torch.float64).to(dtype).expand(45, 24)
    assert g.stride() == (0, 1)
    run((45,), 40, 24, 4, dtype, grad=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_3d_x_with_non_contiguous_weights(dtype):
    x, w, b, A, R, B = make_inputs((3, 11), 40, 36, 8, dtype=dtype)
    w_t = w.t().contiguous().t()  # (out, in) with stride (1, out)
    A_t = A.t().contiguous().t()
    y = loraxs_linear(x, w_t, b, A_t, R, B, 0.9, backend="triton")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    gx, gR = torch.autograd.grad(y, (x, R), g)
    assert y.shape == (3, 11, 36)
    assert_matches_reference(y, gx, gR, (x, w, b, A, R, B), 0.9, dtype, "strided W, A", grad_out=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_only_one_gradient(dtype):
    """need_x without need_R (frozen R) and need_R without need_x (x needs no grad: x_p_kernel forms u)."""
    inputs = make_inputs((30,), 48, 40, 8, dtype=dtype)
    x, w, b, A, R, B = inputs
    g = torch.randn(30, 40, generator=torch.Generator().manual_seed(6)).to(dtype)
    y = loraxs_linear(x, w, b, A, R.detach(), B, 0.6, backend="triton")
    (gx,) = torch.autograd.grad(y, (x,), g)
    assert_matches_reference(None, gx, None, inputs, 0.6, dtype, "grad_x alone", grad_out=g)
    y = loraxs_linear(x.detach(), w, b, A, R, B, 0.6, backend="triton")
    (gR,) = torch.autograd.grad(y, (R,), g)
    assert_matches_reference(None, None, gR, inputs, 0.6, dtype, "grad_R alone", grad_out=g)


def test_empty_batch_launches_nothing(monkeypatch):
    calls = _count_launches(monkeypatch)
    x, w, b, A, R, B = make_inputs((0,), 32, 16, 4, dtype=torch.float32)
    y, xa = tb.forward(x.detach(), w, b, A, R.detach(), B, 1.0)
    gx, gR = tb.backward(torch.empty(0, 16), xa, w, A, R.detach(), B, 1.0, True, True)
    assert y.shape == (0, 16) and xa.shape == (0, 4) and gx.shape == (0, 32)
    assert torch.equal(gR, torch.zeros(4, 4))
    assert sum(calls.values()) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,in_f,out_f,r", [((64,), 128, 96, 16), ((17,), 31, 45, 1), ((2, 3, 5), 40, 24, 7)],
                         ids=str)
def test_split_schedule(monkeypatch, lead, in_f, out_f, r, dtype):
    """The two-launch schedule (auto for r > 64), forced at small ranks."""
    monkeypatch.setenv(configs.SCHEDULE_ENV, "split")
    run(lead, in_f, out_f, r, dtype)


def test_schedule_choice(monkeypatch):
    monkeypatch.delenv(configs.SCHEDULE_ENV, raising=False)
    assert [configs.schedule(tb.padded_rank(r)) for r in (1, 16, 64, 65, 256)] == ["fused"] * 3 + ["split"] * 2
    monkeypatch.setenv(configs.SCHEDULE_ENV, "fused")
    assert configs.schedule(256) == "split"  # the fused kernel holds T in registers: RP <= 64 only
    monkeypatch.setenv(configs.SCHEDULE_ENV, "nonsense")
    with pytest.raises(ValueError, match="LORAXS_TRITON_SCHEDULE"):
        configs.schedule(16)


# ----------------------------------------------------------------------------- every table entry
def _scaled_down(c):
    # The interpreter's cost grows with tile area; the math depends on the shape relations (GROUP_N,
    # tiles vs sizes), kept at a quarter of the size.
    return configs.GemmConfig(max(16, c.block_m // 4), max(16, c.block_n // 4), max(16, c.block_k // 4),
                              c.group_n, c.num_warps, c.num_stages)


def _table_configs():
    seen = {}
    for arch in configs.ARCHS:
        for regime in configs.REGIMES:
            for schedule in configs.SCHEDULES:
                for c in configs.gemm_configs(arch, regime, schedule, 2, "ieee"):
                    small = _scaled_down(c)
                    seen[(schedule, small.block_m, small.block_n, small.block_k, small.group_n)] = (schedule, small)
    return list(seen.values())


@pytest.mark.parametrize("schedule,config", _table_configs(),
                         ids=lambda v: v if isinstance(v, str) else f"{v.block_m}x{v.block_n}x{v.block_k}g{v.group_n}")
def test_tile_configs(monkeypatch, schedule, config):
    """Tile shapes and GROUP_N of the tuned tables, scaled down so that this shape spans several tiles
    in M and N and a partial N group, give the reference result (bf16, the dtype the tables serve)."""
    monkeypatch.setenv(configs.SCHEDULE_ENV, schedule)
    with tb.forced_config(config):
        run((70,), 40, 150, 6, torch.bfloat16, seed=3)


def _every_entry():
    """Each distinct (schedule, config) the autotuner can pick, on any architecture, for 16-bit
    (as is), fp32 with TF32 (the _for_fp32 derivation) and the fixed fp32/fp64 FMA configs."""
    seen = {}
    for arch in configs.ARCHS:
        for regime in configs.REGIMES:
            for schedule in configs.SCHEDULES:
                for size, precision, dtype in ((2, "ieee", torch.bfloat16), (4, "tf32", torch.float32),
                                               (4, "ieee", torch.float32), (8, "ieee", torch.float64)):
                    for c in configs.gemm_configs(arch, regime, schedule, size, precision):
                        seen.setdefault((schedule, c, dtype), None)
    return list(seen)


@pytest.mark.parametrize("schedule,config,dtype", _every_entry(),
                         ids=lambda v: v if isinstance(v, str) else str(v)[6:] if isinstance(v, torch.dtype)
                         else f"{v.block_m}x{v.block_n}x{v.block_k}g{v.group_n}w{v.num_warps}s{v.num_stages}")
def test_every_table_entry_at_its_real_size(monkeypatch, schedule, config, dtype):
    """Every autotune entry at its real tile sizes, forward and backward, on a small shape (the last
    tile partial in M, N and K; the backward's K is out = 136). The interpreter ignores num_warps and
    num_stages; the AOT report compiles those."""
    monkeypatch.setenv(configs.SCHEDULE_ENV, schedule)
    with tb.forced_config(config):
        run((67,), 72, 136, 9 if schedule == "fused" else 40, dtype, seed=5)  # split: RP = 64, two T chunks


def _every_proj_entry():
    seen = {}
    for arch in configs.ARCHS:
        for rc in configs.RANK_CLASSES:
            for size, precision, dtype in ((2, "ieee", torch.bfloat16), (4, "tf32", torch.float32),
                                           (4, "ieee", torch.float32), (8, "ieee", torch.float64)):
                for c in configs.proj_configs(arch, rc, size, precision):
                    seen.setdefault((rc, c, dtype), None)
    return list(seen)


@pytest.mark.parametrize("rclass,config,dtype", _every_proj_entry(),
                         ids=lambda v: v if isinstance(v, str) else str(v)[6:] if isinstance(v, torch.dtype)
                         else f"{v.block_m}x{v.block_k}w{v.num_warps}s{v.num_stages}")
def test_every_projection_entry_at_its_real_size(monkeypatch, rclass, config, dtype):
    """x_p_kernel's entries (the split schedule's x A and u = g Bᵀ) at their real tile sizes."""
    monkeypatch.setenv(configs.SCHEDULE_ENV, "split")
    with tb.forced_config(proj=config):
        run((45,), 70, 30, 20 if rclass == "r64" else 24, dtype, seed=4)


def test_projection_configs(monkeypatch):
    monkeypatch.setenv(configs.SCHEDULE_ENV, "split")
    cfgs = {configs.ProjConfig(max(16, c.block_m // 4), max(16, c.block_k // 4), c.num_warps, c.num_stages)
            for arch in configs.ARCHS for rc in configs.RANK_CLASSES for c in configs.proj_configs(arch, rc, 2, "ieee")}
    assert len(cfgs) > 1
    for c in sorted(cfgs, key=str):
        with tb.forced_config(proj=c):
            run((45,), 70, 30, 20, torch.bfloat16, seed=4)


def test_int64_offsets(monkeypatch):
    """The IDX64 path (taken when a tensor spans >= 2**31 elements) computes the same numbers."""
    assert not tb._needs_int64(((2**15, 2**16), (2**16, 1)))  # last offset 2**31 - 1: int32 still holds it
    assert tb._needs_int64(((2**15 + 1, 2**16), (2**16, 1)))
    assert tb._needs_int64(((2**16, 2**15 + 1), (1, 2**16)))  # a transposed view reaches as far
    assert not tb._needs_int64(((0, 2**40), (2**40, 1)))
    monkeypatch.setattr(tb, "_needs_int64", lambda *views: True)
    run((20,), 36, 28, 5, torch.float32)


# ------------------------------------------------------------------------------ launches, bits
def _count_launches(monkeypatch, ops=None):
    """Count launches of every Triton kernel of the backend; ATen ops issued outside launches go to `ops`."""
    calls = {}
    inside = [False]
    for kernel in (gemm_mod.gemm_rank_r_kernel, proj_mod.x_p_kernel, grad_r_mod.xa_t_u_splits_kernel,
                   grad_r_mod.sum_splits_kernel):
        original = kernel.run

        def counted(*args, _orig=original, _name=kernel.__name__, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            inside[0] = True
            try:
                return _orig(*args, **kwargs)
            finally:
                inside[0] = False

        monkeypatch.setattr(kernel, "run", counted)
    if ops is not None:
        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not inside[0]:  # the interpreter itself copies tensors to and from numpy
                    ops.append(str(func.overloadpacket.__name__))
                return func(*args, **(kwargs or {}))
        return calls, Record()
    return calls


def test_forward_is_one_launch(monkeypatch):
    monkeypatch.delenv(configs.SCHEDULE_ENV, raising=False)
    ops = []
    calls, record = _count_launches(monkeypatch, ops)
    x, w, b, A, R, B = make_inputs((50,), 64, 80, 16, dtype=torch.float16, requires_grad=False)
    with record:
        tb.forward(x, w, b, A, R, B, 0.5)
    assert calls == {"gemm_rank_r_kernel": 1}
    # Outside the launch: allocations of y and x A only (no cast of R, no copy of x, no add kernel).
    assert set(ops) <= {"empty"}, ops


def test_forward_split_is_two_launches(monkeypatch):
    monkeypatch.delenv(configs.SCHEDULE_ENV, raising=False)
    ops = []
    calls, record = _count_launches(monkeypatch, ops)
    x, w, b, A, R, B = make_inputs((10,), 80, 96, 70, dtype=torch.float32, requires_grad=False)  # RP = 128
    with record:
        tb.forward(x, w, b, A, R, B, 0.5)
    assert calls == {"x_p_kernel": 1, "gemm_rank_r_kernel": 1}
    assert set(ops) <= {"empty"}, ops


@pytest.mark.parametrize("need_x,need_R,M,expected", [
    (True, True, 50, {"gemm_rank_r_kernel": 1, "xa_t_u_splits_kernel": 1}),
    (True, True, 700, {"gemm_rank_r_kernel": 1, "xa_t_u_splits_kernel": 1, "sum_splits_kernel": 1}),
    (True, False, 50, {"gemm_rank_r_kernel": 1}),
    (False, True, 50, {"x_p_kernel": 1, "xa_t_u_splits_kernel": 1}),
])
def test_backward_launches(monkeypatch, need_x, need_R, M, expected):
    """grad_x and u from one GEMM launch (g read once); grad_R by the split reduction (+ the fixed-order sum)."""
    monkeypatch.delenv(configs.SCHEDULE_ENV, raising=False)
    calls = _count_launches(monkeypatch)
    x, w, b, A, R, B = make_inputs((M,), 32, 24, 8, dtype=torch.float32, requires_grad=False)
    _, xa = tb.forward(x, w, b, A, R, B, 0.5)
    calls.clear()
    gx, gR = tb.backward(torch.randn(M, 24), xa, w, A, R, B, 0.5, need_x, need_R)
    assert calls == expected
    assert (gx is not None) == need_x and (gR is not None) == need_R


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [40, 1300])  # one split (written directly) and several (summed in order)
def test_grad_R_split_reduction(M, dtype):
    """grad_R's split count depends on M and r only, and the fixed-order sum of the fp32 partials gives
    the reference result. (Its bitwise reproducibility is a GPU property, checked in test_triton_gpu.py:
    the interpreter runs programs one at a time, so a run-to-run comparison here could not fail.)"""
    inputs = make_inputs((M,), 32, 24, 8, dtype=dtype, r_dtype=torch.float32)
    x, w, b, A, R, B = inputs
    g = torch.randn(M, 24, generator=torch.Generator().manual_seed(M)).to(dtype)
    splits, _ = tb.grad_r_splits(M, 8)
    assert (splits > 1) == (M > configs.GRAD_R_MIN_ROWS_PER_SPLIT)
    assert tb.grad_r_splits(M, 8) == (splits, _)
    y = loraxs_linear(x, w, b, A, R, B, 0.5, backend="triton")
    (gR,) = torch.autograd.grad(y, (R,), g)
    assert gR.dtype == torch.float32
    assert_matches_reference(None, None, gR, inputs, 0.5, dtype, f"grad_R, {splits} splits", grad_out=g)


# -------------------------------------------------------------------------------- availability
def test_unavailable_reason():
    assert tb.unavailable_reason(torch.device("cpu")) is None  # the interpreter
    assert "CUDA" in tb.unavailable_reason(torch.device("meta"))
    assert backends.unavailable_reason("triton", torch.device("cpu")) is None


def test_unavailable_reason_without_interpreter(monkeypatch):
    monkeypatch.setattr(tb, "INTERPRETED", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in tb.unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "after" in tb.unavailable_reason(torch.device("cpu"))


def test_import_loraxs_kernels_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, loraxs_kernels; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
