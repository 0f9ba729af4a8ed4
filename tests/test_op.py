"""The public op, loraxs_kernels.loraxs_linear / torch.ops.loraxs.linear, against the fp64 reference
on the CPU backends ("torch", "cpp"), plus its autograd contract: gradcheck, opcheck, torch.compile,
and what it saves for the backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import loraxs_kernels
from common import (
    DTYPES,
    SHAPES,
    assert_close,
    assert_matches_reference,
    aten_op_names,
    check_against_reference,
    cpu_backends,
    make_inputs,
    native_reason,
    reference_fp64,
)
from loraxs_kernels import reference
from loraxs_kernels.backends.pytorch import merge_pays

BACKENDS = cpu_backends()
CPU = torch.device("cpu")


def shape_id(s):
    lead, i, o, r = s
    return "x".join(map(str, lead)) + f"-{i}-{o}-r{r}"


def op(backend, w, b, A, B, scaling):
    return lambda x, R: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, scaling, backend=backend)


# ----------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, dtype, shape, bias):
    lead, i, o, r = shape
    inputs = make_inputs(lead, i, o, r, dtype=dtype, bias=bias)
    x, w, b, A, R, B = inputs
    y = check_against_reference(op(backend, w, b, A, B, 0.75), inputs, 0.75, dtype, f"{backend}")
    assert y.shape == (*lead, o)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_auto_and_registered_op(shape):
    """backend="auto" and torch.ops.loraxs.linear (the contract callers outside use) run the same op."""
    lead, i, o, r = shape
    inputs = make_inputs(lead, i, o, r)
    x, w, b, A, R, B = inputs
    check_against_reference(op("auto", w, b, A, B, 0.5), inputs, 0.5, torch.float32, "auto")
    check_against_reference(lambda x, R: torch.ops.loraxs.linear(x, w, b, A, R, B, 0.5), inputs, 0.5,
                            torch.float32, "torch.ops.loraxs.linear")
    check_against_reference(lambda x, R: torch.ops.loraxs.linear(x, w, b, A, R, B), inputs, 1.0,
                            torch.float32, "default scaling")


@pytest.mark.parametrize("lead", [(1,), (300,)], ids=["lowrank", "merged"])
def test_auto_runs_cpp_on_cpu_when_built(monkeypatch, lead):
    """On CPU, "auto" is the C++ kernel when the extension is built, with no Python backend in the
    call (the Python "torch" backend runs only when named); without the build it is "torch"."""
    from loraxs_kernels.backends import pytorch

    calls = []

    def spy(real, name):
        def wrapper(*args):
            calls.append(name)
            return real(*args)
        return wrapper

    for fn in ("forward", "backward"):
        monkeypatch.setattr(pytorch, fn, spy(getattr(pytorch, fn), f"torch.{fn}"))
    x, w, b, A, R, B = make_inputs(lead, 40, 30, 4)
    y_auto = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5)
    y_auto.sum().backward()
    torch.ops.loraxs.linear(x, w, b, A, R, B, 0.5).sum().backward()
    built = native_reason() is None
    assert calls == ([] if built else ["torch.forward", "torch.backward"] * 2)
    loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend="torch").sum().backward()
    assert calls[-2:] == ["torch.forward", "torch.backward"], "backend='torch' must run the Python backend"
    if built:
        assert torch.equal(y_auto, loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend="cpp"))
    assert set(loraxs_kernels.available_backends(CPU)) >= {"torch"} | ({"cpp"} if built else set())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 96, 97, 200])
@pytest.mark.parametrize("backend", BACKENDS)
def test_both_schedules(backend, M, dtype):
    """in = out = 64: merge_pays flips, in both directions, between M = 96 (2·96·64 = 3·64·64, low-rank)
    and M = 97 (merged)."""
    assert merge_pays(M, 64, 64) == merge_pays(M, 64, 64, backward=True) == (M > 96)
    inputs = make_inputs((M,), 64, 64, 8, dtype=dtype, seed=M)
    x, w, b, A, R, B = inputs
    check_against_reference(op(backend, w, b, A, B, 1.3), inputs, 1.3, dtype, f"M={M}")


def _updates_in_place(fn) -> int:
    """How many in-place addmm_ calls fn makes: the low-rank schedule's rank-r update of y (forward)
    or grad_x (backward) is one; the merged schedule makes none (it folds the update into W)."""
    return aten_op_names(fn).count("aten::addmm_")


# (in, out, M, x only): each direction's own rule, merge_pays(...) and merge_pays(..., backward=True).
MIXED = {
    "fwd-lowrank-bwd-merged": (64, 16, 50, False),   # 2·50·16 ≤ 3·64·16; 2·50·64 > 3·64·16
    "fwd-merged-bwd-lowrank": (16, 64, 50, False),
    "bwd-merged-without-grad-R": (64, 64, 80, True),  # 2·80·64 ≤ 3·64·64 < 2·80·(64 + 64): g Bᵀ counts
}


@pytest.mark.parametrize("case", list(MIXED))
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_pick_their_schedules(backend, case):
    """The forward's merge replaces y += T B (M·out numbers), the backward's grad_x += V Aᵀ (M·in, plus
    M·out for g Bᵀ when grad_R is not wanted), so one call can run each direction differently: the
    values match the reference either way, and the C++ and Python schedules follow merge_pays."""
    i, o, M, x_only = MIXED[case]
    fwd_merged = merge_pays(M, i, o)
    bwd_merged = merge_pays(M, i, o, backward=True, need_R=not x_only)
    assert fwd_merged != bwd_merged, "the case must run different schedules in its two directions"
    inputs = make_inputs((M,), i, o, 4, dtype=torch.float64, seed=3)
    x, w, b, A, R, B = inputs
    R.requires_grad_(not x_only)
    check_against_reference(op(backend, w, b, A, B, 0.6), inputs, 0.6, torch.float64, case)
    x.grad = None
    y = None

    def forward():
        nonlocal y
        y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.6, backend=backend)

    assert _updates_in_place(forward) == (0 if fwd_merged else 1), f"{backend} forward, {case}"
    assert _updates_in_place(lambda: y.backward(torch.ones_like(y))) == (0 if bwd_merged else 1), \
        f"{backend} backward, {case}"


@pytest.mark.parametrize("scaling", [0.0, -1.5, 4.0, 1e-3])
@pytest.mark.parametrize("M", [3, 400], ids=["lowrank", "merged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling(backend, M, scaling):
    inputs = make_inputs((M,), 40, 30, 6, dtype=torch.float64)
    x, w, b, A, R, B = inputs
    y = check_against_reference(op(backend, w, b, A, B, scaling), inputs, scaling, torch.float64, f"s={scaling}")
    if scaling == 0.0:
        assert torch.equal(R.grad, torch.zeros_like(R)), "s = 0: grad_R must be exactly zero"
        assert_close(y, F.linear(x, w, b), torch.float64, "s = 0 is the base layer")


@pytest.mark.parametrize("M", [8, 600], ids=["lowrank", "merged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_256(backend, M):
    """The largest rank the op takes, with in/out above it."""
    assert merge_pays(M, 288, 264) == (M == 600)
    inputs = make_inputs((M,), 288, 264, 256, seed=5)
    x, w, b, A, R, B = inputs
    check_against_reference(op(backend, w, b, A, B, 0.25), inputs, 0.25, torch.float32, "r=256")


# ------------------------------------------------------------------------------ layouts and grads
def _noncontiguous_views(x):
    """Views of x (M, in) with the same values and other strides, each a fresh leaf's view."""
    M, i = x.shape
    xd = x.detach()
    wide = torch.zeros(M, 2 * i, dtype=x.dtype)
    wide[:, ::2] = xd
    tall = torch.zeros(2 * M, i, dtype=x.dtype)
    tall[::2] = xd
    return {
        "transposed": xd.t().contiguous().t(),    # column-major
        "col-sliced": wide[:, ::2],               # inner stride 2
        "row-sliced": tall[::2],                  # row stride 2·in
        "3d-permuted": xd.reshape(M // 2, 2, i).transpose(0, 1).contiguous().transpose(0, 1),
    }


@pytest.mark.parametrize("M", [6, 300], ids=["lowrank", "merged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_x(backend, dtype, M):
    x0, w, b, A, R, B = make_inputs((M,), 40, 30, 5, dtype=dtype)
    for name, view in _noncontiguous_views(x0).items():
        assert not view.is_contiguous(), name
        base = view.clone()  # the reference gets the same values, contiguous
        xv = view.requires_grad_()  # a view of a detached tensor is a leaf: the strided tensor itself is the input
        y = loraxs_kernels.loraxs_linear(xv, w, b, A, R, B, 0.5, backend=backend)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        gx, gR = torch.autograd.grad(y, (xv, R), g)
        assert_matches_reference(y, gx, gR, (base, w, b, A, R, B), 0.5, dtype, name, grad_out=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_x(backend):
    """x with a stride-0 batch dimension (one token broadcast to 5 rows)."""
    x1, w, b, A, R, B = make_inputs((1,), 24, 20, 4, requires_grad=False)
    x = x1.expand(5, 24)
    R.requires_grad_()
    y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)
    assert_matches_reference(y, None, None, (x, w, b, A, R, B), 0.5, torch.float32, "expanded x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_layer_tensors(backend):
    """weight, A, R, B given as transposed/sliced views (e.g. a tied or re-laid-out weight)."""
    inputs = make_inputs((7, 3), 32, 24, 6)
    x, w, b, A, R, B = inputs
    wt = w.t().contiguous().t()
    At = A.t().contiguous().t()
    Bs = torch.zeros(6, 48)
    Bs[:, ::2] = B
    Bs = Bs[:, ::2]
    Rt = R.detach().t().contiguous().t().requires_grad_()
    assert not any(t.is_contiguous() for t in (wt, At, Bs, Rt))
    fn = lambda x, R: loraxs_kernels.loraxs_linear(x, wt, b, At, R, Bs, 0.9, backend=backend)  # noqa: E731
    check_against_reference(fn, (x, w, b, A, Rt, B), 0.9, torch.float32, "strided layer tensors")


def _layouts(t):
    """t's values laid out row-major and column-major (the two a thin factor reaches the op in)."""
    return {"row-major": t.contiguous(), "col-major": t.t().contiguous().t()}


@pytest.mark.parametrize("M", [8, 96], ids=["M8-as-given", "M96-transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_thin_factor_layouts(backend, dtype, M):
    """x A and g Bᵀ with A (in×r) and Bᵀ (out×r) row- or column-major (the layer's A is row-major, PEFT
    TinyLoRA's B makes Bᵀ row-major): from 64 rows with 2 ≤ r ≤ 8 the CPU schedule computes fp32 thin
    products transposed, (fᵀ rowsᵀ)ᵀ, at r ≥ 4 and copies a row-major factor column-major otherwise
    (rows_times_thin). Every layout pair within the reference's bounds, and the same values from each
    pair up to rounding."""
    inputs = make_inputs((M,), 48, 40, 4, dtype=dtype)
    x, w, b, A, R, B = inputs
    ys = []
    for a_name, A_l in _layouts(A).items():
        for b_name, Bt_l in _layouts(B.t()).items():
            B_l = Bt_l.t()
            fn = lambda x, R, A_l=A_l, B_l=B_l: loraxs_kernels.loraxs_linear(x, w, b, A_l, R, B_l, 0.75,  # noqa: E731
                                                                             backend=backend)
            ys.append(check_against_reference(fn, inputs, 0.75, dtype, f"A {a_name}, Bᵀ {b_name}").detach())
    for y in ys[1:]:
        assert_close(y, ys[0], dtype, "the same values from every layout")


@pytest.mark.parametrize("M", [4, 300], ids=["lowrank", "merged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_out_expanded_and_noncontiguous(backend, M):
    x, w, b, A, R, B = make_inputs((M,), 40, 30, 5)
    # y.sum().backward(): autograd hands the op an expanded, all-stride-0 grad_out.
    y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)
    y.sum().backward()
    assert_matches_reference(None, x.grad, R.grad, (x, w, b, A, R, B), 0.5, torch.float32, "sum()",
                             grad_out=torch.ones_like(y))
    # A transposed grad_out, and a row-broadcast one (stride 0 in M only).
    for g in (torch.randn(30, M).t(), torch.randn(1, 30).expand(M, 30)):
        assert not g.is_contiguous()
        y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)
        gx, gR = torch.autograd.grad(y, (x, R), g)
        assert_matches_reference(None, gx, gR, (x, w, b, A, R, B), 0.5, torch.float32, f"strides {g.stride()}",
                                 grad_out=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_sum_backward(backend):
    x, w, b, A, R, B = make_inputs((3, 5), 16, 12, 4)
    (loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 2.0, backend=backend) * 3).sum().backward()
    assert_matches_reference(None, x.grad, R.grad, (x, w, b, A, R, B), 2.0, torch.float32, "3-D sum",
                             grad_out=torch.full((3, 5, 12), 3.0))


@pytest.mark.parametrize("need", ["x_only", "R_only", "neither"])
@pytest.mark.parametrize("M", [4, 300], ids=["lowrank", "merged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_grads(backend, M, need):
    inputs = make_inputs((M,), 40, 30, 5)
    x, w, b, A, R, B = inputs
    x.requires_grad_(need == "x_only")
    R.requires_grad_(need == "R_only")
    y = check_against_reference(op(backend, w, b, A, B, 0.5), inputs, 0.5, torch.float32, need)
    assert y.requires_grad == (need != "neither")
    if need == "x_only":
        assert R.grad is None
    if need == "R_only":
        assert x.grad is None


@pytest.mark.parametrize("lead", [(), (1,)], ids=["1d", "M1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_1d_x(backend, lead):
    """x of shape (in,) like F.linear takes: y of shape (out,)."""
    inputs = make_inputs(lead, 16, 12, 4)
    x, w, b, A, R, B = inputs
    y = check_against_reference(op(backend, w, b, A, B, 0.5), inputs, 0.5, torch.float32, "1-D")
    assert y.shape == (*lead, 12) and x.grad.shape == x.shape


@pytest.mark.parametrize("layer_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("M", [4, 300], ids=["lowrank", "merged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_master_R(backend, M, layer_dtype):
    inputs = make_inputs((M,), 40, 30, 6, dtype=layer_dtype, r_dtype=torch.float32)
    x, w, b, A, R, B = inputs
    assert R.dtype == torch.float32
    y = check_against_reference(op(backend, w, b, A, B, 0.5), inputs, 0.5, layer_dtype, "fp32 R")
    assert y.dtype == layer_dtype and x.grad.dtype == layer_dtype and R.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------- gradcheck
# in = out = 8: merge_pays(M, 8, 8) is 2·M·8 > 3·64 in both directions, so M = 2 is low-rank and M = 16
# (or 4×4) merged.
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead", [(2,), (16,), (4, 4)], ids=["lowrank", "merged", "3d"])
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_gradcheck(backend, lead, bias):
    x, w, b, A, R, B = make_inputs(lead, 8, 8, 3, dtype=torch.float64, bias=bias)
    fn = lambda x, R: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.7, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, R))


# ----------------------------------------------------------------------------------------- opcheck
def _sample_inputs():
    samples = []
    for lead, i, o, r, kw in [
        ((8,), 16, 12, 4, {}),
        ((8,), 16, 12, 4, {"bias": False}),
        ((2, 3), 16, 12, 4, {}),
        ((8,), 16, 12, 4, {"requires_grad": False}),
        ((40,), 16, 12, 4, {}),                                   # merged schedule
        ((0,), 16, 12, 4, {}),                                    # empty batch
        ((0,), 16, 12, 4, {"requires_grad": False}),
        ((5,), 16, 12, 4, {"dtype": torch.bfloat16, "r_dtype": torch.float32}),
        ((), 16, 12, 4, {}),                                      # 1-D x
    ]:
        samples.append((lead, make_inputs(lead, i, o, r, **kw)))
    x, w, b, A, R, B = make_inputs((6,), 16, 12, 4)
    samples.append(("x only", (x, w, b, A, R.detach(), B)))
    samples.append(("R only", (x.detach(), w, b, A, R, B)))
    samples.append(("noncontig x", (torch.randn(16, 6).t().requires_grad_(), w, b, A, R, B)))
    return samples


SAMPLES = _sample_inputs()


@pytest.mark.parametrize("sample", SAMPLES, ids=[str(s[0]) for s in SAMPLES])
def test_opcheck_linear(sample):
    opcheck(torch.ops.loraxs.linear, (*sample[1], 0.5))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[str(s[0]) for s in SAMPLES])
def test_opcheck_linear_fwd(sample, backend):
    opcheck(torch.ops.loraxs.linear_fwd, (*sample[1], 0.5, backend))


# ----------------------------------------------------------------------------------------- compile
def _compiled_matches_eager(fn, compiled, shapes, scaling, post=lambda y: y, tol_dtype=torch.float32):
    for seed, (lead, i, o, r) in enumerate(shapes):
        x, w, b, A, R, B = make_inputs(lead, i, o, r, seed=seed)
        xe, Re = x.detach().clone().requires_grad_(), R.detach().clone().requires_grad_()
        y = compiled(x, w, b, A, R, B)
        ye = fn(xe, w, b, A, Re, B)
        g = torch.randn_like(ye)
        y.backward(g)
        ye.backward(g)
        assert_close(y, ye, tol_dtype, f"compiled y {lead}")
        assert_close(x.grad, xe.grad, tol_dtype, f"compiled grad_x {lead}")
        assert_close(R.grad, Re.grad, tol_dtype, f"compiled grad_R {lead}")
        y_ref, _, _ = reference_fp64(x, w, b, A, R, B, scaling)
        assert_close(y, post(y_ref), tol_dtype, "compiled vs reference")


@pytest.mark.parametrize("backend_op", ["auto", "torch"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_function(compiler, backend_op):
    torch._dynamo.reset()

    def fn(x, w, b, A, R, B):
        return torch.relu(loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend_op)) * 2

    compiled = torch.compile(fn, backend=compiler, fullgraph=True)
    # Two shapes (and a 3-D x): the second recompiles or runs a dynamic graph; both must match eager.
    _compiled_matches_eager(fn, compiled, [((8,), 32, 24, 4), ((3, 5), 32, 24, 4)], 0.5, post=lambda y: torch.relu(y) * 2)


def test_compile_dynamic():
    torch._dynamo.reset()

    def fn(x, w, b, A, R, B):
        return loraxs_kernels.loraxs_linear(x, w, b, A, R, B, -0.5)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    _compiled_matches_eager(fn, compiled, [((8,), 32, 24, 4), ((50,), 32, 24, 4), ((2, 7), 32, 24, 4)], -0.5)


def test_compile_has_no_graph_break():
    torch._dynamo.reset()
    x, w, b, A, R, B = make_inputs((8,), 32, 24, 4)
    explanation = torch._dynamo.explain(lambda x, R: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5))(x, R)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_module(compiler):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = loraxs_kernels.FusedLoRAXSLinear(32, 24, 4, scaling=2.0)
    with torch.no_grad():
        layer.lora_R.normal_(0, 0.5)
    compiled = torch.compile(layer, backend=compiler, fullgraph=True)
    for lead in [(8,), (2, 9)]:
        x = torch.randn(*lead, 32)
        layer.lora_R.grad = None
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = compiled(xc)
        y.square().sum().backward()
        gRc = layer.lora_R.grad.clone()
        layer.lora_R.grad = None
        ye = layer(xe)
        ye.square().sum().backward()
        assert_close(y, ye, torch.float32, "module y")
        assert_close(xc.grad, xe.grad, torch.float32, "module grad_x")
        assert_close(gRc, layer.lora_R.grad, torch.float32, "module grad_R")


# ------------------------------------------------------------------------------------ saved tensors
def _saved_during(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, saved


def _foreign(saved, own):
    """The saved tensors that do not share storage with one of the `own` tensors."""
    own_ptrs = {t.untyped_storage().data_ptr() for t in own if t is not None}
    return [t for t in saved if t.untyped_storage().data_ptr() not in own_ptrs]


def _assert_saves_only_xa(saved, x, w, b, A, R, B):
    M, i = math.prod(x.shape[:-1]), x.shape[-1]
    r = A.shape[1]
    for t in saved:
        assert not (t.dim() >= 2 and math.prod(t.shape[:-1]) == M and t.shape[-1] == i), (
            f"a tensor of x's size {tuple(t.shape)} was saved for the backward")
        assert t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr(), "x itself was saved"
    foreign = _foreign(saved, (w, b, A, R, B))
    assert len(foreign) == 1, f"expected x A alone beside the layer's tensors, got {[tuple(t.shape) for t in foreign]}"
    xa = foreign[0]
    assert xa.shape == (M, r)
    assert_close(xa, (x.detach().reshape(M, i).double() @ A.double()), x.dtype, "saved x A")


@pytest.mark.parametrize("lead", [(20,), (4, 5), (300,)], ids=["lowrank", "3d", "merged"])
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_saves_only_xa(backend, lead):
    x, w, b, A, R, B = make_inputs(lead, 16, 12, 4)  # M ≠ out, so no (M, in) tensor is mistaken for W
    y, saved = _saved_during(lambda: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend))
    _assert_saves_only_xa(saved, x, w, b, A, R, B)
    y.sum().backward()  # what was saved is enough
    assert x.grad is not None and R.grad is not None


def test_saves_only_xa_module_fp32_master_R():
    layer = loraxs_kernels.FusedLoRAXSLinear(16, 12, 4, dtype=torch.bfloat16, r_dtype=torch.float32)
    x = torch.randn(20, 16, dtype=torch.bfloat16, requires_grad=True)
    y, saved = _saved_during(lambda: layer(x))
    _assert_saves_only_xa(saved, x, layer.weight, layer.bias, layer.lora_A, layer.lora_R, layer.lora_B)


def test_saved_tensor_audit_can_fail():
    """The audit flags a layer that keeps x: the reference does as soon as a factor is not frozen."""
    x, w, b, A, R, B = make_inputs((20,), 16, 12, 4)
    A_trainable = A.clone().requires_grad_()
    _, saved = _saved_during(lambda: reference.loraxs_linear(x, w, b, A_trainable, R, B, 0.5))
    with pytest.raises(AssertionError, match="x"):
        _assert_saves_only_xa(saved, x, w, b, A_trainable, R, B)


# ------------------------------------------------------------------------------------ meta / fake
def test_meta_tensors_give_shapes():
    """Shape inference on the meta device, as F.linear allows (e.g. a model built on meta)."""
    args = [t.detach().to("meta") if t is not None else None for t in make_inputs((3, 5), 16, 12, 4)]
    assert F.linear(args[0], args[1], args[2]).shape == (3, 5, 12)
    assert loraxs_kernels.loraxs_linear(*args, 0.5).shape == (3, 5, 12)
    assert torch.ops.loraxs.linear(*args, 0.5).shape == (3, 5, 12)


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = make_inputs((3, 5), 16, 12, 4)  # made outside the mode: its generators read real values
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) if t is not None else None for t in real]
        y = loraxs_kernels.loraxs_linear(*args, 0.5)
        assert y.shape == (3, 5, 12) and y.dtype == torch.float32
