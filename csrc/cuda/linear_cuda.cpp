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

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "../loraxs.h"
#include "kernels/launch.h"

namespace loraxs {
namespace {

namespace lc = loraxs::cuda;

struct DeviceInfo {
  int num_sms = 0;
  int cc_major = 0;
  std::string name;
};

// SM count, compute capability and name, queried once per device.
DeviceInfo device_info(int device) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device));
  cudaDeviceProp prop;
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  info.name = prop.name;
  cache.emplace(device, info);
  return info;
}

// Switches for A/B runs and tests, read on every call (a getenv is nothing next to a launch):
// LORAXS_CUDA_DECODE=0 sends M <= 16 to the tiled GEMMs; LORAXS_CUDA_PDL=0 turns off programmatic
// dependent launch on sm_90.
bool env_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0);
}

lc::DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kHalf:
      return lc::DType::kHalf;
    case at::kBFloat16:
      return lc::DType::kBFloat16;
    case at::kFloat:
      return lc::DType::kFloat;
    case at::kDouble:
      return lc::DType::kDouble;
    default:
      break;
  }
  TORCH_CHECK(false, "loraxs CUDA kernels support float16, bfloat16, float32 and float64, got ", s);
}

bool is_half(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

// A 2-D tensor as a GEMM operand: rows along dim 0, k along dim 1 ...
lc::Operand as_is(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
// ... or transposed (rows along dim 1), by swapping strides: no copy.
lc::Operand transposed(const at::Tensor& t) { return {t.data_ptr(), t.stride(1), t.stride(0)}; }

// The half-precision GEMMs copy x (forward) and grad_out (backward) tiles with 16-byte async copies.
// An operand they cannot read that way (k not the unit-stride dimension, or row starts not 16-byte
// aligned) still works, through element-wise copies that every column of CTAs repeats; one
// contiguous copy up front reads it once instead of ceil(N/64) times, so take it. (Reasoned, not
// measured: no GPU was available when this was written.) An expanded grad_out with row stride 0 is
// already readable and is not copied.
at::Tensor vector_readable(const at::Tensor& t) {
  if (!is_half(t.scalar_type()) || t.numel() == 0) return t;
  const bool ok = t.stride(1) == 1 && t.stride(0) % 8 == 0 && (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0;
  if (ok) return t;
  // A fresh copy helps when it can take the 16-byte copies (k a multiple of 8) or at least makes k
  // the unit-stride dimension of the element-wise ones. clone, not contiguous(): a contiguous view at
  // an odd offset would come back unchanged.
  if (t.size(1) % 8 == 0 || t.stride(1) != 1) return t.clone(at::MemoryFormat::Contiguous);
  return t;
}

void check_cuda_inputs(const char* op, const at::Tensor& ref, int64_t r) {
  TORCH_CHECK(ref.is_cuda(), op, ": expected CUDA tensors, got ", ref.device());
  TORCH_CHECK(r >= 1 && r <= lc::kMaxRank, op, ": the CUDA kernels take rank 1..", lc::kMaxRank, ", got ", r);
}

DeviceInfo checked_device(const at::Tensor& ref) {
  const DeviceInfo info = device_info(ref.get_device());
  // mma.sync bf16, ldmatrix and cp.async need sm_80; the library carries sm_80 and sm_90 code.
  TORCH_CHECK(info.cc_major >= 8, "loraxs CUDA kernels need compute capability 8.0 or newer (the device has ",
              info.cc_major, ".x)");
  return info;
}

void run_gemm(lc::DType dt, const lc::GemmArgs& a, lc::QOrder order, const DeviceInfo& info, cudaStream_t stream) {
  C10_CUDA_CHECK(lc::gemm(dt, a, order, info.num_sms, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// C (M×N, contiguous, fresh) = alpha·(P1 Q1ᵀ + P2 Q2ᵀ) + bias.
lc::GemmArgs gemm_args(const at::Tensor& C, int64_t K1, lc::Operand P1, lc::Operand Q1, double alpha = 1.0) {
  lc::GemmArgs a;
  a.M = C.size(0);
  a.N = C.size(1);
  a.K1 = K1;
  a.P1 = P1;
  a.Q1 = Q1;
  a.C = C.data_ptr();
  a.s_cm = C.stride(0);
  a.s_cn = C.stride(1);
  a.alpha = alpha;
  return a;
}

// ------------------------------------------------------------------- the "cuda" backend, (M, ·) inputs
Fwd cuda_forward(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling) {
  const int64_t M = x_in.size(0), in = weight.size(1), out = weight.size(0), r = A.size(1);
  check_cuda_inputs("loraxs native_fwd", x_in, r);
  const lc::DType dt = dtype_of(x_in.scalar_type());
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty({M, out}, x_in.options());
  at::Tensor xa = at::empty({M, r}, x_in.options());
  if (M == 0) return {y, xa};
  const DeviceInfo info = checked_device(x_in);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor x = vector_readable(x_in);
  // A, B, R and the bias are the layer's parameters, contiguous in practice (then .contiguous() is
  // free); the weight is used with whatever strides it has (copying it would cost a full read+write).
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous(), Rc = R.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();

  lc::DecodeArgs d;
  d.M = M, d.N = out, d.K = in, d.r = r;
  d.x = x.data_ptr(), d.s_x = x.stride(0);
  d.W = weight.data_ptr(), d.s_w = weight.stride(0);
  d.A = Ac.data_ptr(), d.s_a0 = Ac.stride(0), d.s_a1 = Ac.stride(1);
  d.R = Rc.data_ptr(), d.s_r0 = Rc.stride(0), d.s_r1 = Rc.stride(1), d.r_dtype = dtype_of(Rc.scalar_type());
  d.B = Bc.data_ptr(), d.s_b0 = Bc.stride(0), d.s_b1 = Bc.stride(1);
  d.bias = b.defined() ? b.data_ptr() : nullptr;
  d.scaling = scaling;
  d.y = y.data_ptr(), d.xa = xa.data_ptr();
  if (x.stride(1) == 1 && weight.stride(1) == 1 && lc::decode_supported(dt, d) && env_on("LORAXS_CUDA_DECODE")) {
    const int splits = lc::decode_splits(d, info.num_sms);
    at::Tensor ws = at::empty({lc::decode_workspace_floats(d, splits)}, x.options().dtype(at::kFloat));
    const bool pdl = info.cc_major >= 9 && env_on("LORAXS_CUDA_PDL");  // and the binary's arch: decode.cu
    C10_CUDA_CHECK(lc::decode_forward_partial(dt, d, splits, ws.data_ptr<float>(), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    C10_CUDA_CHECK(lc::decode_forward_epilogue(dt, d, splits, ws.data_ptr<float>(), pdl, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {y, xa};
  }

  // xa = x A:  Q1 = Aᵀ (rows = the r columns of A, k = in).
  run_gemm(dt, gemm_args(xa, in, as_is(x), transposed(Ac)), lc::QOrder::kQ1NContig_Q2KContig, info, stream);
  // t = s·xa R in the layer's dtype (an fp32 master R is rounded first, like the CPU kernel).
  const at::Tensor Rt = Rc.to(x.scalar_type());
  at::Tensor t = at::empty({M, r}, x.options());
  run_gemm(dt, gemm_args(t, r, as_is(xa), transposed(Rt), scaling), lc::QOrder::kQ1NContig_Q2KContig, info, stream);
  // y = x Wᵀ + t B + b: the rank-r term is r more steps of the same K loop (Q2 = Bᵀ).
  lc::GemmArgs main = gemm_args(y, in, as_is(x), as_is(weight));
  main.K2 = r;
  main.P2 = as_is(t);
  main.Q2 = transposed(Bc);
  main.bias = b.defined() ? b.data_ptr() : nullptr;
  run_gemm(dt, main, lc::QOrder::kQ1KContig_Q2NContig, info, stream);
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
  const DeviceInfo info = checked_device(grad_out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const at::Tensor g = vector_readable(grad_out);
  const at::Tensor Ac = A.contiguous(), Bc = B.contiguous();
  // u = g Bᵀ (M×r): Q1 = B as is (rows = r, k = out).
  at::Tensor u = at::empty({M, r}, g.options());
  run_gemm(dt, gemm_args(u, weight.size(0), as_is(g), as_is(Bc)), lc::QOrder::kQ1KContig_Q2NContig, info, stream);

  if (need_x) {
    // v = s·u Rᵀ: Q1 = R as is (rows = i, k = j).
    const at::Tensor Rt = R.contiguous().to(g.scalar_type());
    at::Tensor v = at::empty({M, r}, g.options());
    run_gemm(dt, gemm_args(v, r, as_is(u), as_is(Rt), scaling), lc::QOrder::kQ1KContig_Q2NContig, info, stream);
    // grad_x = g W + v Aᵀ: Q1 = Wᵀ (rows = in, k = out), Q2 = A as is (rows = in, k = r).
    lc::GemmArgs main = gemm_args(grad_x, weight.size(0), as_is(g), transposed(weight));
    main.K2 = r;
    main.P2 = as_is(v);
    main.Q2 = as_is(Ac);
    run_gemm(dt, main, lc::QOrder::kQ1NContig_Q2KContig, info, stream);
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
Backend resolve(Backend asked, const at::Tensor& ref, int64_t M, int64_t r) {
  if (asked != Backend::kAuto) return asked;
  const DeviceInfo info = device_info(ref.get_device());
  CudaContext c;
  c.device_name = info.name;
  c.cc_major = info.cc_major;
  c.tf32 = at::globalContext().allowTF32CuBLAS();
  c.triton = triton_installed();
  c.cuda_kernels = true;
  return choose_cuda_backend(c, ref.scalar_type(), M, r);
}

Fwd linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling,
                    c10::string_view backend) {
  const Backend asked = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // inputs are cast already
  check_inputs(x, weight, bias, A, R, B);
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, in});
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
  TORCH_CHECK(false, "backend 'cpp' is the C++ extension's CPU kernel; tensors are on ", x.device());
}

Bwd linear_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                    const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x, bool need_R,
                    c10::string_view backend) {
  const Backend asked = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_backward_inputs(grad_out, xa, weight, A, R, B, need_R);
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor g2 = grad_out.reshape({-1, out});
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
  TORCH_CHECK(false, "backend 'cpp' is the C++ extension's CPU kernel; tensors are on ", grad_out.device());
}

}  // namespace
}  // namespace loraxs

TORCH_LIBRARY_IMPL(loraxs, CUDA, m) {
  m.impl("linear_fwd", &loraxs::linear_fwd_cuda);
  m.impl("linear_bwd", &loraxs::linear_bwd_cuda);
}
