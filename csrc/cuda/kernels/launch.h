// The torch-free interface of the CUDA kernels: plain pointers, int64 strides and a cudaStream_t.
//
// The binding (csrc/cuda/linear_cuda.cpp) includes only this header, so it compiles with the host
// compiler alone; the kernels live in kernels/*.cuh and are instantiated in csrc/cuda/*.cu, which
// include no torch header (nvcc then parses no ATen, and the .cu files build in parallel).
//
// Every launcher only enqueues work; it returns the error of a CUDA API call it made (an attribute
// or cudaLaunchKernelEx), else cudaSuccess. The caller checks cudaGetLastError() after each launcher
// (C10_CUDA_KERNEL_LAUNCH_CHECK in the binding) for errors of <<<>>> launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace loraxs {
namespace cuda {

enum class DType : int { kHalf, kBFloat16, kFloat, kDouble };

// One matrix operand seen as rows × k: element (row, k) sits at ptr[row * s_row + k * s_k].
// A transposed view is the same pointer with the strides swapped; nothing is copied.
struct Operand {
  const void* ptr = nullptr;
  int64_t s_row = 0;
  int64_t s_k = 0;
};

// C (M×N) = alpha · (P1 Q1ᵀ + P2 Q2ᵀ) + bias, with P1 (M×K1), Q1 (N×K1), P2 (M×K2), Q2 (N×K2).
// The second product is the rank-r term of the layer, run as K2 = r extra steps of the same
// reduction (K2 = 0: none). bias is (N,) contiguous or null. Accumulation is fp32 (fp64 for fp64).
struct GemmArgs {
  int64_t M = 0, N = 0, K1 = 0, K2 = 0;
  Operand P1, Q1, P2, Q2;
  void* C = nullptr;
  int64_t s_cm = 0, s_cn = 0;
  const void* bias = nullptr;
  double alpha = 1.0;
};

// Which of Q1/Q2 has unit stride along k (a weight used as is) and which along its rows, n (a
// transposed view of a weight). The half-precision kernels stage each Q tile in shared memory in
// that order, so 16-byte async copies work, and read it back with ldmatrix or ldmatrix.trans. Any
// strides still work in either order (an element-wise tile copy takes over), only slower.
//   kQ1KContig_Q2NContig:  y = x Wᵀ + t B     (Q1 = W,  Q2 = Bᵀ);  u = g Bᵀ (Q1 = B);  v = s·u Rᵀ (Q1 = R)
//   kQ1NContig_Q2KContig:  grad_x = g W + v Aᵀ (Q1 = Wᵀ, Q2 = A);  xa = x A (Q1 = Aᵀ);  t = s·xa R (Q1 = Rᵀ)
enum class QOrder : int { kQ1KContig_Q2NContig, kQ1NContig_Q2KContig };

// Tensor cores (mma.sync m16n8k16) for half/bfloat16, SIMT for float/double.
cudaError_t gemm(DType dt, const GemmArgs& args, QOrder order, int num_sms, cudaStream_t stream);

namespace detail {  // one per .cu file, so the instantiations compile in parallel
cudaError_t gemm_half(const GemmArgs& args, QOrder order, int num_sms, cudaStream_t stream);
cudaError_t gemm_bfloat16(const GemmArgs& args, QOrder order, int num_sms, cudaStream_t stream);
}  // namespace detail

// Integer types of adapter ids (many adapters in one batch, issue 11).
enum class IndexType : int { kInt32, kInt64 };

// ---- The decoding path: M <= 16 rows, y = x Wᵀ + b + s·((x A) R) B and xa = x A in two kernels.
struct DecodeArgs {
  int64_t M = 0, N = 0, K = 0, r = 0;  // N = out, K = in
  const void* x = nullptr;             // (M, K), k stride 1, row stride s_x
  int64_t s_x = 0;
  const void* W = nullptr;             // (N, K), k stride 1, row stride s_w
  int64_t s_w = 0;
  const void* A = nullptr;             // (K, r), any strides
  int64_t s_a0 = 0, s_a1 = 0;
  const void* R = nullptr;             // (r, r), any strides, in r_dtype (the layer's dtype or float)
  int64_t s_r0 = 0, s_r1 = 0;
  DType r_dtype = DType::kFloat;
  const void* B = nullptr;             // (r, N), any strides
  int64_t s_b0 = 0, s_b1 = 0;
  const void* bias = nullptr;          // (N,) contiguous or null
  double scaling = 1.0;
  void* y = nullptr;                   // (M, N) contiguous, written
  void* xa = nullptr;                  // (M, r) contiguous, written
  // Many adapters in one batch: null ids = the one adapter R above. Otherwise R is a bank whose
  // adapter k starts at R + k·s_rn (int64: n·r² may pass 2^31), row m uses adapter ids[m] ((M,)
  // contiguous, values in [-1, n), checked by the caller; -1: no low-rank term) scaled by
  // scaling·adapter_scale[id] (adapter_scale (n,) contiguous, or null: scaling alone).
  const void* ids = nullptr;
  IndexType ids_type = IndexType::kInt64;
  int64_t s_rn = 0;
  const double* adapter_scale = nullptr;
};

constexpr int64_t kDecodeMaxM = 16;
constexpr int64_t kMaxRank = 256;

// True when the decoding kernels take these arguments: half/bfloat16, 1 <= M <= 16, K, N >= 1,
// r <= 256, and x and W rows that 16-byte vector loads can read (k stride 1, row stride a multiple
// of 8 elements, 16-byte aligned base).
bool decode_supported(DType dt, const DecodeArgs& a);
// The number of K splits the decoding kernels use (depends on the shape and the SM count only).
int decode_splits(const DecodeArgs& a, int num_sms);
// fp32 scratch the decoding kernels need, in floats: partial y (splits·M·N) and partial x A (splits·M·r).
int64_t decode_workspace_floats(const DecodeArgs& a, int splits);
// The two kernels of the path, launched in this order on one stream with the same arguments,
// splits and workspace (two calls so that the caller checks each launch). pdl: launch the second
// with programmatic dependent launch where the caller allows it (a device of cc >= 9) and the
// code that runs was compiled with griddepcontrol (checked here, from the binary; see decode.cu).
cudaError_t decode_forward_partial(DType dt, const DecodeArgs& a, int splits, float* workspace, cudaStream_t stream);
cudaError_t decode_forward_epilogue(DType dt, const DecodeArgs& a, int splits, float* workspace, bool pdl,
                                    cudaStream_t stream);

// ---- grad_R = s · xaᵀ u (r×r), reduced over M rows in fp32 (fp64 for fp64) in a fixed order.
struct GradRArgs {
  int64_t M = 0, r = 0;
  const void* xa = nullptr;  // (M, r), any strides
  int64_t s_xa0 = 0, s_xa1 = 0;
  const void* u = nullptr;   // (M, r), any strides
  int64_t s_u0 = 0, s_u1 = 0;
  double scaling = 1.0;
  void* out = nullptr;       // (r, r) contiguous, in out_dtype (R's dtype)
  DType out_dtype = DType::kFloat;
};

// Splits over M (a function of M and r only, so the result does not depend on the GPU).
int grad_r_splits(int64_t M, int64_t r);
// Scratch in accumulator elements (float, or double for fp64): splits·r·r.
int64_t grad_r_workspace_elems(int64_t r, int splits);
// Two kernels, launched in this order with the same arguments: per-split partial sums, then their
// sum in split order, times s, in out_dtype (which must be dt or kFloat).
cudaError_t grad_r_partial(DType dt, const GradRArgs& a, int splits, void* workspace, cudaStream_t stream);
cudaError_t grad_r_reduce(DType dt, const GradRArgs& a, int splits, const void* workspace, cudaStream_t stream);

// ---- Many adapters in one batch (issue 11): R is a bank (n, r, r), row i uses R[ids[i]] and the
// scaling s_i = scaling·adapter_scale[ids[i]] (scaling alone when adapter_scale is null); id -1 = the
// base layer alone. Ids are checked to lie in [-1, n) by the caller before any launch: a kernel reads
// R[id] unchecked. The rest of the layer runs on gemm() (kernels/multi.cuh).
//
// out_i = s_i · in_i R[id_i]  (transpose_R: s_i · in_i R[id_i]ᵀ), rows with id -1 all zeros; fp32
// (fp64) accumulation, R rounded to dt first (an fp32 master bank beside a 16-bit layer).
struct MultiRowsArgs {
  int64_t M = 0, r = 0, n = 0;
  const void* in = nullptr;            // (M, r) in dt, any strides
  int64_t s_in0 = 0, s_in1 = 0;
  const void* R = nullptr;             // (n, r, r) in r_dtype (dt, or kFloat beside a 16-bit or fp64 dt), any strides
  int64_t s_rn = 0, s_r0 = 0, s_r1 = 0;
  DType r_dtype = DType::kFloat;
  bool transpose_R = false;
  const void* ids = nullptr;           // (M,) contiguous
  IndexType ids_type = IndexType::kInt64;
  const double* adapter_scale = nullptr;  // (n,) contiguous or null
  double scaling = 1.0;
  void* out = nullptr;                 // (M, r) contiguous, dt, written
};
cudaError_t multi_rows(DType dt, const MultiRowsArgs& a, cudaStream_t stream);

// grad_R[k] = s_k · Σ_{rows i with id_i = k} xa_iᵀ u_i  (n, r, r), zeros for an adapter with no rows.
// The rows come grouped by adapter: perm (M,) is the row order sorted by id (stable, so each
// adapter's rows keep their batch order; the -1 rows first), and adapter k's rows are
// perm[seg[k] .. seg[k+1]) with seg (n + 1,) on the device (searchsorted of the sorted ids: no copy to
// the host). One CTA per (adapter, 32×32 tile) sums its rows in that order: no atomics, bitwise
// reproducible on every GPU.
struct MultiGradRArgs {
  int64_t r = 0, n = 0;
  const void* xa = nullptr;            // (M, r) in dt, any strides
  int64_t s_xa0 = 0, s_xa1 = 0;
  const void* u = nullptr;             // (M, r) in dt, any strides
  int64_t s_u0 = 0, s_u1 = 0;
  const int64_t* perm = nullptr;       // (M,) contiguous
  const int64_t* seg = nullptr;        // (n + 1,) contiguous
  const double* adapter_scale = nullptr;  // (n,) contiguous or null
  double scaling = 1.0;
  void* out = nullptr;                 // (n, r, r) contiguous, in out_dtype (dt, or kFloat beside a 16-bit or fp64 dt)
  DType out_dtype = DType::kFloat;
};
cudaError_t multi_grad_r(DType dt, const MultiGradRArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace loraxs
