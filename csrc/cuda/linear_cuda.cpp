// The CUDA kernels of linear_fwd / linear_bwd (schemas in csrc/ops.cpp): the contract check, the
// backend choice ("auto": csrc/backend.cpp), and for the "cuda" backend allocation, the current
// stream and the launches. The kernels themselves are
// torch-free (kernels/*.cuh behind kernels/launch.h, instantiated in the .cu files next to this one).
//
// This file is plain host C++: it includes ATen and c10/cuda headers but launches nothing with
// <<<>>>, so the host compiler parses torch's headers once, instead of nvcc's front end once per
// GPU architecture. Registration is TORCH_LIBRARY_IMPL only (no pybind11): the library is loaded
// with torch.ops.load_library, from the setup.py build or the CMake build alike.
//
// Schedules (M = rows of x, r = rank):
//   forward, half/bf16, M <= 16:  decode_partial + decode_epilogue (kernels/decode.cuh), W read once.
//   forward otherwise:            xa = x A;  t = s·xa R;  y = x Wᵀ + t B + b, the t B term as r extra
//                                 k steps of the x Wᵀ GEMM (3 GEMM launches)
//   backward:                     u = g Bᵀ;  v = s·u Rᵀ;  grad_x = g W + v Aᵀ (same fusion);
//                                 grad_R = s·xaᵀ u (split over M, fixed-order reduction)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding.h"

