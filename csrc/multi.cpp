// Many adapters in one batch (issue 11): row i of x gets its own R from a bank,
//
//   y_i = x_i Wᵀ + b + s_i·((x_i A) R[id_i]) B,    s_i = scaling·adapter_scaling[id_i] (or scaling),
//
// with id_i = -1 meaning the base layer alone. A and B come from the base weight's SVD, so every
// adapter of a layer shares them: x Wᵀ and x A are computed once for all rows and only the r×r
// transform differs per row. The same layout as the single-adapter op (ops.cpp): the public
// `linear_multi` is CompositeImplicitAutograd (autocast's casts, then linear_multi_fwd), whose
// Autograd kernel (multi_autograd.cpp) keeps x A only when R trains and calls linear_multi_bwd; the
// device kernels (cpu/multi_aten.cpp) check the contract (multi_contract.cpp) once. Fake kernels:
// loraxs_kernels/ops/multi.py.
#include <torch/library.h>

#include "loraxs.h"

namespace loraxs {
namespace {

at::Tensor linear_multi(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                        double scaling, const std::optional<at::Tensor>& adapter_scaling, c10::string_view backend) {
  static const auto fwd =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("loraxs::linear_multi_fwd", "")
          .typed<Fwd(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                     const std::optional<at::Tensor>&, c10::string_view)>();
  // The ids and the per-adapter scaling are not layer tensors: autocast leaves them alone.
  if (auto c = autocast_layer(x, weight, bias, A, R, B)) {
    return std::get<0>(
        fwd.call(c->x, c->weight, c->bias, c->A, c->R, c->B, adapter_ids, scaling, adapter_scaling, backend));
  }
  return std::get<0>(fwd.call(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling, backend));
}

}  // namespace
}  // namespace loraxs

TORCH_LIBRARY_FRAGMENT(loraxs, m) {
  m.set_python_module("loraxs_kernels.ops.multi");
  // `backend` as for linear: "auto", "cpp" / "torch" (the grouped ATen schedule of cpu/multi_aten.cpp, on the
  // CPU or through cuBLAS), "triton" (backends/triton/multi.py), "cuda" (cuda/multi_cuda.cpp).
  m.def("linear_multi(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, Tensor adapter_ids, "
        "float scaling=1.0, Tensor? adapter_scaling=None, str backend=\"auto\") -> Tensor");
  m.def("linear_multi_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, Tensor adapter_ids, "
        "float scaling, Tensor? adapter_scaling, str backend) -> (Tensor, Tensor)");
  m.def("linear_multi_bwd(Tensor grad_out, Tensor xa, Tensor weight, Tensor A, Tensor R, Tensor B, "
        "Tensor adapter_ids, float scaling, Tensor? adapter_scaling, bool need_x, bool need_R, str backend) "
        "-> (Tensor, Tensor)");
  // The Python backend ("triton"), called by the device kernels when a call names it (or "auto" picks it
  // on CUDA): x and grad_out arrive as (M, ·), the ids as (M,), all checked.
  m.def("py_multi_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, Tensor adapter_ids, "
        "float scaling, Tensor? adapter_scaling, str backend) -> (Tensor, Tensor)");
  m.def("py_multi_bwd(Tensor grad_out, Tensor xa, Tensor weight, Tensor A, Tensor R, Tensor B, "
        "Tensor adapter_ids, float scaling, Tensor? adapter_scaling, bool need_x, bool need_R, str backend) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(loraxs, CompositeImplicitAutograd, m) { m.impl("linear_multi", &loraxs::linear_multi); }
