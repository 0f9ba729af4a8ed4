// The tensor-core GEMM for float16, in both operand orders (see kernels/gemm_mma.cuh).
#include "kernels/gemm_mma.cuh"

namespace loraxs {
namespace cuda {
namespace detail {

cudaError_t gemm_half(const GemmArgs& args, QOrder order, int num_sms, cudaStream_t stream) {
  return order == QOrder::kQ1KContig_Q2NContig ? launch_gemm_mma<__half, true, false>(args, num_sms, stream)
                                           : launch_gemm_mma<__half, false, true>(args, num_sms, stream);
}

}  // namespace detail
}  // namespace cuda
}  // namespace loraxs
