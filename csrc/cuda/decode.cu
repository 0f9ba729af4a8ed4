// The decoding kernels (kernels/decode.cuh): instantiations and the shape plan.
#include "kernels/decode.cuh"

#include <atomic>

namespace loraxs {
namespace cuda {

bool decode_supported(DType dt, const DecodeArgs& a) {
  if (dt != DType::kHalf && dt != DType::kBFloat16) return false;
  if (a.M < 1 || a.M > kDecodeMaxM || a.N < 1 || a.K < 1 || a.r < 1 || a.r > kMaxRank) return false;
  return rows_along_k_vectorizable(Operand{a.x, a.s_x, 1}, 2) && rows_along_k_vectorizable(Operand{a.W, a.s_w, 1}, 2);
}

// Enough (W + xa) blocks for about two CTAs per SM, with at least 4 chunks (one per warp) per split
// and a chunk count per split rounded up to a multiple of 4 so the warps get equal shares.
// in = out = 4096 on 132 SMs: 64 W blocks + 2 xa blocks (r <= 64) × 4 splits of 16 chunks each.
int decode_splits(const DecodeArgs& a, int num_sms) {
  const int64_t chunks = ceil_div(a.K, decode::KCHUNK);
  const int64_t blocks = ceil_div(a.N, decode::W_ROWS) + ceil_div(a.r, decode::A_COLS);
  int64_t s = ceil_div(2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), blocks);
  const int64_t s_max = chunks / decode::WARPS > 1 ? chunks / decode::WARPS : 1;
  s = s < 1 ? 1 : (s > s_max ? s_max : s);
  const int64_t per = ceil_div(ceil_div(chunks, s), decode::WARPS) * decode::WARPS;
  s = ceil_div(chunks, per);
  return static_cast<int>(s < 1 ? 1 : (s > 65535 ? 65535 : s));
}

int64_t decode_workspace_floats(const DecodeArgs& a, int splits) {
  return static_cast<int64_t>(splits) * a.M * (a.N + a.r);
}

cudaError_t decode_forward_partial(DType dt, const DecodeArgs& a, int splits, float* workspace, cudaStream_t stream) {
  if (!decode_supported(dt, a)) return cudaErrorInvalidValue;
  return dt == DType::kHalf ? launch_decode_partial<__half>(a, splits, workspace, stream)
                            : launch_decode_partial<__nv_bfloat16>(a, splits, workspace, stream);
}

// PDL is safe only when the epilogue that runs holds griddepcontrol.wait, which decode.cuh compiles for
// __CUDA_ARCH__ >= 900 alone. What runs is decided by the binary, not the device: a "8.0+PTX" build
// on an H100 JIT-compiles compute_80 PTX, which has no wait, and its epilogue would read the split-K
// partials before they are written. cudaFuncGetAttributes' ptxVersion is the virtual architecture
// the running code was compiled for (90 for sm_90 SASS or compute_90 PTX); it is asked once per device.
namespace {
template <typename T>
bool epilogue_waits_for_primary() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int8_t> known[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  int8_t v = known[device].load(std::memory_order_relaxed);
  if (v == 0) {
    cudaFuncAttributes fa;
    v = cudaFuncGetAttributes(&fa, decode_epilogue_kernel<T, T>) == cudaSuccess && fa.ptxVersion >= 90 ? 1 : -1;
    known[device].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}
}  // namespace

cudaError_t decode_forward_epilogue(DType dt, const DecodeArgs& a, int splits, float* workspace, bool pdl,
                                    cudaStream_t stream) {
  if (!decode_supported(dt, a)) return cudaErrorInvalidValue;
  if (pdl) pdl = dt == DType::kHalf ? epilogue_waits_for_primary<__half>() : epilogue_waits_for_primary<__nv_bfloat16>();
  if (a.r_dtype != dt && a.r_dtype != DType::kFloat) return cudaErrorInvalidValue;
  return dt == DType::kHalf ? launch_decode_epilogue<__half>(a, splits, workspace, pdl, stream)
                            : launch_decode_epilogue<__nv_bfloat16>(a, splits, workspace, pdl, stream);
}

}  // namespace cuda
}  // namespace loraxs
