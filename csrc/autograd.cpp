// The autograd formula of linear_fwd, in C++ (no Python between the caller and the kernels):
//
//   y = x Wᵀ + b + s·((x A) R) B
//   grad_x = g W + s·((g Bᵀ) Rᵀ) Aᵀ,     grad_R = s·(x A)ᵀ (g Bᵀ)
//
// x A (M×r) is the only activation kept, and only when R needs a gradient; weight, A, R and B are
// the layer's own tensors (no new memory). linear_bwd gets an Autograd kernel too, whose backward
// raises: the op gives first-order gradients only.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "loraxs.h"

namespace loraxs {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("loraxs::linear_fwd", "")
                             .typed<Fwd(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                        c10::string_view)>();
  return op;
}

const auto& bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("loraxs::linear_bwd", "")
                             .typed<Bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, double, bool, bool, c10::string_view)>();
  return op;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& R,
                               const at::Tensor& B, double scaling, c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, xa] = fwd_op().call(x, weight, bias, A, R, B, scaling, backend);
    ctx->mark_non_differentiable({xa});
    // xa never gets a gradient; without this, autograd would allocate an (M×r) zero tensor for it on
    // every backward (seen in the profiler at M = 1).
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({R.requires_grad() ? xa : at::Tensor(), weight, A, R, B});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["backend"] = std::string(backend);
    // R's position among the tensor inputs: bias is an input edge only when it is given.
    ctx->saved_data["r_edge"] = static_cast<int64_t>(bias.has_value() ? 4 : 3);
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(8);  // y did not reach the loss
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[1], &A = saved[2], &R = saved[3], &B = saved[4];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_R = ctx->needs_input_grad(static_cast<size_t>(ctx->saved_data["r_edge"].toInt()));
    // R needs no gradient, so x A was not kept; backends read xa only for grad_R.
    const at::Tensor xa = saved[0].defined() ? saved[0] : grads[0].new_empty({0, A.size(1)});
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    auto [grad_x, grad_R] =
        bwd_op().call(grads[0], xa, weight, A, R, B, ctx->saved_data["scaling"].toDouble(), need_x, need_R, backend);
    // One entry per forward argument: x, weight, bias, A, R, B, scaling, backend.
    return {need_x ? grad_x : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            need_R ? grad_R : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Fwd linear_fwd_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling,
                        c10::string_view backend) {
  if (at::GradMode::is_enabled()) {
    check_frozen(weight, bias, A, B);
    if (x.requires_grad() || R.requires_grad()) {
      variable_list out = LinearFunction::apply(x, weight, bias, A, R, B, scaling, backend);
      return {out[0], out[1]};
    }
  }
  // Nothing to differentiate: no graph node, straight to the device kernel.
  at::AutoDispatchBelowADInplaceOrView below;
  return fwd_op().call(x, weight, bias, A, R, B, scaling, backend);
}

class NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& xa,
                               const at::Tensor& weight, const at::Tensor& A, const at::Tensor& R,
                               const at::Tensor& B, double scaling, bool need_x, bool need_R,
                               c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [gx, gR] = bwd_op().call(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend);
    return {gx, gR};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "loraxs.linear supports first-order gradients only: differentiating its backward "
                "(create_graph=True, then a second backward) is not implemented; use loraxs_kernels.reference");
  }
};

Bwd linear_bwd_autograd(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x,
                        bool need_R, c10::string_view backend) {
  if (at::GradMode::is_enabled() && (grad_out.requires_grad() || R.requires_grad())) {
    variable_list out = NoDoubleBackward::apply(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend);
    return {out[0], out[1]};
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return bwd_op().call(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend);
}

}  // namespace
}  // namespace loraxs

TORCH_LIBRARY_IMPL(loraxs, Autograd, m) {
  m.impl("linear_fwd", &loraxs::linear_fwd_autograd);
  m.impl("linear_bwd", &loraxs::linear_bwd_autograd);
}
