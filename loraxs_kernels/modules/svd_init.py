"""A and B from the truncated SVD of Wᵀ, the initialisation the LoRA-XS paper found best.

    Wᵀ = U Σ Vᵀ,   A = U_r Σ_r  (in×r),   B = V_rᵀ  (r×out)

so A B is the best rank-r approximation of Wᵀ, with Σ on A. The SVD runs in fp32 (fp64 for fp64
weights) whatever W's dtype: LAPACK has no half-precision SVD, and the official code's SVD in the
weight's own dtype crashes on bf16.

Only the top r singular triplets are needed, so they are computed by a truncated method, on the
weight's own device (`truncated_svd` below): a full SVD costs O(m n min(m, n)) (51 s for one
4096×4096 layer on a 2-core CPU, hours for a 7B model), the truncated one O(m n k) per iteration with
k = 2r + 16 columns.

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

import math
from typing import NamedTuple

import torch


class SVDBasis(NamedTuple):
    A: torch.Tensor  # (in, r), weight's dtype and device
    B: torch.Tensor  # (r, out)
    # W's top singular values, descending, fp32/fp64: at least r + 1 of them when min(in, out) > r (the
    # fingerprint keeps r + 1, min_relative_gap reads σ_{r+1}); all of them after a full SVD.
    singular_values: torch.Tensor
    pivots: torch.Tensor  # (r,) int64: U[pivots[i], i] > 0


# Truncated-SVD settings (see truncated_svd).
MAX_ITERATIONS = 48
# Stop when every kept pair has ‖W v_i − σ_i u_i‖ ≤ RESIDUAL_TOL·σ_1 (fp32; fp64 uses FP64_RESIDUAL_TOL).
# fp32's full SVD itself leaves residuals of 6.5e-7 and 7.1e-7·σ_1 (both residuals, A and B rounded to
# fp32; measured on a 512×384 weight with σ_i = i^-½), so a tighter stop buys nothing. The tolerance
# is scaled by √(n/4096) for a longer dot product n, as its rounding grows that way.
RESIDUAL_TOL = 1e-6
FP64_RESIDUAL_TOL = 1e-13


def sketch_width(rank: int) -> int:
    """k = 2r + 16 columns in the iterated subspace: the error of pair i shrinks like (σ_{k+1}/σ_i)^2 per
    iteration, so extra columns buy fewer iterations; at r = 16 on 4096² weights with σ_i ∝ i^-½,
    k = 32, 48, 64 needed 21, 13, 10 iterations to 1e-6 (≈ the same GEMM work; 48 is the middle)."""
    return 2 * rank + 16


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {rank!r} ({type(rank).__name__})")
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank must be between 1 and min(in_features, out_features) = {min(in_features, out_features)} "
            f"for a weight of shape ({out_features}, {in_features}), got rank={rank}"
        )


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of Y's columns. Cholesky QR twice (a Gram GEMM and a k×k Cholesky: 1.6 ms
    here for 4096×48, against 71 ms for Householder QR) while Y is well enough conditioned for it — it
    needs cond(Y)² well below 1/eps —, Householder QR otherwise."""
    Y = Y / torch.linalg.vector_norm(Y, dim=0).clamp_min(torch.finfo(Y.dtype).tiny)
    Q = Y
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q.t() @ Q)
        d = L.diagonal()
        if int(info) != 0 or not bool((d > 0).all()) or float(d.max() / d.min()) ** 2 * torch.finfo(Y.dtype).eps > 1e-2:
            return torch.linalg.qr(Y)[0]
        Q = torch.linalg.solve_triangular(L, Q.t(), upper=False).t()
    return Q


def _seed(shape, rank: int) -> int:
    # Fixed per call signature, so one weight always gives one basis; never the global RNG.
    return (int(shape[0]) * 1_000_003 + int(shape[1]) * 10_007 + rank) % (2**31 - 1)


# Up to this size of the smaller side, the iteration starts from the exact top-k eigenvectors of the
# Gram matrix on that side (one GEMM and an n×n eigh: 16 ms at n = 384, 0.39 s at 1024, one thread
# here, against 33 ms and 1.2 s for the full SVD), so it converges in one or two steps even for the
# flat spectra of small layers (all-MiniLM-L6-v2's took 10-48 steps from a random start). Above it,
# eigh's n³ is the cost a 7B model cannot pay (1.9 s at 2048), and the random sketch is used.
GRAM_START_MAX = 1024


