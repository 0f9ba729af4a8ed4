// Tiled tensor-core GEMM with the rank-r term as extra K steps (half / bfloat16, fp32 accumulation):
//
//     C = alpha · (P1 Q1ᵀ + P2 Q2ᵀ) + bias          (launch.h: GemmArgs)
//
// Forward:  y = [x | t] [W | Bᵀ]ᵀ + b  with t = s·(x A) R  (M×r), so the rank-r term costs r/in
// more MMA steps in the same pass and y is written once. Backward: grad_x = [g | v] [Wᵀ | A]ᵀ with
// v = s·(g Bᵀ) Rᵀ. The same kernel computes the thin products (x A, t, g Bᵀ, v) with K2 = 0.
//
// Tile: BM×BN per CTA, BK = 32, a cp.async pipeline of STAGES buffers, warps of WM×WN doing
// mma.sync.m16n8k16 fed by ldmatrix. Shared tiles (16-bit elements):
//   P:               [BM][BK+8]   (k contiguous; ldmatrix)
//   Q k-contiguous:  [BN][BK+8]   (unit stride along k: W in y, B in u = g Bᵀ, A in grad_x; ldmatrix)
//   Q n-contiguous:  [BK][BN+8]   (unit stride along n: W in grad_x, B in y, A in x A; ldmatrix.trans)
// The +8 padding makes each row 80 or 144 bytes, so the 8 row addresses of one ldmatrix phase fall
// in 8 distinct 16-byte bank groups (no conflicts) and every row stays 16-byte aligned for cp.async.
#pragma once

#include "common.cuh"

namespace loraxs {
namespace cuda {

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct MmaCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 32, STAGES = STAGES_, PAD = 8;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MT = WM / 16, NT = WN / 8;             // mma tiles per warp
  static constexpr int LDP = BK + PAD, LDQK = BK + PAD, LDQN = BN + PAD;
  static constexpr int P_ELEMS = BM * LDP;
  static constexpr int Q_ELEMS = (BN * LDQK > BK * LDQN) ? BN * LDQK : BK * LDQN;
  static constexpr int STAGE_ELEMS = P_ELEMS + Q_ELEMS;
  static constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be whole 16x16 ldmatrix blocks");
  static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory is capped at 48 KiB without opt-in");
};
// 128×64, 4 warps of 64×32, 3 stages: 45 KiB of static shared memory. For large M.
using MmaCfgLarge = MmaCfg<128, 64, 2, 2, 3>;
// 64×64, 4 warps of 32×32, 3 stages: 30 KiB. Twice the CTAs when the large tile leaves SMs idle.
using MmaCfgSmall = MmaCfg<64, 64, 2, 2, 3>;

struct MmaParams {
  GemmArgs a;
  bool vec_p1, vec_q1, vec_p2, vec_q2;  // 16-byte async copies allowed for that operand
  bool pair_c;                          // C rows take aligned 2-element stores
};

// Tile of `ROWS` rows × BK k into smem[ROWS][BK+PAD] (k contiguous). Element (row, k) of the
// operand is g[row * s_row + k * s_k]; rows >= nrows and k >= K become zeros.
template <int ROWS, int BK, int PAD, int THREADS>
__device__ __forceinline__ void load_tile_k_contig(uint16_t* sm, const uint16_t* g, int64_t s_row, int64_t s_k,
                                                 int64_t nrows, int64_t K, int64_t row0, int64_t k0, bool vec,
                                                 int tid) {
  constexpr int LD = BK + PAD;
  if (vec) {  // s_k == 1, rows 16-byte aligned: 8 elements per cp.async
    constexpr int PER_ROW = BK / 8, CHUNKS = ROWS * PER_ROW;
    static_assert(CHUNKS % THREADS == 0, "tile chunks must split evenly over the threads");
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
      const int c = tid + i * THREADS;
      const int r = c / PER_ROW, kc = (c % PER_ROW) * 8;
      const int64_t gr = row0 + r, gk = k0 + kc;
      const uint16_t* src = g;  // any valid address when nothing is read
      int bytes = 0;
      if (gr < nrows && gk < K) {
        bytes = static_cast<int>(K - gk < 8 ? K - gk : 8) * 2;
        src = g + gr * s_row + gk;
      }
      cp_async_16(sm + r * LD + kc, src, bytes);
    }
  } else {  // any strides: one element per load, k fastest across threads
    for (int e = tid; e < ROWS * BK; e += THREADS) {
      const int r = e / BK, k = e % BK;
      const int64_t gr = row0 + r, gk = k0 + k;
      sm[r * LD + k] = (gr < nrows && gk < K) ? g[gr * s_row + gk * s_k] : uint16_t(0);
    }
  }
}

