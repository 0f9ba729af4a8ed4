// The input contract of y = x Wᵀ + b + s·((x A) R) B, checked once per call by the device kernels.
// The messages are word for word those of loraxs_kernels/ops/checks.py (which checks fake tensors
// under torch.compile and the build-less fallback), so a wrong call reads the same on every path.
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

#include "loraxs.h"

namespace loraxs {

std::string dims_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << ")";
  return s.str();
}

std::string shape_str(const at::Tensor& t) { return dims_str(t.sizes()); }

std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

namespace {

bool supported(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

}  // namespace

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& A, const at::Tensor& R, const at::Tensor& B) {
  // Shapes.
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension (..., in_features), got shape ", shape_str(x));
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ",
                    shape_str(weight));
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == in_features, "x has ", x.size(-1), " features (shape ", shape_str(x),
                    ") but weight expects ", in_features, " (weight shape ", shape_str(weight), ")");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "bias must have shape (", out_features,
                      ",) to match weight ", shape_str(weight), ", got ", shape_str(*bias));
  }
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(0) == in_features, "A must have shape (in_features=", in_features,
                    ", r), got ", shape_str(A));
  const int64_t r = A.size(1);
  TORCH_CHECK_VALUE(r >= 1 && r <= kMaxRank, "rank r = A.shape[1] must be between 1 and ", kMaxRank, ", got ", r,
                    " (A shape ", shape_str(A), ")");
  TORCH_CHECK_VALUE(R.dim() == 2 && R.size(0) == r && R.size(1) == r, "R must have shape (r, r) = (", r, ", ", r,
                    ") to match A ", shape_str(A), ", got ", shape_str(R));
  TORCH_CHECK_VALUE(B.dim() == 2 && B.size(0) == r && B.size(1) == out_features,
                    "B must have shape (r, out_features) = (", r, ", ", out_features, ") to match A ", shape_str(A),
                    " and weight ", shape_str(weight), ", got ", shape_str(B));

  // Dtypes: one compute dtype for the layer; R may be a wider master copy (fp32 beside bf16/fp16).
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK_TYPE(supported(dt), "x has dtype ", dtype_str(dt),
                   "; supported dtypes are float16, bfloat16, float32 and float64");
  const std::pair<const char*, const at::Tensor*> layer[] = {
      {"weight", &weight}, {"bias", bias.has_value() ? &*bias : nullptr}, {"A", &A}, {"B", &B}};
  for (const auto& [name, t] : layer) {
    if (t != nullptr) {
      TORCH_CHECK_TYPE(t->scalar_type() == dt, name, " has dtype ", dtype_str(t->scalar_type()), " but x has dtype ",
                       dtype_str(dt), "; they must match");
    }
  }
  TORCH_CHECK_TYPE(R.scalar_type() == dt || R.scalar_type() == at::kFloat, "R has dtype ",
                   dtype_str(R.scalar_type()), "; it must be x's dtype (", dtype_str(dt),
                   ") or float32 (a master weight)");

  // Devices.
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"weight", &weight}, {"bias", bias.has_value() ? &*bias : nullptr}, {"A", &A}, {"R", &R}, {"B", &B}};
  for (const auto& [name, t] : all) {
    if (t != nullptr) {
      TORCH_CHECK(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device(),
                  "; all tensors must be on one device");
    }
  }
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                           const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, bool need_R) {
  // The layer's tensors passed the forward's checks; these guard direct callers of linear_bwd.
  TORCH_CHECK_VALUE(weight.dim() == 2 && A.dim() == 2 && A.size(0) == weight.size(1) && R.dim() == 2 &&
                        R.size(0) == A.size(1) && R.size(1) == A.size(1) && B.dim() == 2 &&
                        B.size(0) == A.size(1) && B.size(1) == weight.size(0),
                    "loraxs.linear_bwd: inconsistent layer: weight ", shape_str(weight), ", A ", shape_str(A),
                    ", R ", shape_str(R), ", B ", shape_str(B));
  TORCH_CHECK_VALUE(grad_out.dim() >= 1 && grad_out.size(-1) == weight.size(0), "loraxs.linear_bwd: grad_out ",
                    shape_str(grad_out), " must be (..., ", weight.size(0), ") to match weight ", shape_str(weight));
  const at::ScalarType dt = grad_out.scalar_type();
  TORCH_CHECK_TYPE(supported(dt) && weight.scalar_type() == dt && A.scalar_type() == dt && B.scalar_type() == dt &&
                       (R.scalar_type() == dt || R.scalar_type() == at::kFloat),
                   "loraxs.linear_bwd: grad_out has dtype ", dtype_str(dt), ", weight ",
                   dtype_str(weight.scalar_type()), ", A ", dtype_str(A.scalar_type()), ", R ",
                   dtype_str(R.scalar_type()), ", B ", dtype_str(B.scalar_type()));
  for (const at::Tensor* t : {&weight, &A, &R, &B}) {
    TORCH_CHECK(t->device() == grad_out.device(), "loraxs.linear_bwd: a layer tensor is on ", t->device(),
                " but grad_out is on ", grad_out.device());
  }
  if (!need_R) return;  // xa is read only for grad_R (an empty placeholder otherwise)
  // The rows are counted from the leading dims, not numel / out_features: out_features may be 0.
  const int64_t M = c10::multiply_integers(grad_out.sizes().slice(0, grad_out.dim() - 1));
  TORCH_CHECK_VALUE(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == A.size(1), "loraxs.linear_bwd: xa must be (",
                    M, ", ", A.size(1), "), got ", shape_str(xa));
  TORCH_CHECK_TYPE(xa.scalar_type() == dt, "loraxs.linear_bwd: xa has dtype ", dtype_str(xa.scalar_type()),
                   " but grad_out has dtype ", dtype_str(dt));
  TORCH_CHECK(xa.device() == grad_out.device(), "loraxs.linear_bwd: xa is on ", xa.device(), " but grad_out is on ",
              grad_out.device());
}

void check_frozen(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& A,
                  const at::Tensor& B, const char* op, const char* reference) {
  const std::pair<const char*, const at::Tensor*> frozen[] = {
      {"weight", &weight}, {"bias", bias.has_value() ? &*bias : nullptr}, {"A", &A}, {"B", &B}};
  for (const auto& [name, t] : frozen) {
    TORCH_CHECK(t == nullptr || !t->requires_grad(), op, " computes gradients for x and R only, but ", name, " ",
                shape_str(*t), " requires grad; freeze it (requires_grad_(False)) or use loraxs_kernels.reference.",
                reference);
  }
}

}  // namespace loraxs
