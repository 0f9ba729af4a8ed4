"""Every bad input gets a clear error that names the offending tensor and its sizes, dtype or device
(shapes: ValueError, dtypes: TypeError, devices and frozen tensors: RuntimeError, backends:
ValueError / BackendUnavailable); plus the edge inputs that must work (NaN, M = 0, autocast)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import loraxs_kernels
from common import assert_close, cpu_backends, make_inputs, reference_fp64
from loraxs_kernels import BackendUnavailable, backends

BACKENDS = cpu_backends()
CPU = torch.device("cpu")
NAMES = ("x", "weight", "bias", "A", "R", "B")


def call(backend="auto", scaling=1.0, **replace):
    """loraxs_linear on a valid (x (5, 16), weight (12, 16), r = 4) layer with some tensors replaced."""
    args = dict(zip(NAMES, make_inputs((5,), 16, 12, 4, requires_grad=False)))
    args.update(replace)
    return loraxs_kernels.loraxs_linear(*(args[n] for n in NAMES), scaling, backend=backend)


def call_registered(**replace):
    args = dict(zip(NAMES, make_inputs((5,), 16, 12, 4, requires_grad=False)))
    args.update(replace)
    return torch.ops.loraxs.linear(*(args[n] for n in NAMES), 1.0)


# --------------------------------------------------------------------------------------- shapes
SHAPE_CASES = [
    ("x features", dict(x=torch.randn(5, 15)), r"x has 15 features \(shape \(5, 15\)\) but weight expects 16"),
    ("x features 3-D", dict(x=torch.randn(2, 3, 17)), r"x has 17 features .* weight expects 16"),
    ("x 0-D", dict(x=torch.tensor(1.0)), r"x must have at least one dimension .* got shape \(\)"),
    ("weight 1-D", dict(weight=torch.randn(16)), r"weight must be 2-D .* got shape \(16\)"),
    ("weight in", dict(weight=torch.randn(12, 15)), r"x has 16 features .* weight expects 15 \(weight shape \(12, 15\)\)"),
    ("bias length", dict(bias=torch.randn(11)), r"bias must have shape \(12,\) .* got \(11\)"),
    ("bias 2-D", dict(bias=torch.randn(1, 12)), r"bias must have shape \(12,\) .* got \(1, 12\)"),
    ("A rows", dict(A=torch.randn(15, 4)), r"A must have shape \(in_features=16, r\), got \(15, 4\)"),
    ("A 3-D", dict(A=torch.randn(16, 4, 1)), r"A must have shape \(in_features=16, r\), got \(16, 4, 1\)"),
    ("R not square", dict(R=torch.randn(4, 5)), r"R must have shape \(r, r\) = \(4, 4\) .* got \(4, 5\)"),
    ("R wrong r", dict(R=torch.randn(3, 3)), r"R must have shape \(r, r\) = \(4, 4\) .* got \(3, 3\)"),
    ("B out", dict(B=torch.randn(4, 11)), r"B must have shape \(r, out_features\) = \(4, 12\) .* got \(4, 11\)"),
    ("B r", dict(B=torch.randn(5, 12)), r"B must have shape \(r, out_features\) = \(4, 12\) .* got \(5, 12\)"),
    ("rank 0", dict(A=torch.randn(16, 0), R=torch.randn(0, 0), B=torch.randn(0, 12)),
     r"rank r = A.shape\[1\] must be between 1 and 256, got 0"),
    ("rank 257", dict(x=torch.randn(5, 300), weight=torch.randn(280, 300), bias=None, A=torch.randn(300, 257),
                      R=torch.randn(257, 257), B=torch.randn(257, 280)),
     r"rank r = A.shape\[1\] must be between 1 and 256, got 257"),
]


@pytest.mark.parametrize("entry", ["loraxs_linear", "torch.ops"])
@pytest.mark.parametrize("replace,match", [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES])
def test_bad_shapes(replace, match, entry):
    with pytest.raises(ValueError, match=match):
        (call if entry == "loraxs_linear" else call_registered)(**replace)


# --------------------------------------------------------------------------------------- dtypes
DTYPE_CASES = [
    ("weight fp64", dict(weight=torch.randn(12, 16, dtype=torch.float64)),
     r"weight has dtype torch.float64 but x has dtype torch.float32"),
    ("bias bf16", dict(bias=torch.randn(12, dtype=torch.bfloat16)), r"bias has dtype torch.bfloat16 but x has dtype torch.float32"),
    ("A fp16", dict(A=torch.randn(16, 4, dtype=torch.float16)), r"A has dtype torch.float16 but x has dtype torch.float32"),
    ("B fp64", dict(B=torch.randn(4, 12, dtype=torch.float64)), r"B has dtype torch.float64 but x has dtype torch.float32"),
    ("x fp64", dict(x=torch.randn(5, 16, dtype=torch.float64)), r"weight has dtype torch.float32 but x has dtype torch.float64"),
    ("R fp64 beside fp32", dict(R=torch.randn(4, 4, dtype=torch.float64)),
     r"R has dtype torch.float64; it must be x's dtype \(torch.float32\) or float32"),
    ("R fp16 beside fp32", dict(R=torch.randn(4, 4, dtype=torch.float16)), r"R has dtype torch.float16"),
    ("x int", dict(x=torch.ones(5, 16, dtype=torch.int32)), r"x has dtype torch.int32; supported dtypes are"),
    ("weight int", dict(weight=torch.ones(12, 16, dtype=torch.int64)),
     r"weight has dtype torch.int64 but x has dtype torch.float32"),
    ("R int", dict(R=torch.ones(4, 4, dtype=torch.int32)), r"R has dtype torch.int32"),
]


@pytest.mark.parametrize("replace,match", [c[1:] for c in DTYPE_CASES], ids=[c[0] for c in DTYPE_CASES])
def test_bad_dtypes(replace, match):
    with pytest.raises(TypeError, match=match):
        call(**replace)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_non_tensor_inputs(backend):
    """A list or float where a tensor belongs: the op schema (a RuntimeError from the dispatcher) or
    check_inputs (TypeError) rejects it, naming the argument; never an AttributeError from inside."""
    with pytest.raises((TypeError, RuntimeError), match=r"\bx\b"):
        call(x=[[1.0] * 16] * 5, backend=backend)
    with pytest.raises((TypeError, RuntimeError), match=r"\bbias\b"):
        call(bias=0.5, backend=backend)


def test_R_of_a_third_dtype_beside_half_layer():
    """A half layer takes R in its own dtype or fp32; the other half type or fp64 is a TypeError."""
    x, w, b, A, R, B = make_inputs((5,), 16, 12, 4, dtype=torch.float16, requires_grad=False)
    for bad in (torch.bfloat16, torch.float64):
        with pytest.raises(TypeError, match=rf"R has dtype {bad}; it must be x's dtype \(torch.float16\) or float32"):
            loraxs_kernels.loraxs_linear(x, w, b, A, R.to(bad), B)
    all_int = [t.to(torch.int64) for t in (x, w, b, A, R, B)]
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        loraxs_kernels.loraxs_linear(*all_int)


# -------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("name", NAMES)
def test_device_mismatch(name):
    """One tensor on the meta device (CUDA tensors cannot be made here): a RuntimeError naming both
    devices, from whichever side the odd tensor is on."""
    args = dict(zip(NAMES, make_inputs((5,), 16, 12, 4, requires_grad=False)))
    args[name] = args[name].to("meta")
    with pytest.raises(RuntimeError, match=r"(?=.*\bmeta\b)(?=.*\bcpu\b)"):
        loraxs_kernels.loraxs_linear(*(args[n] for n in NAMES))


# ------------------------------------------------------------------------------------- backends
def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'bogus'; choose one of 'auto', 'torch', 'cpp', 'triton', 'cuda'"):
        call(backend="bogus")
    with pytest.raises(ValueError, match="unknown backend 'CPP'"):
        call(backend="CPP")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.unavailable_reason("gpu", CPU)


def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(BackendUnavailable, match=r"backend 'cuda' .* needs CUDA tensors; tensors are on cpu"):
        call(backend="cuda")
    assert issubclass(BackendUnavailable, RuntimeError)
    assert "cuda" not in loraxs_kernels.available_backends(CPU)


def test_triton_on_cpu_without_interpreter():
    """Triton picks its interpreter when the kernels are imported, so this runs in a fresh process
    whose environment has no TRITON_INTERPRET (conftest sets it for this one)."""
    code = (
        "import torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from common import make_inputs\n"
        "import loraxs_kernels\n"
        "from loraxs_kernels import backends\n"
        "reason = backends.unavailable_reason('triton', torch.device('cpu'))\n"
        "assert reason, 'triton reported available on CPU without TRITON_INTERPRET'\n"
        "try:\n"
        "    loraxs_kernels.loraxs_linear(*make_inputs((3,), 16, 12, 4), backend='triton')\n"
        "except loraxs_kernels.BackendUnavailable as e:\n"
        "    print('BackendUnavailable:', e)\n"
        "else:\n"
        "    raise SystemExit('no BackendUnavailable')\n"
        "assert 'triton' not in loraxs_kernels.available_backends(torch.device('cpu'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BackendUnavailable:" in proc.stdout and "TRITON_INTERPRET" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------- frozen tensors
@pytest.mark.parametrize("name,shape", [("weight", r"\(12, 16\)"), ("bias", r"\(12\)"), ("A", r"\(16, 4\)"),
                                        ("B", r"\(4, 12\)")])
def test_frozen_tensor_requiring_grad(name, shape):
    args = dict(zip(NAMES, make_inputs((5,), 16, 12, 4)))  # x and R require grad
    args[name] = args[name].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=rf"gradients for x and R only, but {name} {shape} requires grad"):
        loraxs_kernels.loraxs_linear(*(args[n] for n in NAMES))
    # Also when neither x nor R asks for a gradient: the frozen tensor would silently get none.
    args["x"], args["R"] = args["x"].detach(), args["R"].detach()
    with pytest.raises(RuntimeError, match=rf"but {name} {shape} requires grad"):
        torch.ops.loraxs.linear(*(args[n] for n in NAMES), 1.0)
    # Inference is fine, and correct.
    with torch.no_grad():
        y = loraxs_kernels.loraxs_linear(*(args[n] for n in NAMES), 0.5)
    y_ref, _, _ = reference_fp64(*(args[n] for n in NAMES), 0.5)
    assert_close(y, y_ref, torch.float32, "no_grad with a frozen tensor requiring grad")
    with torch.inference_mode():
        assert loraxs_kernels.loraxs_linear(*(args[n] for n in NAMES), 0.5).shape == (5, 12)


# ------------------------------------------------------------------------------- edge inputs work
@pytest.mark.parametrize("M", [6, 300], ids=["lowrank", "merged"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_stays_in_its_row(backend, M):
    x, w, b, A, R, B = make_inputs((M,), 40, 30, 5, requires_grad=False)
    x[3, 7] = float("nan")
    y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)
    assert torch.isnan(y[3]).all(), "the NaN row must be NaN everywhere (every output mixes all inputs)"
    others = torch.cat([y[:3], y[4:]])
    assert torch.isfinite(others).all(), "a NaN in one row leaked into other rows"
    keep = torch.ones(M, dtype=torch.bool)
    keep[3] = False
    y_ref, _, _ = reference_fp64(x[keep], w, b, A, R, B, 0.5)
    assert_close(y[keep], y_ref, torch.float32, "rows without NaN")


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_empty_batch(backend, lead):
    x, w, b, A, R, B = make_inputs(lead, 16, 12, 4)
    y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)
    assert y.shape == (*lead, 12) and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(R.grad, torch.zeros(4, 4)), "an empty batch gives a zero grad_R"


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_autocast_bf16(backend):
    """Under torch.autocast("cpu", bfloat16), fp32 inputs give a bf16 output, as F.linear does."""
    x, w, b, A, R, B = make_inputs((6, 5), 32, 24, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = F.linear(x, w, b).dtype
        y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)
    assert expected_dtype == torch.bfloat16 and y.dtype == expected_dtype
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)
    assert x.grad.dtype == torch.float32 and R.grad.dtype == torch.float32
    # The op computes in bf16 on the bf16-rounded inputs: compare with bf16 tolerance.
    y_ref, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, 0.5, g)
    assert_close(y, y_ref, torch.bfloat16, "autocast y")
    assert_close(x.grad, gx_ref, torch.bfloat16, "autocast grad_x")
    assert_close(R.grad, gR_ref, torch.bfloat16, "autocast grad_R")


def test_autocast_bf16_registered_op():
    x, w, b, A, R, B = make_inputs((7,), 32, 24, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.loraxs.linear(x, w, b, A, R, B, 0.5)
        y_no_bias = torch.ops.loraxs.linear(x, w, None, A, R, B, 0.5)
    assert y.dtype == torch.bfloat16 and y_no_bias.dtype == torch.bfloat16
    assert_close(y, reference_fp64(x, w, b, A, R, B, 0.5)[0], torch.bfloat16, "torch.ops autocast")
    assert_close(y_no_bias, reference_fp64(x, w, None, A, R, B, 0.5)[0], torch.bfloat16, "torch.ops autocast, no bias")
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and R.grad.dtype == torch.float32


def test_autocast_leaves_fp64_and_disabled_alone():
    x, w, b, A, R, B = make_inputs((5,), 16, 12, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5)
    assert y.dtype == torch.float64  # autocast leaves fp64 alone, as for F.linear
    x, w, b, A, R, B = make_inputs((5,), 16, 12, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5).dtype == torch.float32


def test_double_backward_raises_clearly():
    """The op gives first-order gradients only; a second backward must say so, not be silently wrong."""
    x, w, b, A, R, B = make_inputs((5,), 12, 10, 3, dtype=torch.float64)
    y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        gx.sum().backward()


def test_xa_not_kept_when_R_is_frozen():
    """x A feeds grad_R only: with R frozen the backward keeps no activation at all."""
    x, w, b, A, R, B = make_inputs((40,), 24, 16, 4)
    R.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5)
    layer_ptrs = {t.data_ptr() for t in (w, A, R, B)}
    assert all(t.data_ptr() in layer_ptrs for t in saved), [tuple(t.shape) for t in saved]
    g = torch.randn_like(y)
    y.backward(g)
    _, ref_gx, _ = reference_fp64(x, w, b, A, R, B, 0.5, g)
    assert_close(x.grad, ref_gx, torch.float32, "grad_x with R frozen")
