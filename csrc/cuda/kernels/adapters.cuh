// Per-row adapter lookups shared by the many-adapter kernels (multi.cuh) and the decoding epilogue
// (decode.cuh): which adapter a row uses and its scaling.
#pragma once

#include "common.cuh"

namespace loraxs {
namespace cuda {

// The adapter of row i, -1 for none (the caller checked every id is in [-1, n) before the launch).
__device__ __forceinline__ int64_t adapter_of(const void* ids, IndexType type, int64_t i) {
  return type == IndexType::kInt64 ? static_cast<const int64_t*>(ids)[i]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(ids)[i]);
}

// s_k = scaling·adapter_scale[k] in double (what the CPU kernel passes as its GEMMs' alpha), or scaling.
__device__ __forceinline__ double adapter_scaling_of(double scaling, const double* adapter_scale, int64_t k) {
  return adapter_scale ? scaling * adapter_scale[k] : scaling;
}

}  // namespace cuda
}  // namespace loraxs
