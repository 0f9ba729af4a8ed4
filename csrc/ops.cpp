// Schemas of the native ops and the shared argument checks. The public op (torch.ops.loraxs.linear)
// is defined in Python (loraxs_kernels/ops/linear.py) and calls these through the "cpp" and "cuda"
// backends; keeping these internal lets the C++ kernels be swapped without touching the contract.
#include <torch/library.h>

#include "loraxs.h"

namespace loraxs {
namespace {

// weight (out, in), A (in, r), R (r, r), B (r, out): shapes agree, one dtype (R may be fp32), one device.
void check_layer(const char* op, const at::Tensor& ref, const at::Tensor& weight, const at::Tensor& A,
                 const at::Tensor& R, const at::Tensor& B) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out, in), got ", weight.sizes());
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == in, op, ": A must be (", in, ", r), got ", A.sizes());
  const int64_t r = A.size(1);
  TORCH_CHECK(R.dim() == 2 && R.size(0) == r && R.size(1) == r, op, ": R must be (", r, ", ", r, "), got ", R.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == r && B.size(1) == out, op, ": B must be (", r, ", ", out, "), got ",
              B.sizes());
  TORCH_CHECK(at::isFloatingType(ref.scalar_type()), op, ": inputs must be floating point, got ", ref.scalar_type());
  for (const at::Tensor* t : {&weight, &A, &B}) {
    TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": dtype ", t->scalar_type(), " does not match ",
                ref.scalar_type());
  }
  TORCH_CHECK(R.scalar_type() == ref.scalar_type() || R.scalar_type() == at::kFloat, op,
              ": R must be the layer's dtype or float32, got ", R.scalar_type());
  for (const at::Tensor* t : {&weight, &A, &R, &B}) {
    TORCH_CHECK(t->device() == ref.device(), op, ": a tensor is on ", t->device(), " but the input is on ", ref.device());
  }
}

}  // namespace

void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B) {
  check_layer("loraxs native_fwd", x, weight, A, R, B);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "loraxs native_fwd: x ", x.sizes(), " must be (M, ",
              weight.size(1), ") to match weight ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "loraxs native_fwd: bias must be (",
                weight.size(0), "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "loraxs native_fwd: bias must match x's dtype and device");
  }
}

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                         const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, bool need_R) {
  check_layer("loraxs native_bwd", grad_out, weight, A, R, B);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(1) == weight.size(0), "loraxs native_bwd: grad_out ",
              grad_out.sizes(), " must be (M, ", weight.size(0), ")");
  if (!need_R) return;  // xa is read only for grad_R (it may be an empty placeholder otherwise)
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == grad_out.size(0) && xa.size(1) == A.size(1), "loraxs native_bwd: xa must be (",
              grad_out.size(0), ", ", A.size(1), "), got ", xa.sizes());
  TORCH_CHECK(xa.scalar_type() == grad_out.scalar_type() && xa.device() == grad_out.device(),
              "loraxs native_bwd: xa must match grad_out's dtype and device");
}

}  // namespace loraxs

TORCH_LIBRARY_FRAGMENT(loraxs, m) {
  m.def("native_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, float scaling) -> (Tensor, Tensor)");
  m.def("native_bwd(Tensor grad_out, Tensor xa, Tensor weight, Tensor A, Tensor R, Tensor B, float scaling, "
        "bool need_x, bool need_R) -> (Tensor, Tensor)");
}