namespace loraxs {
namespace {

using namespace cuda_binding;  // binding.h: device facts, operands, GEMM/decoding launches, resolve

// ------------------------------------------------------------------- the "cuda" backend, (M, ·) inputs
Fwd cuda_forward(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling) {
  const int64_t M = x_in.size(0), out = weight.size(0), r = A.size(1);
  check_cuda_inputs("loraxs native_fwd", x_in, r);
  const lc::DType dt = dtype_of(x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty({M, out}, x_in.options());
  at::Tensor xa = at::empty({M, r}, x_in.options());
  if (M == 0) return {y, xa};
  if (zero_features(weight)) return zero_feature_forward(x_in, A, bias, y, xa);
  const DeviceInfo info = checked_device(x_in);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor x = vector_readable(x_in);
  // A, B, R and the bias are the layer's parameters, contiguous in practice (then .contiguous() is
  // free); the weight is used with whatever strides it has (copying it would cost a full read+write).
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous(), Rc = R.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();

  lc::DecodeArgs d = decode_args(x, weight, b, Ac, Bc, scaling, y, xa);
  d.R = Rc.data_ptr(), d.s_r0 = Rc.stride(0), d.s_r1 = Rc.stride(1), d.r_dtype = dtype_of(Rc.scalar_type());
  if (try_decode(dt, d, x, weight, info, stream)) return {y, xa};

  run_x_times_A(dt, xa, x, Ac, info, stream);
  // t = s·xa R in the layer's dtype (an fp32 master R is rounded first, like the CPU kernel).
  const at::Tensor Rt = Rc.to(x.scalar_type());
  at::Tensor t = at::empty({M, r}, x.options());
  run_gemm(dt, gemm_args(t, r, as_is(xa), transposed(Rt), scaling), lc::QOrder::kQ1NContig_Q2KContig, info, stream);
  run_forward_main(dt, y, x, weight, t, Bc, b, info, stream);  // y = x Wᵀ + t B + b
  return {y, xa};
}

Bwd cuda_backward(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                  const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x, bool need_R) {
  const int64_t M = grad_out.size(0), in = weight.size(1), r = A.size(1);
  check_cuda_inputs("loraxs native_bwd", grad_out, r);
  const lc::DType dt = dtype_of(grad_out.scalar_type());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor grad_x = need_x ? at::empty({M, in}, grad_out.options()) : grad_out.new_empty({0});
  // A sum over zero tokens is zero, not empty.
  at::Tensor grad_R = need_R ? (M == 0 ? at::zeros({r, r}, R.options()) : at::empty({r, r}, R.options()))
                             : R.new_empty({0});
  if (M == 0 || (!need_x && !need_R)) return {grad_x, grad_R};
  if (zero_features(weight)) return zero_feature_backward(grad_x, grad_R);
  const DeviceInfo info = checked_device(grad_out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor g = vector_readable(grad_out);
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous();
  // u = g Bᵀ (M×r).
  at::Tensor u = at::empty({M, r}, g.options());
  run_g_times_Bt(dt, u, g, Bc, info, stream);

  if (need_x) {
    // v = s·u Rᵀ: Q1 = R as is (rows = i, k = j).
    const at::Tensor Rt = R.contiguous().to(g.scalar_type());
    at::Tensor v = at::empty({M, r}, g.options());
    run_gemm(dt, gemm_args(v, r, as_is(u), as_is(Rt), scaling), lc::QOrder::kQ1KContig_Q2NContig, info, stream);
    run_grad_x_main(dt, grad_x, g, weight, v, Ac, info, stream);  // grad_x = g W + v Aᵀ
  }
  if (need_R) {
    lc::GradRArgs a;
    a.M = M, a.r = r;
    a.xa = xa.data_ptr(), a.s_xa0 = xa.stride(0), a.s_xa1 = xa.stride(1);
    a.u = u.data_ptr(), a.s_u0 = u.stride(0), a.s_u1 = u.stride(1);
    a.scaling = scaling;
    a.out = grad_R.data_ptr();
    a.out_dtype = dtype_of(R.scalar_type());
    const int splits = lc::grad_r_splits(M, r);
    const auto acc = dt == lc::DType::kDouble ? at::kDouble : at::kFloat;
    at::Tensor ws = at::empty({lc::grad_r_workspace_elems(r, splits)}, g.options().dtype(acc));
    C10_CUDA_CHECK(lc::grad_r_partial(dt, a, splits, ws.data_ptr(), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(lc::grad_r_reduce(dt, a, splits, ws.data_ptr(), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_x, grad_R};
}

// ------------------------------------------------------------------------ the CUDA dispatch key
Fwd linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling,
                    c10::string_view backend) {
  const Backend asked = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // inputs are cast already
  check_inputs(x, weight, bias, A, R, B);
  const int64_t out = weight.size(0);
  const at::Tensor x2 = as_rows(x);
  switch (resolve(asked, x, x2.size(0), A.size(1))) {
    case Backend::kCuda: {
      auto [y2, xa] = cuda_forward(x2, weight, bias, A, R, B, scaling);
      return {unflatten_fresh(y2, x.sizes(), out), xa};
    }
    case Backend::kTorch:
      // "auto" chose cuBLAS: the C++ ATen schedule. A call that names "torch" gets the Python backend.
      if (asked == Backend::kAuto) return aten_forward(x, weight, bias, A, R, B, scaling);
      [[fallthrough]];
    case Backend::kTriton: {
      const Backend py = asked == Backend::kAuto ? Backend::kTriton : asked;
      auto [y2, xa] = call_python_fwd(x2, weight, bias, A, R, B, scaling, py);
      return {unflatten_fresh(y2, x.sizes(), out), xa};
    }
    default:
      break;
  }
  wrong_device(Backend::kCpp, x.device());
}

Bwd linear_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                    const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x, bool need_R,
                    c10::string_view backend) {
  const Backend asked = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_backward_inputs(grad_out, xa, weight, A, R, B, need_R);
  const int64_t in = weight.size(1);
  const at::Tensor g2 = as_rows(grad_out);
  switch (resolve(asked, grad_out, g2.size(0), A.size(1))) {
    case Backend::kCuda: {
      auto [gx2, gR] = cuda_backward(g2, xa, weight, A, R, B, scaling, need_x, need_R);
      return {need_x ? unflatten_fresh(gx2, grad_out.sizes(), in) : gx2, gR};
    }
    case Backend::kTorch:
      if (asked == Backend::kAuto) return aten_backward(grad_out, xa, weight, A, R, B, scaling, need_x, need_R);
      [[fallthrough]];
    case Backend::kTriton: {
      const Backend py = asked == Backend::kAuto ? Backend::kTriton : asked;
      auto [gx2, gR] = call_python_bwd(g2, xa, weight, A, R, B, scaling, need_x, need_R, py);
      return {need_x ? unflatten_fresh(gx2, grad_out.sizes(), in) : gx2, gR};
    }
    default:
      break;
  }
  wrong_device(Backend::kCpp, grad_out.device());
}

}  // namespace
}  // namespace loraxs

TORCH_LIBRARY_IMPL(loraxs, CUDA, m) {
  m.impl("linear_fwd", &loraxs::linear_fwd_cuda);
  m.impl("linear_bwd", &loraxs::linear_bwd_cuda);
}
