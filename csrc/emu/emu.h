// Host emulation of the CUDA kernels in csrc/cuda/kernels (make cuda-emu; docs/cuda.md, "Host emulation").
//
// The kernel sources are compiled by g++ with LORAXS_CUDA_EMU defined: common.cuh includes this
// header, which turns the CUDA keywords into plain C++ and gives each CUDA thread an OS thread.
// loraxs_kernels/tools/cuda_emu.py rewrites the three constructs g++ cannot parse or a prefix macro
// cannot express, and nothing else: `k<<<grid, block, smem, stream>>>(args)` becomes
// `::loraxs_emu::launcher(k, grid, block, smem, stream)(args)`, `cudaLaunchKernelEx(` becomes
// `::loraxs_emu::launch_ex(`, and `__shared__ T name[..];` becomes a reference to a per-block heap
// array (exact size, so AddressSanitizer sees every byte past its end).
//
// What each piece models (the PTX twins live in ptx.h):
//   - a grid runs block after block; a block runs all of its threads at once, one OS thread each;
//   - __syncthreads is a barrier over the block's live threads (an exited thread no longer counts);
//   - a warp-wide instruction (ldmatrix, mma) is a rendezvous of the warp's 32 threads;
//   - shared memory, fresh scratch and output buffers start as 0xFF bytes (NaN in fp16, bf16, fp32
//     and fp64), so a read of anything never written shows up as NaN in the result;
//   - launches are deferred one deep on the stream, so that a dependent launched with programmatic
//     dependent launch runs its code before griddepcontrol.wait before its primary grid runs at all.
// The checkers: memcheck = AddressSanitizer + UBSan's alignment check + the twins' own checks
// (state space, alignment, cp.async size); racecheck = ThreadSanitizer, whose happens-before comes
// only from the block barrier, the warp rendezvous and thread start/join, i.e. from __syncthreads.
#pragma once

#ifndef LORAXS_CUDA_EMU
#error "csrc/emu/emu.h is the host emulation's shim; it is built only with LORAXS_CUDA_EMU defined"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace loraxs_emu {

struct Block;

// One cp.async: 16 bytes read from global memory when issued, written to shared memory only when
// cp.async.wait_group retires its group.
struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
};

struct ThreadState {
  uint3 thread_idx{0, 0, 0}, block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1}, grid_dim{1, 1, 1};
  const char* kernel = "";
  Block* block = nullptr;
  int tid = 0;                                    // linear thread index in the block
  std::vector<PendingCopy> open;                  // issued since the last commit_group
  std::vector<std::vector<PendingCopy>> groups;   // committed, oldest first
  unsigned warp_parity = 0;                       // which of the two rendezvous slot sets is next
};
ThreadState& self();

// Checker names used in reports: "memcheck", "racecheck" (TSan reports itself), "sync" (barrier
// misuse, deadlock, warp-op divergence, cp.async left pending).
[[noreturn]] void fail(const char* checker, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

void syncthreads();
// Shared memory: a per-block allocation, created by the first thread that reaches the declaration.
void* shared_alloc(const char* name, size_t bytes, size_t align);
// True when [p, p + bytes) lies inside one shared allocation of the current block.
bool in_shared(const void* p, size_t bytes);
template <class Arr>
Arr& shared(const char* name) {
  return *static_cast<Arr*>(shared_alloc(name, sizeof(Arr), alignof(Arr) > 128 ? alignof(Arr) : 128));
}

// ld.global.nc / ld.global.cs: plain loads here; a misaligned vector load faults on a GPU.
void check_global_aligned(const void* p, size_t align, const char* what);
template <class T>
T load_global(const T* p, const char* what) {
  check_global_aligned(p, alignof(T), what);
  return *p;
}

// Warp rendezvous: every lane deposits its operands, waits for all 32, reads everyone's.
struct WarpSlots {
  const void* addr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  int op[32];
};
// Deposit (lane's part already written into the returned slot set by `fill`), then wait for the warp.
WarpSlots& warp_slots_next();
void warp_arrive(int op, const char* what);

// PDL.
void pdl_launch_dependents();
void pdl_wait_primary();

// ---------------------------------------------------------------------------------- launches
struct LaunchSpec {
  dim3 grid, block;
  size_t smem = 0;
  bool pdl = false;
};
using Body = std::function<void()>;
void enqueue(const void* kernel_addr, const LaunchSpec& spec, Body body);
// Runs whatever launch is still deferred on the stream (the end of a host call sequence).
void synchronize();

template <class... P>
struct Launcher {
  void (*k)(P...);
  LaunchSpec spec;
  template <class... A>
  void operator()(A&&... args) const {
    // Kernel parameters are copies taken at launch, read by every thread (as from the constant bank).
    auto params = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(args)...);
    auto k_ = k;
    enqueue(reinterpret_cast<const void*>(k), spec, [k_, params]() { std::apply(k_, *params); });
  }
};
template <class... P>
Launcher<P...> launcher(void (*k)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{k, LaunchSpec{grid, block, smem, false}};
}
template <class... P, class... A>
cudaError_t launch_ex(const cudaLaunchConfig_t* cfg, void (*k)(P...), A&&... args) {
  LaunchSpec spec{cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, false};
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization &&
        cfg->attrs[i].val.programmaticStreamSerializationAllowed)
      spec.pdl = true;
  }
  Launcher<P...>{k, spec}(std::forward<A>(args)...);
  return cudaSuccess;
}

}  // namespace loraxs_emu

// ---------------------------------------------------------------------------------- CUDA runtime
// The runtime calls the launch code makes (no cudart is linked; cudaGetDevice is in emu.cpp). The
// emulation is one device running sm_90 code: a kernel's ptxVersion is 90, so its
// griddepcontrol.wait exists and decode.cu keeps PDL on.
template <class... P>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*)(P...)) {
  *attr = cudaFuncAttributes{};
  attr->ptxVersion = 90;
  attr->binaryVersion = 90;
  attr->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------- the shim
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::loraxs_emu::self().thread_idx)
#define blockIdx (::loraxs_emu::self().block_idx)
// No blockDim / gridDim macros: those names are also fields of cudaLaunchConfig_t, which decode.cuh
// fills in. No kernel reads them; one that does fails to compile here, loudly.

inline void __syncthreads() { ::loraxs_emu::syncthreads(); }
template <class T>
inline T __ldg(const T* p) {
  return ::loraxs_emu::load_global(p, "__ldg (ld.global.nc)");
}
template <class T>
inline T __ldcs(const T* p) {
  return ::loraxs_emu::load_global(p, "__ldcs (ld.global.cs)");
}
using std::fma;
using std::fmaf;

#include "ptx.h"
