"""The "torch" backend: LoRA-XS in ATen calls, for any device. It is the CPU path's fallback when the
C++ extension is not built, and the shape every native backend mirrors.

Two schedules, both with no (M×out) temporary beyond y and no (M×in) temporary beyond grad_x:

- low-rank: y = addmm(b, x, Wᵀ), then y += s·((x A) R) B in place (addmm_ with alpha=s). The rank-r
  term costs 2·M·r·(in+out) FLOPs plus one more read and write of y.
- merged: W' = W + s·(A R B)ᵀ (out×in, rebuilt in each call, never saved), then y = addmm(b, x, W'ᵀ)
  and grad_x = g W'. The rank-r work becomes 2·r·in·out FLOPs, independent of M, and y is
  written once. x A is still computed for the backward (2·M·in·r).

Each direction merges when the rank-r update it replaces writes over 1.5× as many numbers as W has
(forward: M·out > 1.5·in·out, i.e. M > 1.5·in; backward: M·in > 1.5·in·out, plus M·out for g Bᵀ
when grad_R is not wanted): x A and g Bᵀ are computed by both schedules, and building W' (a fresh
out×in matrix) costs about 1.4× per number what a rank-r update does on the CPU
(csrc/cpu/aten_schedule.cpp has the measurement). Decoding and small batches stay low-rank.
"""

from __future__ import annotations

import torch

NAME = "torch"


def unavailable_reason(device: torch.device) -> str | None:
    return None  # ATen runs everywhere.


def merge_pays(M: int, in_features: int, out_features: int, *, backward: bool = False, need_R: bool = True) -> bool:
    """True when folding s·(A R B)ᵀ into W costs less than the rank-r update it replaces in this
    direction (the same rule as csrc/cpu/aten_schedule.cpp's merge_pays)."""
    if backward:
        replaced = M * in_features + (0 if need_R else M * out_features)
    else:
        replaced = M * out_features
    return 2 * replaced > 3 * in_features * out_features


def merged_weight(weight, A, R, B, scaling):
    """W + s·(A R B)ᵀ as one addmm: W + s · Bᵀ (A R)ᵀ."""
    return torch.addmm(weight, B.t(), (A @ R).t(), alpha=scaling)


def rows_times_thin(rows, f):
    """rows (M, K) @ f (K, r) as csrc/cpu/aten_schedule.cpp's rows_times_thin computes it (same rule and
    measurements): on the CPU from 64 rows at 2 ≤ r ≤ 8, (fᵀ rowsᵀ)ᵀ for fp32 at r ≥ 4 (the result is
    column-major), else a row-major f copied column-major first."""
    r = f.shape[1]
    if rows.is_cpu and 2 <= r <= 8 and rows.shape[0] >= 64:
        if rows.dtype == torch.float32 and r >= 4:
            return (f.t() @ rows.t()).t()
        if f.shape[0] > 1 and f.stride(0) != 1:
            f = f.t().contiguous().t()
    return rows @ f


def forward(x, weight, bias, A, R, B, scaling):
    """x: (M, in) → (y (M, out), x A (M, r)), both in x's dtype."""
    M, (out_features, in_features) = x.shape[0], weight.shape
    R = R.to(x.dtype)
    xa = rows_times_thin(x, A).contiguous()  # saved for the backward as (M, r) rows
    if merge_pays(M, in_features, out_features):
        w = merged_weight(weight, A, R, B, scaling)
        y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
    else:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
        y.addmm_(xa @ R, B, alpha=scaling)
    return y, xa


def backward(grad_out, xa, weight, A, R, B, scaling, need_x: bool, need_R: bool):
    """grad_out: (M, out) → (grad_x (M, in) or None, grad_R (r, r) in R's dtype or None).

    u = g Bᵀ;  grad_x = g W + s·(u Rᵀ) Aᵀ;  grad_R = s·(x A)ᵀ u, reduced over M in fp32.
    """
    M, (out_features, in_features) = grad_out.shape[0], weight.shape
    merged = need_x and merge_pays(M, in_features, out_features, backward=True, need_R=need_R)
    Rc = R.to(grad_out.dtype)
    grad_x = grad_R = None
    u = rows_times_thin(grad_out, B.t()) if (need_R or (need_x and not merged)) else None  # g Bᵀ (M×r)
    if need_x:
        if merged:
            grad_x = grad_out @ merged_weight(weight, A, Rc, B, scaling)
        else:
            grad_x = grad_out @ weight
            grad_x.addmm_(u @ Rc.t(), A.t(), alpha=scaling)
    if need_R:
        # The sum over M tokens runs in fp32 (fp64 for fp64) even for half inputs: M is large, R is tiny.
        acc = torch.promote_types(grad_out.dtype, torch.float32)
        grad_R = torch.mm(xa.t().to(acc), u.to(acc)).mul_(scaling).to(R.dtype)
    return grad_x, grad_R
