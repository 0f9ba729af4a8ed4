// Many adapters in one batch (issue 11): the two kernels that differ from the single-adapter layer.
// R is a bank (n, r, r) and row i of the batch uses R[id_i] (id -1: the base layer alone), scaled by
// s_i = scaling·adapter_scale[id_i]. Everything else runs on the single-adapter kernels:
//
//   forward:   xa = x A (gemm);  t_i = s_i·xa_i R[id_i]  (multi_rows_kernel);  y = x Wᵀ + t B + b (gemm, K2 = r)
//   backward:  u = g Bᵀ (gemm);  v_i = s_i·u_i R[id_i]ᵀ (multi_rows_kernel, transposed);
//              grad_x = g W + v Aᵀ (gemm, K2 = r);
//              grad_R[k] = s_k·Σ_{i: id_i = k} xa_iᵀ u_i   (multi_grad_r_kernel, over the rows sorted by adapter)
//
// multi_rows_kernel: one warp per row, lane l owns output columns l, l+32, ... (8 at r = 256). The row's
// input (r values) is staged in shared memory and read as a broadcast; R[id] is read row by row, so the
// 32 lanes of a warp read consecutive elements of a row of R (one or two 64-byte pieces for a
// contiguous bank). Each row reads its own r×r matrix: M·r² loads from L2 next to the M·in·out of
// the GEMMs; rows of the same adapter hit the same cached lines. An fp32 master bank beside a half
// layer is rounded element by element as it is read (never converted as a whole: the bank may hold
// thousands of adapters). Each output is one fixed-order dot product: deterministic.
//
// multi_grad_r_kernel: grid (n, r tiles, r tiles); CTA (k, ti, tj) sums the 32×32 tile (ti, tj) of
// xaᵀu over adapter k's rows, perm[seg[k] .. seg[k+1]), in that order (the binding's stable sort keeps
// the batch order within an adapter), in fp32 (fp64 for fp64), then multiplies by s_k and rounds once
// to R's dtype. No atomics and no workspace: the same bits on every run and every GPU. An adapter with
// no rows gets exact zeros whatever its scaling. The segment of one adapter is summed by one CTA per
// tile: a batch whose rows all belong to one adapter serialises over M there (M·r² FMAs on ⌈r/32⌉²
// CTAs), the price of one launch with no split workspace; the single-adapter path splits over M instead.
#pragma once

#include <type_traits>

#include "adapters.cuh"
#include "common.cuh"

