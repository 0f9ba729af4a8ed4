// The layer in ATen GEMM calls: the CPU kernel (MKL/oneDNN underneath), and cuBLAS on CUDA where
// "auto" picks it. On a CPU the GEMMs are the whole cost, so the job is to issue as few and as
// large ones as possible, with no (M×out) temporary beyond y and no (M×in) temporary beyond grad_x.
// Same two schedules as the Python "torch" backend (loraxs_kernels/backends/pytorch.py, which
// explains the choice); the point of this one is the host cost: no Python between the caller and
// the GEMMs, which at decoding sizes is most of the time.
//
// The CPU kernels of linear_fwd / linear_bwd are here too: check the contract once, then run the
// backend the call names ("auto" and "cpp": this file; "torch" and "triton": the Python backends).
#include <torch/library.h>

#include "../loraxs.h"

namespace loraxs {
namespace {

// Folding s·(A R B)ᵀ into W (a fresh out×in matrix, W copied into it, plus a K = r product) replaces
// one rank-r update of the output: y += T B (M·out numbers) in the forward, grad_x += V Aᵀ (M·in) in
// the backward. x A and g Bᵀ are needed by both schedules (the saved tensor, grad_R), except g Bᵀ when
// grad_R is not wanted. Per number written the merge cost 1.4× the update on this project's CI CPU
// (AMD EPYC, 1 thread, fp32, in = out = 768: 0.175 ms for W' vs 0.082 ms for y += T B at M = 512), and
// a whole layer's forward + backward, backend "torch" forced either way, crossed over between M ≈ 0.7·in
// and 2·in (in = out = 384 and 768). So each direction merges when the update it replaces is over
// 1.5× the size of W. The old rule, M·(in+out) > in·out, counted x A and g Bᵀ as work merging saves:
// it merged from M = 385 at in = out = 768, where at M = 512 the merged layer cost 1.023× the low-rank one.
bool merge_pays(int64_t M, int64_t in, int64_t out, bool backward, bool need_R) {
  const int64_t replaced = backward ? M * in + (need_R ? 0 : M * out) : M * out;
  return 2 * replaced > 3 * in * out;
}

// W + s·(A R B)ᵀ = W + s · Bᵀ (A R)ᵀ, as one addmm. R is already in the layer's dtype.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                         double scaling) {
  return at::addmm(weight, B.t(), at::mm(A, R).t(), /*beta=*/1, /*alpha=*/scaling);
}

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// y2 = x2 wᵀ (+ bias), written into y2 (a 2-D view of the output).
void base_gemm(at::Tensor& y2, const at::Tensor& x2, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(y2, *bias, x2, w.t());
  } else {
    at::mm_out(y2, x2, w.t());
  }
}

}  // namespace

at::DimVector with_last(at::IntArrayRef lead_and_last, int64_t last) {
  at::DimVector shape(lead_and_last.begin(), lead_and_last.end());
  shape.back() = last;
  return shape;
}

at::Tensor as_rows(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  // reshape({-1, last}) is ambiguous when last == 0 (in or out features of a zero-size layer).
  return t.reshape({c10::multiply_integers(t.sizes().slice(0, t.dim() - 1)), t.size(-1)});
}

at::Tensor unflatten_fresh(const at::Tensor& t2, at::IntArrayRef lead_and_last, int64_t last) {
  // _unsafe_view: the same storage under a new shape, not recorded as a view (t2 is ours alone).
  const at::Tensor c = t2.is_contiguous() ? t2 : t2.contiguous();
  return at::_unsafe_view(c, with_last(lead_and_last, last));
}

// rows (M×K) times a thin f (K×r), from 64 rows at 2 ≤ r ≤ 8, where MKL on this project's CI CPU (AMD
// EPYC, 1 thread) is slow on the plain product (measured with the copy included, min of 300 calls):
// - fp32, 4 ≤ r ≤ 8: (fᵀ rowsᵀ)ᵀ, r rows times M columns. M = 512, K = 768, r = 8: 0.116 ms vs 0.188
//   ms for rows · f with f copied column-major and 0.45 ms with f row-major (the layer's A); M = 2048,
//   K = 384: 0.23 vs 0.36 ms; r = 4-7 and K = 2048 alike or equal. The result is column-major: callers
//   that return or save it make it contiguous (a copy of M·r numbers, 8 µs at M = 512, r = 8).
// - otherwise rows · f, a row-major f copied column-major first (K·r numbers): 2-5× faster than with f
//   row-major in fp32/fp64 (half dtypes go to oneDNN: within 10 % either way); the transposed form
//   was 1.5-2.5× slower at r = 2, 3 (fp32) and up to 1.3× slower in fp64 (r = 5-7, K = 2048).
// Under 64 rows (decoding: 5.6 vs 2.9 µs at M = 1 for the transposed form) the plain product is as
// fast or faster.
at::Tensor rows_times_thin(const at::Tensor& rows, const at::Tensor& f) {
  const int64_t r = f.size(1);
  if (rows.is_cpu() && r >= 2 && r <= 8 && rows.size(0) >= 64) {
    if (rows.scalar_type() == at::kFloat && r >= 4) return at::mm(f.t(), rows.t()).t();
    if (f.size(0) > 1 && f.stride(0) != 1) return at::mm(rows, f.t().contiguous().t());
  }
  return at::mm(rows, f);
}

