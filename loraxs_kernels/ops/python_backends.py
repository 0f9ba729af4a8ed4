"""The Python backends ("torch", "triton") behind the C++ ops: kernels of loraxs::py_fwd / py_bwd, and
of loraxs::py_multi_fwd / py_multi_bwd for many adapters ("triton" only).

The op's CPU and CUDA kernels (csrc/) call these only when a call runs one of these backends, with
x / grad_out already flattened to (M, ·) and the contract checked; autocast is already excluded.
"""

from __future__ import annotations

import torch

from .. import backends


def _py_fwd(x, weight, bias, A, R, B, scaling, backend):
    return backends.get(backend, x.device, x.dtype, x.shape[0], A.shape[1]).forward(x, weight, bias, A, R, B, scaling)


def _py_bwd(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend):
    impl = backends.get(backend, grad_out.device, grad_out.dtype, grad_out.shape[0], A.shape[1])
    grad_x, grad_R = impl.backward(grad_out, xa, weight, A, R, B, scaling, need_x, need_R)
    return (grad_x if need_x else grad_out.new_empty(0)), (grad_R if need_R else R.new_empty(0))


def _py_multi_fwd(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling, backend):
    return _multi(backend, x).forward_multi(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling)


def _py_multi_bwd(grad_out, xa, weight, A, R, B, adapter_ids, scaling, adapter_scaling, need_x, need_R, backend):
    grad_x, grad_R = _multi(backend, grad_out).backward_multi(grad_out, xa, weight, A, R, B, adapter_ids, scaling,
                                                              adapter_scaling, need_x, need_R)
    return (grad_x if need_x else grad_out.new_empty(0)), (grad_R if need_R else R.new_empty(0))


def _multi(backend, t):
    """The many-adapter kernels of a Python backend: only "triton" has them (the others run in C++)."""
    if backend != "triton":
        raise backends.BackendUnavailable(f"backend {backend!r} has no Python many-adapter kernel")
    backends.require(backend, t.device)
    from ..backends.triton import multi

    return multi


for _key in ("CPU", "CUDA"):
    torch.library.impl("loraxs::py_fwd", _key)(_py_fwd)
    torch.library.impl("loraxs::py_bwd", _key)(_py_bwd)
    torch.library.impl("loraxs::py_multi_fwd", _key)(_py_multi_fwd)
    torch.library.impl("loraxs::py_multi_bwd", _key)(_py_multi_bwd)
