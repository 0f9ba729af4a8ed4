"""The op's host path (issue 8): C++ from the call to the kernels, what "auto" chooses on CUDA (the
C++ rule, run here through loraxs::auto_backend), outputs that are never views, the build-less
fallback, and CUDA-graph capture on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import loraxs_kernels
from common import assert_close, cpu_backends, make_inputs, native_reason, reference_fp64
from loraxs_kernels.backends import auto_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_native = pytest.mark.skipif(native_reason() is not None and os.environ.get("LORAXS_ALLOW_NO_NATIVE") == "1",
                                  reason="the C++ extension is not built (LORAXS_ALLOW_NO_NATIVE=1)")


# ------------------------------------------------------------------------------ outputs, not views
@pytest.mark.parametrize("backend", cpu_backends() + ["auto"])
@pytest.mark.parametrize("lead", [(3, 5), (2, 1, 4), (7,)], ids=str)
def test_outputs_are_not_views(backend, lead):
    """FSDP2 (and in-place ops) treat a view output specially: y and grad_x are fresh tensors with
    x's leading dims, for 2-D and N-D x alike."""
    x, w, b, A, R, B = make_inputs(lead, 24, 20, 4)
    y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)
    assert y._base is None and not y._is_view(), f"{backend}: y is a view of {tuple(y._base.shape)}"
    assert y.shape == (*lead, 20) and y.is_contiguous()
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert gx._base is None and gx.shape == x.shape
    y_ref, gx_ref, _ = reference_fp64(x, w, b, A, R, B, 0.5, torch.ones_like(y))
    assert_close(y, y_ref, torch.float32, f"{backend} y")
    assert_close(gx, gx_ref, torch.float32, f"{backend} grad_x")


# ------------------------------------------------------------------------------- "auto" on CUDA
def _auto(dtype=torch.bfloat16, M=16, r=16, cc=9, tf32=False, triton=True, cuda=True, name="NVIDIA H200"):
    return torch.ops.loraxs.auto_backend(name, cc, dtype, M, r, tf32, triton, cuda)


@pytest.fixture
def clean_table():
    torch.ops.loraxs.clear_auto_choices()
    yield
    torch.ops.loraxs.clear_auto_choices()
    for (device, dtype, m, r), choice in auto_table.entries():  # restore the shipped table
        torch.ops.loraxs.set_auto_choice(device, getattr(torch, dtype), m, r, choice)


@needs_native
def test_auto_rule_without_measurements(clean_table):
    """No measured entry: Triton for 16-bit and TF32 fp32; cuBLAS (the ATen schedule) for fp64, for
    fp32 when TF32 is off, and below sm_80; the CUDA C++ kernels when Triton is not installed."""
    assert _auto(torch.bfloat16) == "triton"
    assert _auto(torch.float16) == "triton"
    assert _auto(torch.float32, tf32=True) == "triton"
    assert _auto(torch.float32, tf32=False) == "torch"
    assert _auto(torch.float64, tf32=True) == "torch"
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert _auto(dtype, cc=7, tf32=True) == "torch", "below sm_80 neither GPU backend has code"
    assert _auto(torch.bfloat16, triton=False) == "cuda"
    assert _auto(torch.bfloat16, triton=False, cuda=False) == "torch"


@needs_native
@pytest.mark.parametrize("M,r", [(1, 1), (1, 16), (2, 16), (16, 4), (17, 5), (128, 64), (129, 65), (5000, 200),
                                 (9000, 256), (100000, 16)])
def test_auto_table_buckets_match_python(clean_table, M, r):
    """The C++ lookup buckets M and r as auto_table.py (which tune_auto writes with) does: an entry
    set for Python's bucket of (M, r) is the one C++ finds, and no neighbouring bucket's."""
    mb, rb = auto_table.bucket(M, auto_table.M_BUCKETS), auto_table.bucket(r, auto_table.R_BUCKETS)
    torch.ops.loraxs.set_auto_choice("NVIDIA H200", torch.bfloat16, mb, rb, "cuda")
    assert _auto(torch.bfloat16, M=M, r=r) == "cuda"
    assert _auto(torch.float16, M=M, r=r) == "triton", "an entry is per dtype"
    assert _auto(torch.bfloat16, M=M, r=r, name="NVIDIA A100-SXM4-80GB") == "triton", "an entry is per GPU"
    other_m = auto_table.M_BUCKETS[(auto_table.M_BUCKETS.index(mb) + 1) % len(auto_table.M_BUCKETS)]
    assert _auto(torch.bfloat16, M=other_m, r=r) == "triton", "an entry is per M bucket"


@needs_native
def test_auto_table_choice_that_cannot_run_falls_back(clean_table):
    torch.ops.loraxs.set_auto_choice("NVIDIA H200", torch.float32, 16, 16, "triton")
    assert _auto(torch.float32, M=8, tf32=False) == "triton", "a measurement overrides the dtype rule"
    assert _auto(torch.float32, M=8, tf32=False, triton=False) == "torch"


