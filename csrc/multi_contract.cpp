// The input contract of the many-adapter layer (linear_multi, multi.cpp): the single-adapter
// contract (contract.cpp) on the layer with R's first slot, plus the bank, the ids and the optional
// per-adapter scaling. Word for word the messages of loraxs_kernels/ops/multi.py (the fake kernels
// and the build-less path), so a wrong call reads the same on every path.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "loraxs.h"

namespace loraxs {
namespace {

void check_bank(const at::Tensor& A, const at::Tensor& R) {
  TORCH_CHECK_VALUE(R.dim() == 3 && R.size(0) >= 1, "R must be a bank of shape (n, r, r) with n >= 1 adapters, got ",
                    shape_str(R));
  if (A.dim() == 2) {
    const int64_t r = A.size(1);
    TORCH_CHECK_VALUE(R.size(1) == r && R.size(2) == r, "R must have shape (n, r, r) = (", R.size(0), ", ", r, ", ", r,
                      ") to match A ", shape_str(A), ", got ", shape_str(R));
  }
}

// Types, shape and device of the ids against the rows they label, then their values.
void check_ids(const at::Tensor& ids, at::IntArrayRef lead, const at::Device& device, const at::Tensor& R,
               const char* rows, bool values_on_host) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "adapter_ids has dtype ",
                   dtype_str(ids.scalar_type()), "; it must be torch.int32 or torch.int64");
  TORCH_CHECK_VALUE(ids.sizes() == lead, "adapter_ids must have shape ", rows, ".shape[:-1] = ", dims_str(lead),
                    " (one id per row), got ", shape_str(ids));
  TORCH_CHECK(ids.device() == device, "adapter_ids is on ", ids.device(), " but ", rows, " is on ", device,
              "; all tensors must be on one device");
  if (ids.numel() == 0 || !values_on_host) return;
  const int64_t n = R.size(0);
  // Two scalars to the host (a sync on a GPU): the price of never reading R past its end.
  auto [lo, hi] = at::aminmax(ids);
  if (lo.item<int64_t>() >= -1 && hi.item<int64_t>() < n) return;
  const at::Tensor flat = ids.reshape({-1});
  const int64_t at_flat = at::nonzero(flat.lt(-1).logical_or_(flat.ge(n)))[0][0].item<int64_t>();
  std::vector<int64_t> pos(lead.size());
  for (int64_t d = static_cast<int64_t>(lead.size()) - 1, rest = at_flat; d >= 0; --d) {
    pos[d] = rest % lead[d];
    rest /= lead[d];
  }
  TORCH_CHECK_VALUE(false, "adapter_ids must be in [-1, ", n, ") for a bank of ", n, " adapters (R ", shape_str(R),
                    "), got ", flat[at_flat].item<int64_t>(), " at index ", dims_str(pos));
}

void check_adapter_scaling(const std::optional<at::Tensor>& s, const at::Tensor& R, const at::Device& device) {
  if (!s.has_value()) return;
  TORCH_CHECK_VALUE(s->dim() == 1 && s->size(0) == R.size(0), "adapter_scaling must have shape (n,) = (",
                    R.size(0), ") to match R ", shape_str(R), ", got ", shape_str(*s));
  TORCH_CHECK_TYPE(at::isFloatingType(s->scalar_type()), "adapter_scaling has dtype ", dtype_str(s->scalar_type()),
                   "; it must be a floating dtype");
  TORCH_CHECK(s->device() == device, "adapter_scaling is on ", s->device(), " but x is on ", device,
              "; all tensors must be on one device");
}

}  // namespace

void check_multi_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                        const std::optional<at::Tensor>& adapter_scaling, bool ids_on_host) {
  check_bank(A, R);
  check_inputs(x, weight, bias, A, R.select(0, 0), B);
  check_adapter_scaling(adapter_scaling, R, x.device());
  check_ids(adapter_ids, x.sizes().slice(0, x.dim() - 1), x.device(), R, "x", ids_on_host);
}

void check_multi_backward_inputs(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                                 const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                                 const at::Tensor& adapter_ids, const std::optional<at::Tensor>& adapter_scaling,
                                 bool need_R, bool ids_on_host) {
  check_bank(A, R);
  check_backward_inputs(grad_out, xa, weight, A, R.select(0, 0), B, need_R);
  check_adapter_scaling(adapter_scaling, R, grad_out.device());
  check_ids(adapter_ids, grad_out.sizes().slice(0, grad_out.dim() - 1), grad_out.device(), R, "grad_out",
            ids_on_host);
}

std::string ids_range_message(const at::Tensor& R) {
  return "adapter_ids must be in [-1, " + std::to_string(R.size(0)) + ") for a bank of " +
         std::to_string(R.size(0)) + " adapters (R " + shape_str(R) +
         "), checked on the device during CUDA-graph capture";
}

void check_multi_frozen(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& A,
                        const at::Tensor& B, const std::optional<at::Tensor>& adapter_scaling) {
  check_frozen(weight, bias, A, B, "loraxs.linear_multi", "loraxs_linear_multi");
  TORCH_CHECK(!adapter_scaling.has_value() || !adapter_scaling->requires_grad(),
              "loraxs.linear_multi computes gradients for x and R only, but adapter_scaling ",
              shape_str(*adapter_scaling), " requires grad; detach it");
}

}  // namespace loraxs
