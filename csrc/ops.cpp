// The op's schemas, defined once, and the public entry `linear`.
//
// `linear` is CompositeImplicitAutograd: autocast's casts, then linear_fwd(...)[0]. Autograd,
// FakeTensor and torch.compile therefore see linear_fwd / linear_bwd, opaque ops with one kernel per
// device (cpu/aten_schedule.cpp, cuda/linear_cuda.cpp), an Autograd kernel (autograd.cpp) and fake
// kernels (loraxs_kernels/ops/fake.py: Python, because fake tensors may carry symbolic sizes).
// `backend` is a string argument rather than a dispatch key so that a test can run any backend on
// any device; "auto" is what every caller outside the tests uses.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "loraxs.h"

namespace loraxs {

void set_auto_choice(c10::string_view device_name, at::ScalarType dtype, int64_t m_bucket, int64_t r_bucket,
                     c10::string_view backend);
void clear_auto_choices();
void set_triton_installed(bool installed);
std::string auto_backend(c10::string_view device_name, int64_t cc_major, at::ScalarType dtype, int64_t M, int64_t r,
                         bool tf32, bool triton, bool cuda_kernels);

std::optional<LayerTensors> autocast_layer(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                           const at::Tensor& R, const at::Tensor& B) {
  const c10::DeviceType dev = x.device().type();
  if (!(at::autocast::is_autocast_available(dev) && at::autocast::is_autocast_enabled(dev))) return std::nullopt;
  const at::ScalarType to = at::autocast::get_autocast_dtype(dev);
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(to, t, dev); };
  return LayerTensors{cast(x), cast(weight), at::autocast::cached_cast(to, bias, dev), cast(A),
                      R.scalar_type() == at::kFloat ? R : cast(R), cast(B)};
}

namespace {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling,
                  c10::string_view backend) {
  static const auto fwd = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("loraxs::linear_fwd", "")
                              .typed<Fwd(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                         c10::string_view)>();
  if (auto c = autocast_layer(x, weight, bias, A, R, B)) {
    return std::get<0>(fwd.call(c->x, c->weight, c->bias, c->A, c->R, c->B, scaling, backend));
  }
  return std::get<0>(fwd.call(x, weight, bias, A, R, B, scaling, backend));
}

}  // namespace
}  // namespace loraxs

TORCH_LIBRARY(loraxs, m) {
  // Fake kernels of linear_fwd / linear_bwd live in Python; this tells torch where.
  m.set_python_module("loraxs_kernels.ops.fake");
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, float scaling=1.0, "
        "str backend=\"auto\") -> Tensor");
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, float scaling, "
        "str backend) -> (Tensor, Tensor)");
  m.def("linear_bwd(Tensor grad_out, Tensor xa, Tensor weight, Tensor A, Tensor R, Tensor B, float scaling, "
        "bool need_x, bool need_R, str backend) -> (Tensor, Tensor)");
  // The Python backends ("torch", "triton"), called by the device kernels above when a call names
  // them; x and grad_out arrive as (M, ·), already checked.
  m.def("py_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor R, Tensor B, float scaling, "
        "str backend) -> (Tensor, Tensor)");
  m.def("py_bwd(Tensor grad_out, Tensor xa, Tensor weight, Tensor A, Tensor R, Tensor B, float scaling, "
        "bool need_x, bool need_R, str backend) -> (Tensor, Tensor)");
  // "auto" on CUDA: the measured table's entries, and the choice itself for any (GPU, dtype, shape),
  // so that the rule runs in the tests of a machine without a GPU.
  m.def("set_auto_choice(str device_name, ScalarType dtype, int M_bucket, int r_bucket, str backend) -> ()",
        &loraxs::set_auto_choice);
  m.def("clear_auto_choices() -> ()", &loraxs::clear_auto_choices);
  m.def("set_triton_installed(bool installed) -> ()", &loraxs::set_triton_installed);
  m.def("auto_backend(str device_name, int cc_major, ScalarType dtype, int M, int r, bool tf32, bool triton, "
        "bool cuda_kernels) -> str",
        &loraxs::auto_backend);
}

TORCH_LIBRARY_IMPL(loraxs, CompositeImplicitAutograd, m) { m.impl("linear", &loraxs::linear); }
