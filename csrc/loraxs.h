// The C++ side of the LoRA-XS op: y = x Wᵀ + b + s·((x A) R) B.
//
// Two ops, registered in ops.cpp, with one kernel per dispatch key (cpu/ and cuda/):
//   native_fwd(x, weight, bias?, A, R, B, scaling)              -> (y, xa = x A)
//   native_bwd(grad_out, xa, weight, A, R, B, scaling, need_x, need_R) -> (grad_x, grad_R)
// x and grad_out are 2-D (M rows); the Python op has already checked the contract and flattened
// leading dims. R may be fp32 beside half weights: compute in x's dtype, return grad_R in R's dtype.
// An output that is not needed comes back as an empty tensor.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace loraxs {

// Shape/dtype/device checks shared by every kernel (the Python layer checks first; these guard
// direct callers of torch.ops.loraxs.native_*).
void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B);
void check_backward_args(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                         const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, bool need_R);

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                  const at::Tensor& R, const at::Tensor& B, double scaling);
std::tuple<at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& xa,
                                                  const at::Tensor& weight, const at::Tensor& A, const at::Tensor& R,
                                                  const at::Tensor& B, double scaling, bool need_x, bool need_R);

}  // namespace loraxs
