"""The backends behind the op, and how "auto" picks one.

With the C++ extension built, the op itself resolves the backend (csrc/backend.cpp): "cpp" on the CPU,
and on CUDA the measured table, the GPU's capability and the dtype. This module says which backends
can run where (available, unavailable_reason), mirrors the choice for reporting (auto_name), and
loads the Python backends ("torch", "triton") that the op calls through loraxs::py_fwd / py_bwd, and
that the build-less fallback runs.

A Python backend is a module with:
    NAME: str
    unavailable_reason(device) -> str | None       why it cannot run on that device (None: it can)
    forward(x, weight, bias, A, R, B, scaling) -> (y, xa)
        x (M, in) in any strides; y (M, out) and xa = x A (M, r) in x's dtype
    backward(grad_out, xa, weight, A, R, B, scaling, need_x, need_R) -> (grad_x | None, grad_R | None)
        grad_out (M, out) in any strides (autograd may hand in an expanded, stride-0 tensor);
        grad_x (M, in) in grad_out's dtype; grad_R (r, r) in R's dtype. xa is read only when need_R;
        otherwise it is an empty (0, r) tensor (the op keeps x A only when R needs a gradient).
The op has already checked shapes, dtypes and devices, and flattened x to 2-D; M may be 0. R may be
fp32 beside half-precision weights: compute in x's dtype.
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


def require(name: str, device: torch.device | None) -> None:
    """Raise ValueError for an unknown name, BackendUnavailable (with the reason) for one that
    cannot run on `device`; device None (a non-tensor input) leaves the rest to the op's checks."""
    check_name(name)
    if device is not None:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(reason)


def available(device: torch.device, *, reasons: bool = False):
    """The concrete backends that can run on `device` (for the one "auto" picks, see auto_name).

    reasons=True: a dict of every backend → None when it can run, else why not (what is missing)."""
    device = torch.device(device)
    if reasons:
        return {n: unavailable_reason(n, device) for n in _MODULES}
    return [n for n in _MODULES if unavailable_reason(n, device) is None]


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def auto_name(device: torch.device, dtype: torch.dtype, M: int, rank: int) -> str:
    """The backend "auto" runs for this device, dtype and shape (the op decides in C++; this asks it)."""
    device = torch.device(device)
    built = unavailable_reason("cpp", torch.device("cpu")) is None
    if device.type == "cuda":
        if not built:  # the fallback runs the Python backends only
            return "triton" if unavailable_reason("triton", device) is None else "torch"
        major, _ = torch.cuda.get_device_capability(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        return torch.ops.loraxs.auto_backend(
            _device_name(device), major, dtype, M, rank, tf32,
            unavailable_reason("triton", device) is None, unavailable_reason("cuda", device) is None,
        )
    return "cpp" if built and device.type == "cpu" else "torch"


def get(name: str, device: torch.device, dtype: torch.dtype, M: int, rank: int):
    """The backend module to run, after resolving "auto"; raises BackendUnavailable with the reason."""
    check_name(name)
    if name == "auto":
        name = auto_name(device, dtype, M, rank)
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise BackendUnavailable(reason)
    return _load(name)
