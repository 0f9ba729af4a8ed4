"""The op without the C++ extension: the same contract and autograd formula in Python, over the
Python backends ("torch", or "triton" where it runs). Slower on the host (each call crosses
several Python layers), identical in what it computes; loraxs_linear warns once when it runs this."""

from __future__ import annotations

import math

import torch

from .. import backends
from .checks import check_frozen, check_inputs


def _autocast(x, weight, bias, A, R, B):
    """Cast like F.linear under torch.autocast: floating tensors other than fp64 go to the autocast
    dtype; an fp32 R stays fp32 (the op takes an fp32 master R beside half weights)."""
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return x, weight, bias, A, R, B
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64) else t

    return cast(x), cast(weight), cast(bias), cast(A), (R if R.dtype == torch.float32 else cast(R)), cast(B)


def _rows(t):
    """t (..., k) as (M, k); reshape(-1, k) is ambiguous for an empty t when k == 0 (a zero-size layer)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, R, B, scaling, backend):
        x2 = _rows(x)
        impl = backends.get(backend, x.device, x.dtype, x2.shape[0], A.shape[1])
        y, xa = impl.forward(x2, weight, bias, A, R, B, float(scaling))
        ctx.save_for_backward(xa if R.requires_grad else None, weight, A, R, B)
        ctx.scaling, ctx.impl = float(scaling), impl
        return y.reshape(*x.shape[:-1], weight.shape[0]).clone() if x.dim() != 2 else y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xa, weight, A, R, B = ctx.saved_tensors
        need_x, need_R = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        if xa is None:
            xa = grad_out.new_empty((0, A.shape[1]))
        g2 = _rows(grad_out)
        grad_x, grad_R = ctx.impl.backward(g2, xa, weight, A, R, B, ctx.scaling, need_x, need_R)
        if need_x:
            grad_x = grad_x.reshape(grad_out.shape[:-1] + (weight.shape[1],))
        return (grad_x if need_x else None), None, None, None, (grad_R if need_R else None), None, None, None


def linear(x, weight, bias, A, R, B, scaling, backend):
    backends.check_name(backend)
    x, weight, bias, A, R, B = _autocast(x, weight, bias, A, R, B)
    check_inputs(x, weight, bias, A, R, B)
    if torch.is_grad_enabled():
        check_frozen(weight, bias, A, B)
    with torch.autocast(x.device.type, enabled=False):
        return _Linear.apply(x, weight, bias, A, R, B, scaling, backend)
