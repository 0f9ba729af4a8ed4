"""The rank-r projection on its own:

    U = X·P  (M×r)

forward:  U = x A  (saved for the backward, and the input of the split GEMM's T = s·U R)
backward: U = g Bᵀ (the u of grad_R, and the input of the split GEMM's T = s·u Rᵀ)

Used where the fused GEMM does not run: the split schedule (padded rank > 64, see gemm_rank_r.py)
and the backward that wants grad_R but not grad_x. A skinny GEMM that reads X once: memory-bound,
BLOCK_M rows per program, the whole padded rank in one accumulator.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def x_times_p(acc, x_ptr, p_ptr, offs_m, mask_m, offs_r, mask_r, K, stride_xm, stride_xk, stride_pk, stride_pr,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc (BLOCK_M × RP) += X[rows]·P over the whole K; also the K loop of per_row_r.py's kernel."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    p_ptrs = p_ptr + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        pt = tl.load(p_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
        acc = tl.dot(xt, pt, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        x_ptrs += BLOCK_K * stride_xk
        p_ptrs += BLOCK_K * stride_pk
    return acc


@triton.jit(do_not_specialize=["M_BUCKET"])
def x_p_kernel(
    x_ptr, p_ptr, u_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_pk, stride_pr, stride_um, stride_ur,
    M_BUCKET,  # autotune key only
    RP: tl.constexpr, PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_ty = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    mask_m = offs_m < M
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    acc = x_times_p(tl.zeros((BLOCK_M, RP), dtype=acc_ty), x_ptr, p_ptr, offs_m, mask_m, offs_r, mask_r, K,
                    stride_xm, stride_xk, stride_pk, stride_pr, BLOCK_K, PRECISION)
    tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
             acc.to(u_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
