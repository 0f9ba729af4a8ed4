"""A and B from the truncated SVD of Wᵀ, the initialisation the LoRA-XS paper found best.

    Wᵀ = U Σ Vᵀ,   A = U_r Σ_r  (in×r),   B = V_rᵀ  (r×out)

so A B is the best rank-r approximation of Wᵀ, with Σ on A. The SVD runs in fp32 (fp64 for fp64
weights) whatever W's dtype: LAPACK has no half-precision SVD, and the official code's SVD in the
weight's own dtype crashes on bf16.

Signs: each singular pair (u_i, v_i) is defined up to a joint sign flip, and a flip of pair i changes
A R B (it negates row and column i of R's effect), so the sign is fixed by a pivot: the entry
U[pivot_i, i] is made positive. By default pivot_i is the entry of largest magnitude in column i, so
one W gives one A and B on every machine. That default alone is fragile when two entries of a column
have nearly equal magnitudes and opposite signs: rounding W to bf16 can swap which one is largest.
Measured on all-MiniLM-L6-v2 at rank 8: `encoder.layer.1.attention.self.query` flips one pair that
way, and A·R·B (random R) changes by 79 % between the fp32 and the bf16 base; recomputed with the
pivots of the fp32 run it changes by 1.8 %. An adapter file therefore stores the pivots, and the basis
is recomputed with them (`svd_basis(weight, rank, pivots=...)`): the pivot entry has magnitude at
least 1/√in, far from zero, so its sign survives any small perturbation of W.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SVDBasis(NamedTuple):
    A: torch.Tensor  # (in, r), weight's dtype and device
    B: torch.Tensor  # (r, out)
    singular_values: torch.Tensor  # all min(in, out) singular values of W, descending, fp32/fp64
    pivots: torch.Tensor  # (r,) int64: U[pivots[i], i] > 0


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank must be between 1 and min(in_features, out_features) = {min(in_features, out_features)} "
            f"for a weight of shape ({out_features}, {in_features}), got rank={rank}"
        )


def svd_basis(weight: torch.Tensor, rank: int, pivots=None) -> SVDBasis:
    """The LoRA-XS basis of `weight` (out×in) and the facts an adapter file keeps about it.

    pivots: None (the largest-magnitude entry of each U_r column) or r row indices recorded by an
    earlier call, which reproduce that call's signs exactly.
    """
    _check_rank(weight, rank)
    if weight.is_meta:
        raise ValueError("weight is on the meta device: it has no values to take an SVD of")
    w = weight.detach()
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"weight of shape {tuple(w.shape)} has {bad} non-finite entries (NaN or Inf): no SVD exists")
    work_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    wt = w.to(work_dtype).t()  # in×out
    U, S, Vh = torch.linalg.svd(wt, full_matrices=False)
    U, Vh = U[:, :rank], Vh[:rank]
    cols = torch.arange(rank, device=U.device)
    if pivots is None:
        pivots = U.abs().argmax(dim=0)
    else:
        pivots = torch.as_tensor(pivots, dtype=torch.int64, device=U.device)
        if pivots.shape != (rank,) or (pivots < 0).any() or (pivots >= U.shape[0]).any():
            raise ValueError(
                f"pivots must be {rank} row indices in [0, {U.shape[0]}), got {pivots.tolist()}"
            )
    signs = torch.sign(U[pivots, cols])
    signs[signs == 0] = 1
    U, Vh = U * signs, Vh * signs[:, None]
    A = U * S[:rank]  # Σ on A
    return SVDBasis(A.to(w.dtype).contiguous(), Vh.to(w.dtype).contiguous(), S, pivots.cpu())


def svd_factors(weight: torch.Tensor, rank: int, pivots=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for `weight` (out×in), in weight's dtype and device."""
    basis = svd_basis(weight, rank, pivots)
    return basis.A, basis.B


def min_relative_gap(singular_values: torch.Tensor, rank: int) -> float:
    """min over i = 1..r of (σ_i − σ_{i+1}) / σ_i: how close the SVD basis is to being undefined.

    A near-tie anywhere among σ_1..σ_{r+1} lets a small change of W rotate the tied singular vectors
    into each other; at the boundary (i = r) the kept subspace itself moves, inside it (i < r) the
    basis turns within the subspace, and A R B moves with it either way for a general R. Past the last
    singular value (rank = min(in, out)) σ_{r+1} counts as 0.
    """
    s = singular_values.double()
    nxt = torch.cat([s[1 : rank + 1], s.new_zeros(max(0, rank + 1 - len(s)))])
    top = s[:rank]
    gaps = torch.where(top > 0, (top - nxt) / top.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(top))
    return float(gaps.min())
