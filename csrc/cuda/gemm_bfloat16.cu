// The tensor-core GEMM for bfloat16, in both operand orders (see kernels/gemm_mma.cuh).
#include "kernels/gemm_mma.cuh"

namespace loraxs {
namespace cuda {
namespace detail {

cudaError_t gemm_bfloat16(const GemmArgs& args, QOrder order, int num_sms, cudaStream_t stream) {
  return order == QOrder::kQ1KContig_Q2NContig ? launch_gemm_mma<__nv_bfloat16, true, false>(args, num_sms, stream)
                                           : launch_gemm_mma<__nv_bfloat16, false, true>(args, num_sms, stream);
}

}  // namespace detail
}  // namespace cuda
}  // namespace loraxs
