"""One GEMM with a rank-r term fused in, for both directions of a LoRA-XS layer:

    Y = X·Wt (+ b) + T·S,    T = s·((X·P)·Q),    and U = X·P
    X: M×K   Wt: K×N   P: K×r   Q: r×r   S: r×N   U, T: M×r

forward:  X = x, Wt = Wᵀ, P = A,  Q = R,  S = B,  U = x A  (saved for the backward)
grad_x:   X = g, Wt = W,  P = Bᵀ, Q = Rᵀ, S = Aᵀ, U = g Bᵀ (= u, the input of grad_R)

Every operand is addressed through its strides, so the transposed views cost nothing and x or g may
be strided (stride 0 from an expanded grad included).

Two schedules (the analysis is in docs/triton.md):

fused (U_GIVEN=False, padded rank RP <= 64): one launch. A program owns one BLOCK_M row block and
  GROUP_N adjacent BLOCK_N tiles of Y. Its first tile runs the K loop with two dots on each X tile
  already in shared memory, X·Wt and X·P, so X·P needs no second read of X; T = s·(U·Q) is formed
  once in registers and each of the GROUP_N tiles adds T·S to its accumulator before its only store.
  The X·P work repeated across the N groups is RP / (BLOCK_N·GROUP_N) of the main GEMM. Only the
  programs of the first N group store U.
split (U_GIVEN=True, RP > 64, or forced): U comes from low_rank_projection.py (a second launch) and
  T·S enters as r extra K steps: Y = [X | T]·[Wt ; S]. At RP = 128..256 the fused kernel's X·P
  accumulator (BLOCK_M × RP fp32) does not fit beside the main one (the AOT report showed spills in
  every config tried), and its repeated X·P work would be 50-100 % of the GEMM.
split with T_GIVEN (many adapters, multi.py): T itself comes in (formed per row, each row with its own
  R, by per_row_r.py) and enters as the same r extra K steps; Q is not read.
"""

from __future__ import annotations

import triton
import triton.language as tl


