// Many adapters in one batch (kernels/multi.cuh): instantiations and the dtype dispatch.
#include "kernels/multi.cuh"

namespace loraxs {
namespace cuda {

namespace {
// R (and grad_R) in the layer's dtype, or an fp32 bank beside a 16-bit or fp64 layer: what the op's
// contract accepts (csrc/contract.cpp), so no accepted call ends in cudaErrorInvalidValue here.
bool bank_dtype_ok(DType dt, DType r_dt) {
  return r_dt == dt ||
         (r_dt == DType::kFloat && (dt == DType::kHalf || dt == DType::kBFloat16 || dt == DType::kDouble));
}
}  // namespace

cudaError_t multi_rows(DType dt, const MultiRowsArgs& a, cudaStream_t stream) {
  if (!bank_dtype_ok(dt, a.r_dtype) || (a.M > 0 && a.ids == nullptr)) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kHalf:
      return launch_multi_rows<__half>(a, stream);
    case DType::kBFloat16:
      return launch_multi_rows<__nv_bfloat16>(a, stream);
    case DType::kFloat:
      return launch_multi_rows<float>(a, stream);
    case DType::kDouble:
      return launch_multi_rows<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t multi_grad_r(DType dt, const MultiGradRArgs& a, cudaStream_t stream) {
  if (!bank_dtype_ok(dt, a.out_dtype) || a.perm == nullptr || a.seg == nullptr) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kHalf:
      return launch_multi_grad_r<__half>(a, stream);
    case DType::kBFloat16:
      return launch_multi_grad_r<__nv_bfloat16>(a, stream);
    case DType::kFloat:
      return launch_multi_grad_r<float>(a, stream);
    case DType::kDouble:
      return launch_multi_grad_r<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace loraxs
