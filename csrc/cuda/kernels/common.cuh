// Device helpers shared by the kernels: number conversions, cp.async, ldmatrix, mma.sync, PDL.
// Torch-free; compiled by nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

// LORAXS_CUDA_EMU: the host emulation (csrc/emu, make cuda-emu) compiles these kernels with g++.
// Each PTX helper below then runs its host twin (csrc/emu/ptx.h) instead of the inline asm; nvcc
// never defines the macro, so the device code is unchanged.
#ifdef LORAXS_CUDA_EMU
#include "emu.h"
#endif

namespace loraxs {
namespace cuda {

// ---------------------------------------------------------------------------------- numbers
// Num<T>::acc is the accumulator type (fp32 for the half types and fp32, fp64 for fp64).
template <typename T>
struct Num;
template <>
struct Num<__half> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

// A value of type S read as T's accumulator, after rounding to T: "compute in x's dtype" for an
// fp32 master R beside half weights (the CPU kernel's R.to(x.dtype)).
template <typename T, typename S>
__device__ __forceinline__ typename Num<T>::acc rounded_to(S v) {
  return Num<T>::to_acc(Num<T>::from_acc(static_cast<typename Num<T>::acc>(Num<S>::to_acc(v))));
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------- cp.async
// 16-byte global→shared copy that reads src_bytes (0..16) and zero-fills the rest: the edges of
// every tile (rows past M or N, k past K) come in as zeros, so no NaN from stale memory meets a zero.
// "memory" clobbers keep the compiler from moving shared-memory accesses across these statements.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#ifdef LORAXS_CUDA_EMU
  loraxs_emu::ptx::cp_async_16(smem, gmem, src_bytes);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef LORAXS_CUDA_EMU
  loraxs_emu::ptx::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LORAXS_CUDA_EMU
  loraxs_emu::ptx::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// ---------------------------------------------------------------------------------- ldmatrix / mma
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#ifdef LORAXS_CUDA_EMU
  loraxs_emu::ptx::ldmatrix_x4(r, smem, false);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#ifdef LORAXS_CUDA_EMU
  loraxs_emu::ptx::ldmatrix_x4(r, smem, true);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
#endif
}

// D += A·B for one 16×8×16 tile, fp32 accumulators. Fragments (g = lane/4, t = lane%4):
//   a[0]: A[g][2t..2t+1]   a[1]: A[g+8][2t..2t+1]   a[2]: A[g][2t+8..2t+9]   a[3]: A[g+8][2t+8..2t+9]
//   b[0]: B[2t..2t+1][g]   b[1]: B[2t+8..2t+9][g]
//   d[0..1]: D[g][2t..2t+1]   d[2..3]: D[g+8][2t..2t+1]
// (the lower 16 bits of each register hold the lower k or column index).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef LORAXS_CUDA_EMU
  loraxs_emu::ptx::mma_16816<__half>(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
#ifdef LORAXS_CUDA_EMU
  loraxs_emu::ptx::mma_16816<__nv_bfloat16>(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---------------------------------------------------------------------------------- PDL (sm_90)
// Programmatic dependent launch: the primary kernel lets the next one start launching early; the
// dependent waits for the primary grid to finish (and its writes to be visible) before it reads
// them. Both are no-ops when the launch did not ask for PDL, and compile to nothing below sm_90.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(LORAXS_CUDA_EMU)
  loraxs_emu::pdl_launch_dependents();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait_primary() {
#if defined(LORAXS_CUDA_EMU)
  loraxs_emu::pdl_wait_primary();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------- host helpers
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// An operand whose rows (index `row`) are read in 16-byte pieces along `k`: unit k stride, row
// starts on 16-byte boundaries. `elem` is the element size in bytes.
inline bool rows_along_k_vectorizable(const Operand& o, int elem) {
  const int64_t per16 = 16 / elem;
  return o.s_k == 1 && o.s_row % per16 == 0 && aligned16(o.ptr);
}
// The transposed case: 16-byte pieces along `row` (unit row stride), k-lines 16-byte aligned.
inline bool rows_along_n_vectorizable(const Operand& o, int elem) {
  const int64_t per16 = 16 / elem;
  return o.s_row == 1 && o.s_k % per16 == 0 && aligned16(o.ptr);
}

}  // namespace cuda
}  // namespace loraxs
