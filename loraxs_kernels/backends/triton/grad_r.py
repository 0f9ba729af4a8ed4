"""grad_R = s · (x A)ᵀ u, a sum over the M tokens of r×r outer products, without float atomics.

    xa_t_u_splits_kernel: program (split, i, j) sums rows [split·rows_per_split, +rows_per_split) of
                          xaᵀ u for one BLOCK_I × BLOCK_J block, in row order; with one split it
                          writes s·sum in R's dtype directly, else an fp32 partial per split.
    sum_splits_kernel:    grad_R = s · Σ_split partial[split], splits added in index order.

The split count and the tiles depend on M and r only (fixed configs, no autotune), so two calls
with the same shapes run the same additions in the same order: grad_R is bitwise reproducible.
xa and u are M×r each (r/out of g's size): the backward reads g once, in the grad_x GEMM that also
writes u.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def xa_t_u_splits_kernel(
    xa_ptr, u_ptr, out_ptr,
    M, R, rows_per_split,
    stride_am, stride_ar, stride_um, stride_ur,
    scaling, scaling_lo,
    FINAL: tl.constexpr,  # one split: write s·sum in out's dtype; else fp32 partials [split, R, R]
    PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
):
    acc_ty = tl.float64 if xa_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_s = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < R
    mask_j = offs_j < R
    if IDX64:
        row0 = pid_s.to(tl.int64) * rows_per_split
    else:
        row0 = pid_s * rows_per_split
    offs_m = tl.arange(0, BLOCK_M)
    # xaᵀ is read as a BLOCK_I × BLOCK_M tile straight from xa's strides (no transposed copy).
    a_ptrs = xa_ptr + offs_i[:, None] * stride_ar + (row0 + offs_m)[None, :] * stride_am
    b_ptrs = u_ptr + (row0 + offs_m)[:, None] * stride_um + offs_j[None, :] * stride_ur
    rows = tl.minimum(M - row0, rows_per_split)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=acc_ty)
    for m in range(0, tl.cdiv(rows, BLOCK_M)):
        m_left = rows - m * BLOCK_M
        a = tl.load(a_ptrs, mask=mask_i[:, None] & (offs_m[None, :] < m_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_m[:, None] < m_left) & mask_j[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        a_ptrs += BLOCK_M * stride_am
        b_ptrs += BLOCK_M * stride_um
    mask = mask_i[:, None] & mask_j[None, :]
    if FINAL:
        if acc_ty == tl.float64:
            acc = acc * scaling + acc * scaling_lo
        else:
            acc = acc * scaling
        tl.store(out_ptr + offs_i[:, None] * R + offs_j[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_s * R * R + offs_i[:, None] * R + offs_j[None, :], acc, mask=mask)


@triton.jit
def sum_splits_kernel(part_ptr, out_ptr, n, num_splits, scaling, scaling_lo, BLOCK: tl.constexpr):
    """out[k] = s · Σ_split part[split, k] for the n = r·r entries, splits in index order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
    for s in range(0, num_splits):
        acc += tl.load(part_ptr + s * n + offs, mask=mask, other=0.0)
    if part_ptr.dtype.element_ty == tl.float64:
        acc = acc * scaling + acc * scaling_lo
    else:
        acc = acc * scaling
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
