// The decoding path (M <= 16 rows, half / bfloat16): y = x Wᵀ + b + s·((x A) R) B and xa = x A.
//
// At M <= 16 the layer is a stream over W (out×in): every W element is used M times, far too few
// to be compute-bound, so the goal is to read W once at full bandwidth and fold everything else
// (the rank-r term, the bias, the split reduction) into work that is small next to that stream.
// Two kernels, no atomics, every sum in a fixed order (bitwise deterministic run to run):
//
// 1. decode_partial_kernel, grid (W blocks + xa blocks, splits). K (= in) is cut into chunks of 64
//    and the chunks into `splits` contiguous ranges, one per grid row j.
//    - A W block owns 64 rows of W (64 outputs). Each of its 4 warps takes every 4th chunk of the
//      range and runs mma.sync m16n8k16 on 8 n-tiles of 8 rows: x (M rows, zero-padded to 16) is the
//      A operand, W rows the B operand, both read straight from global memory with 16-byte loads,
//      no shared memory. That works because a dot product may visit k in any order: lane (g, t)
//      loads the 16 elements k ∈ {8t..8t+7} ∪ {32+8t..32+8t+7} of the chunk, for its x rows g, g+8
//      and its W rows g (+8·nt), and feeds word 2s / 2s+1 of them as the fragment halves the mma
//      calls "k = 2t, 2t+1" / "k = 2t+8, 2t+9" in step s. x and W use the same lane-local order,
//      so each of the 4 steps pairs equal k, and the 4 steps cover the chunk's 64 k exactly once.
//      Each warp-wide W load reads 64 contiguous bytes of 8 rows: whole 32-byte sectors.
//      W is read with ld.global.cs (evict-first): it is read once; x (reused by every block) stays cached.
//      The 4 warp partials are summed in shared memory in warp order and stored as fp32
//      part_y[j][m][n].
//    - An xa block owns 32 columns of A (one per lane) and computes part_xa[j][m][c] = Σ_k x[m,k]
//      A[k,c] over the same k range on CUDA cores (x A is r/out of the W work: small).
// 2. decode_epilogue_kernel, one CTA per 64 outputs: xa = Σ_j part_xa[j] (in j order, rounded to
//    the layer's dtype: this is the xa the backward reads; CTA 0 writes it out), t = s·xa·R in fp32
//    with R rounded to the layer's dtype, then y = Σ_j part_y[j] + t B + b, rounded once.
//    Many adapters in one batch (DecodeArgs::ids set): row m takes R[ids[m]] of a bank and its own
//    scaling; a row with id -1 gets no low-rank term (y = Σ_j part_y[j] + b).
//    On sm_90 it is launched with programmatic dependent launch, so its launch overlaps kernel 1's
//    tail; it waits (griddepcontrol.wait) before touching anything kernel 1 wrote.
#pragma once

#include "adapters.cuh"
#include "common.cuh"

