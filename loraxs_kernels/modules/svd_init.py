"""A and B from the truncated SVD of Wᵀ, the initialisation the LoRA-XS paper found best.

    Wᵀ = U Σ Vᵀ,   A = U_r Σ_r  (in×r),   B = V_rᵀ  (r×out)

so A B is the best rank-r approximation of Wᵀ, with Σ on A. The SVD runs in fp32 (fp64 for fp64
weights) whatever W's dtype: LAPACK has no half-precision SVD, and the official code's SVD in the
weight's own dtype crashes on bf16. Each singular pair gets a canonical sign (the entry of largest
magnitude in each column of U_r is positive), so one W gives one A and B on every machine.
"""

from __future__ import annotations

import torch


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for `weight` (out×in), in weight's dtype and device."""
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank must be between 1 and min(in_features, out_features) = {min(in_features, out_features)} "
            f"for a weight of shape ({out_features}, {in_features}), got rank={rank}"
        )
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    wt = weight.detach().to(work_dtype).t()  # in×out
    U, S, Vh = torch.linalg.svd(wt, full_matrices=False)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    # Canonical signs: flip (u_i, v_i) together so that u_i's largest-magnitude entry is positive.
    pivot = U.abs().argmax(dim=0)
    signs = torch.sign(U[pivot, torch.arange(rank, device=U.device)])
    signs[signs == 0] = 1
    U, Vh = U * signs, Vh * signs[:, None]
    A = U * S  # Σ on A
    return A.to(weight.dtype).contiguous(), Vh.to(weight.dtype).contiguous()
