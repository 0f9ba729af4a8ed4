"""The fp64 reference of the many-adapter layer (reference.loraxs_linear_multi) and its per-element
rounding-error yardsticks, for tests/common.py's assert_within_bound: abs_bound_parts with each row's
own R[id_i] and |s_i| (rows with id -1 have no low-rank part), and grad_R per adapter (zeros for an
adapter no row uses). Used by the host-emulation tests and the GPU tests of the CUDA kernels."""

from __future__ import annotations

import torch

from loraxs_kernels import reference


def d64(t):
    return None if t is None else t.detach().cpu().to(torch.float64)


def multi_reference(x, w, b, A, R, B, ids, scaling, adapter_scale, g):
    """(y, grad_x, grad_R) in fp64 on the CPU; x (M, in), ids (M,), s_i = scaling·adapter_scale[id_i]."""
    x64 = d64(x).requires_grad_()
    R64 = d64(R).requires_grad_()
    s = scaling if adapter_scale is None else scaling * d64(adapter_scale)
    y = reference.loraxs_linear_multi(x64, d64(w), d64(b), d64(A), R64, d64(B), ids.cpu(), s)
    gx, gR = torch.autograd.grad(y, (x64, R64), d64(g))
    return y.detach(), gx, gR


def multi_bounds(x, w, b, A, R, B, ids, scaling, adapter_scale, g):
    """((y_base, y_low), (gx_base, gx_low), (0, grad_R)) absolute-value bounds in fp64."""
    ab = lambda t: None if t is None else d64(t).abs()  # noqa: E731
    ids = ids.cpu().long()
    M, n, r = ids.shape[0], R.shape[0], R.shape[1]
    used = ids >= 0
    k = ids.clamp(min=0)
    s = torch.full((M,), abs(scaling), dtype=torch.float64)
    if adapter_scale is not None:
        s = s * ab(adapter_scale)[k]
    s = torch.where(used, s, torch.zeros_like(s))
    Rk = ab(R)[k]
    xa = ab(x) @ ab(A)
    y_base = ab(x) @ ab(w).t() + (ab(b) if b is not None else 0)
    y_low = s[:, None] * (torch.bmm(xa[:, None, :], Rk)[:, 0] @ ab(B))
    u = ab(g) @ ab(B).t()
    gx_base = ab(g) @ ab(w)
    gx_low = s[:, None] * (torch.bmm(u[:, None, :], Rk.transpose(1, 2))[:, 0] @ ab(A).t())
    gR = torch.zeros(n, r, r, dtype=torch.float64)
    gR.index_add_(0, k[used], (s[:, None, None] * xa[:, :, None] * u[:, None, :])[used])
    return (y_base, y_low), (gx_base, gx_low), (torch.zeros_like(gR), gR)
