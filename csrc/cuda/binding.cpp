// The helpers both CUDA bindings use (binding.h).
#include "binding.h"

#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace loraxs {
namespace cuda_binding {

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

lc::GemmArgs gemm_args(const at::Tensor& C, int64_t K1, lc::Operand P1, lc::Operand Q1, double alpha) {
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

void run_gemm(lc::DType dt, const lc::GemmArgs& a, lc::QOrder order, const DeviceInfo& info, cudaStream_t stream) {
  C10_CUDA_CHECK(lc::gemm(dt, a, order, info.num_sms, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run_x_times_A(lc::DType dt, const at::Tensor& xa, const at::Tensor& x, const at::Tensor& Ac,
                   const DeviceInfo& info, cudaStream_t stream) {
  // Q1 = Aᵀ (rows = the r columns of A, k = in).
  run_gemm(dt, gemm_args(xa, x.size(1), as_is(x), transposed(Ac)), lc::QOrder::kQ1NContig_Q2KContig, info, stream);
}

void run_g_times_Bt(lc::DType dt, const at::Tensor& u, const at::Tensor& g, const at::Tensor& Bc,
                    const DeviceInfo& info, cudaStream_t stream) {
  // Q1 = B as is (rows = r, k = out).
  run_gemm(dt, gemm_args(u, g.size(1), as_is(g), as_is(Bc)), lc::QOrder::kQ1KContig_Q2NContig, info, stream);
}

void run_forward_main(lc::DType dt, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& t, const at::Tensor& Bc, const at::Tensor& b, const DeviceInfo& info,
                      cudaStream_t stream) {
  // The rank-r term is r more steps of the same K loop (Q2 = Bᵀ).
  lc::GemmArgs main = gemm_args(y, x.size(1), as_is(x), as_is(weight));
  main.K2 = t.size(1);
  main.P2 = as_is(t);
  main.Q2 = transposed(Bc);
  main.bias = b.defined() ? b.data_ptr() : nullptr;
  run_gemm(dt, main, lc::QOrder::kQ1KContig_Q2NContig, info, stream);
}

void run_grad_x_main(lc::DType dt, const at::Tensor& grad_x, const at::Tensor& g, const at::Tensor& weight,
                     const at::Tensor& v, const at::Tensor& Ac, const DeviceInfo& info, cudaStream_t stream) {
  // Q1 = Wᵀ (rows = in, k = out), Q2 = A as is (rows = in, k = r).
  lc::GemmArgs main = gemm_args(grad_x, g.size(1), as_is(g), transposed(weight));
  main.K2 = v.size(1);
  main.P2 = as_is(v);
  main.Q2 = as_is(Ac);
  run_gemm(dt, main, lc::QOrder::kQ1NContig_Q2KContig, info, stream);
}

lc::DecodeArgs decode_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& b, const at::Tensor& Ac,
                           const at::Tensor& Bc, double scaling, const at::Tensor& y, const at::Tensor& xa) {
  lc::DecodeArgs d;
  d.M = x.size(0), d.N = weight.size(0), d.K = weight.size(1), d.r = Ac.size(1);
  d.x = x.data_ptr(), d.s_x = x.stride(0);
  d.W = weight.data_ptr(), d.s_w = weight.stride(0);
  d.A = Ac.data_ptr(), d.s_a0 = Ac.stride(0), d.s_a1 = Ac.stride(1);
  d.B = Bc.data_ptr(), d.s_b0 = Bc.stride(0), d.s_b1 = Bc.stride(1);
  d.bias = b.defined() ? b.data_ptr() : nullptr;
  d.scaling = scaling;
  d.y = y.data_ptr(), d.xa = xa.data_ptr();
  return d;
}

bool try_decode(lc::DType dt, const lc::DecodeArgs& d, const at::Tensor& x, const at::Tensor& weight,
                const DeviceInfo& info, cudaStream_t stream) {
  if (!(x.stride(1) == 1 && weight.stride(1) == 1 && lc::decode_supported(dt, d) && env_on("LORAXS_CUDA_DECODE"))) {
    return false;
  }
  const int splits = lc::decode_splits(d, info.num_sms);
  at::Tensor ws = at::empty({lc::decode_workspace_floats(d, splits)}, x.options().dtype(at::kFloat));
  const bool pdl = info.cc_major >= 9 && env_on("LORAXS_CUDA_PDL");  // and the binary's arch: decode.cu
  C10_CUDA_CHECK(lc::decode_forward_partial(dt, d, splits, ws.data_ptr<float>(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  C10_CUDA_CHECK(lc::decode_forward_epilogue(dt, d, splits, ws.data_ptr<float>(), pdl, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

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

}  // namespace cuda_binding
}  // namespace loraxs
