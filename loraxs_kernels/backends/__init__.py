"""The backends behind the op, and how "auto" picks one.

A backend is a module with:
    NAME: str
    unavailable_reason(device) -> str | None       why it cannot run on that device (None: it can)
    forward(x, weight, bias, A, R, B, scaling) -> (y, xa)
        x (M, in) in any strides; y (M, out) and xa = x A (M, r) in x's dtype
    backward(grad_out, xa, weight, A, R, B, scaling, need_x, need_R) -> (grad_x | None, grad_R | None)
        grad_out (M, out) in any strides (autograd may hand in an expanded, stride-0 tensor);
        grad_x (M, in) in grad_out's dtype; grad_R (r, r) in R's dtype. xa is read only when need_R;
        otherwise it is an empty (0, r) tensor (the op keeps x A only when R needs a gradient).
The op (loraxs_kernels/ops/linear.py) has already checked shapes, dtypes and devices, and flattened
x to 2-D; M may be 0. R may be fp32 beside half-precision weights: compute in x's dtype.
"""

from __future__ import annotations

import functools
import importlib

import torch

from . import auto_table

# name -> module; imported on first use so that `import loraxs_kernels` never pays for Triton.
_MODULES = {
    "torch": "loraxs_kernels.backends.pytorch",
    "cpp": "loraxs_kernels.backends.native",
    "triton": "loraxs_kernels.backends.triton",
    "cuda": "loraxs_kernels.backends.native",
}
NAMES = ("auto",) + tuple(_MODULES)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(repr(n) for n in NAMES)}")


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as e:  # e.g. triton not installed
        raise BackendUnavailable(f"backend {name!r} cannot be imported: {e}") from e


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on `device`, else a sentence saying why not."""
    check_name(name)
    if name == "auto":
        return None
    try:
        module = _load(name)
    except BackendUnavailable as e:
        return str(e)
    if name == "cpp" and device.type != "cpu":
        return f"backend 'cpp' is the C++ extension's CPU kernel; tensors are on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"backend 'cuda' is the C++ extension's CUDA kernel and needs CUDA tensors; tensors are on {device}"
    return module.unavailable_reason(device)


def available(device: torch.device) -> list[str]:
    """The concrete backends that can run on `device` (for the one "auto" picks, see auto_name)."""
    return [n for n in _MODULES if unavailable_reason(n, device) is None]


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def auto_name(device: torch.device, dtype: torch.dtype, M: int, rank: int) -> str:
    """The backend "auto" runs for this device, dtype and shape."""
    if device.type == "cuda":
        # Triton by default; CUDA C++ where the measured table (auto_table.json) says it is faster.
        first = auto_table.choose(_device_name(device), str(dtype).removeprefix("torch."), M, rank)
        preference = (first, "triton", "cuda", "torch")
    else:  # CPU (and anything else ATen runs on): the C++ kernel when built, else ATen from Python.
        preference = ("cpp", "torch")
    for name in preference:
        if unavailable_reason(name, device) is None:
            return name
    return "torch"


def get(name: str, device: torch.device, dtype: torch.dtype, M: int, rank: int):
    """The backend module to run, after resolving "auto"; raises BackendUnavailable with the reason."""
    check_name(name)
    if name == "auto":
        name = auto_name(device, dtype, M, rank)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(reason)
    return _load(name)
