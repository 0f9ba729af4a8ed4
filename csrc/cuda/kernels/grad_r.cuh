// grad_R = s · xaᵀ u  (r×r), the only weight gradient of the layer: a sum over all M tokens of
// rank-1 products of two thin (M×r) matrices. It is tiny next to the GEMMs (M·r² against M·in·out),
// so it runs on CUDA cores in fp32 (fp64 for fp64) with a deterministic two-step split reduction and
// no atomics: M is cut into `splits` contiguous row ranges (a function of M and r only, so the
// bits do not depend on the GPU model), each CTA sums its 32×32 block of grad_R over its range in
// row order into a workspace slice, and a second kernel adds the slices in slice order, scales by s
// and rounds once to R's dtype.
#pragma once

#include "common.cuh"

namespace loraxs {
namespace cuda {

namespace gradr {
constexpr int TILE = 32, THREADS = 256, REDUCE_THREADS = 256;
}

template <typename T>
__global__ void __launch_bounds__(gradr::THREADS)
    grad_r_partial_kernel(const GradRArgs a, int64_t rows_per_split, typename Num<T>::acc* ws) {
  using Acc = typename Num<T>::acc;
  using gradr::TILE;
  __shared__ Acc sx[TILE][TILE + 1];
  __shared__ Acc su[TILE][TILE + 1];
  const int tid = threadIdx.x, tx = tid % TILE, ty = tid / TILE;  // ty in 0..7
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TILE;     // grad_R rows (xa columns)
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * TILE;     // grad_R columns (u columns)
  const int64_t split = blockIdx.z;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < a.M ? m_begin + rows_per_split : a.M;
  const T* xa = static_cast<const T*>(a.xa);
  const T* u = static_cast<const T*>(a.u);

  // Thread (ty, tx) owns grad_R[i0 + ty + 8q][j0 + tx], q < 4.
  Acc acc[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
  for (int64_t m0 = m_begin; m0 < m_end; m0 += TILE) {
#pragma unroll
    for (int q = 0; q < TILE * TILE / gradr::THREADS; ++q) {
      const int e = tid + q * gradr::THREADS;
      const int mm = e / TILE, cc = e % TILE;  // consecutive threads: consecutive columns of one row
      const int64_t m = m0 + mm;
      const bool row_ok = m < m_end;
      sx[mm][cc] = (row_ok && i0 + cc < a.r) ? Num<T>::to_acc(xa[m * a.s_xa0 + (i0 + cc) * a.s_xa1]) : Acc(0);
      su[mm][cc] = (row_ok && j0 + cc < a.r) ? Num<T>::to_acc(u[m * a.s_u0 + (j0 + cc) * a.s_u1]) : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int mm = 0; mm < TILE; ++mm) {
      const Acc uv = su[mm][tx];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = fma(sx[mm][ty + 8 * q], uv, acc[q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t i = i0 + ty + 8 * q, jj = j0 + tx;
    if (i < a.r && jj < a.r) ws[(split * a.r + i) * a.r + jj] = acc[q];
  }
}

template <typename Acc, typename OutT>
__global__ void __launch_bounds__(gradr::REDUCE_THREADS)
    grad_r_reduce_kernel(const GradRArgs a, int splits, const Acc* ws) {
  const int64_t rr = a.r * a.r;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * gradr::REDUCE_THREADS + threadIdx.x;
  if (e >= rr) return;
  Acc s = Acc(0);
  for (int j = 0; j < splits; ++j) s += ws[j * rr + e];
  static_cast<OutT*>(a.out)[e] = Num<OutT>::from_acc(static_cast<typename Num<OutT>::acc>(static_cast<Acc>(a.scaling) * s));
}

template <typename T>
cudaError_t launch_grad_r_partial(const GradRArgs& a, int splits, void* workspace, cudaStream_t stream) {
  using Acc = typename Num<T>::acc;
  if (a.M <= 0 || a.r <= 0 || splits < 1 || splits > 65535) return cudaErrorInvalidValue;
  const unsigned tiles = static_cast<unsigned>(ceil_div(a.r, gradr::TILE));
  grad_r_partial_kernel<T><<<dim3(tiles, tiles, static_cast<unsigned>(splits)), gradr::THREADS, 0, stream>>>(
      a, ceil_div(a.M, splits), static_cast<Acc*>(workspace));
  return cudaSuccess;
}

// grad_R comes back in R's dtype: the layer's dtype T or an fp32 master copy.
template <typename T>
cudaError_t launch_grad_r_reduce(const GradRArgs& a, int splits, const void* workspace, cudaStream_t stream) {
  using Acc = typename Num<T>::acc;
  if (a.r <= 0 || splits < 1) return cudaErrorInvalidValue;
  const unsigned blocks = static_cast<unsigned>(ceil_div(a.r * a.r, gradr::REDUCE_THREADS));
  const Acc* ws = static_cast<const Acc*>(workspace);
  if (a.out_dtype == DType::kFloat)
    grad_r_reduce_kernel<Acc, float><<<blocks, gradr::REDUCE_THREADS, 0, stream>>>(a, splits, ws);
  else
    grad_r_reduce_kernel<Acc, T><<<blocks, gradr::REDUCE_THREADS, 0, stream>>>(a, splits, ws);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace loraxs
