"""Fake kernels of loraxs::linear_fwd / linear_bwd (schemas in csrc/ops.cpp), for FakeTensor and
torch.compile. Python, because fake tensors may have symbolic sizes, which the C++ contract check
(which needs concrete ints) cannot read; checks.py words its errors like csrc/contract.cpp."""

from __future__ import annotations

import math

import torch

from .. import backends
from .checks import check_inputs


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
