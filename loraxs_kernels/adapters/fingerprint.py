"""A cheap, tolerant fingerprint of a base layer's weight: does this adapter belong to this base?

A fingerprint of W (out×in, the layer's orientation; a Conv1D's transposed view) holds:
- `shape`: [out, in];
- `sigma`: its top singular values (up to rank + 1 of them: the adapter needs the SVD anyway);
- `fro`: its Frobenius norm;
- `samples`: 32 entries [flat index, value] at indices (k·2654435761 + 97) mod numel, k = 0..31
  (Knuth's multiplicative hash: spread over rows and columns for any shape, unlike evenly spaced
  flat indices, which land in one column whenever numel/32 is a multiple of `in`).

Two weights match when the shapes are equal and, with RTOL = 1e-2,
    |σ'_i − σ_i| ≤ RTOL·σ_1,   |fro' − fro| ≤ RTOL·fro,   |w' − w| ≤ RTOL·|w| + ATOL·rms(W)  (ATOL = 1e-3).
Every field is validated before use (fingerprint_problem): a stored fingerprint with a wrong type, a
wrong-length list, a NaN or an Inf (json.dump writes a NaN base's norm as bare NaN, which then compared
False against everything and matched any base of that shape) is refused, and fingerprint() refuses a
weight with NaN/Inf entries.

A byte hash would refuse the same base loaded in bf16 or computed on another device. Measured on
all-MiniLM-L6-v2 (36 linear layers): rounding W to bf16 moves the top 17 singular values by at most
2.1e-3·σ_1 and any entry by at most 3.9e-3 of itself (bf16's unit roundoff, 2⁻⁸), so RTOL leaves a
factor ≥ 2.5 of headroom; fp16 flushes entries below 6e-5 towards zero (relative error up to 1),
which ATOL·rms(W) (about 4e-5 there) absorbs. Another checkpoint of the same architecture differs
in most sampled entries by far more than 1 % (a random initialisation, or fine-tuning that moved the
weights by ≥ 2 % of their size) and is refused; a fine-tune that moved every sampled entry by less
than 1 % is, by this test, the same base.
"""

from __future__ import annotations

import math

import torch

RTOL = 1e-2
ATOL = 1e-3
N_SAMPLES = 32
_HASH_MULT, _HASH_ADD = 2654435761, 97


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def fingerprint_problem(fp) -> str | None:
    """None when `fp` has the fields, types and finite values fingerprint() writes, else what is wrong."""
    if not isinstance(fp, dict):
        return f"the fingerprint must be an object, got {type(fp).__name__}"
    for key in ("shape", "sigma", "fro", "samples"):
        if key not in fp:
            return f"the fingerprint has no {key!r}"
    shape = fp["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_index(v) for v in shape)):
        return f"'shape' must be [out_features, in_features] (two non-negative ints), got {shape!r}"
    numel = shape[0] * shape[1]
    if not (_finite_number(fp["fro"]) and fp["fro"] >= 0):
        return f"'fro' (the Frobenius norm) must be a finite number >= 0, got {fp['fro']!r}"
    sigma = fp["sigma"]
    if not isinstance(sigma, list) or len(sigma) > min(shape):
        return f"'sigma' must be a list of at most min(shape) = {min(shape)} singular values, got {sigma!r:.80}"
    for k, v in enumerate(sigma):
        if not (_finite_number(v) and v >= 0):
            return f"'sigma'[{k}] must be a finite number >= 0, got {v!r}"
    samples = fp["samples"]
    if not isinstance(samples, list) or len(samples) > min(N_SAMPLES, numel):
        return f"'samples' must be a list of at most {min(N_SAMPLES, numel)} [index, value] pairs, got {samples!r:.80}"
    for k, pair in enumerate(samples):
        if not (isinstance(pair, list) and len(pair) == 2 and _index(pair[0]) and pair[0] < numel
                and _finite_number(pair[1])):
            return (f"'samples'[{k}] must be [flat index in [0, {numel}), finite value], got {pair!r}")
    return None


def sample_indices(numel: int, n: int = N_SAMPLES) -> list[int]:
    return sorted({(k * _HASH_MULT + _HASH_ADD) % numel for k in range(min(n, numel))})


def fingerprint(weight: torch.Tensor, n_sigma: int = 8, singular_values: torch.Tensor | None = None) -> dict:
    """The fingerprint of `weight` (out×in) as a JSON-ready dict (see the module docstring).

    singular_values: W's singular values when the caller already has them (svd_basis returns them);
    else they are computed here (torch.linalg.svdvals in fp32, fp64 for fp64 weights).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    w = weight.detach()
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"the base weight of shape {tuple(w.shape)} has {bad} NaN/Inf entries: it has no fingerprint")
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    if singular_values is None:
        singular_values = torch.linalg.svdvals(w.to(work))
    flat = w.reshape(-1)
    idx = sample_indices(flat.numel())
    vals = flat[torch.tensor(idx, device=flat.device)].double().cpu().tolist() if idx else []
    return {
        "shape": [int(w.shape[0]), int(w.shape[1])],
        "sigma": [float(s) for s in singular_values[:n_sigma].double().cpu().tolist()],
        "fro": float(torch.linalg.vector_norm(w.to(work)).item()),
        "samples": [[i, v] for i, v in zip(idx, vals)],
    }


def fingerprint_mismatch(stored: dict, weight: torch.Tensor, singular_values: torch.Tensor | None = None) -> str | None:
    """None when `weight` matches the stored fingerprint, else a sentence saying what differs.
    Raises AdapterError when the stored fingerprint is malformed (fingerprint_problem)."""
    why = fingerprint_problem(stored)
    if why is not None:
        from .format import AdapterError  # format.py imports this module: resolved at call time

        shape = tuple(weight.shape)
        raise AdapterError(f"the adapter's fingerprint of the base weight (this base: shape {shape}) is malformed: {why}")
    shape = [int(weight.shape[0]), int(weight.shape[1])] if weight.dim() == 2 else list(weight.shape)
    if list(stored["shape"]) != shape:
        return f"the base weight has shape {tuple(shape)} but the adapter was made for {tuple(stored['shape'])}"
    w = weight.detach()
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    fro = float(torch.linalg.vector_norm(w.to(work)).item())
    if abs(fro - stored["fro"]) > RTOL * abs(stored["fro"]):
        return f"the base weight's Frobenius norm is {fro:.6g}, the adapter's base had {stored['fro']:.6g}"
    flat = w.reshape(-1)
    rms = stored["fro"] / math.sqrt(max(1, flat.numel()))
    idx = [int(i) for i, _ in stored["samples"]]
    if idx:
        if max(idx) >= flat.numel():
            return f"sampled index {max(idx)} is outside the base weight ({flat.numel()} entries)"
        now = flat[torch.tensor(idx, device=flat.device)].double().cpu().tolist()
        for (i, ref), val in zip(stored["samples"], now):
            if abs(val - ref) > RTOL * abs(ref) + ATOL * rms:
                r, c = divmod(int(i), shape[1])
                return f"the base weight's entry [{r}, {c}] is {val:.6g}, the adapter's base had {ref:.6g}"
    sigma = stored["sigma"]
    if sigma:
        if singular_values is None:
            singular_values = torch.linalg.svdvals(w.to(work))
        now = singular_values[: len(sigma)].double().cpu().tolist()
        for k, (val, ref) in enumerate(zip(now, sigma)):
            if abs(val - ref) > RTOL * sigma[0]:
                return f"the base weight's singular value σ_{k + 1} is {val:.6g}, the adapter's base had {ref:.6g}"
    return None