// Tile of ROWS rows × BK k into smem[BK][ROWS+PAD] (rows contiguous), for a transposed weight.
template <int ROWS, int BK, int PAD, int THREADS>
__device__ __forceinline__ void load_tile_n_contig(uint16_t* sm, const uint16_t* g, int64_t s_row, int64_t s_k,
                                                 int64_t nrows, int64_t K, int64_t row0, int64_t k0, bool vec,
                                                 int tid) {
  constexpr int LD = ROWS + PAD;
  if (vec) {  // s_row == 1, k-lines 16-byte aligned
    constexpr int PER_K = ROWS / 8, CHUNKS = BK * PER_K;
    static_assert(CHUNKS % THREADS == 0, "tile chunks must split evenly over the threads");
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
      const int c = tid + i * THREADS;
      const int k = c / PER_K, rc = (c % PER_K) * 8;
      const int64_t gk = k0 + k, gr = row0 + rc;
      const uint16_t* src = g;
      int bytes = 0;
      if (gk < K && gr < nrows) {
        bytes = static_cast<int>(nrows - gr < 8 ? nrows - gr : 8) * 2;
        src = g + gk * s_k + gr;
      }
      cp_async_16(sm + k * LD + rc, src, bytes);
    }
  } else {  // rows fastest across threads
    for (int e = tid; e < ROWS * BK; e += THREADS) {
      const int k = e / ROWS, r = e % ROWS;
      const int64_t gr = row0 + r, gk = k0 + k;
      sm[k * LD + r] = (gr < nrows && gk < K) ? g[gr * s_row + gk * s_k] : uint16_t(0);
    }
  }
}

// One BK slice of the warp's MT×NT mma tiles from one pipeline stage.
//   P fragment (ldmatrix.x4): lane l gives the address of row (l % 16), k offset 8·(l / 16); the four
//     8×8 matrices come back as a[0..3] in the mma order (rows 0-7|8-15 × k 0-7|8-15).
//   Q k-contiguous (ldmatrix.x4): lane l → row n = (l % 8) + 8·(l / 16), k offset 8·((l / 8) % 2);
//     registers: b0, b1 of n-tile 2np, then b0, b1 of n-tile 2np+1.
//   Q n-contiguous (ldmatrix.x4.trans): lane l → k row (l % 8) + 8·((l / 8) % 2), n offset 8·(l / 16);
//     .trans hands each thread the pair (k = 2t, 2t+1) at column n = g: the same b0, b1 order.
template <typename T, class Cfg, bool Q_K_CONTIG>
__device__ __forceinline__ void mma_stage(const uint16_t* sP, const uint16_t* sQ, float (&acc)[Cfg::MT][Cfg::NT][4],
                                          int warp_m, int warp_n, int lane) {
#pragma unroll
  for (int kk = 0; kk < Cfg::BK; kk += 16) {
    uint32_t a[Cfg::MT][4];
    uint32_t b[Cfg::NT][2];
#pragma unroll
    for (int mt = 0; mt < Cfg::MT; ++mt) {
      const int row = warp_m * Cfg::WM + mt * 16 + (lane & 15);
      const int col = kk + (lane >> 4) * 8;
      ldmatrix_x4(a[mt], sP + row * Cfg::LDP + col);
    }
#pragma unroll
    for (int np = 0; np < Cfg::NT / 2; ++np) {
      uint32_t r[4];
      if (Q_K_CONTIG) {
        const int row = warp_n * Cfg::WN + np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int col = kk + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(r, sQ + row * Cfg::LDQK + col);
      } else {
        const int row = kk + (lane & 7) + (((lane >> 3) & 1) << 3);
        const int col = warp_n * Cfg::WN + np * 16 + ((lane >> 4) << 3);
        ldmatrix_x4_trans(r, sQ + row * Cfg::LDQN + col);
      }
      b[2 * np][0] = r[0];
      b[2 * np][1] = r[1];
      b[2 * np + 1][0] = r[2];
      b[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mt = 0; mt < Cfg::MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < Cfg::NT; ++nt) mma_16816<T>(acc[mt][nt], a[mt], b[nt]);
    }
  }
}

