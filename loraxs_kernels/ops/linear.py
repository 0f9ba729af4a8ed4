"""The contract: torch.ops.loraxs.linear, its fake kernel and its autograd formula.

    linear(x, weight, bias, A, R, B, scaling=1.0) -> y = x Wᵀ + b + s·((x A) R) B

The backward needs x A (M×r), which y alone does not give, so the op is built from two internal ops:

    linear_fwd(x, weight, bias, A, R, B, scaling, backend) -> (y, xa)     fake kernel + autograd
    linear_bwd(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend) -> (grad_x, grad_R)

`linear` is CompositeImplicitAutograd: it calls linear_fwd and returns y, so autograd, FakeTensor and
torch.compile all see linear_fwd/linear_bwd, whose CPU and CUDA kernels are opaque calls into the
chosen backend (no graph break, and Inductor cannot split our fused kernels apart). The autograd
formula keeps x A (only when R needs a gradient) beside the layer's own tensors, never x. `backend` is a string argument rather than a
dispatch key so that `loraxs_linear(..., backend="torch")` can pick any backend on any device.
"""

from __future__ import annotations

import math

import torch

from .. import backends
from .checks import check_frozen, check_inputs, check_tensor_types

torch.library.define(
    "loraxs::linear",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, float scaling=1.0) -> Tensor",
)
torch.library.define(
    "loraxs::linear_fwd",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, float scaling, str backend) "
    "-> (Tensor, Tensor)",
)
torch.library.define(
    "loraxs::linear_bwd",
    "(Tensor grad_out, Tensor xa, Tensor weight, Tensor A, Tensor R, Tensor B, float scaling, "
    "bool need_x, bool need_R, str backend) -> (Tensor, Tensor)",
)


# ----------------------------------------------------------------------------------------- forward
def _linear_fwd_kernel(x, weight, bias, A, R, B, scaling, backend):
    check_inputs(x, weight, bias, A, R, B)
    in_features, out_features, rank = weight.shape[1], weight.shape[0], A.shape[1]
    x2 = x.reshape(-1, in_features)
    impl = backends.get(backend, x.device, x.dtype, x2.shape[0], rank)
    # Inputs were cast by _autocast below if autocast is on; the kernels must not be re-cast.
    with torch.autocast(x.device.type, enabled=False):
        y, xa = impl.forward(x2, weight, bias, A, R, B, float(scaling))
    return y.reshape(*x.shape[:-1], out_features), xa


def _linear_bwd_kernel(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend):
    out_features, in_features = weight.shape
    g2 = grad_out.reshape(-1, out_features)
    impl = backends.get(backend, grad_out.device, grad_out.dtype, g2.shape[0], A.shape[1])
    with torch.autocast(grad_out.device.type, enabled=False):
        grad_x, grad_R = impl.backward(g2, xa, weight, A, R, B, float(scaling), need_x, need_R)
    grad_x = grad_x.reshape(*grad_out.shape[:-1], in_features) if need_x else grad_out.new_empty(0)
    return grad_x, (grad_R if need_R else R.new_empty(0))


for _key in ("CPU", "CUDA"):
    torch.library.impl("loraxs::linear_fwd", _key)(_linear_fwd_kernel)
    torch.library.impl("loraxs::linear_bwd", _key)(_linear_bwd_kernel)


@torch.library.register_fake("loraxs::linear_fwd")
def _linear_fwd_fake(x, weight, bias, A, R, B, scaling, backend):
    check_inputs(x, weight, bias, A, R, B)
    backends.check_name(backend)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    xa = x.new_empty((math.prod(x.shape[:-1]), A.shape[1]))
    return y, xa


@torch.library.register_fake("loraxs::linear_bwd")
def _linear_bwd_fake(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend):
    grad_x = grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1])) if need_x else grad_out.new_empty(0)
    grad_R = R.new_empty(R.shape) if need_R else R.new_empty(0)
    return grad_x, grad_R


# ---------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, weight, bias, A, R, B, scaling, backend = inputs
    check_frozen(weight, bias, A, B)
    _, xa = output
    ctx.mark_non_differentiable(xa)
    # x A (M×r) is the only activation kept, and only grad_R reads it; weight, A, R and B are the
    # layer's own tensors (no new memory).
    ctx.save_for_backward(xa if R.requires_grad else None, weight, A, R, B)
    ctx.scaling, ctx.backend = scaling, backend


def _backward(ctx, grad_out, _grad_xa):
    xa, weight, A, R, B = ctx.saved_tensors
    need_x, need_R = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
    if xa is None:  # R needs no gradient, so x A was not kept; backends read xa only for grad_R.
        xa = grad_out.new_empty((0, A.shape[1]))
    grad_x, grad_R = torch.ops.loraxs.linear_bwd(
        grad_out, xa, weight, A, R, B, ctx.scaling, need_x, need_R, ctx.backend
    )
    return (grad_x if need_x else None), None, None, None, (grad_R if need_R else None), None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "loraxs.linear supports first-order gradients only: differentiating its backward "
        "(create_graph=True, then a second backward) is not implemented; use loraxs_kernels.reference"
    )


torch.library.register_autograd("loraxs::linear_fwd", _backward, setup_context=_setup_context)
torch.library.register_autograd("loraxs::linear_bwd", _no_double_backward)


# -------------------------------------------------------------------------------- the public entry
def _autocast(x, weight, bias, A, R, B):
    """Cast like F.linear does under torch.autocast: float32 tensors go to the autocast dtype.

    R stays as it is when it is float32: the op takes an fp32 master R beside half weights.
    """
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return x, weight, bias, A, R, B
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64) else t

    return cast(x), cast(weight), cast(bias), cast(A), (R if R.dtype == torch.float32 else cast(R)), cast(B)


def _linear(x, weight, bias, A, R, B, scaling, backend):
    x, weight, bias, A, R, B = _autocast(x, weight, bias, A, R, B)
    return torch.ops.loraxs.linear_fwd(x, weight, bias, A, R, B, scaling, backend)[0]


@torch.library.impl("loraxs::linear", "CompositeImplicitAutograd")
def _linear_composite(x, weight, bias, A, R, B, scaling=1.0):
    return _linear(x, weight, bias, A, R, B, scaling, "auto")


def loraxs_linear(x, weight, bias, A, R, B, scaling: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """y = x Wᵀ + b + scaling·((x A) R) B, shape (..., out), x's dtype.

    x: (..., in); weight: (out, in); bias: (out,) or None; A: (in, r); R: (r, r); B: (r, out).
    Gradients flow to x and R only. backend: "auto" | "torch" | "cpp" | "triton" | "cuda"; a backend
    that cannot run here raises backends.BackendUnavailable saying why.
    """
    backends.check_name(backend)
    check_tensor_types(x, weight, bias, A, R, B)
    if backend == "auto":
        return torch.ops.loraxs.linear(x, weight, bias, A, R, B, scaling)
    return _linear(x, weight, bias, A, R, B, scaling, backend)
