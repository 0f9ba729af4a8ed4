// The fp32 / fp64 GEMM: the same contract as gemm_mma.cuh (C = alpha·(P1 Q1ᵀ + P2 Q2ᵀ) + bias) on
// CUDA cores, in the input precision. No TF32: torch leaves allow_tf32 off for matmuls by default,
// so nn.Linear in fp32 is a true fp32 GEMM, and so is this one (fp32 results match the fp32 reference
// to 1e-5). A plain 64×64×16 tile, 256 threads, 4×4 outputs each: correctness and any strides first;
// fp32/fp64 is not the regime this backend is tuned for.
#pragma once

#include "common.cuh"

namespace loraxs {
namespace cuda {

namespace simt {
constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;
}

// Tile ROWS × BK of an operand into s[BK][ROWS+1]; k-fastest thread order when k is the contiguous
// dimension (coalesced), rows-fastest otherwise.
template <typename T, int ROWS>
__device__ __forceinline__ void simt_load(T (*s)[ROWS + 1], const T* g, int64_t s_row, int64_t s_k, int64_t nrows,
                                          int64_t K, int64_t row0, int64_t k0, int tid) {
  const bool k_fast = s_k == 1;
#pragma unroll
  for (int i = 0; i < ROWS * simt::BK / simt::THREADS; ++i) {
    const int e = tid + i * simt::THREADS;
    const int r = k_fast ? e / simt::BK : e % ROWS;
    const int k = k_fast ? e % simt::BK : e / ROWS;
    const int64_t gr = row0 + r, gk = k0 + k;
    s[k][r] = (gr < nrows && gk < K) ? g[gr * s_row + gk * s_k] : T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(simt::THREADS) gemm_simt_kernel(const GemmArgs a) {
  using simt::BK;
  using simt::BM;
  using simt::BN;
  __shared__ T sP[BK][BM + 1];
  __shared__ T sQ[BK][BN + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  // Thread (ty, tx) owns rows m0 + ty + 16i and columns n0 + tx + 16j (i, j < 4): consecutive
  // threads read consecutive sQ entries, and a warp's two ty values broadcast sP.
  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);

  for (int seg = 0; seg < 2; ++seg) {
    const Operand& P = seg == 0 ? a.P1 : a.P2;
    const Operand& Q = seg == 0 ? a.Q1 : a.Q2;
    const int64_t K = seg == 0 ? a.K1 : a.K2;
    for (int64_t k0 = 0; k0 < K; k0 += BK) {
      simt_load<T, BM>(sP, static_cast<const T*>(P.ptr), P.s_row, P.s_k, a.M, K, m0, k0, tid);
      simt_load<T, BN>(sQ, static_cast<const T*>(Q.ptr), Q.s_row, Q.s_k, a.N, K, n0, k0, tid);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < BK; ++k) {
        T pv[4], qv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) pv[i] = sP[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) qv[j] = sQ[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(pv[i], qv[j], acc[i][j]);
      }
      __syncthreads();  // the next tile overwrites sP/sQ
    }
  }

  const T alpha = static_cast<T>(a.alpha);
  const T* bias = static_cast<const T*>(a.bias);
  T* C = static_cast<T*>(a.C);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + tx + 16 * j;
    if (n >= a.N) continue;
    const T b = bias ? bias[n] : T(0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m < a.M) C[m * a.s_cm + n * a.s_cn] = alpha * acc[i][j] + b;
    }
  }
}

template <typename T>
cudaError_t launch_gemm_simt(const GemmArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.N <= 0) return cudaSuccess;
  const int64_t gm = ceil_div(a.M, simt::BM), gn = ceil_div(a.N, simt::BN);
  if (gm > 0x7fffffff || gn > 65535) return cudaErrorInvalidConfiguration;
  gemm_simt_kernel<T><<<dim3(static_cast<unsigned>(gm), static_cast<unsigned>(gn)), simt::THREADS, 0, stream>>>(a);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace loraxs
