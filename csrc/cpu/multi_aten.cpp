// The many-adapter layer (multi.cpp) in ATen calls, grouped by adapter: the CPU kernel, and for now
// the CUDA one too (every call below is device-agnostic ATen; fused Triton/CUDA kernels that gather
// R per row are issue 11's next step).
//
// Forward: x Wᵀ + b and x A once for all M rows (the two large GEMMs, as for one adapter), then the
// rows grouped by adapter with one stable sort of the ids per call, and one small GEMM per adapter
// that has rows: T[rows of k] = s_k·(x A)[rows of k] R[k]. T goes back to row order (rows with id -1
// keep a zero row) and y += T B is one more GEMM. The only temporaries are (M×r).
// Backward: u = g Bᵀ once; grad_x = g W + V Aᵀ with V[rows of k] = s_k·u[rows of k] R[k]ᵀ; and
// grad_R[k] = s_k·(x A)[rows of k]ᵀ u[rows of k], one GEMM per adapter over its rows in their original
// order (the sort is stable): a segmented reduction with no atomics, the same bits on every run;
// fp32 sums for 16-bit inputs. Adapters no row used get zeros.
#include <torch/library.h>

#include <vector>

#include "../loraxs.h"

namespace loraxs {
namespace {

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// The rows with an adapter, sorted by it: adapter k's rows are perm[start[k] : start[k + 1]].
struct Groups {
  at::Tensor perm;              // (active,) int64 row indices
  std::vector<int64_t> start;   // n + 1 offsets into perm
  int64_t active = 0;           // rows with id >= 0
};

Groups group_rows(const at::Tensor& adapter_ids, int64_t n) {
  const at::Tensor ids = as_dtype(adapter_ids.reshape({-1}), at::kLong);
  const int64_t M = ids.size(0);
  // Stable, so each adapter's rows keep their order and its grad_R sums them in a fixed order.
  const at::Tensor perm = std::get<1>(at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  // counts[0]: rows with id -1, which sort first. One (n + 1)-long copy to the host per call.
  const at::Tensor counts = at::bincount(ids + 1, {}, n + 1).to(at::kCPU);
  const int64_t* c = counts.data_ptr<int64_t>();
  Groups g;
  g.start.resize(n + 1);
  g.start[0] = 0;
  for (int64_t k = 0; k < n; ++k) g.start[k + 1] = g.start[k] + c[k + 1];
  g.active = M - c[0];
  g.perm = c[0] == 0 ? perm : perm.narrow(0, c[0], g.active);
  return g;
}

// s·adapter_scaling[k] for every k, on the host (the GEMMs take it as alpha).
std::vector<double> scalings(double scaling, const std::optional<at::Tensor>& adapter_scaling, int64_t n) {
  std::vector<double> s(n, scaling);
  if (adapter_scaling.has_value()) {
    const at::Tensor h = adapter_scaling->to(at::kCPU, at::kDouble).contiguous();
    const double* p = h.data_ptr<double>();
    for (int64_t k = 0; k < n; ++k) s[k] *= p[k];
  }
  return s;
}

// out[rows of k] = s_k·in[rows of k] R[k] (or R[k]ᵀ), in sorted order; in and out are (active, r).
void per_adapter(at::Tensor& out, const at::Tensor& in, const at::Tensor& Rc, const Groups& g,
                 const std::vector<double>& s, bool transpose_R) {
  const int64_t n = Rc.size(0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t rows = g.start[k + 1] - g.start[k];
    if (rows == 0) continue;
    at::Tensor o = out.narrow(0, g.start[k], rows);
    const at::Tensor Rk = Rc.select(0, k);
    // beta = 0: the fresh output is never read.
    at::addmm_out(o, o, in.narrow(0, g.start[k], rows), transpose_R ? Rk.t() : Rk, /*beta=*/0, /*alpha=*/s[k]);
  }
}

// (M×r) in row order from (active×r) in sorted order; rows with id -1 are zero.
at::Tensor unsort(const at::Tensor& sorted, const Groups& g, int64_t M) {
  at::Tensor full = g.active == M ? at::empty({M, sorted.size(1)}, sorted.options())
                                  : at::zeros({M, sorted.size(1)}, sorted.options());
  return full.index_copy_(0, g.perm, sorted);
}

Fwd multi_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                  double scaling, const std::optional<at::Tensor>& adapter_scaling) {
  const int64_t in = weight.size(1), out = weight.size(0), n = R.size(0);
  const at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, in});
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty(with_last(x.sizes(), out), x.options());
  at::Tensor y2 = x.dim() == 2 ? y : y.view({M, out});
  if (bias.has_value()) {
    at::addmm_out(y2, *bias, x2, weight.t());
  } else {
    at::mm_out(y2, x2, weight.t());
  }
  at::Tensor xa = at::mm(x2, A);
  const Groups g = group_rows(adapter_ids, n);
  if (g.active > 0) {
    const at::Tensor xs = xa.index_select(0, g.perm);
    at::Tensor t = at::empty_like(xs);
    per_adapter(t, xs, as_dtype(R, x.scalar_type()), g, scalings(scaling, adapter_scaling, n), false);
    y2.addmm_(unsort(t, g, M), B);
  }
  return {y, xa};
}

