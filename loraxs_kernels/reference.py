"""The math of a LoRA-XS layer, in plain PyTorch autograd: the truth every backend is tested against.

    y = x Wᵀ + b + s · ((x A) R) B

W (out×in) and b are the frozen base layer, A (in×r) and B (r×out) the frozen factors from the SVD
of Wᵀ, R (r×r) the only trainable matrix and s a float scaling. R may be held in a wider dtype than
the layer (an fp32 master weight beside bf16 weights); the layer computes in x's dtype.

Written for clarity, not speed: it keeps x for the backward and materialises every product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loraxs_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    R: torch.Tensor,
    B: torch.Tensor,
    scaling: float = 1.0,
) -> torch.Tensor:
    """x Wᵀ + b + scaling · ((x A) R) B, with shape (..., out) and x's dtype."""
    base = F.linear(x, weight, bias)
    low_rank = ((x @ A) @ R.to(x.dtype)) @ B
    return base + scaling * low_rank


def loraxs_grads(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    R: torch.Tensor,
    B: torch.Tensor,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form gradients, written out (g = ∂L/∂y, u = g Bᵀ):

        grad_x = g W + s · (u Rᵀ) Aᵀ
        grad_R = s · (x A)ᵀ u
    """
    g = grad_out.reshape(-1, weight.shape[0])
    x2 = x.reshape(-1, weight.shape[1])
    u = g @ B.t()
    grad_x = g @ weight + scaling * (u @ R.to(g.dtype).t()) @ A.t()
    grad_R = scaling * (x2 @ A).t() @ u
    return grad_x.reshape(x.shape), grad_R.to(R.dtype)


def merged_weight(weight: torch.Tensor, A: torch.Tensor, R: torch.Tensor, B: torch.Tensor, scaling: float = 1.0):
    """W + s · (A R B)ᵀ: the plain weight of the equivalent nn.Linear (out×in)."""
    return weight + scaling * (A @ R.to(A.dtype) @ B).t()


def unfused_linear(x, weight, bias, A, R, B, scaling: float = 1.0):
    """What the official LoRA-XS code and PEFT's TinyLoRA run: the base layer plus three chained
    F.linear calls (lora_A, the latent R, lora_B), each weight in nn.Linear's (out, in) layout.
    The benchmarks' `unfused` baseline; equal to loraxs_linear up to rounding.
    """
    low_rank = F.linear(F.linear(F.linear(x, A.t()), R.to(x.dtype).t()), B.t())
    return F.linear(x, weight, bias) + low_rank * scaling


def loraxs_linear_multi(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    R: torch.Tensor,
    B: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Many adapters in one batch: row i of x uses adapter adapter_ids[i] of the bank R (n, r, r),

        y_i = x_i Wᵀ + b + s_i · ((x_i A) R[id_i]) B,     s_i = scaling (a float) or scaling[id_i] (an (n,) tensor),

    and a row with id -1 gets the base layer alone. adapter_ids: integers of shape x.shape[:-1].
    Gathers one r×r matrix per row (M·r² memory): clear, not fast.
    """
    ids = adapter_ids.long()
    used = ids >= 0
    k = ids.clamp(min=0)
    base = F.linear(x, weight, bias)
    per_row_R = R.to(x.dtype)[k]  # (..., r, r)
    low_rank = ((x @ A).unsqueeze(-2) @ per_row_R).squeeze(-2) @ B
    s = scaling.to(x.dtype)[k].unsqueeze(-1) if isinstance(scaling, torch.Tensor) else scaling
    return torch.where(used.unsqueeze(-1), base + s * low_rank, base)
