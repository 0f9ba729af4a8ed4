// grad_R = s · xaᵀ u (kernels/grad_r.cuh): instantiations and the split plan.
#include "kernels/grad_r.cuh"

namespace loraxs {
namespace cuda {

// About 256 rows per split, capped so the workspace stays under 2^22 accumulators (16 MiB in fp32).
int grad_r_splits(int64_t M, int64_t r) {
  const int64_t cap_ws = (int64_t{1} << 22) / (r * r) > 1 ? (int64_t{1} << 22) / (r * r) : 1;
  int64_t s = ceil_div(M, 256);
  if (s > cap_ws) s = cap_ws;
  if (s > 65535) s = 65535;
  if (s < 1) s = 1;
  return static_cast<int>(ceil_div(M, ceil_div(M, s)));  // no empty split
}

int64_t grad_r_workspace_elems(int64_t r, int splits) { return static_cast<int64_t>(splits) * r * r; }

cudaError_t grad_r_partial(DType dt, const GradRArgs& a, int splits, void* workspace, cudaStream_t stream) {
  switch (dt) {
    case DType::kHalf:
      return launch_grad_r_partial<__half>(a, splits, workspace, stream);
    case DType::kBFloat16:
      return launch_grad_r_partial<__nv_bfloat16>(a, splits, workspace, stream);
    case DType::kFloat:
      return launch_grad_r_partial<float>(a, splits, workspace, stream);
    case DType::kDouble:
      return launch_grad_r_partial<double>(a, splits, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t grad_r_reduce(DType dt, const GradRArgs& a, int splits, const void* workspace, cudaStream_t stream) {
  if (a.out_dtype != dt && a.out_dtype != DType::kFloat) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kHalf:
      return launch_grad_r_reduce<__half>(a, splits, workspace, stream);
    case DType::kBFloat16:
      return launch_grad_r_reduce<__nv_bfloat16>(a, splits, workspace, stream);
    case DType::kFloat:
      return launch_grad_r_reduce<float>(a, splits, workspace, stream);
    case DType::kDouble:
      return launch_grad_r_reduce<double>(a, splits, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace loraxs