namespace loraxs {
namespace cuda {

namespace decode {
constexpr int THREADS = 128, WARPS = 4;
constexpr int W_ROWS = 64;   // W rows (outputs) per W block: 8 n-tiles per warp
constexpr int KCHUNK = 64;   // k per warp step
constexpr int A_COLS = 32;   // A columns per xa block: one per lane
constexpr int MAXM = 16;     // rows of x: the mma's 16
constexpr int RED_LD = 68;   // reduction row stride (floats): 64 + 4 spreads the fragment stores over banks
constexpr int EPI_THREADS = 256, EPI_COLS = 64, MAXR = 256;
}  // namespace decode

struct DecodeParams {
  DecodeArgs a;
  int splits;
  int64_t chunks_per_split;  // KCHUNK-chunks per grid row
  int64_t w_blocks;          // ceil(N / W_ROWS)
  float* part_y;             // [splits][M][N]
  float* part_xa;            // [splits][M][r]
};

// Offset, within a 64-k chunk, of the first element of word q (of 8) held by a lane with t = lane % 4.
__device__ __forceinline__ int decode_word_k(int q, int t) { return (q < 4 ? 8 * t : 32 + 8 * t) + 2 * (q & 3); }

// The lane's 16 elements of one row of a full chunk: two 16-byte loads (k0 + 8t and k0 + 32 + 8t).
template <bool STREAM>
__device__ __forceinline__ void decode_load_row(uint32_t (&w)[8], const uint16_t* chunk_row, int t) {
  const int4* p0 = reinterpret_cast<const int4*>(chunk_row + 8 * t);
  const int4* p1 = reinterpret_cast<const int4*>(chunk_row + 32 + 8 * t);
  const int4 v0 = STREAM ? __ldcs(p0) : __ldg(p0);
  const int4 v1 = STREAM ? __ldcs(p1) : __ldg(p1);
  w[0] = v0.x, w[1] = v0.y, w[2] = v0.z, w[3] = v0.w;
  w[4] = v1.x, w[5] = v1.y, w[6] = v1.z, w[7] = v1.w;
}
// The same for the last, partial chunk: element by element, zeros at k >= K.
__device__ __forceinline__ void decode_load_row_tail(uint32_t (&w)[8], const uint16_t* chunk_row, int64_t k_left,
                                                     int t) {
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const int k = decode_word_k(q, t);
    const uint32_t lo = k < k_left ? chunk_row[k] : 0u;
    const uint32_t hi = k + 1 < k_left ? chunk_row[k + 1] : 0u;
    w[q] = lo | (hi << 16);
  }
}

template <typename T>
__device__ __forceinline__ float half_bits_to_float(uint32_t bits16);
template <>
__device__ __forceinline__ float half_bits_to_float<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(uint32_t b) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
}