@needs_native
def test_auto_fallbacks_warn_once():
    """Falling back from what the table or the default asked for is said, once per process (c10's
    TORCH_WARN_ONCE, printed on stderr: the op is called without Python's warning machinery)."""
    code = (
        "import torch, loraxs_kernels\n"
        "torch.ops.loraxs.clear_auto_choices()\n"
        "torch.ops.loraxs.set_auto_choice('G', torch.float32, 16, 16, 'triton')\n"
        "for _ in range(3):\n"
        "    assert torch.ops.loraxs.auto_backend('G', 9, torch.float32, 8, 16, False, False, True) == 'torch'\n"
        "    assert torch.ops.loraxs.auto_backend('G', 9, torch.bfloat16, 8, 16, False, False, True) == 'cuda'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("the measured auto table picks backend 'triton' on G, which is not available") == 1, proc.stderr
    assert proc.stderr.count("Triton is not installed, so \"auto\" runs the CUDA C++ kernels") == 1, proc.stderr


@needs_native
def test_set_auto_choice_rejects_what_the_table_cannot_hold(clean_table):
    with pytest.raises(ValueError, match="M bucket 3 / rank bucket 16 is not one of the table's buckets"):
        torch.ops.loraxs.set_auto_choice("X", torch.bfloat16, 3, 16, "cuda")
    with pytest.raises(ValueError, match="may choose 'triton', 'cuda' or 'torch', got 'cpp'"):
        torch.ops.loraxs.set_auto_choice("X", torch.bfloat16, 16, 16, "cpp")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        torch.ops.loraxs.set_auto_choice("X", torch.bfloat16, 16, 16, "fast")


@needs_native
def test_unknown_backend_through_the_registered_op():
    x, w, b, A, R, B = make_inputs((3,), 16, 12, 4, requires_grad=False)
    with pytest.raises(ValueError, match="unknown backend 'gpu'; choose one of 'auto', 'torch', 'cpp', 'triton', 'cuda'"):
        torch.ops.loraxs.linear(x, w, b, A, R, B, 1.0, "gpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' .* needs CUDA tensors; tensors are on cpu"):
        torch.ops.loraxs.linear(x, w, b, A, R, B, 1.0, "cuda")


# ------------------------------------------------------------------------- without the extension
def test_fallback_without_the_extension():
    """No built library: the package imports, loraxs_linear and the module run the pure-PyTorch path
    (same numbers as the reference), after exactly one warning saying how to build, and
    available_backends says what is missing."""
    code = r"""
import sys, warnings
sys.path.insert(0, "tests")
import torch
from common import make_inputs, reference_fp64
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import loraxs_kernels
    from loraxs_kernels import FusedLoRAXSLinear
    assert not hasattr(torch.ops.loraxs, "linear_fwd") or not torch._C._dispatch_has_kernel_for_dispatch_key(
        "loraxs::linear_fwd", "CPU")
    x, w, b, A, R, B = make_inputs((2, 3), 24, 20, 4)
    y = loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, 0.5, g)
    for got, ref in ((y, y_ref), (x.grad, gx_ref), (R.grad, gR_ref)):
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), "fallback disagrees with the reference"
    layer = FusedLoRAXSLinear(24, 20, 4)
    layer(torch.randn(5, 24)).sum().backward()
    assert layer.lora_R.grad is not None
    try:
        loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend="cpp")
    except loraxs_kernels.BackendUnavailable as e:
        assert "not built" in str(e) or "failed to load" in str(e), e
    else:
        raise SystemExit("backend='cpp' ran without the extension")
ours = [str(w.message) for w in caught if "pure-PyTorch path" in str(w.message)]
assert len(ours) == 1, ours
assert "make build" in ours[0], ours[0]
reasons = loraxs_kernels.available_backends(torch.device("cpu"), reasons=True)
assert reasons["torch"] is None and reasons["cpp"] and reasons["cuda"], reasons
print("OK", reasons["cpp"])
"""
    env = dict(os.environ, LORAXS_NATIVE_LIB=os.path.join(ROOT, "build", "no-such-library.so"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------- GPU: graphs
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("M", [1, 64])
def test_cuda_graph_capture_and_replay(backend, M):
    """The CUDA path can be captured (torch.cuda.graph): no host synchronisation, no data-dependent
    allocation, no autotuning inside the capture; replays compute the layer for new inputs."""
    from loraxs_kernels import backends

    dev = torch.device("cuda")
    if backends.unavailable_reason(backend, dev) is not None:
        pytest.fail(f"backend {backend} unavailable on a GPU machine: {backends.unavailable_reason(backend, dev)}")
    x, w, b, A, R, B = (t.cuda() if t is not None else None
                        for t in make_inputs((M,), 256, 192, 16, dtype=torch.bfloat16, requires_grad=False))
    fn = lambda: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5, backend=backend)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, reference_fp64(x, w, b, A, R, B, 0.5)[0], torch.bfloat16, f"{backend} replay {seed}")


@pytest.mark.gpu
def test_compile_reduce_overhead_on_cuda():
    """torch.compile(mode="reduce-overhead") records the op into CUDA graphs, forward and backward."""
    x, w, b, A, R, B = (t.cuda() if t is not None else None
                        for t in make_inputs((32,), 256, 192, 16, dtype=torch.bfloat16))
    x, R = x.detach().requires_grad_(), R.detach().requires_grad_()
    fn = torch.compile(lambda x, R: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, 0.5), mode="reduce-overhead",
                       fullgraph=True)
    g = torch.randn(32, 192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        y = fn(x, R)
        gx, gR = torch.autograd.grad(y, (x, R), g)
    y_ref, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, 0.5, g)
    assert_close(y, y_ref, torch.bfloat16, "reduce-overhead y")
    assert_close(gx, gx_ref, torch.bfloat16, "reduce-overhead grad_x")
    assert_close(gR, gR_ref, torch.bfloat16, "reduce-overhead grad_R")
