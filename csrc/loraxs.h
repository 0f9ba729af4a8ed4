// The C++ side of the LoRA-XS op: y = x Wᵀ + b + s·((x A) R) B.
//
// Every schema is defined once, in ops.cpp (TORCH_LIBRARY(loraxs)):
//   linear(x, weight, bias?, A, R, B, scaling=1, backend="auto") -> y            the public op
//   linear_fwd(x, weight, bias?, A, R, B, scaling, backend)  -> (y, xa = x A)    autograd + devices
//   linear_bwd(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend) -> (grad_x, grad_R)
//   py_fwd / py_bwd: the same signatures, implemented in Python by the "torch" and "triton" backends
// `linear` is CompositeImplicitAutograd (autocast casts, then linear_fwd). linear_fwd's Autograd
// kernel (autograd.cpp) keeps x A only when R trains and calls linear_bwd; its CPU and CUDA kernels
// (cpu/, cuda/) check the contract (contract.cpp) once and run the backend the string names.
//
// x and grad_out have any leading dims; y and grad_x come back with x's leading dims, never as
// views of an internal buffer. R may be fp32 beside half weights: compute in x's dtype, return grad_R
// in R's dtype. An output that is not needed comes back as an empty tensor.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

namespace loraxs {

using Fwd = std::tuple<at::Tensor, at::Tensor>;
using Bwd = std::tuple<at::Tensor, at::Tensor>;

// ------------------------------------------------------------------------------------ contract.cpp
// The input contract: ValueError for shapes, TypeError for dtypes, RuntimeError for devices, each
// naming the offending tensor with its sizes/dtype/device (the same words as ops/checks.py, which
// serves the fake kernels and the build-less fallback; tests hold the two to one text).
constexpr int64_t kMaxRank = 256;
// How the messages print sizes and dtypes: "(5, 15)" and "torch.float32", as Python does (c10 prints
// "[5, 15]" and "Float").
std::string dims_str(at::IntArrayRef sizes);
std::string shape_str(const at::Tensor& t);
std::string dtype_str(at::ScalarType t);
void check_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& A, const at::Tensor& R, const at::Tensor& B);
void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                           const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, bool need_R);
// The op differentiates x and R only: a frozen tensor that asks for a gradient is a bug upstream. `op`
// and `reference` name the op and its plain-autograd twin in loraxs_kernels.reference (the many-adapter
// op passes its own names).
void check_frozen(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& A,
                  const at::Tensor& B, const char* op = "loraxs.linear", const char* reference = "loraxs_linear");

// Autocast's casts for a layer, as F.linear's: floating tensors other than fp64 go to the autocast
// dtype; an fp32 R (a master weight) stays fp32. nullopt when autocast is off for x's device.
struct LayerTensors {
  at::Tensor x, weight;
  std::optional<at::Tensor> bias;
  at::Tensor A, R, B;
};
std::optional<LayerTensors> autocast_layer(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                           const at::Tensor& R, const at::Tensor& B);

// ------------------------------------------------------------------------------------- backend.cpp
enum class Backend { kAuto, kTorch, kCpp, kTriton, kCuda };
Backend parse_backend(std::string_view name);  // ValueError naming the choices
const char* backend_name(Backend b);
// The error for a backend named on tensors it does not run on: "cuda" on the CPU, "cpp" on CUDA.
[[noreturn]] void wrong_device(Backend b, const at::Device& device);
// The Python backends ("torch", "triton"), reached through the dispatcher (py_fwd / py_bwd).
bool triton_installed();  // set by Python at load time (loraxs::set_triton_installed)
Fwd call_python_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling, Backend b);
Bwd call_python_bwd(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                    const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x, bool need_R, Backend b);
// What "auto" runs on a CUDA device, from the measured table (auto_table.json, loaded by Python
// through loraxs::set_auto_choice), the device's capability and the dtype; see backend.cpp.
struct CudaContext {
  std::string device_name;
  int cc_major = 0;
  bool tf32 = false;              // torch lets fp32 matmuls use TF32
  bool triton = false;            // the Python "triton" backend is registered for CUDA
  bool cuda_kernels = false;      // this library carries the CUDA kernels
};
Backend choose_cuda_backend(const CudaContext& c, at::ScalarType dtype, int64_t M, int64_t r);

