"""The rank-r projection with a per-row r×r transform, for many adapters in one batch (multi.py):

    U = X·P  (M×r)        T_i = s_i·U_i·Q[id_i]  (row i; T_i = 0 where id_i = -1)

forward:  X = x, P = A,  Q = R,  U = x A  (saved for the backward), T the low-rank rows of y
backward: X = g, P = Bᵀ, Q = Rᵀ, U = g Bᵀ (= u, grad_R's input),   T the low-rank rows of grad_x

Q is a bank (n, r, r) addressed through its strides (Rᵀ is R with its last two strides swapped).
T then enters gemm_rank_r_kernel as r extra K columns (T_GIVEN): Y = [X | T]·[Wt ; S].

The K loop is x_p_kernel's. The transform gathers each row's own Q straight from the bank (no per-row
copy): BLOCK_C columns of T at a time, as a broadcast product U[:, :, None]·Q[id][:, :, cols] summed
over the rank in fp32 (fp64 for fp64). BLOCK_M·RP·BLOCK_C is kept to a fixed element budget so the
gathered slab fits in registers (multi.per_row_config). Rounding follows the single-adapter kernels
and the reference: U is rounded to the compute dtype, Q is rounded to it (an fp32 master R beside
16-bit weights, as R.to(x.dtype)), T is accumulated in fp32, scaled, and rounded once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gemm_rank_r import _scale
from .low_rank_projection import x_times_p


@triton.jit
def x_p_per_row_q_kernel(
    x_ptr, p_ptr, q_ptr, ids_ptr, as_ptr, u_ptr, t_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_pk, stride_pr, stride_qn, stride_qi, stride_qj, stride_ids, stride_as,
    stride_um, stride_ur, stride_tm, stride_tr,
    scaling, scaling_lo,
    STORE_U: tl.constexpr,  # write U (xa in the forward, u when grad_R is wanted)
    FORM_T: tl.constexpr,  # write T (not needed when the backward wants grad_R only)
    HAS_ASCALE: tl.constexpr,  # s_i = scaling·adapter_scaling[id_i], else scaling
    RP: tl.constexpr, PRECISION: tl.constexpr,
    IDX64: tl.constexpr,  # some tensor spans > 2**31 elements: row, column and bank offsets in int64
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
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
    u_h = acc.to(x_ptr.dtype.element_ty)
    if STORE_U:
        tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u_h,
                 mask=mask_m[:, None] & mask_r[None, :])
    if FORM_T:
        ids = tl.load(ids_ptr + offs_m * stride_ids, mask=mask_m, other=-1)
        used = ids >= 0
        if IDX64:
            adapter = tl.where(used, ids, 0).to(tl.int64)
        else:
            adapter = tl.where(used, ids, 0).to(tl.int32)
        if HAS_ASCALE:
            s_row = _scale(tl.load(as_ptr + adapter * stride_as, mask=used, other=0.0).to(acc_ty),
                           scaling, scaling_lo)
        u_f = u_h.to(acc_ty)
        q_rows = q_ptr + adapter[:, None, None] * stride_qn + offs_r[None, :, None] * stride_qi
        q_mask = used[:, None, None] & mask_r[None, :, None]
        offs_cc = tl.arange(0, BLOCK_C)
        for c in range(0, tl.cdiv(R, BLOCK_C)):
            offs_c = c * BLOCK_C + offs_cc
            q = tl.load(q_rows + offs_c[None, None, :] * stride_qj,
                        mask=q_mask & (offs_c[None, None, :] < R), other=0.0)
            t = tl.sum(u_f[:, :, None] * q.to(u_h.dtype).to(acc_ty), axis=1)
            if HAS_ASCALE:
                t = t * s_row[:, None]
            else:
                t = _scale(t, scaling, scaling_lo)
            # where, not a product: a -1 row's U may hold inf (its x is never adapted), and inf·0 is NaN.
            t = tl.where(used[:, None], t, 0.0)
            tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_c[None, :] * stride_tr,
                     t.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_c[None, :] < R))
