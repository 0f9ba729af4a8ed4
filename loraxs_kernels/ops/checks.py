"""The input contract of a LoRA-XS layer, checked once for every backend.

Each failure names the offending tensor and its sizes, dtype or device, so a wrong call reads like
"x has 15 features but weight expects 16" rather than a shape error deep inside a GEMM.
Shapes raise ValueError, dtypes TypeError, devices RuntimeError.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_RANK = 256


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor_types(x, weight, bias, A, R, B) -> None:
    for name, t in (("x", x), ("weight", weight), ("A", A), ("R", R), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")


def check_inputs(x, weight, bias, A, R, B) -> None:
    """Validate the tensors of y = x Wᵀ + b + s·((x A) R) B; return None or raise."""
    check_tensor_types(x, weight, bias, A, R, B)

    # Shapes.
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension (..., in_features), got shape {_shape(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {_shape(weight)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features (shape {_shape(x)}) but weight expects {in_features} "
            f"(weight shape {_shape(weight)})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"bias must have shape ({out_features},) to match weight {_shape(weight)}, got {_shape(bias)}")
    if A.dim() != 2 or A.shape[0] != in_features:
        raise ValueError(f"A must have shape (in_features={in_features}, r), got {_shape(A)}")
    r = A.shape[1]
    if r < 1 or r > MAX_RANK:
        raise ValueError(f"rank r = A.shape[1] must be between 1 and {MAX_RANK}, got {r} (A shape {_shape(A)})")
    if R.dim() != 2 or R.shape[0] != r or R.shape[1] != r:
        raise ValueError(f"R must have shape (r, r) = ({r}, {r}) to match A {_shape(A)}, got {_shape(R)}")
    if B.dim() != 2 or B.shape[0] != r or B.shape[1] != out_features:
        raise ValueError(
            f"B must have shape (r, out_features) = ({r}, {out_features}) to match A {_shape(A)} and "
            f"weight {_shape(weight)}, got {_shape(B)}"
        )

    # Dtypes: one compute dtype for the layer; R may be a wider master copy (fp32 beside bf16/fp16).
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported dtypes are float16, bfloat16, float32 and float64")
    for name, t in (("weight", weight), ("bias", bias), ("A", A), ("B", B)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
    if R.dtype != x.dtype and R.dtype != torch.float32:
        raise TypeError(f"R has dtype {R.dtype}; it must be x's dtype ({x.dtype}) or float32 (a master weight)")

    # Devices.
    for name, t in (("weight", weight), ("bias", bias), ("A", A), ("R", R), ("B", B)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")


def check_frozen(weight, bias, A, B, *, op="loraxs.linear", reference="loraxs_linear") -> None:
    """The op differentiates x and R only; a frozen tensor that asks for a gradient is a bug upstream.
    op / reference: the op's name and its plain-autograd twin (csrc/contract.cpp takes the same two)."""
    for name, t in (("weight", weight), ("bias", bias), ("A", A), ("B", B)):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"{op} computes gradients for x and R only, but {name} {_shape(t)} requires grad; "
                f"freeze it (requires_grad_(False)) or use loraxs_kernels.reference.{reference}"
            )