# Every tl.dot with an accumulator passes out_dtype=acc.dtype: Triton 3.6 types the result fp32 whatever
# the accumulator and asserts on fp64 (all 38 fp64 variants failed to compile in the AOT report under
# triton 3.6.0); 3.8 and 3.9 infer it from the accumulator. The same holds in grad_r.py and
# low_rank_projection.py.
@triton.jit
def _x_times_w(acc, x_ptr, w_ptr, offs_m, offs_n, mask_m, N, K,
               stride_xm, stride_xk, stride_wk, stride_wn,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += X[rows]·Wt[:, cols] over the whole K."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    mask_n = offs_n < N
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        wt = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _scale(t, scaling, scaling_lo):
    if t.dtype == tl.float64:
        return t * scaling + t * scaling_lo  # s arrives as two fp32 halves; fp64 keeps both
    else:
        return t * scaling


@triton.jit
def _u_times_q(u_h, q_ptr, offs_c, R, stride_qi, stride_qj, scaling, scaling_lo,
              RP: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """s·(U·Q[:, offs_c]) rounded to U's dtype, as the reference rounds (x A) R before the last product."""
    offs_i = tl.arange(0, RP)
    # Q may be an fp32 master R beside 16-bit weights: round it to the compute dtype like R.to(x.dtype).
    q = tl.load(q_ptr + offs_i[:, None] * stride_qi + offs_c[None, :] * stride_qj,
                mask=(offs_i[:, None] < R) & (offs_c[None, :] < R), other=0.0).to(u_h.dtype)
    t = tl.dot(u_h, q, input_precision=PRECISION, out_dtype=ACC)
    return _scale(t, scaling, scaling_lo).to(u_h.dtype)


@triton.jit
def _add_t_times_s(acc, t_h, s_ptr, offs_c, offs_n, N, R, stride_sr, stride_sn, PRECISION: tl.constexpr):
    """acc += T[:, offs_c]·S[offs_c, cols]."""
    sb = tl.load(s_ptr + offs_c[:, None] * stride_sr + offs_n[None, :] * stride_sn,
                 mask=(offs_c[:, None] < R) & (offs_n[None, :] < N), other=0.0)
    return tl.dot(t_h, sb, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _add_t_from_u(acc, u_ptr, q_ptr, s_ptr, offs_m, mask_m, offs_n, N, R,
                  stride_um, stride_ur, stride_qi, stride_qj, stride_sr, stride_sn, scaling, scaling_lo,
                  BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """acc += T·S[:, cols] with T = s·(U·Q) formed here from U in memory, BLOCK_T columns of T at a
    time (each a sum over U's columns, BLOCK_T deep): r extra K steps after the main loop.

    Forming T per tile instead of once per row block costs BLOCK_M·RP² per tile, RP²/(K·BLOCK_N) of
    the GEMM (6 % at r = 256, K = 4096, BLOCK_N = 256), and keeps every dot BLOCK_T deep: a single
    RP-deep U·Q dot spilled thousands of bytes in the FMA dots of fp32-without-TF32 and fp64. The
    loops are not software-pipelined (num_stages=1): they are r/K of the work, and their stage
    buffers pushed BLOCK_K = 128 configs over sm_90's shared memory."""
    offs_t = tl.arange(0, BLOCK_T)
    for c in tl.range(0, tl.cdiv(R, BLOCK_T), num_stages=1):
        offs_c = c * BLOCK_T + offs_t
        t = tl.zeros((BLOCK_M, BLOCK_T), dtype=acc.dtype)
        for kc in tl.range(0, tl.cdiv(R, BLOCK_T), num_stages=1):
            offs_i = kc * BLOCK_T + offs_t
            u = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_i[None, :] * stride_ur,
                        mask=mask_m[:, None] & (offs_i[None, :] < R), other=0.0)
            q = tl.load(q_ptr + offs_i[:, None] * stride_qi + offs_c[None, :] * stride_qj,
                        mask=(offs_i[:, None] < R) & (offs_c[None, :] < R), other=0.0)
            t = tl.dot(u, q.to(u.dtype), t, input_precision=PRECISION, out_dtype=t.dtype)
        t_h = _scale(t, scaling, scaling_lo).to(u_ptr.dtype.element_ty)
        acc = _add_t_times_s(acc, t_h, s_ptr, offs_c, offs_n, N, R, stride_sr, stride_sn, PRECISION)
    return acc


@triton.jit
def _add_t_given(acc, t_ptr, s_ptr, offs_m, mask_m, offs_n, N, R, stride_tm, stride_tr, stride_sr, stride_sn,
                 BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """acc += T·S[:, cols] with T read as given (many adapters, multi.py: T_i = s_i·U_i·Q[id_i] was formed
    per row by the projection launch), BLOCK_T columns at a time; not pipelined, as in _add_t_from_u."""
    offs_t = tl.arange(0, BLOCK_T)
    for c in tl.range(0, tl.cdiv(R, BLOCK_T), num_stages=1):
        offs_c = c * BLOCK_T + offs_t
        t_h = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_c[None, :] * stride_tr,
                      mask=mask_m[:, None] & (offs_c[None, :] < R), other=0.0)
        acc = _add_t_times_s(acc, t_h, s_ptr, offs_c, offs_n, N, R, stride_sr, stride_sn, PRECISION)
    return acc


@triton.jit
def _store_tile(acc, y_ptr, b_ptr, offs_m, offs_n, mask_m, N, stride_ym, stride_yn, stride_b,
                HAS_BIAS: tl.constexpr):
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
        acc = acc + bias.to(acc.dtype)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M_BUCKET", "W_KMAJOR"])
def gemm_rank_r_kernel(
    x_ptr, w_ptr, b_ptr, p_ptr, q_ptr, s_ptr, y_ptr, u_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_b,
    stride_pk, stride_pr, stride_qi, stride_qj, stride_sr, stride_sn,
    stride_ym, stride_yn, stride_um, stride_ur,
    scaling, scaling_lo,
    M_BUCKET, W_KMAJOR,  # autotune keys only (shape bucket; forward vs backward layout of W)
    U_GIVEN: tl.constexpr,  # split schedule: U = X·P read from u_ptr; fused: formed here (and stored)
    HAS_BIAS: tl.constexpr,
    STORE_U: tl.constexpr,  # fused only
    RP: tl.constexpr,  # r padded to a power of two >= 16 (tl.dot's smallest side)
    BLOCK_T: tl.constexpr,  # split: columns of T formed per step
    PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 inputs only; 16-bit dots ignore it)
    IDX64: tl.constexpr,  # some tensor spans > 2**31 elements: row/column offsets in int64
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    # Split only: u_ptr holds T itself (M×r, already scaled and rounded), not U; Q is not read. The
    # many-adapter launches (multi.py) form T per row, each row with its own R. A separate branch, so
    # the specialisations with T_GIVEN=False compile to what they did before the flag existed.
    T_GIVEN: tl.constexpr = False,
):
    acc_ty = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    # Grouped order: GROUP_M row blocks walk the same N groups together, so W tiles are reused from
    # L2. max(., 1) keeps N = 0 (an empty layer) from dividing by zero; U is still written then.
    num_pid_g = tl.maximum(tl.cdiv(N, BLOCK_N * GROUP_N), 1)
    width = GROUP_M * num_pid_g
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_g = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_first = pid_g * (BLOCK_N * GROUP_N)
    if IDX64:
        offs_m = offs_m.to(tl.int64)
    mask_m = offs_m < M
    # The last group may hold fewer than GROUP_N tiles.
    n_tiles = tl.minimum(tl.cdiv(N - n_first, BLOCK_N), GROUP_N)

    if U_GIVEN:
        offs_n = n_first + tl.arange(0, BLOCK_N)
        if IDX64:
            offs_n = offs_n.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
        acc = _x_times_w(acc, x_ptr, w_ptr, offs_m, offs_n, mask_m, N, K,
                         stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_K, PRECISION)
        if T_GIVEN:
            acc = _add_t_given(acc, u_ptr, s_ptr, offs_m, mask_m, offs_n, N, R, stride_um, stride_ur,
                               stride_sr, stride_sn, BLOCK_T, PRECISION)
        else:
            acc = _add_t_from_u(acc, u_ptr, q_ptr, s_ptr, offs_m, mask_m, offs_n, N, R, stride_um, stride_ur,
                                stride_qi, stride_qj, stride_sr, stride_sn, scaling, scaling_lo, BLOCK_M, BLOCK_T,
                                PRECISION)
        _store_tile(acc, y_ptr, b_ptr, offs_m, offs_n, mask_m, N, stride_ym, stride_yn, stride_b, HAS_BIAS)
        # Only emitted for GROUP_N > 1: even a loop that runs zero times cost ~30 registers and spills
        # in the AOT report (ptxas keeps its live ranges).
        if GROUP_N > 1:
            for j in range(1, n_tiles):
                offs_n = n_first + j * BLOCK_N + tl.arange(0, BLOCK_N)
                if IDX64:
                    offs_n = offs_n.to(tl.int64)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
                acc = _x_times_w(acc, x_ptr, w_ptr, offs_m, offs_n, mask_m, N, K,
                                 stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_K, PRECISION)
                if T_GIVEN:
                    acc = _add_t_given(acc, u_ptr, s_ptr, offs_m, mask_m, offs_n, N, R, stride_um, stride_ur,
                                       stride_sr, stride_sn, BLOCK_T, PRECISION)
                else:
                    acc = _add_t_from_u(acc, u_ptr, q_ptr, s_ptr, offs_m, mask_m, offs_n, N, R, stride_um,
                                        stride_ur, stride_qi, stride_qj, stride_sr, stride_sn, scaling, scaling_lo,
                                        BLOCK_M, BLOCK_T, PRECISION)
                _store_tile(acc, y_ptr, b_ptr, offs_m, offs_n, mask_m, N, stride_ym, stride_yn, stride_b,
                            HAS_BIAS)
    else:
        tl.static_assert(RP <= 64, "the fused schedule keeps U and T in registers: RP <= 64")
        offs_n = n_first + tl.arange(0, BLOCK_N)
        if IDX64:
            offs_n = offs_n.to(tl.int64)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, RP)
        mask_r = offs_r < R
        # First tile: X·Wt and X·P from the same X tiles.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
        acc_u = tl.zeros((BLOCK_M, RP), dtype=acc_ty)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        p_ptrs = p_ptr + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            pt = tl.load(p_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            acc_u = tl.dot(xt, pt, acc_u, input_precision=PRECISION, out_dtype=acc_u.dtype)
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION, out_dtype=acc.dtype)
            x_ptrs += BLOCK_K * stride_xk
            p_ptrs += BLOCK_K * stride_pk
            w_ptrs += BLOCK_K * stride_wk
        # U in the compute dtype: the value the backward reads, and the one T is formed from.
        u_h = acc_u.to(x_ptr.dtype.element_ty)
        if STORE_U:
            if pid_g == 0:
                tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u_h,
                         mask=mask_m[:, None] & mask_r[None, :])
        t_h = _u_times_q(u_h, q_ptr, offs_r, R, stride_qi, stride_qj, scaling, scaling_lo, RP, PRECISION, acc_ty)
        acc = _add_t_times_s(acc, t_h, s_ptr, offs_r, offs_n, N, R, stride_sr, stride_sn, PRECISION)
        _store_tile(acc, y_ptr, b_ptr, offs_m, offs_n, mask_m, N, stride_ym, stride_yn, stride_b, HAS_BIAS)
        # The other tiles of the group reuse T from registers.
        if GROUP_N > 1:
            for j in range(1, n_tiles):
                offs_n = n_first + j * BLOCK_N + tl.arange(0, BLOCK_N)
                if IDX64:
                    offs_n = offs_n.to(tl.int64)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_ty)
                acc = _x_times_w(acc, x_ptr, w_ptr, offs_m, offs_n, mask_m, N, K,
                                 stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_K, PRECISION)
                acc = _add_t_times_s(acc, t_h, s_ptr, offs_r, offs_n, N, R, stride_sr, stride_sn, PRECISION)
                _store_tile(acc, y_ptr, b_ptr, offs_m, offs_n, mask_m, N, stride_ym, stride_yn, stride_b,
                            HAS_BIAS)
