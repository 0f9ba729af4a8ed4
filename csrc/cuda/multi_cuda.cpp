// The CUDA kernels of linear_multi_fwd / linear_multi_bwd (schemas in csrc/multi.cpp, contract in
// csrc/multi_contract.cpp): many adapters in one batch, row i using R[adapter_ids[i]] of a bank (n, r, r).
// The contract check (ids' values included, before any launch: a kernel reads R[id] unchecked), the
// backend choice ("auto" as for one adapter: csrc/backend.cpp), and for backend "cuda" allocation, the
// current stream and the launches of kernels/multi.cuh and the single-adapter GEMMs / decoding kernels:
//
//   forward, half/bf16, M <= 16:  decode_partial + decode_epilogue with per-row R (DecodeArgs::ids)
//   forward otherwise:            xa = x A;  t_i = s_i·xa_i R[id_i] (multi_rows);  y = x Wᵀ + t B + b
//   backward:                     u = g Bᵀ;  v_i = s_i·u_i R[id_i]ᵀ (multi_rows);  grad_x = g W + v Aᵀ;
//                                 grad_R: the rows sorted by adapter once per call (stable sort on the
//                                 device, segment starts by searchsorted: no copy to the host), then
//                                 one CTA per (adapter, tile) sums its rows in order (multi_grad_r)
//
// Plain host C++ like linear_cuda.cpp (no <<<>>>): the kernels sit behind kernels/launch.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding.h"

