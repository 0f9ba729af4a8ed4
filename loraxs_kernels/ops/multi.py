"""Many adapters in one batch: loraxs_linear_multi → torch.ops.loraxs.linear_multi (csrc/multi.cpp).

    y_i = x_i Wᵀ + b + s_i·((x_i A) R[id_i]) B      R: a bank (n, r, r); id_i in [-1, n), -1 = base only

This file holds the input contract in Python (the words of csrc/multi_contract.cpp), the fake
kernels of linear_multi_fwd / linear_multi_bwd for FakeTensor and torch.compile, and the public
function. Without a built extension the function runs the plain-PyTorch reference after the same
checks (one warning says so).
"""

from __future__ import annotations

import math
import warnings

import torch

from .. import backends
from ..backends import native
from .checks import _shape, check_frozen, check_inputs

NATIVE_REASON = native.load()


def _dims(sizes) -> str:
    return "(" + ", ".join(str(s) for s in sizes) + ")"


def check_multi_inputs(x, weight, bias, A, R, B, adapter_ids, adapter_scaling=None, *, values=True) -> None:
    """The contract of linear_multi; values=False skips the ids' values (fake tensors have none)."""
    if not isinstance(R, torch.Tensor):
        raise TypeError(f"R must be a torch.Tensor, got {type(R).__name__}")
    if R.dim() != 3 or R.shape[0] < 1:
        raise ValueError(f"R must be a bank of shape (n, r, r) with n >= 1 adapters, got {_shape(R)}")
    if isinstance(A, torch.Tensor) and A.dim() == 2:
        r = A.shape[1]
        if R.shape[1] != r or R.shape[2] != r:
            raise ValueError(f"R must have shape (n, r, r) = ({R.shape[0]}, {r}, {r}) to match A {_shape(A)}, "
                             f"got {_shape(R)}")
    check_inputs(x, weight, bias, A, R[0], B)
    n = R.shape[0]
    if adapter_scaling is not None:
        s = adapter_scaling
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"adapter_scaling must be a torch.Tensor or None, got {type(s).__name__}")
        if s.dim() != 1 or s.shape[0] != n:
            raise ValueError(f"adapter_scaling must have shape (n,) = ({n}) to match R {_shape(R)}, got {_shape(s)}")
        if not s.is_floating_point():
            raise TypeError(f"adapter_scaling has dtype {s.dtype}; it must be a floating dtype")
        if s.device != x.device:
            raise RuntimeError(f"adapter_scaling is on {s.device} but x is on {x.device}; "
                               "all tensors must be on one device")
    _check_ids(adapter_ids, x.shape[:-1], x.device, R, "x", values)


def check_multi_frozen(weight, bias, A, B, adapter_scaling) -> None:
    """What csrc/multi_contract.cpp's check_multi_frozen raises, word for word: the op differentiates x
    and the bank only, so a frozen layer tensor or a scaling tensor that asks for a gradient is refused
    (never silently detached)."""
    check_frozen(weight, bias, A, B, op="loraxs.linear_multi", reference="loraxs_linear_multi")
    if adapter_scaling is not None and adapter_scaling.requires_grad:
        raise RuntimeError(f"loraxs.linear_multi computes gradients for x and R only, but adapter_scaling "
                           f"{_shape(adapter_scaling)} requires grad; detach it")


def _check_ids(ids, lead, device, R, rows, values):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids has dtype {ids.dtype}; it must be torch.int32 or torch.int64")
    if tuple(ids.shape) != tuple(lead):
        raise ValueError(f"adapter_ids must have shape {rows}.shape[:-1] = {_dims(lead)} (one id per row), "
                         f"got {_shape(ids)}")
    if ids.device != device:
        raise RuntimeError(f"adapter_ids is on {ids.device} but {rows} is on {device}; "
                           "all tensors must be on one device")
    if not values or ids.numel() == 0:
        return
    n = R.shape[0]
    bad = (ids < -1) | (ids >= n)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(lead)))
        raise ValueError(f"adapter_ids must be in [-1, {n}) for a bank of {n} adapters (R {_shape(R)}), "
                         f"got {int(ids.reshape(-1)[flat])} at index {_dims(pos)}")