template <typename T, class Cfg, bool Q1_K_CONTIG, bool Q2_K_CONTIG>
__global__ void __launch_bounds__(Cfg::THREADS) gemm_mma_kernel(const MmaParams p) {
  __shared__ __align__(128) uint16_t smem[Cfg::STAGES * Cfg::STAGE_ELEMS];
  const GemmArgs& a = p.a;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  // M tiles on x (up to 2^31-1 of them), N tiles on y (the launcher checks the 65535 limit).
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * Cfg::BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * Cfg::BN;
  const int kt1 = static_cast<int>(ceil_div(a.K1, Cfg::BK));
  const int ktiles = kt1 + static_cast<int>(ceil_div(a.K2, Cfg::BK));

  const uint16_t* P1 = static_cast<const uint16_t*>(a.P1.ptr);
  const uint16_t* Q1 = static_cast<const uint16_t*>(a.Q1.ptr);
  const uint16_t* P2 = static_cast<const uint16_t*>(a.P2.ptr);
  const uint16_t* Q2 = static_cast<const uint16_t*>(a.Q2.ptr);

  // Tile kt of the concatenated reduction: tiles [0, kt1) read segment 1, the rest segment 2.
  auto load_stage = [&](int kt, int stage) {
    uint16_t* sP = smem + stage * Cfg::STAGE_ELEMS;
    uint16_t* sQ = sP + Cfg::P_ELEMS;
    if (kt < kt1) {
      const int64_t k0 = static_cast<int64_t>(kt) * Cfg::BK;
      load_tile_k_contig<Cfg::BM, Cfg::BK, Cfg::PAD, Cfg::THREADS>(sP, P1, a.P1.s_row, a.P1.s_k, a.M, a.K1, m0, k0,
                                                                 p.vec_p1, tid);
      if (Q1_K_CONTIG)
        load_tile_k_contig<Cfg::BN, Cfg::BK, Cfg::PAD, Cfg::THREADS>(sQ, Q1, a.Q1.s_row, a.Q1.s_k, a.N, a.K1, n0, k0,
                                                                   p.vec_q1, tid);
      else
        load_tile_n_contig<Cfg::BN, Cfg::BK, Cfg::PAD, Cfg::THREADS>(sQ, Q1, a.Q1.s_row, a.Q1.s_k, a.N, a.K1, n0, k0,
                                                                   p.vec_q1, tid);
    } else {
      const int64_t k0 = static_cast<int64_t>(kt - kt1) * Cfg::BK;
      load_tile_k_contig<Cfg::BM, Cfg::BK, Cfg::PAD, Cfg::THREADS>(sP, P2, a.P2.s_row, a.P2.s_k, a.M, a.K2, m0, k0,
                                                                 p.vec_p2, tid);
      if (Q2_K_CONTIG)
        load_tile_k_contig<Cfg::BN, Cfg::BK, Cfg::PAD, Cfg::THREADS>(sQ, Q2, a.Q2.s_row, a.Q2.s_k, a.N, a.K2, n0, k0,
                                                                   p.vec_q2, tid);
      else
        load_tile_n_contig<Cfg::BN, Cfg::BK, Cfg::PAD, Cfg::THREADS>(sQ, Q2, a.Q2.s_row, a.Q2.s_k, a.N, a.K2, n0, k0,
                                                                   p.vec_q2, tid);
    }
  };

  float acc[Cfg::MT][Cfg::NT][4];
#pragma unroll
  for (int mt = 0; mt < Cfg::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Cfg::NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  // Pipeline: tile kt sits in stage kt % STAGES. One commit group per tile (empty groups past the
  // end keep the count uniform), so at iteration kt, wait_group<STAGES-2> leaves only tiles after
  // kt in flight; the barrier then publishes tile kt to all threads and also guarantees every warp
  // has finished tile kt-1, whose stage the prefetch of tile kt+STAGES-1 overwrites.
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();
    const int pf = kt + Cfg::STAGES - 1;
    if (pf < ktiles) load_stage(pf, pf % Cfg::STAGES);
    cp_async_commit();
    const uint16_t* sP = smem + (kt % Cfg::STAGES) * Cfg::STAGE_ELEMS;
    const uint16_t* sQ = sP + Cfg::P_ELEMS;
    if (kt < kt1)
      mma_stage<T, Cfg, Q1_K_CONTIG>(sP, sQ, acc, warp_m, warp_n, lane);
    else
      mma_stage<T, Cfg, Q2_K_CONTIG>(sP, sQ, acc, warp_m, warp_n, lane);
  }
  cp_async_wait<0>();

  // Epilogue straight from the accumulators: C[m][n] = alpha·acc + bias[n], rounded once.
  const float alpha = static_cast<float>(a.alpha);
  const T* bias = static_cast<const T*>(a.bias);
  T* C = static_cast<T*>(a.C);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < Cfg::MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < Cfg::NT; ++nt) {
      const int64_t n = n0 + warp_n * Cfg::WN + nt * 8 + 2 * t;  // even
      if (n >= a.N) continue;
      const bool has1 = n + 1 < a.N;
      const float b0 = bias ? Num<T>::to_acc(bias[n]) : 0.f;
      const float b1 = (bias && has1) ? Num<T>::to_acc(bias[n + 1]) : 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + warp_m * Cfg::WM + mt * 16 + g + 8 * h;
        if (m >= a.M) continue;
        const T v0 = Num<T>::from_acc(alpha * acc[mt][nt][2 * h] + b0);
        const T v1 = Num<T>::from_acc(alpha * acc[mt][nt][2 * h + 1] + b1);
        T* dst = C + m * a.s_cm + n * a.s_cn;
        if (p.pair_c && has1) {
          // s_cn == 1, s_cm even and C 4-byte aligned (host-checked); n is even: one 4-byte store.
          struct alignas(4) Pair { T lo, hi; };
          *reinterpret_cast<Pair*>(dst) = Pair{v0, v1};
        } else {
          dst[0] = v0;
          if (has1) dst[a.s_cn] = v1;
        }
      }
    }
  }
}