namespace loraxs {
namespace {

using namespace cuda_binding;  // binding.h, shared with linear_cuda.cpp

// ---- Many-adapter arguments shared by the launches.
struct Adapters {
  at::Tensor ids;    // (M,) contiguous int32 / int64
  at::Tensor scale;  // (n,) contiguous float64, or undefined
  lc::IndexType ids_type() const {
    return ids.scalar_type() == at::kLong ? lc::IndexType::kInt64 : lc::IndexType::kInt32;
  }
  const double* scale_ptr() const { return scale.defined() ? scale.data_ptr<double>() : nullptr; }
};

Adapters adapters(const at::Tensor& ids, const std::optional<at::Tensor>& adapter_scaling) {
  Adapters a;
  a.ids = ids.reshape({-1}).contiguous();
  // The kernels form s_k = scaling·adapter_scaling[k] in double, as the CPU kernel does for its alphas.
  if (adapter_scaling.has_value()) a.scale = adapter_scaling->to(at::kDouble).contiguous();
  return a;
}

// out_i = s_i·in_i R[id_i] (transpose_R: R[id_i]ᵀ), zero rows for id -1. R: the bank with its own strides
// (an fp32 master bank is rounded as it is read; the bank is never copied or converted).
void run_multi_rows(lc::DType dt, at::Tensor& out, const at::Tensor& in, const at::Tensor& R, const Adapters& ad,
                    double scaling, bool transpose_R, cudaStream_t stream) {
  lc::MultiRowsArgs a;
  a.M = in.size(0), a.r = in.size(1), a.n = R.size(0);
  a.in = in.data_ptr(), a.s_in0 = in.stride(0), a.s_in1 = in.stride(1);
  a.R = R.data_ptr(), a.s_rn = R.stride(0), a.s_r0 = R.stride(1), a.s_r1 = R.stride(2);
  a.r_dtype = dtype_of(R.scalar_type());
  a.transpose_R = transpose_R;
  a.ids = ad.ids.data_ptr(), a.ids_type = ad.ids_type();
  a.adapter_scale = ad.scale_ptr();
  a.scaling = scaling;
  a.out = out.data_ptr();
  C10_CUDA_CHECK(lc::multi_rows(dt, a, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------- the "cuda" backend, (M, ·) inputs
Fwd cuda_multi_forward(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& ids,
                       double scaling, const std::optional<at::Tensor>& adapter_scaling) {
  const int64_t M = x_in.size(0), out = weight.size(0), r = A.size(1);
  const lc::DType dt = dtype_of(x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty({M, out}, x_in.options());
  at::Tensor xa = at::empty({M, r}, x_in.options());
  if (M == 0) return {y, xa};
  if (zero_features(weight)) return zero_feature_forward(x_in, A, bias, y, xa);
  check_cuda_inputs("loraxs linear_multi_fwd", x_in, r);
  const DeviceInfo info = checked_device(x_in);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor x = vector_readable(x_in);
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  const Adapters ad = adapters(ids, adapter_scaling);

  lc::DecodeArgs d = decode_args(x, weight, b, Ac, Bc, scaling, y, xa);
  // R per row: the bank's slice id·s_rn with its own strides (ids null = one adapter).
  d.R = R.data_ptr(), d.s_r0 = R.stride(1), d.s_r1 = R.stride(2), d.r_dtype = dtype_of(R.scalar_type());
  d.ids = ad.ids.data_ptr(), d.ids_type = ad.ids_type(), d.s_rn = R.stride(0), d.adapter_scale = ad.scale_ptr();
  if (try_decode(dt, d, x, weight, info, stream)) return {y, xa};

  run_x_times_A(dt, xa, x, Ac, info, stream);
  // t_i = s_i·xa_i R[id_i] in the layer's dtype; zero rows for id -1.
  at::Tensor t = at::empty({M, r}, x.options());
  run_multi_rows(dt, t, xa, R, ad, scaling, /*transpose_R=*/false, stream);
  run_forward_main(dt, y, x, weight, t, Bc, b, info, stream);  // y = x Wᵀ + t B + b
  return {y, xa};
}

Bwd cuda_multi_backward(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& ids,
                        double scaling, const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R) {
  const int64_t M = grad_out.size(0), in = weight.size(1), r = A.size(1), n = R.size(0);
  const lc::DType dt = dtype_of(grad_out.scalar_type());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor grad_x = need_x ? at::empty({M, in}, grad_out.options()) : grad_out.new_empty({0});
  // Every adapter's slice is written (zeros for unused adapters); over zero tokens the sum is zero.
  at::Tensor grad_R = need_R ? (M == 0 ? at::zeros({n, r, r}, R.options()) : at::empty({n, r, r}, R.options()))
                             : R.new_empty({0});
  if (M == 0 || (!need_x && !need_R)) return {grad_x, grad_R};
  if (zero_features(weight)) return zero_feature_backward(grad_x, grad_R);
  check_cuda_inputs("loraxs linear_multi_bwd", grad_out, r);
  const DeviceInfo info = checked_device(grad_out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor g = vector_readable(grad_out);
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous();
  const Adapters ad = adapters(ids, adapter_scaling);
  // u = g Bᵀ (M×r).
  at::Tensor u = at::empty({M, r}, g.options());
  run_g_times_Bt(dt, u, g, Bc, info, stream);

  if (need_x) {
    // v_i = s_i·u_i R[id_i]ᵀ; grad_x = g W + v Aᵀ: Q1 = Wᵀ (rows = in, k = out), Q2 = A as is.
    at::Tensor v = at::empty({M, r}, g.options());
    run_multi_rows(dt, v, u, R, ad, scaling, /*transpose_R=*/true, stream);
    run_grad_x_main(dt, grad_x, g, weight, v, Ac, info, stream);
  }
  if (need_R) {
    // The rows grouped by adapter, on the device: a stable sort keeps each adapter's rows in batch
    // order (the -1 rows sort first); adapter k's rows are perm[seg[k] : seg[k + 1]) with seg[k] the
    // number of ids below k.
    const at::Tensor ids64 = ad.ids.to(at::kLong);
    auto [sorted, perm] = at::sort(ids64, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const at::Tensor seg = at::searchsorted(sorted, at::arange(n + 1, ids64.options()));
    lc::MultiGradRArgs a;
    a.r = r, a.n = n;
    a.xa = xa.data_ptr(), a.s_xa0 = xa.stride(0), a.s_xa1 = xa.stride(1);
    a.u = u.data_ptr(), a.s_u0 = u.stride(0), a.s_u1 = u.stride(1);
    const at::Tensor perm_c = perm.contiguous(), seg_c = seg.contiguous();
    a.perm = perm_c.data_ptr<int64_t>(), a.seg = seg_c.data_ptr<int64_t>();
    a.adapter_scale = ad.scale_ptr();
    a.scaling = scaling;
    a.out = grad_R.data_ptr();
    a.out_dtype = dtype_of(R.scalar_type());
    C10_CUDA_CHECK(lc::multi_grad_r(dt, a, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_x, grad_R};
}

// ------------------------------------------------------------------------ the CUDA dispatch key
// CUDA graphs (issue 19). Outside a capture the contract checks the ids' values on the host (aminmax, two
// scalars: a sync) and raises a ValueError naming the first bad id before anything is launched. A
// capture cannot contain a host copy, so while t's stream is capturing the values are checked on the
// device instead: torch._assert_async, enqueued before every kernel of the call, traps on an id outside
// [-1, n) at replay; the trap stops the stream before any later kernel reads R[id] (a device-side
// assert is sticky: every later launch of the context fails), so a bad id still raises (a RuntimeError
// at the next sync) and still cannot read past the bank; multi_rows_kernel also maps such an id to the
// base row. Validating once per use_adapters call instead would leave a direct call of the op unchecked.
bool capturing_on(const at::Tensor& t) {
  const c10::cuda::CUDAGuard guard(t.device());
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

void assert_ids_in_bank(const at::Tensor& ids, const at::Tensor& R) {
  if (ids.numel() == 0) return;
  const at::Tensor ok = at::logical_and(ids.ge(-1), ids.lt(R.size(0))).all();
  at::_assert_async(ok, ids_range_message(R));
}

Fwd linear_multi_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                          double scaling, const std::optional<at::Tensor>& adapter_scaling, c10::string_view backend) {
  const Backend asked = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // inputs are cast already
  const bool capturing = capturing_on(x);
  check_multi_inputs(x, weight, bias, A, R, B, adapter_ids, adapter_scaling, !capturing);  // before any kernel
  if (capturing) assert_ids_in_bank(adapter_ids, R);
  const int64_t out = weight.size(0);
  const at::Tensor x2 = as_rows(x);
  switch (resolve(asked, x, x2.size(0), A.size(1))) {
    case Backend::kCuda: {
      auto [y2, xa] =
          cuda_multi_forward(x2, weight, bias, A, R, B, adapter_ids.reshape({-1}), scaling, adapter_scaling);
      return {unflatten_fresh(y2, x.sizes(), out), xa};
    }
    case Backend::kTorch:
      return aten_multi_forward(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling);
    case Backend::kTriton: {
      auto [y2, xa] = call_python_multi_fwd(x2, weight, bias, A, R, B, adapter_ids.reshape({-1}), scaling,
                                            adapter_scaling, Backend::kTriton);
      return {unflatten_fresh(y2, x.sizes(), out), xa};
    }
    default:
      break;
  }
  wrong_device(Backend::kCpp, x.device());
}

Bwd linear_multi_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                          const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                          double scaling, const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R,
                          c10::string_view backend) {
  const Backend asked = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool capturing = capturing_on(grad_out);
  check_multi_backward_inputs(grad_out, xa, weight, A, R, B, adapter_ids, adapter_scaling, need_R, !capturing);
  if (capturing) assert_ids_in_bank(adapter_ids, R);
  const int64_t in = weight.size(1);
  const at::Tensor g2 = as_rows(grad_out);
  switch (resolve(asked, grad_out, g2.size(0), A.size(1))) {
    case Backend::kCuda: {
      auto [gx2, gR] = cuda_multi_backward(g2, xa, weight, A, R, B, adapter_ids.reshape({-1}), scaling,
                                           adapter_scaling, need_x, need_R);
      return {need_x ? unflatten_fresh(gx2, grad_out.sizes(), in) : gx2, gR};
    }
    case Backend::kTorch:
      return aten_multi_backward(grad_out, xa, weight, A, R, B, adapter_ids, scaling, adapter_scaling, need_x,
                                 need_R);
    case Backend::kTriton: {
      auto [gx2, gR] = call_python_multi_bwd(g2, xa, weight, A, R, B, adapter_ids.reshape({-1}), scaling,
                                             adapter_scaling, need_x, need_R, Backend::kTriton);
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
  m.impl("linear_multi_fwd", &loraxs::linear_multi_fwd_cuda);
  m.impl("linear_multi_bwd", &loraxs::linear_multi_bwd_cuda);
}