template <typename T>
__global__ void __launch_bounds__(decode::THREADS) decode_partial_kernel(const DecodeParams p) {
  using namespace decode;
  __shared__ float red[WARPS][MAXM][RED_LD];
  // Let the epilogue kernel (PDL) start launching now; it waits for this grid before reading.
  pdl_launch_dependents();

  const DecodeArgs& a = p.a;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int M = static_cast<int>(a.M);
  const int64_t j = blockIdx.y;
  const int64_t nchunks = ceil_div(a.K, KCHUNK);
  const int64_t c_begin = j * p.chunks_per_split;
  const int64_t c_end = c_begin + p.chunks_per_split < nchunks ? c_begin + p.chunks_per_split : nchunks;
  const uint16_t* x = static_cast<const uint16_t*>(a.x);

  if (static_cast<int64_t>(blockIdx.x) < p.w_blocks) {
    // ---------------------------------------------------------------- W block: 64 outputs
    const uint16_t* W = static_cast<const uint16_t*>(a.W);
    const int64_t nb0 = static_cast<int64_t>(blockIdx.x) * W_ROWS;
    const bool has_g = g < M, has_g8 = g + 8 < M;
    const uint16_t* xg = x + (has_g ? g : 0) * a.s_x;
    const uint16_t* xg8 = x + (has_g8 ? g + 8 : 0) * a.s_x;

    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

    for (int64_t c = c_begin + warp; c < c_end; c += WARPS) {
      const int64_t k0 = c * KCHUNK;
      const int64_t k_left = a.K - k0;  // > 0
      uint32_t xw[8], xw8[8], ww[8][8];
      if (k_left >= KCHUNK) {
#pragma unroll
        for (int q = 0; q < 8; ++q) xw[q] = xw8[q] = 0u;
        if (has_g) decode_load_row<false>(xw, xg + k0, t);
        if (has_g8) decode_load_row<false>(xw8, xg8 + k0, t);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int64_t n = nb0 + nt * 8 + g;
          if (n < a.N) {
            decode_load_row<true>(ww[nt], W + n * a.s_w + k0, t);
          } else {
#pragma unroll
            for (int q = 0; q < 8; ++q) ww[nt][q] = 0u;
          }
        }
      } else {
#pragma unroll
        for (int q = 0; q < 8; ++q) xw[q] = xw8[q] = 0u;
        if (has_g) decode_load_row_tail(xw, xg + k0, k_left, t);
        if (has_g8) decode_load_row_tail(xw8, xg8 + k0, k_left, t);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int64_t n = nb0 + nt * 8 + g;
          if (n < a.N) {
            decode_load_row_tail(ww[nt], W + n * a.s_w + k0, k_left, t);
          } else {
#pragma unroll
            for (int q = 0; q < 8; ++q) ww[nt][q] = 0u;
          }
        }
      }
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t af[4] = {xw[2 * s], xw8[2 * s], xw[2 * s + 1], xw8[2 * s + 1]};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const uint32_t bf[2] = {ww[nt][2 * s], ww[nt][2 * s + 1]};
          mma_16816<T>(acc[nt], af, bf);
        }
      }
    }
    // acc[nt]: rows g and g+8 (m), columns nt*8 + 2t, +1 (n within the block).
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      red[warp][g][nt * 8 + 2 * t] = acc[nt][0];
      red[warp][g][nt * 8 + 2 * t + 1] = acc[nt][1];
      red[warp][g + 8][nt * 8 + 2 * t] = acc[nt][2];
      red[warp][g + 8][nt * 8 + 2 * t + 1] = acc[nt][3];
    }
    __syncthreads();
    for (int e = tid; e < MAXM * W_ROWS; e += THREADS) {
      const int m = e / W_ROWS, nn = e % W_ROWS;
      const int64_t n = nb0 + nn;
      if (m < M && n < a.N) {
        p.part_y[(j * M + m) * a.N + n] = ((red[0][m][nn] + red[1][m][nn]) + red[2][m][nn]) + red[3][m][nn];
      }
    }
  } else {
    // ---------------------------------------------------------------- xa block: 32 columns of A
    const T* A = static_cast<const T*>(a.A);
    const int64_t col = (static_cast<int64_t>(blockIdx.x) - p.w_blocks) * A_COLS + lane;
    const bool col_ok = col < a.r;
    const int64_t k_begin = c_begin * KCHUNK;
    const int64_t k_end = c_end * KCHUNK < a.K ? c_end * KCHUNK : a.K;
    float acc[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
    // Warps take groups of 8 consecutive k (8-aligned, so one 16-byte load of x covers a group).
    for (int64_t k8 = k_begin + 8 * warp; k8 < k_end; k8 += 8 * WARPS) {
      float av[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int64_t k = k8 + e;
        av[e] = (col_ok && k < k_end) ? Num<T>::to_acc(A[k * a.s_a0 + col * a.s_a1]) : 0.f;
      }
      const bool full = k8 + 8 <= k_end;
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m >= M) break;
        const uint16_t* xr = x + m * a.s_x + k8;
        float xv[8];
        if (full) {
          const int4 v = __ldg(reinterpret_cast<const int4*>(xr));  // same address across the warp
          const uint32_t w4[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                                  static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            xv[2 * q] = half_bits_to_float<T>(w4[q] & 0xffffu);
            xv[2 * q + 1] = half_bits_to_float<T>(w4[q] >> 16);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) xv[e] = k8 + e < k_end ? half_bits_to_float<T>(xr[e]) : 0.f;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m] = fmaf(xv[e], av[e], acc[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m) red[warp][m][lane] = acc[m];
    __syncthreads();
    for (int e = tid; e < MAXM * A_COLS; e += THREADS) {
      const int m = e / A_COLS, cc = e % A_COLS;
      const int64_t c = (static_cast<int64_t>(blockIdx.x) - p.w_blocks) * A_COLS + cc;
      if (m < M && c < a.r) {
        p.part_xa[(j * M + m) * a.r + c] = ((red[0][m][cc] + red[1][m][cc]) + red[2][m][cc]) + red[3][m][cc];
      }
    }
  }
}

template <typename T, typename RT>
__global__ void __launch_bounds__(decode::EPI_THREADS) decode_epilogue_kernel(const DecodeParams p) {
  using namespace decode;
  __shared__ float s_xa[MAXM * MAXR];
  __shared__ float s_t[MAXM * MAXR];
  __shared__ int64_t s_id[MAXM];  // each row's adapter: 0 for the single-adapter layer, -1 for none
  pdl_wait_primary();  // everything below reads what decode_partial_kernel wrote

  const DecodeArgs& a = p.a;
  const int tid = threadIdx.x;
  const int M = static_cast<int>(a.M), r = static_cast<int>(a.r), S = p.splits;
  if (tid < M) s_id[tid] = a.ids ? adapter_of(a.ids, a.ids_type, tid) : 0;
  T* xa_out = static_cast<T*>(a.xa);
  for (int e = tid; e < M * r; e += EPI_THREADS) {
    const int m = e / r, c = e % r;
    float s = 0.f;
    for (int j = 0; j < S; ++j) s += p.part_xa[(static_cast<int64_t>(j) * M + m) * r + c];
    const T v = Num<T>::from_acc(s);
    s_xa[e] = Num<T>::to_acc(v);
    if (blockIdx.x == 0) xa_out[e] = v;  // xa is (M, r) contiguous: e = m·r + c
  }
  __syncthreads();
  for (int e = tid; e < M * r; e += EPI_THREADS) {
    const int m = e / r, c2 = e % r;
    const int64_t id = s_id[m];
    if (id < 0) continue;  // s_t of this row is never read
    const RT* R = static_cast<const RT*>(a.R) + id * a.s_rn;
    float s = 0.f;
    for (int c = 0; c < r; ++c) s = fmaf(s_xa[m * r + c], rounded_to<T, RT>(R[c * a.s_r0 + c2 * a.s_r1]), s);
    s_t[e] = static_cast<float>(adapter_scaling_of(a.scaling, a.adapter_scale, id)) * s;
  }
  __syncthreads();
  const T* B = static_cast<const T*>(a.B);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * EPI_COLS;
  for (int e = tid; e < M * EPI_COLS; e += EPI_THREADS) {
    const int m = e / EPI_COLS;
    const int64_t n = n_base + e % EPI_COLS;
    if (n >= a.N) continue;
    float base = 0.f;
    for (int j = 0; j < S; ++j) base += p.part_y[(static_cast<int64_t>(j) * M + m) * a.N + n];
    float low = 0.f;
    if (s_id[m] >= 0) {
      for (int c = 0; c < r; ++c) low = fmaf(s_t[m * r + c], Num<T>::to_acc(B[c * a.s_b0 + n * a.s_b1]), low);
    }
    float v = base + low;
    if (bias) v += Num<T>::to_acc(bias[n]);
    y[m * a.N + n] = Num<T>::from_acc(v);
  }
}

template <typename T, typename RT>
cudaError_t launch_decode_epilogue(const DecodeParams& p, bool pdl, cudaStream_t stream) {
  const int64_t blocks = p.a.N > 0 ? ceil_div(p.a.N, decode::EPI_COLS) : 1;  // CTA 0 always writes xa
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (!pdl) {
    decode_epilogue_kernel<T, RT><<<static_cast<unsigned>(blocks), decode::EPI_THREADS, 0, stream>>>(p);
    return cudaSuccess;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(decode::EPI_THREADS);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, decode_epilogue_kernel<T, RT>, p);
}

inline DecodeParams make_decode_params(const DecodeArgs& a, int splits, float* workspace) {
  DecodeParams p;
  p.a = a;
  p.splits = splits;
  p.chunks_per_split = ceil_div(ceil_div(a.K, decode::KCHUNK), splits);
  p.w_blocks = ceil_div(a.N, decode::W_ROWS);
  p.part_y = workspace;
  p.part_xa = workspace + static_cast<int64_t>(splits) * a.M * a.N;
  return p;
}

template <typename T>
cudaError_t launch_decode_partial(const DecodeArgs& a, int splits, float* workspace, cudaStream_t stream) {
  const DecodeParams p = make_decode_params(a, splits, workspace);
  const int64_t blocks_x = p.w_blocks + ceil_div(a.r, decode::A_COLS);
  if (blocks_x > 0x7fffffff || splits < 1 || splits > 65535) return cudaErrorInvalidConfiguration;
  decode_partial_kernel<T><<<dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(splits)), decode::THREADS,
                             0, stream>>>(p);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_decode_epilogue(const DecodeArgs& a, int splits, float* workspace, bool pdl, cudaStream_t stream) {
  const DecodeParams p = make_decode_params(a, splits, workspace);
  return a.r_dtype == DType::kFloat ? launch_decode_epilogue<T, float>(p, pdl, stream)
                                    : launch_decode_epilogue<T, T>(p, pdl, stream);
}

}  // namespace cuda
}  // namespace loraxs