def _start(M: torch.Tensor, k: int, rank: int) -> torch.Tensor:
    """An orthonormal m×k first guess Q of M's top left singular subspace."""
    m, n = M.shape
    if min(m, n) <= GRAM_START_MAX:
        # The Gram matrix squares the condition number, so its eigenvectors are only a start (accurate to
        # about eps·σ_1²/(σ_i² − σ_{i+1}²)); the Rayleigh–Ritz steps after it refine them to the tolerance.
        if m <= n:
            return torch.linalg.eigh(M @ M.t())[1][:, -k:].flip(1).contiguous()
        V = torch.linalg.eigh(M.t() @ M)[1][:, -k:].flip(1)
        return _orthonormal(M @ V)
    g = torch.Generator(device=M.device).manual_seed(_seed(M.shape, rank))
    return _orthonormal(M @ torch.randn(n, k, generator=g, device=M.device, dtype=M.dtype))


def truncated_svd(M: torch.Tensor, rank: int):
    """(U_r, σ_1..σ_{r+1}, V_rᵀ) of M (m×n, fp32 or fp64), or None when it did not converge.

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4) with a Rayleigh–Ritz step
    at each iteration: Q spans the current k-dimensional guess of the top left singular subspace;
    Mᵀ Q = Q_z R_z, and the SVD of the small R_zᵀ gives the exact top singular triplets of Q Qᵀ M, the
    best that Q allows. The residual ‖M v_i − σ_i u_i‖ of each kept pair is the exact distance from
    a true singular triplet in the sense of Wedin's theorem: the angle between u_i and the true one
    is at most residual / (gap between σ_i and its neighbours), so stopping on it bounds the error
    whatever the spectrum. The residuals shrink like (σ_{k+1}/σ_r)^(2·iterations): fast for decaying
    (trained) spectra, slow for flat ones (a random Gaussian matrix: σ_{k+1}/σ_r ≈ 1). A near-tie
    σ_r ≈ σ_{r+1} does not slow them (k > r + 1 columns hold both), but there the residual bound on
    the vectors is weak, as the kept subspace is ill-defined for any method, the full SVD included
    (adapter files store such a layer's basis: files.GAP_THRESHOLD). After MAX_ITERATIONS without
    convergence the caller falls back to the full SVD.
    """
    m, n = M.shape
    k = sketch_width(rank)
    tol = (FP64_RESIDUAL_TOL if M.dtype == torch.float64 else RESIDUAL_TOL) * math.sqrt(max(1.0, max(m, n) / 4096))
    Q = _start(M, k, rank)
    for _ in range(MAX_ITERATIONS):
        Qz = _orthonormal(M.t() @ Q)  # n×k
        Y = M @ Qz  # m×k, = Q Qᵀ M Qz + the part Q misses
        Ur, S, Vrh = torch.linalg.svd(Q.t() @ Y)  # Qᵀ M Qz (k×k): Ritz values and vectors
        U = Q @ Ur[:, :rank]
        Vh = Vrh[:rank] @ Qz.t()
        residual = torch.linalg.vector_norm(Y @ Vrh[:rank].t() - U * S[:rank], dim=0)
        if bool((residual <= tol * S[0]).all()):
            return U, S[: rank + 1], Vh
        Q = _orthonormal(Y)
    return None


def svd_basis(weight: torch.Tensor, rank: int, pivots=None) -> SVDBasis:
    """The LoRA-XS basis of `weight` (out×in) and the facts an adapter file keeps about it.

    pivots: None (the largest-magnitude entry of each U_r column) or r row indices recorded by an
    earlier call, which reproduce that call's signs exactly.

    Small layers (min(in, out) < 2k, k = sketch_width(rank)) take the full SVD: it is cheap there and
    exact, and the sketch would be most of the matrix anyway. Others take truncated_svd, falling
    back to the full SVD when it does not converge (a flat spectrum: 48 wasted iterations first).
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
    found = truncated_svd(wt, rank) if min(wt.shape) >= 2 * sketch_width(rank) else None
    if found is None:
        U, S, Vh = torch.linalg.svd(wt, full_matrices=False)
        U, Vh = U[:, :rank], Vh[:rank]
    else:
        U, S, Vh = found
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
