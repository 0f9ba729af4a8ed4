// The fp32/fp64 GEMM (kernels/gemm_simt.cuh) and the dtype dispatch of gemm().
#include "kernels/gemm_simt.cuh"

namespace loraxs {
namespace cuda {

cudaError_t gemm(DType dt, const GemmArgs& args, QOrder order, int num_sms, cudaStream_t stream) {
  switch (dt) {
    case DType::kHalf:
      return detail::gemm_half(args, order, num_sms, stream);
    case DType::kBFloat16:
      return detail::gemm_bfloat16(args, order, num_sms, stream);
    case DType::kFloat:
      return launch_gemm_simt<float>(args, stream);
    case DType::kDouble:
      return launch_gemm_simt<double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace loraxs