template <typename T, class Cfg, bool Q1_K_CONTIG, bool Q2_K_CONTIG>
cudaError_t launch_gemm_mma_cfg(const MmaParams& p, cudaStream_t stream) {
  const int64_t gm = ceil_div(p.a.M, Cfg::BM), gn = ceil_div(p.a.N, Cfg::BN);
  if (gm > 0x7fffffff || gn > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(gm), static_cast<unsigned>(gn));
  gemm_mma_kernel<T, Cfg, Q1_K_CONTIG, Q2_K_CONTIG><<<grid, Cfg::THREADS, 0, stream>>>(p);
  return cudaSuccess;
}

// Host side: pick the tile, check the grid limits, launch.
template <typename T, bool Q1_K_CONTIG, bool Q2_K_CONTIG>
cudaError_t launch_gemm_mma(const GemmArgs& a, int num_sms, cudaStream_t stream) {
  MmaParams p;
  p.a = a;
  p.vec_p1 = rows_along_k_vectorizable(a.P1, 2);
  p.vec_q1 = Q1_K_CONTIG ? rows_along_k_vectorizable(a.Q1, 2) : rows_along_n_vectorizable(a.Q1, 2);
  p.vec_p2 = a.K2 > 0 && rows_along_k_vectorizable(a.P2, 2);
  p.vec_q2 = a.K2 > 0 && (Q2_K_CONTIG ? rows_along_k_vectorizable(a.Q2, 2) : rows_along_n_vectorizable(a.Q2, 2));
  p.pair_c = a.s_cn == 1 && a.s_cm % 2 == 0 && (reinterpret_cast<uintptr_t>(a.C) & 3u) == 0;
  if (a.M <= 0 || a.N <= 0) return cudaSuccess;
  // The large tile when it still gives every SM at least one CTA; else the small one (x A, g Bᵀ and
  // modest M), which doubles the CTA count.
  if (ceil_div(a.M, MmaCfgLarge::BM) * ceil_div(a.N, MmaCfgLarge::BN) >= num_sms)
    return launch_gemm_mma_cfg<T, MmaCfgLarge, Q1_K_CONTIG, Q2_K_CONTIG>(p, stream);
  return launch_gemm_mma_cfg<T, MmaCfgSmall, Q1_K_CONTIG, Q2_K_CONTIG>(p, stream);
}

}  // namespace cuda
}  // namespace loraxs
