// What the two CUDA bindings share (linear_cuda.cpp: one adapter; multi_cuda.cpp: a bank of them):
// the device facts, the env switches, ATen tensors as kernel operands, the GEMM and decoding
// launches, and the "auto" resolution. Plain host C++, like the bindings (no <<<>>>).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <string>

#include "../loraxs.h"
#include "kernels/launch.h"

namespace loraxs {
namespace cuda_binding {

namespace lc = loraxs::cuda;

struct DeviceInfo {
  int num_sms = 0;
  int cc_major = 0;
  std::string name;
};

// SM count, compute capability and name, queried once per device.
DeviceInfo device_info(int device);
// Checks that `ref` is a CUDA tensor and r is a rank the kernels take (`op` names the caller).
void check_cuda_inputs(const char* op, const at::Tensor& ref, int64_t r);
// The device's facts, refusing devices below sm_80 (mma.sync bf16, ldmatrix and cp.async need it).
DeviceInfo checked_device(const at::Tensor& ref);

// Switches for A/B runs and tests, read on every call (a getenv is nothing next to a launch):
// LORAXS_CUDA_DECODE=0 sends M <= 16 to the tiled GEMMs; LORAXS_CUDA_PDL=0 turns off programmatic
// dependent launch on sm_90.
bool env_on(const char* name);

lc::DType dtype_of(at::ScalarType s);
bool is_half(at::ScalarType s);
// A 2-D tensor as a GEMM operand: rows along dim 0, k along dim 1 ...
inline lc::Operand as_is(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
// ... or transposed (rows along dim 1), by swapping strides: no copy.
inline lc::Operand transposed(const at::Tensor& t) { return {t.data_ptr(), t.stride(1), t.stride(0)}; }
// x / grad_out as the half-precision GEMMs read them best (see binding.cpp).
at::Tensor vector_readable(const at::Tensor& t);

// C (M×N, contiguous, fresh) = alpha·P1 Q1ᵀ (add K2, P2, Q2 and bias for the rank-r term).
lc::GemmArgs gemm_args(const at::Tensor& C, int64_t K1, lc::Operand P1, lc::Operand Q1, double alpha = 1.0);
void run_gemm(lc::DType dt, const lc::GemmArgs& a, lc::QOrder order, const DeviceInfo& info, cudaStream_t stream);
// The four GEMMs both bindings run around their rank-r step (t or v: s·xa R for one adapter, per row for
// a bank); outputs (M, ·) contiguous and fresh, A and B contiguous.
void run_x_times_A(lc::DType dt, const at::Tensor& xa, const at::Tensor& x, const at::Tensor& Ac,
                   const DeviceInfo& info, cudaStream_t stream);                       // xa = x A
void run_g_times_Bt(lc::DType dt, const at::Tensor& u, const at::Tensor& g, const at::Tensor& Bc,
                    const DeviceInfo& info, cudaStream_t stream);                      // u = g Bᵀ
void run_forward_main(lc::DType dt, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& t, const at::Tensor& Bc, const at::Tensor& b, const DeviceInfo& info,
                      cudaStream_t stream);                                            // y = x Wᵀ + t B + b
void run_grad_x_main(lc::DType dt, const at::Tensor& grad_x, const at::Tensor& g, const at::Tensor& weight,
                     const at::Tensor& v, const at::Tensor& Ac, const DeviceInfo& info,
                     cudaStream_t stream);                                             // grad_x = g W + v Aᵀ

// The decoding kernels' arguments but R's (each binding sets R, its strides and, for a bank, the ids).
lc::DecodeArgs decode_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& b, const at::Tensor& Ac,
                           const at::Tensor& Bc, double scaling, const at::Tensor& y, const at::Tensor& xa);
// decode_partial + decode_epilogue when the shape, dtype and strides allow them (and
// LORAXS_CUDA_DECODE is not 0); false when they do not, and nothing was launched.
bool try_decode(lc::DType dt, const lc::DecodeArgs& d, const at::Tensor& x, const at::Tensor& weight,
                const DeviceInfo& info, cudaStream_t stream);

// A layer with in or out features = 0 (issue 19): no kernel is launched (a zero-width grid is a launch
// error, and the GEMMs assume K >= 1). With in = 0, x A is exactly zero; with out = 0, g is empty so
// g Bᵀ is zero: either way y = b (or empty), grad_x = 0 and grad_R = 0, formed by ATen fills on the
// current stream (no host sync: capturable like the kernels).
inline bool zero_features(const at::Tensor& weight) { return weight.size(0) == 0 || weight.size(1) == 0; }
inline Fwd zero_feature_forward(const at::Tensor& x, const at::Tensor& A, const std::optional<at::Tensor>& bias,
                                at::Tensor& y, at::Tensor& xa) {
  if (A.size(0) == 0) {
    xa.zero_();
  } else {
    at::mm_out(xa, x, A);
  }
  if (bias.has_value()) {
    y.copy_(bias->unsqueeze(0).expand_as(y));
  } else {
    y.zero_();
  }
  return {y, xa};
}
inline Bwd zero_feature_backward(at::Tensor& grad_x, at::Tensor& grad_R) {
  if (grad_x.numel() > 0) grad_x.zero_();
  if (grad_R.numel() > 0) grad_R.zero_();
  return {grad_x, grad_R};
}

// What runs: `asked`, or for "auto" csrc/backend.cpp's rule for this device, dtype, M and r.
Backend resolve(Backend asked, const at::Tensor& ref, int64_t M, int64_t r);

}  // namespace cuda_binding
}  // namespace loraxs