// ------------------------------------------------------------------------------ cpu/aten_schedule.cpp
// The layer in ATen GEMM calls, for any device (the CPU kernel, and cuBLAS on CUDA where "auto"
// picks it). x: (..., in); returns y (..., out) and xa (M, r).
Fwd aten_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling);
Bwd aten_backward(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                  const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x, bool need_R);

// ------------------------------------------------------ multi.cpp, multi_contract.cpp, cpu/multi_aten.cpp
// Many adapters in one batch (issue 11): R is a bank (n, r, r), adapter_ids (x.shape[:-1], int32 or
// int64, values in [-1, n); -1 = the base layer alone) picks one per row, and row i gets the scaling
// s·adapter_scaling[id_i] (just s without the optional (n,) tensor). Schemas in multi.cpp.
// The whole contract, ids' values included, runs before any kernel: an id past the bank would read
// past R's end on a GPU. ids_on_host = false skips the values (two scalars copied to the host, which a
// CUDA graph cannot capture): the CUDA binding passes it while its stream is capturing and checks the
// values on the device instead (torch._assert_async with ids_range_message, before any kernel).
void check_multi_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                        const std::optional<at::Tensor>& adapter_scaling, bool ids_on_host = true);
void check_multi_backward_inputs(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                                 const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                                 const at::Tensor& adapter_ids, const std::optional<at::Tensor>& adapter_scaling,
                                 bool need_R, bool ids_on_host = true);
std::string ids_range_message(const at::Tensor& R);
void check_multi_frozen(const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& A,
                        const at::Tensor& B, const std::optional<at::Tensor>& adapter_scaling);

// The grouped ATen schedule (cpu/multi_aten.cpp), for any device: the CPU kernel, and cuBLAS on CUDA
// where a call names "torch" or "auto" picks it. x / grad_out (..., ·), ids x.shape[:-1]; checked already.
Fwd aten_multi_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                       double scaling, const std::optional<at::Tensor>& adapter_scaling);
Bwd aten_multi_backward(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                        double scaling, const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R);
// The Python "triton" backend for many adapters (backends/triton/multi.py) through loraxs::py_multi_fwd /
// py_multi_bwd: x2 / g2 flattened to (M, ·), ids to (M,).
Fwd call_python_multi_fwd(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& ids,
                          double scaling, const std::optional<at::Tensor>& adapter_scaling, Backend b);
Bwd call_python_multi_bwd(const at::Tensor& g2, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                          const at::Tensor& R, const at::Tensor& B, const at::Tensor& ids, double scaling,
                          const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R, Backend b);

// Shapes shared by every kernel: x (..., in) seen as (M, in), and outputs with x's leading dims.
at::DimVector with_last(at::IntArrayRef lead_and_last, int64_t last);
// t (..., last) as (M, last), M the product of the leading dims (a view where possible; t when 2-D).
at::Tensor as_rows(const at::Tensor& t);
// A fresh (M, n) result given x's leading dims without making it a view (FSDP2 and in-place ops
// treat views specially; an op output must not be one).
at::Tensor unflatten_fresh(const at::Tensor& t2, at::IntArrayRef lead_and_last, int64_t last);
// rows (M, K) · f (K, r), the rank-r side of x A and g Bᵀ, computed as (fᵀ rowsᵀ)ᵀ on the CPU where that
// pays (aten_schedule.cpp says when and why); the result may be column-major.
at::Tensor rows_times_thin(const at::Tensor& rows, const at::Tensor& f);

}  // namespace loraxs
