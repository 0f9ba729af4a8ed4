// CPU kernels of the native ops, in ATen GEMM calls (MKL/oneDNN underneath): on a CPU the GEMMs are
// the whole cost, so the job here is to issue as few and as large ones as possible, with no (M×out)
// temporary beyond y and no (M×in) temporary beyond grad_x. Same two schedules as the Python
// "torch" backend (loraxs_kernels/backends/pytorch.py, which explains the choice); this one skips
// the Python overhead, which matters at decoding sizes.
#include <torch/library.h>

#include "../loraxs.h"

namespace loraxs {
namespace {

// Folding s·(A R B)ᵀ into W costs 2·r·in·out FLOPs once; keeping it low-rank costs 2·M·r·(in+out).
bool merge_pays(int64_t M, int64_t in, int64_t out) { return M * (in + out) > in * out; }

// W + s·(A R B)ᵀ = W + s · Bᵀ (A R)ᵀ, as one addmm. R is already in the layer's dtype.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                         double scaling) {
  return at::addmm(weight, B.t(), at::mm(A, R).t(), /*beta=*/1, /*alpha=*/scaling);
}

at::Tensor base_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                  const at::Tensor& R, const at::Tensor& B, double scaling) {
  check_forward_args(x, weight, bias, A, R, B);
  const at::Tensor Rc = R.to(x.scalar_type());
  at::Tensor xa = at::mm(x, A);
  if (merge_pays(x.size(0), weight.size(1), weight.size(0))) {
    return {base_gemm(x, merged_weight(weight, A, Rc, B, scaling), bias), xa};
  }
  at::Tensor y = base_gemm(x, weight, bias);
  y.addmm_(at::mm(xa, Rc), B, /*beta=*/1, /*alpha=*/scaling);
  return {y, xa};
}

std::tuple<at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& xa,
                                                  const at::Tensor& weight, const at::Tensor& A, const at::Tensor& R,
                                                  const at::Tensor& B, double scaling, bool need_x, bool need_R) {
  check_backward_args(grad_out, xa, weight, A, R, B, need_R);
  const at::Tensor Rc = R.to(grad_out.scalar_type());
  const bool merged = merge_pays(grad_out.size(0), weight.size(1), weight.size(0));
  at::Tensor u;  // g Bᵀ (M×r)
  if (need_R || (need_x && !merged)) u = at::mm(grad_out, B.t());
  at::Tensor grad_x = grad_out.new_empty({0});
  at::Tensor grad_R = R.new_empty({0});
  if (need_x) {
    if (merged) {
      grad_x = at::mm(grad_out, merged_weight(weight, A, Rc, B, scaling));
    } else {
      grad_x = at::mm(grad_out, weight);
      grad_x.addmm_(at::mm(u, Rc.t()), A.t(), /*beta=*/1, /*alpha=*/scaling);
    }
  }
  if (need_R) {
    // The sum over M tokens runs in fp32 (fp64 for fp64) even for half inputs: M is large, R is tiny.
    const auto acc = at::promote_types(grad_out.scalar_type(), at::kFloat);
    grad_R = at::mm(xa.t().to(acc), u.to(acc)).mul_(scaling).to(R.scalar_type());
  }
  return {grad_x, grad_R};
}

}  // namespace loraxs

TORCH_LIBRARY_IMPL(loraxs, CPU, m) {
  m.impl("native_fwd", &loraxs::linear_fwd_cpu);
  m.impl("native_bwd", &loraxs::linear_bwd_cpu);
}