namespace loraxs {
namespace cuda {

namespace multi {
constexpr int ROWS = 8, THREADS = 32 * ROWS;  // one warp per row
constexpr int PER_LANE = kMaxRank / 32;       // output columns per lane at the largest rank
constexpr int TILE = 32, GR_THREADS = 256;    // grad_R: 32×32 tile, 4 outputs per thread
// An fp32 master bank beside a 16-bit layer, or beside an fp64 layer (the op's contract takes an fp32 R
// beside any layer dtype; fp32 beside fp32 is the same-dtype kernel).
template <typename T>
constexpr bool kFp32BankOk = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value ||
                             std::is_same<T, double>::value;
}  // namespace multi

// out_i[j] = s_i·Σ_c in_i[c]·R[id_i](c, j), where R(c, j) = R[c·s_rc + j·s_rj]: (s_r0, s_r1) for R, swapped
// for Rᵀ. A row with id -1 gets zeros.
template <typename T, typename RT>
__global__ void __launch_bounds__(multi::THREADS)
    multi_rows_kernel(const MultiRowsArgs a, int64_t s_rc, int64_t s_rj) {
  using Acc = typename Num<T>::acc;
  using multi::PER_LANE;
  __shared__ Acc s_in[multi::ROWS][kMaxRank];
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * multi::ROWS + w;
  const int r = static_cast<int>(a.r);
  const bool row_ok = row < a.M;
  // An id outside [0, n) gets the base row (zeros here). The op's contract refuses such ids before any
  // launch; inside a CUDA-graph capture it checks them on the device instead (torch._assert_async,
  // multi_cuda.cpp), and this guard keeps the read inside the bank whatever the order of events.
  const int64_t raw = row_ok ? adapter_of(a.ids, a.ids_type, row) : -1;
  const int64_t id = raw < a.n ? raw : -1;
  const T* in = static_cast<const T*>(a.in);
  if (id >= 0) {
    for (int c = lane; c < r; c += 32) s_in[w][c] = Num<T>::to_acc(in[row * a.s_in0 + c * a.s_in1]);
  }
  __syncthreads();
  if (!row_ok) return;
  T* out = static_cast<T*>(a.out) + row * a.r;
  if (id < 0) {
    for (int c = lane; c < r; c += 32) out[c] = Num<T>::from_acc(Acc(0));
    return;
  }
  const RT* Rk = static_cast<const RT*>(a.R) + id * a.s_rn;
  Acc acc[PER_LANE];
#pragma unroll
  for (int q = 0; q < PER_LANE; ++q) acc[q] = Acc(0);
  for (int c = 0; c < r; ++c) {
    const Acc xv = s_in[w][c];
    const RT* Rc = Rk + c * s_rc;
#pragma unroll
    for (int q = 0; q < PER_LANE; ++q) {
      const int j = lane + 32 * q;
      if (j < r) acc[q] = fma(xv, rounded_to<T, RT>(Rc[j * s_rj]), acc[q]);
    }
  }
  const Acc s = static_cast<Acc>(adapter_scaling_of(a.scaling, a.adapter_scale, id));
#pragma unroll
  for (int q = 0; q < PER_LANE; ++q) {
    const int j = lane + 32 * q;
    if (j < r) out[j] = Num<T>::from_acc(s * acc[q]);
  }
}

template <typename T>
cudaError_t launch_multi_rows(const MultiRowsArgs& a, cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  if (a.r < 1 || a.r > kMaxRank || a.n < 1) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(a.M, multi::ROWS);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // Rᵀ(c, j) = R(j, c): the same kernel with the two strides swapped.
  const bool transposed = a.transpose_R;
  const int64_t s_rc = transposed ? a.s_r1 : a.s_r0;
  const int64_t s_rj = transposed ? a.s_r0 : a.s_r1;
  if constexpr (multi::kFp32BankOk<T>) {
    if (a.r_dtype == DType::kFloat) {
      multi_rows_kernel<T, float><<<static_cast<unsigned>(blocks), multi::THREADS, 0, stream>>>(a, s_rc, s_rj);
      return cudaSuccess;
    }
  }
  multi_rows_kernel<T, T><<<static_cast<unsigned>(blocks), multi::THREADS, 0, stream>>>(a, s_rc, s_rj);
  return cudaSuccess;
}

// grad_R[k](i, j) = s_k·Σ_{p in seg[k] .. seg[k+1])} xa[perm[p]][i]·u[perm[p]][j], p in increasing order.
template <typename T, typename OutT>
__global__ void __launch_bounds__(multi::GR_THREADS) multi_grad_r_kernel(const MultiGradRArgs a) {
  using Acc = typename Num<T>::acc;
  using multi::TILE;
  __shared__ Acc sx[TILE][TILE + 1];
  __shared__ Acc su[TILE][TILE + 1];
  const int tid = threadIdx.x, tx = tid % TILE, ty = tid / TILE;  // ty in 0..7
  const int64_t k = blockIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * TILE;  // grad_R rows (xa columns)
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * TILE;  // grad_R columns (u columns)
  const int64_t p_begin = a.seg[k], p_end = a.seg[k + 1];
  const T* xa = static_cast<const T*>(a.xa);
  const T* u = static_cast<const T*>(a.u);

  // Thread (ty, tx) owns grad_R[k][i0 + ty + 8q][j0 + tx], q < 4.
  Acc acc[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  for (int64_t p0 = p_begin; p0 < p_end; p0 += TILE) {
#pragma unroll
    for (int q = 0; q < TILE * TILE / multi::GR_THREADS; ++q) {
      const int e = tid + q * multi::GR_THREADS;
      const int mm = e / TILE, cc = e % TILE;
      const int64_t p = p0 + mm;
      const bool row_ok = p < p_end;
      const int64_t m = row_ok ? a.perm[p] : 0;
      sx[mm][cc] = (row_ok && i0 + cc < a.r) ? Num<T>::to_acc(xa[m * a.s_xa0 + (i0 + cc) * a.s_xa1]) : Acc(0);
      su[mm][cc] = (row_ok && j0 + cc < a.r) ? Num<T>::to_acc(u[m * a.s_u0 + (j0 + cc) * a.s_u1]) : Acc(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int mm = 0; mm < TILE; ++mm) {
      const Acc uv = su[mm][tx];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = fma(sx[mm][ty + 8 * q], uv, acc[q]);
    }
    __syncthreads();
  }
  // An adapter with no rows stores exact zeros: its scaling is not read (an unused slot of an
  // adapter_scaling tensor may hold inf or NaN, and inf·0 is NaN).
  const Acc s = p_end > p_begin ? static_cast<Acc>(adapter_scaling_of(a.scaling, a.adapter_scale, k)) : Acc(0);
  OutT* out = static_cast<OutT*>(a.out);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t i = i0 + ty + 8 * q, j = j0 + tx;
    if (i < a.r && j < a.r)
      out[(k * a.r + i) * a.r + j] = Num<OutT>::from_acc(static_cast<typename Num<OutT>::acc>(s * acc[q]));
  }
}

// grad_R comes back in R's dtype: the layer's dtype T or an fp32 master bank.
template <typename T>
cudaError_t launch_multi_grad_r(const MultiGradRArgs& a, cudaStream_t stream) {
  if (a.r < 1 || a.r > kMaxRank || a.n < 1) return cudaErrorInvalidValue;
  if (a.n > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const unsigned tiles = static_cast<unsigned>(ceil_div(a.r, multi::TILE));
  const dim3 grid(static_cast<unsigned>(a.n), tiles, tiles);
  if constexpr (multi::kFp32BankOk<T>) {
    if (a.out_dtype == DType::kFloat) {
      multi_grad_r_kernel<T, float><<<grid, multi::GR_THREADS, 0, stream>>>(a);
      return cudaSuccess;
    }
  }
  multi_grad_r_kernel<T, T><<<grid, multi::GR_THREADS, 0, stream>>>(a);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace loraxs