Fwd aten_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling) {
  // Every skipped no-op below (a same-dtype .to, a 2-D reshape/view) is one dispatcher round trip
  // less: at M = 1 the calls, not the FLOPs, are the cost (the overhead preset's 64→64 case).
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor x2 = as_rows(x);
  const at::Tensor Rc = as_dtype(R, x.scalar_type());
  at::Tensor y = at::empty(with_last(x.sizes(), out), x.options());
  at::Tensor y2 = x.dim() == 2 ? y : y.view({x2.size(0), out});
  const at::Tensor xa = rows_times_thin(x2, A).contiguous();  // saved for the backward as (M×r) rows
  if (merge_pays(x2.size(0), in, out, /*backward=*/false, /*need_R=*/true)) {
    base_gemm(y2, x2, merged_weight(weight, A, Rc, B, scaling), bias);
  } else {
    base_gemm(y2, x2, weight, bias);
    y2.addmm_(at::mm(xa, Rc), B, /*beta=*/1, /*alpha=*/scaling);
  }
  return {y, xa};
}

Bwd aten_backward(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                  const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x, bool need_R) {
  const int64_t in = weight.size(1), out = weight.size(0);
  const at::Tensor g2 = as_rows(grad_out);
  const at::ScalarType dt = grad_out.scalar_type();
  const bool merged = need_x && merge_pays(g2.size(0), in, out, /*backward=*/true, need_R);
  at::Tensor u;  // g Bᵀ (M×r)
  if (need_R || (need_x && !merged)) u = rows_times_thin(g2, B.t());
  at::Tensor grad_x = grad_out.new_empty({0});
  at::Tensor grad_R = R.new_empty({0});
  if (need_x) {
    const at::Tensor Rc = as_dtype(R, dt);
    grad_x = at::empty(with_last(grad_out.sizes(), in), grad_out.options());
    at::Tensor gx2 = grad_out.dim() == 2 ? grad_x : grad_x.view({g2.size(0), in});
    if (merged) {
      at::mm_out(gx2, g2, merged_weight(weight, A, Rc, B, scaling));
    } else {
      at::mm_out(gx2, g2, weight);
      gx2.addmm_(at::mm(u, Rc.t()), A.t(), /*beta=*/1, /*alpha=*/scaling);
    }
  }
  if (need_R) {
    // The sum over M tokens runs in fp32 (fp64 for fp64) even for half inputs: M is large, R is tiny.
    // s is applied by the GEMM itself (beta = 0: the fresh output is never read).
    const at::ScalarType acc = at::promote_types(dt, at::kFloat);
    const int64_t r = A.size(1);
    at::Tensor sum = at::empty({r, r}, grad_out.options().dtype(acc));
    at::addmm_out(sum, sum, as_dtype(xa, acc).t(), as_dtype(u, acc), /*beta=*/0, /*alpha=*/scaling);
    grad_R = as_dtype(sum, R.scalar_type());
  }
  return {grad_x, grad_R};
}

namespace {

Fwd linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling,
                   c10::string_view backend) {
  const Backend b = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // inputs are cast already
  check_inputs(x, weight, bias, A, R, B);
  switch (b) {
    case Backend::kAuto:
    case Backend::kCpp:
      return aten_forward(x, weight, bias, A, R, B, scaling);
    case Backend::kTorch:
    case Backend::kTriton: {
      auto [y2, xa] = call_python_fwd(as_rows(x), weight, bias, A, R, B, scaling, b);
      return {unflatten_fresh(y2, x.sizes(), weight.size(0)), xa};
    }
    case Backend::kCuda:
      break;
  }
  wrong_device(Backend::kCuda, x.device());
}

Bwd linear_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                   const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x, bool need_R,
                   c10::string_view backend) {
  const Backend b = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_backward_inputs(grad_out, xa, weight, A, R, B, need_R);
  switch (b) {
    case Backend::kAuto:
    case Backend::kCpp:
      return aten_backward(grad_out, xa, weight, A, R, B, scaling, need_x, need_R);
    case Backend::kTorch:
    case Backend::kTriton: {
      auto [gx2, gR] = call_python_bwd(as_rows(grad_out), xa, weight, A, R, B, scaling, need_x,
                                       need_R, b);
      return {need_x ? unflatten_fresh(gx2, grad_out.sizes(), weight.size(1)) : gx2, gR};
    }
    case Backend::kCuda:
      break;
  }
  wrong_device(Backend::kCuda, grad_out.device());
}

}  // namespace
}  // namespace loraxs

TORCH_LIBRARY_IMPL(loraxs, CPU, m) {
  m.impl("linear_fwd", &loraxs::linear_fwd_cpu);
  m.impl("linear_bwd", &loraxs::linear_bwd_cpu);
}
