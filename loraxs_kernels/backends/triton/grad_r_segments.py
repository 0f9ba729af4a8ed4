"""grad_R for a bank of adapters: grad_R[k] = s_k · Σ_{i: id_i = k} (x_i A)ᵀ (g_i Bᵀ), without atomics.

The launcher (multi.py) groups the rows by adapter once per call, on the device: a stable sort of
the ids gives a permutation `perm` (rows of one adapter contiguous, each adapter's rows in their
original order) and `bounds` (n + 1 offsets: adapter k owns perm[bounds[k]:bounds[k+1]]; the -1 rows
sort first and belong to none). Program (k, i, j) sums its adapter's rows, gathered through perm,
BLOCK_M at a time in that order, for one BLOCK_I × BLOCK_J block, in fp32 (fp64 for fp64), scales
by s_k and stores in grad_R's dtype. Adapters without rows run no iteration and store zeros.

The tiles are fixed (no autotune) and the order of the additions depends only on the ids, so two
calls with the same inputs give bitwise-identical grad_R. One program walks all rows of its adapter:
with every row in one adapter the reduction is serial over M/BLOCK_M steps (xa_t_u_splits_kernel
splits M instead; a split per segment would be the next step if that case matters).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemm_rank_r import _scale


@triton.jit
def grad_r_segments_kernel(
    xa_ptr, u_ptr, perm_ptr, bounds_ptr, as_ptr, out_ptr,
    R,
    stride_am, stride_ar, stride_um, stride_ur, stride_as, stride_on, stride_oi, stride_oj,
    scaling, scaling_lo,
    HAS_ASCALE: tl.constexpr, PRECISION: tl.constexpr,
    IDX64: tl.constexpr,  # xa, u or grad_R spans > 2**31 elements: offsets in int64
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
):
    acc_ty = tl.float64 if xa_ptr.dtype.element_ty == tl.float64 else tl.float32
    k = tl.program_id(0)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < R
    mask_j = offs_j < R
    start = tl.load(bounds_ptr + k)
    end = tl.load(bounds_ptr + k + 1)
    if IDX64:
        k = k.to(tl.int64)
    else:
        start = start.to(tl.int32)
        end = end.to(tl.int32)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=acc_ty)
    for m in range(0, tl.cdiv(end - start, BLOCK_M)):
        pos = start + m * BLOCK_M + offs_m
        in_seg = pos < end
        rows = tl.load(perm_ptr + pos, mask=in_seg, other=0)
        if not IDX64:
            rows = rows.to(tl.int32)
        # (x A)ᵀ is read as a BLOCK_I × BLOCK_M tile straight from xa's strides (no transposed copy).
        a = tl.load(xa_ptr + offs_i[:, None] * stride_ar + rows[None, :] * stride_am,
                    mask=mask_i[:, None] & in_seg[None, :], other=0.0)
        b = tl.load(u_ptr + rows[:, None] * stride_um + offs_j[None, :] * stride_ur,
                    mask=in_seg[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if HAS_ASCALE:
        s_k = _scale(tl.load(as_ptr + k * stride_as).to(acc_ty), scaling, scaling_lo)
        acc = acc * s_k
    else:
        acc = _scale(acc, scaling, scaling_lo)
    # An adapter without rows stores exact zeros, whatever its scaling (0·inf would be NaN).
    acc = tl.where(end > start, acc, 0.0)
    tl.store(out_ptr + k * stride_on + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj,
             acc.to(out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])