if NATIVE_REASON is None:

    @torch.library.register_fake("loraxs::linear_multi_fwd")
    def _linear_multi_fwd_fake(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling, backend):
        backends.check_name(backend)
        check_multi_inputs(x, weight, bias, A, R, B, adapter_ids, adapter_scaling, values=False)
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))
        xa = x.new_empty((math.prod(x.shape[:-1]), A.shape[1]))
        return y, xa

    @torch.library.register_fake("loraxs::linear_multi_bwd")
    def _linear_multi_bwd_fake(grad_out, xa, weight, A, R, B, adapter_ids, scaling, adapter_scaling, need_x, need_R,
                               backend):
        grad_x = grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1])) if need_x else grad_out.new_empty(0)
        grad_R = R.new_empty(R.shape) if need_R else R.new_empty(0)
        return grad_x, grad_R

    _OP = torch.ops.loraxs.linear_multi.default
else:
    _OP = None
_warned = False


def loraxs_linear_multi(x, weight, bias, A, R, B, adapter_ids, scaling=1.0, *, backend: str = "auto") -> torch.Tensor:
    """Row i: y_i = x_i Wᵀ + b + s_i·((x_i A) R[adapter_ids[i]]) B, shape (..., out), x's dtype.

    x: (..., in); weight (out, in); bias (out,) or None; A (in, r); R: a bank (n, r, r), x's dtype or
    fp32; B (r, out). adapter_ids: int32/int64 of shape x.shape[:-1] (no broadcasting here: that is
    MultiLoRAXSLinear's and use_adapters' job), values in [-1, n), -1 meaning the base layer alone.
    scaling: a float (s_i = scaling) or an (n,) floating tensor (s_i = scaling[id_i]).
    Gradients flow to x and R (grad_R (n, r, r), zero for adapters no row used); W, b, A, B, the ids
    and a scaling tensor are constants. Every input, the ids' values included, is checked before any
    kernel runs.

    backend: "auto" (on the CPU the ATen schedules; on CUDA the same rule as loraxs_linear: Triton for
    16-bit and TF32 fp32, cuBLAS through the ATen schedules for fp64 and strict fp32, the CUDA C++
    kernels where Triton is missing), "cpp" (the ATen schedules, CPU), "torch" (the ATen schedules on
    any device), "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cuda". The ATen schedules
    (csrc/cpu/multi_aten.cpp) gather R[id] per row for a batched product, or sort the rows once and
    run one small GEMM per adapter, by a measured cost model; the Triton and CUDA kernels gather R per
    row inside the kernels.
    """
    backends.check_name(backend)
    if backend != "auto":
        backends.require(backend, x.device if isinstance(x, torch.Tensor) else None)
    if isinstance(scaling, torch.Tensor):
        adapter_scaling, scaling = scaling, 1.0
    else:
        adapter_scaling, scaling = None, float(scaling)
    if _OP is not None:
        return _OP(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling, backend)
    return _fallback(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling)


def _fallback(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling):
    from .. import reference

    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"loraxs_linear_multi runs the plain-PyTorch reference: {NATIVE_REASON}. Build the C++ "
                      "extension (`make build`) for its kernels.", RuntimeWarning, stacklevel=3)
    check_multi_inputs(x, weight, bias, A, R, B, adapter_ids, adapter_scaling)
    if torch.is_grad_enabled():
        check_multi_frozen(weight, bias, A, B, adapter_scaling)
    s = scaling if adapter_scaling is None else scaling * adapter_scaling
    return reference.loraxs_linear_multi(x, weight, bias, A, R, B, adapter_ids, s)