Bwd multi_backward(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                   const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids, double scaling,
                   const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R) {
  const int64_t in = weight.size(1), out = weight.size(0), n = R.size(0), r = A.size(1);
  const at::Tensor g2 = grad_out.dim() == 2 ? grad_out : grad_out.reshape({-1, out});
  const int64_t M = g2.size(0);
  const at::ScalarType dt = grad_out.scalar_type();
  at::Tensor grad_x = grad_out.new_empty({0});
  at::Tensor grad_R = R.new_empty({0});
  if (!need_x && !need_R) return {grad_x, grad_R};
  const Groups g = group_rows(adapter_ids, n);
  const std::vector<double> s = scalings(scaling, adapter_scaling, n);
  at::Tensor us;  // (g Bᵀ)[perm], (active×r)
  if (g.active > 0) us = at::mm(g2, B.t()).index_select(0, g.perm);
  if (need_x) {
    grad_x = at::empty(with_last(grad_out.sizes(), in), grad_out.options());
    at::Tensor gx2 = grad_out.dim() == 2 ? grad_x : grad_x.view({M, in});
    at::mm_out(gx2, g2, weight);
    if (g.active > 0) {
      at::Tensor v = at::empty_like(us);
      per_adapter(v, us, as_dtype(R, dt), g, s, true);
      gx2.addmm_(unsort(v, g, M), A.t());
    }
  }
  if (need_R) {
    // Sums over an adapter's rows run in fp32 (fp64 for fp64) even for half inputs, as for one adapter.
    const at::ScalarType acc = at::promote_types(dt, at::kFloat);
    at::Tensor sum = at::zeros({n, r, r}, grad_out.options().dtype(acc));
    if (g.active > 0) {
      const at::Tensor xs = as_dtype(xa.index_select(0, g.perm), acc);
      const at::Tensor ua = as_dtype(us, acc);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t rows = g.start[k + 1] - g.start[k];
        if (rows == 0) continue;
        at::Tensor o = sum.select(0, k);
        at::addmm_out(o, o, xs.narrow(0, g.start[k], rows).t(), ua.narrow(0, g.start[k], rows), /*beta=*/0,
                      /*alpha=*/s[k]);
      }
    }
    grad_R = as_dtype(sum, R.scalar_type());
  }
  return {grad_x, grad_R};
}

Fwd linear_multi_fwd_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                            const at::Tensor& adapter_ids, double scaling,
                            const std::optional<at::Tensor>& adapter_scaling) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // inputs are cast already
  check_multi_inputs(x, weight, bias, A, R, B, adapter_ids, adapter_scaling);
  return multi_forward(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling);
}

Bwd linear_multi_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                            const at::Tensor& A, const at::Tensor& R, const at::Tensor& B,
                            const at::Tensor& adapter_ids, double scaling,
                            const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_multi_backward_inputs(grad_out, xa, weight, A, R, B, adapter_ids, adapter_scaling, need_R);
  return multi_backward(grad_out, xa, weight, A, R, B, adapter_ids, scaling, adapter_scaling, need_x, need_R);
}

}  // namespace
}  // namespace loraxs

TORCH_LIBRARY_IMPL(loraxs, CPU, m) {
  m.impl("linear_multi_fwd", &loraxs::linear_multi_fwd_kernel);
  m.impl("linear_multi_bwd", &loraxs::linear_multi_bwd_kernel);
}

// Not run on a GPU yet (no GPU was lent to the session that wrote it): the same ATen calls, where
// the ids check and the group offsets cost two small device-to-host copies per call.
TORCH_LIBRARY_IMPL(loraxs, CUDA, m) {
  m.impl("linear_multi_fwd", &loraxs::linear_multi_fwd_kernel);
  m.impl("linear_multi_bwd", &loraxs::linear_multi_bwd_kernel);
}
