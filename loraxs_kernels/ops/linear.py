"""The public entry: loraxs_linear → torch.ops.loraxs.linear.

    linear(x, weight, bias, A, R, B, scaling=1.0, backend="auto") -> y = x Wᵀ + b + s·((x A) R) B

The op, its autograd formula, the input contract and the choice of kernel are C++ (csrc/: ops.cpp
holds the schemas); a call with backend "auto" runs no Python between this function and the
kernels. This package adds what must be Python: the fake kernels (fake.py), the Python backends
"torch" and "triton" behind the op (python_backends.py), and the measured table for "auto" on CUDA.

Without a built extension the package still works: loraxs_linear runs the pure-PyTorch path
(fallback.py), after one warning that says how to build.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from .. import backends
from ..backends import auto_table, native

NATIVE_REASON = native.load()  # None: the C++ op is registered

if NATIVE_REASON is None:
    from . import fake, multi, python_backends  # noqa: F401  (registrations with the C++ op)

    _OP = torch.ops.loraxs.linear.default
    torch.ops.loraxs.set_triton_installed(importlib.util.find_spec("triton") is not None)
    for (_device, _dtype, _m, _r), _choice in auto_table.entries():
        torch.ops.loraxs.set_auto_choice(_device, getattr(torch, _dtype), _m, _r, _choice)
else:
    from .fallback import linear as _fallback_linear

    _OP = None
    _warned = False


def loraxs_linear(x, weight, bias, A, R, B, scaling: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """y = x Wᵀ + b + scaling·((x A) R) B, shape (..., out), x's dtype.

    x: (..., in); weight: (out, in); bias: (out,) or None; A: (in, r); R: (r, r); B: (r, out).
    Gradients flow to x and R only. backend: "auto" | "torch" | "cpp" | "triton" | "cuda"; a backend
    that cannot run here raises backends.BackendUnavailable saying why.
    """
    if backend != "auto" and not torch.compiler.is_compiling():
        # The op would refuse too (RuntimeError); this names the reason with BackendUnavailable.
        backends.require(backend, x.device if isinstance(x, torch.Tensor) else None)
    if _OP is not None:
        return _OP(x, weight, bias, A, R, B, scaling, backend)
    _warn_no_native()
    return _fallback_linear(x, weight, bias, A, R, B, scaling, backend)


def linear_auto(x, weight, bias, A, R, B, scaling: float = 1.0) -> torch.Tensor:
    """loraxs_linear with backend "auto", as directly as Python can call it (the module's forward)."""
    if _OP is not None:
        return _OP(x, weight, bias, A, R, B, scaling)
    return loraxs_linear(x, weight, bias, A, R, B, scaling)


def _warn_no_native():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"loraxs_kernels runs its pure-PyTorch path: {NATIVE_REASON}. Build the C++ extension for the fused "
            "kernels and a host cost near nn.Linear's (`make build`, or `pip install --no-build-isolation -e .`).",
            RuntimeWarning,
            stacklevel=3,
        )
