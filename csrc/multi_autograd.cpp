// The autograd formula of linear_multi_fwd (row i uses R[id_i] and s_i; rows with id -1 have no
// low-rank term):
//
//   grad_x_i = g_i W + s_i·((g_i Bᵀ) R[id_i]ᵀ) Aᵀ,     grad_R[k] = Σ_{i: id_i = k} s_i·(x_i A)ᵀ (g_i Bᵀ)
//
// As for the single adapter (autograd.cpp): x A (M×r) is the only activation kept, only when R
// trains; the ids and the per-adapter scaling are saved as they are (no copy). linear_multi_bwd's
// Autograd kernel raises on a second differentiation.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "loraxs.h"

namespace loraxs {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("loraxs::linear_multi_fwd", "")
          .typed<Fwd(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                     const std::optional<at::Tensor>&, c10::string_view)>();
  return op;
}

const auto& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("loraxs::linear_multi_bwd", "")
          .typed<Bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&, bool, bool,
                     c10::string_view)>();
  return op;
}

std::optional<at::Tensor> opt(const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; }

class MultiFunction : public torch::autograd::Function<MultiFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& R,
                               const at::Tensor& B, const at::Tensor& adapter_ids, double scaling,
                               const std::optional<at::Tensor>& adapter_scaling, c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, xa] = fwd_op().call(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling, backend);
    ctx->mark_non_differentiable({xa});
    ctx->set_materialize_grads(false);  // no (M×r) zero gradient for xa (see autograd.cpp)
    ctx->save_for_backward({R.requires_grad() ? xa : at::Tensor(), weight, A, R, B, adapter_ids,
                            adapter_scaling.has_value() ? *adapter_scaling : at::Tensor()});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["backend"] = std::string(backend);
    // R's position among the tensor inputs: bias is an input edge only when it is given.
    ctx->saved_data["r_edge"] = static_cast<int64_t>(bias.has_value() ? 4 : 3);
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return variable_list(10);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[1], &A = saved[2], &R = saved[3], &B = saved[4], &ids = saved[5];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_R = ctx->needs_input_grad(static_cast<size_t>(ctx->saved_data["r_edge"].toInt()));
    const at::Tensor xa = saved[0].defined() ? saved[0] : grads[0].new_empty({0, A.size(1)});
    auto [grad_x, grad_R] =
        bwd_op().call(grads[0], xa, weight, A, R, B, ids, ctx->saved_data["scaling"].toDouble(), opt(saved[6]),
                      need_x, need_R, ctx->saved_data["backend"].toStringRef());
    // One entry per forward argument: x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling, backend.
    return {need_x ? grad_x : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), need_R ? grad_R : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Fwd linear_multi_fwd_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                              const at::Tensor& adapter_ids, double scaling,
                              const std::optional<at::Tensor>& adapter_scaling, c10::string_view backend) {
  if (at::GradMode::is_enabled()) {
    check_multi_frozen(weight, bias, A, B, adapter_scaling);
    if (x.requires_grad() || R.requires_grad()) {
      variable_list out =
          MultiFunction::apply(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling, backend);
      return {out[0], out[1]};
    }
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return fwd_op().call(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling, backend);
}

class NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
 public:
  static variable_list forward(AutogradContext*, const at::Tensor& grad_out, const at::Tensor& xa,
                               const at::Tensor& weight, const at::Tensor& A, const at::Tensor& R,
                               const at::Tensor& B, const at::Tensor& adapter_ids, double scaling,
                               const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R,
                               c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [gx, gR] =
        bwd_op().call(grad_out, xa, weight, A, R, B, adapter_ids, scaling, adapter_scaling, need_x, need_R, backend);
    return {gx, gR};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "loraxs.linear_multi supports first-order gradients only: differentiating its backward "
                "(create_graph=True, then a second backward) is not implemented; use "
                "loraxs_kernels.reference.loraxs_linear_multi");
  }
};

Bwd linear_multi_bwd_autograd(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                              const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                              const at::Tensor& adapter_ids, double scaling,
                              const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R,
                              c10::string_view backend) {
  if (at::GradMode::is_enabled() && (grad_out.requires_grad() || R.requires_grad())) {
    variable_list out = NoDoubleBackward::apply(grad_out, xa, weight, A, R, B, adapter_ids, scaling, adapter_scaling,
                                                need_x, need_R, backend);
    return {out[0], out[1]};
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return bwd_op().call(grad_out, xa, weight, A, R, B, adapter_ids, scaling, adapter_scaling, need_x, need_R, backend);
}

}  // namespace
}  // namespace loraxs

TORCH_LIBRARY_IMPL(loraxs, Autograd, m) {
  m.impl("linear_multi_fwd", &loraxs::linear_multi_fwd_autograd);
  m.impl("linear_multi_bwd", &loraxs::linear_multi_bwd_autograd);
}
