// The many-adapter layer (multi.cpp) in ATen calls: the CPU kernel, and on CUDA the "torch" backend
// and what "auto" runs where it picks cuBLAS (cuda/multi_cuda.cpp). Every call below is
// device-agnostic ATen.
//
// Forward: x Wᵀ + b and x A once for all M rows (the two large GEMMs, as for one adapter), then
// T_i = s_i·(x A)_i R[id_i] (rows with id -1 keep a zero row) and y += T B, one more GEMM. T comes
// from one of two schedules, picked per call from the rows' counts per adapter (one pass over the ids):
//   grouped: the rows sorted by adapter (one stable sort), one small GEMM per adapter that has rows;
//     when each adapter's rows are already one run of consecutive rows (one adapter per sequence,
//     the serving layout, or one adapter for the batch) the GEMMs read and write those runs in place:
//     no sort, gather or scatter (the profiler shows no sort, index_select, index_copy_ or bincount left);
//   per row: R[id_i] gathered for a chunk of rows and one batched (1×r)(r×r) product per chunk; on the
//     host, for fp32/fp64 at r <= 16, one loop over the rows instead (per_row_loop).
// A GEMM call costs ~3 µs of fixed overhead whatever its size, the per-row gather ~0.5 ns per
// element of R[id_i]; measured on this CI machine's CPU (2-core Xeon, fp32, r = 16 and 64, 4096 rows
// over 1 to 4096 adapters), per row won below ~64 rows per adapter at r = 16 and ~8 at r = 64, which
// `used·6000 > active·r²` reproduces. The only temporaries are (M×r) and a ≤ 4 MiB gathered chunk.
// Backward: u = g Bᵀ once; grad_x = g W + V Aᵀ with V_i = s_i·u_i R[id_i]ᵀ (same two schedules), and
// grad_R[k] = Σ_{i: id_i = k} s_i·(x A)_iᵀ u_i: grouped, one GEMM per adapter over its rows in their
// original order (the sort is stable); per row, the rows sorted by adapter (stable) and their outer
// products summed per adapter by segment_reduce, chunk after chunk. Both are fixed-order sums with no
// atomics (index_add_ would use float atomics on CUDA: not the same bits twice), in fp32 for 16-bit
// inputs; adapters no row used get zeros.
// Only the gathered rows' R are converted to the layer's dtype (an fp32 master bank of n adapters is
// never copied whole per call).
// Off the CPU (cuBLAS, where "auto" picks it on CUDA, or backend "torch") the plan is not read back to
// the host: the per-row schedule runs with no device-to-host copy (capturable in a CUDA graph), -1
// rows masked on the device.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "../loraxs.h"

namespace loraxs {
namespace {

at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// One run of consecutive rows with the same adapter.
struct Run {
  int64_t start, rows, adapter;
};

// How a call's rows spread over the bank, and which schedule that asks for.
struct Plan {
  at::Tensor ids;              // (M,) int64
  std::vector<int64_t> count;  // rows per adapter, n entries (host plans only)
  std::vector<Run> runs;       // host plans whose every adapter's rows are one run: those runs (-1 rows left out)
  int64_t active = 0;          // rows with id >= 0 (a device plan: M, an upper bound)
  bool host = true;            // counts known on the host; false: per row, nothing read back
  bool per_row = false;
  bool any_active() const { return active > 0; }
  bool maybe_minus_one() const { return !host || active < ids.size(0); }
};

Plan plan_rows(const at::Tensor& adapter_ids, int64_t n, int64_t r) {
  Plan p;
  p.ids = as_dtype(adapter_ids.reshape({-1}), at::kLong);
  const int64_t M = p.ids.size(0);
  // No host copy off the CPU: the schedule cannot depend on the counts. LORAXS_MULTI_DEVICE_PLAN=1 (read
  // per call) runs that plan on the CPU too, so tests there exercise what cuBLAS runs.
  const char* force = std::getenv("LORAXS_MULTI_DEVICE_PLAN");
  if (!p.ids.is_cpu() || (force != nullptr && force[0] == '1')) {
    p.host = false;
    p.active = M;
    p.per_row = true;
    return p;
  }
  // The ids are on the host: one pass counts the rows per adapter and the runs of equal ids (in place of
  // a bincount, its ids + 1 temporary and the counts' host copy). The contract checked the range [-1, n)
  // already; checked again here because the loop indexes with it.
  p.ids = p.ids.contiguous();
  const int64_t* id = p.ids.data_ptr<int64_t>();
  p.count.assign(n, 0);
  int64_t minus = 0;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t k = id[i];
    if (k < 0) {
      ++minus;
      continue;
    }
    TORCH_CHECK(k < n, "loraxs.linear_multi: adapter id ", k, " out of range for a bank of ", n, " adapters");
    ++p.count[k];
    if (i > 0 && id[i - 1] == k) {
      ++p.runs.back().rows;
    } else {
      p.runs.push_back({i, 1, k});
    }
  }
  p.active = M - minus;
  const int64_t used = std::count_if(p.count.begin(), p.count.end(), [](int64_t v) { return v > 0; });
  if (static_cast<int64_t>(p.runs.size()) != used) p.runs.clear();  // some adapter's rows are split
  p.per_row = used * 6000 > p.active * r * r;  // the cost model in the header
  return p;
}

// The grouped schedule's order: adapter k's rows are perm[start[k] : start[k + 1]].
struct Groups {
  at::Tensor perm;             // (active,) int64 row indices
  std::vector<int64_t> start;  // n + 1 offsets into perm
};

Groups group_rows(const Plan& p) {
  const int64_t n = static_cast<int64_t>(p.count.size()), M = p.ids.size(0);
  // Stable, so each adapter's rows keep their order and its grad_R sums them in a fixed order.
  const at::Tensor perm = std::get<1>(at::sort(p.ids, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  Groups g;
  g.start.resize(n + 1);
  g.start[0] = 0;
  for (int64_t k = 0; k < n; ++k) g.start[k + 1] = g.start[k] + p.count[k];
  g.perm = p.active == M ? perm : perm.narrow(0, M - p.active, p.active);  // -1 rows sort first
  return g;
}

// s·adapter_scaling[k] for every k, on the host (the grouped GEMMs take it as alpha).
std::vector<double> scalings(double scaling, const std::optional<at::Tensor>& adapter_scaling, int64_t n) {
  std::vector<double> s(n, scaling);
  if (adapter_scaling.has_value()) {
    const at::Tensor h = adapter_scaling->to(at::kCPU, at::kDouble).contiguous();
    const double* p = h.data_ptr<double>();
    for (int64_t k = 0; k < n; ++k) s[k] *= p[k];
  }
  return s;
}

// grouped: out[rows of k] = s_k·in[rows of k] R[k] (or R[k]ᵀ), in sorted order; in and out are (active, r).
void per_adapter(at::Tensor& out, const at::Tensor& in, const at::Tensor& Rc, const Groups& g,
                 const std::vector<double>& s, bool transpose_R) {
  const int64_t n = Rc.size(0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t rows = g.start[k + 1] - g.start[k];
    if (rows == 0) continue;
    at::Tensor o = out.narrow(0, g.start[k], rows);
    const at::Tensor Rk = as_dtype(Rc.select(0, k), out.scalar_type());  // this adapter's R only
    // beta = 0: the fresh output is never read.
    at::addmm_out(o, o, in.narrow(0, g.start[k], rows), transpose_R ? Rk.t() : Rk, /*beta=*/0, /*alpha=*/s[k]);
  }
}

// Rows per chunk of the per-row schedule: the gathered R[id] stays near 4 MiB (it is read once).
int64_t chunk_rows(const at::Tensor& R) {
  return std::max<int64_t>(1, (int64_t{4} << 20) / (R.size(1) * R.size(2) * static_cast<int64_t>(R.element_size())));
}

// The rows' scalings s_i = s·adapter_scaling[id_i] as a (M, 1) column in dtype dt (0 on -1 rows), or
// nullopt when every row has s.
std::optional<at::Tensor> row_scalings(const Plan& p, double scaling, const std::optional<at::Tensor>& adapter_scaling,
                                       at::ScalarType dt) {
  if (!adapter_scaling.has_value()) return std::nullopt;
  const at::Tensor k = p.ids.clamp_min(0);
  return (adapter_scaling->to(at::kDouble).index_select(0, k) * scaling).to(dt).unsqueeze(1);
}

// The per-row product as one loop over the rows on the host, for fp32/fp64 with R in the same dtype and
// r <= kLoopMaxRank: out_i = s_{id_i}·Σ_j in_ij R[id_i]_j· (or R[id_i]ᵀ), a zero row on -1. At small r the
// gather + batched product + scaling are fixed costs: MiniLM's query layer under the store (M = 256,
// r = 8, 14 adapters) spent ~95 µs per call there against ~75-90 µs for x·A and T·B together (profiled
// by hand). Sums over j run in order in the input's dtype, as one (1×r)(r×r) product does.
constexpr int64_t kLoopMaxRank = 16;

template <typename T>
void per_row_loop(const T* in, const T* R, const int64_t* id, const double* s, T* out, int64_t M, int64_t r,
                  bool transpose_R) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / (r * r)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* o = out + i * r;
      const int64_t k = id[i];
      if (k < 0) {
        std::fill(o, o + r, T(0));
        continue;
      }
      const T* x = in + i * r;
      const T* Rk = R + k * r * r;
      const T sk = static_cast<T>(s[k]);
      if (transpose_R) {  // o_c = Σ_j x_j R[c][j]: rows of R are contiguous
        for (int64_t c = 0; c < r; ++c) {
          T acc = 0;
          for (int64_t j = 0; j < r; ++j) acc += x[j] * Rk[c * r + j];
          o[c] = acc * sk;
        }
      } else {  // o_c = Σ_j x_j R[j][c]: accumulated row by row of R, vectorised over c
        T acc[kLoopMaxRank] = {};
        for (int64_t j = 0; j < r; ++j) {
          const T xj = x[j];
          for (int64_t c = 0; c < r; ++c) acc[c] += xj * Rk[j * r + c];
        }
        for (int64_t c = 0; c < r; ++c) o[c] = acc[c] * sk;
      }
    }
  });
}

// per row: out_i = s_i·in_i R[id_i] (or R[id_i]ᵀ), 0 on -1 rows; in and out are (M, r) in row order.
at::Tensor per_row(const at::Tensor& in, const at::Tensor& Rc, const Plan& p, double scaling,
                   const std::optional<at::Tensor>& adapter_scaling, bool transpose_R) {
  const int64_t M = in.size(0), r = in.size(1);
  at::Tensor out = at::empty({M, r}, in.options());
  const at::ScalarType dt = in.scalar_type();
  if (p.host && in.is_cpu() && r <= kLoopMaxRank && (dt == at::kFloat || dt == at::kDouble) &&
      Rc.scalar_type() == dt) {
    const at::Tensor inc = in.contiguous(), Rcc = Rc.contiguous();
    const std::vector<double> s = scalings(scaling, adapter_scaling, Rc.size(0));
    AT_DISPATCH_FLOATING_TYPES(dt, "per_row_loop", [&] {
      per_row_loop<scalar_t>(inc.data_ptr<scalar_t>(), Rcc.data_ptr<scalar_t>(), p.ids.data_ptr<int64_t>(), s.data(),
                             out.data_ptr<scalar_t>(), M, r, transpose_R);
    });
    return out;
  }
  const at::Tensor k = p.ids.clamp_min(0);
  const int64_t step = chunk_rows(Rc);
  for (int64_t i0 = 0; i0 < M; i0 += step) {
    const int64_t len = std::min(step, M - i0);
    at::Tensor Rg = as_dtype(Rc.index_select(0, k.narrow(0, i0, len)), in.scalar_type());  // (len, r, r)
    if (transpose_R) Rg = Rg.transpose(1, 2);
    at::Tensor o = out.narrow(0, i0, len).unsqueeze(1);
    at::bmm_out(o, in.narrow(0, i0, len).unsqueeze(1), Rg);
  }
  if (auto s = row_scalings(p, scaling, adapter_scaling, in.scalar_type())) {
    out.mul_(*s);
  } else {
    out.mul_(scaling);
  }
  // where, not a product with 0: a -1 row's input may hold inf or NaN (its x is never adapted).
  if (p.maybe_minus_one()) out.masked_fill_((p.ids < 0).unsqueeze(1), 0);
  return out;
}

// T (M×r, row order) = s_i·in_i R[id_i] (or R[id_i]ᵀ) by the plan's schedule; undefined when no row
// has an adapter.
at::Tensor low_rank_rows(const at::Tensor& in, const at::Tensor& Rc, const Plan& p, double scaling,
                         const std::optional<at::Tensor>& adapter_scaling, bool transpose_R) {
  const int64_t M = in.size(0), n = Rc.size(0);
  if (!p.any_active()) return at::Tensor();
  if (p.per_row) return per_row(in, Rc, p, scaling, adapter_scaling, transpose_R);
  if (!p.runs.empty()) {  // each adapter's rows are one run: the grouped GEMMs in place, row order kept
    const std::vector<double> s = scalings(scaling, adapter_scaling, n);
    at::Tensor out = p.active == M ? at::empty({M, in.size(1)}, in.options()) : at::zeros({M, in.size(1)}, in.options());
    for (const Run& run : p.runs) {
      at::Tensor o = out.narrow(0, run.start, run.rows);
      const at::Tensor Rk = as_dtype(Rc.select(0, run.adapter), out.scalar_type());
      at::addmm_out(o, o, in.narrow(0, run.start, run.rows), transpose_R ? Rk.t() : Rk, /*beta=*/0,
                    /*alpha=*/s[run.adapter]);
    }
    return out;
  }
  const Groups g = group_rows(p);
  const at::Tensor sorted_in = in.index_select(0, g.perm);
  at::Tensor t = at::empty_like(sorted_in);
  per_adapter(t, sorted_in, Rc, g, scalings(scaling, adapter_scaling, n), transpose_R);
  at::Tensor full = p.active == M ? at::empty({M, in.size(1)}, in.options()) : at::zeros({M, in.size(1)}, in.options());
  return full.index_copy_(0, g.perm, t);
}

// per row: sum[k] += Σ_{i: id_i = k} s_i·xa_iᵀ u_i in a fixed order, with no atomics and nothing read
// back to the host. The rows are sorted by adapter (stable: batch order within an adapter; -1 rows
// first), then taken a chunk of sorted rows at a time: their outer products (len, r, r) are summed per
// adapter by segment_reduce (each output summed in order by one thread), segment lengths from a
// searchsorted of the chunk's sorted ids over -1 .. n, and the -1 segment dropped (a -1 row's x or g
// may hold inf/NaN: it is summed apart, never into an adapter). On a device plan a chunk holds at least
// n + 1 rows so the (n + 1, r, r) per-chunk sums cost no more than the outer products themselves; with
// the counts on the host only the chunk's own adapters are summed (below).
void per_row_grad_R(at::Tensor& sum, const at::Tensor& xa, const at::Tensor& u, const Plan& p, double scaling,
                    const std::optional<at::Tensor>& adapter_scaling) {
  const int64_t M = p.ids.size(0), n = sum.size(0);
  const at::ScalarType acc = sum.scalar_type();
  const auto [sorted, perm] = at::sort(p.ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor xs = as_dtype(xa.index_select(0, perm), acc), us = as_dtype(u.index_select(0, perm), acc);
  at::Tensor s;  // (M, 1, 1) per sorted row, or undefined: every row has `scaling`
  if (adapter_scaling.has_value()) {
    s = (adapter_scaling->to(at::kDouble).index_select(0, sorted.clamp_min(0)) * scaling).to(acc).view({M, 1, 1});
  }
  const at::Tensor edges = at::arange(-1, n + 1, p.ids.options());  // segment k + 1 holds adapter k
  // With the counts on the host (the CPU), a chunk sums only the adapters it holds: summing over every
  // adapter's segment made an (n + 1, r, r) temporary per call, which at M = 64 over 10,000 adapters
  // (r = 16) took the backward from 2.5 to 6.5 ms and doubled its peak (10 to 20 MiB; --preset multi).
  const int64_t step = p.host ? chunk_rows(sum) : std::max(chunk_rows(sum), n + 1);
  for (int64_t i0 = 0; i0 < M; i0 += step) {
    const int64_t len = std::min(step, M - i0);
    at::Tensor outer = at::bmm(xs.narrow(0, i0, len).unsqueeze(2), us.narrow(0, i0, len).unsqueeze(1));
    if (s.defined()) {
      outer.mul_(s.narrow(0, i0, len));
    } else {
      outer.mul_(scaling);
    }
    if (p.host) {
      // The chunk's adapters in order (-1 first when present) and their row counts; each adapter's rows
      // summed in order by segment_reduce, then added once into its slot (indices unique within a chunk,
      // chunks in order: a fixed-order sum).
      const auto [present, inverse, counts] =
          at::unique_consecutive(sorted.narrow(0, i0, len), /*return_inverse=*/false, /*return_counts=*/true);
      const at::Tensor per = at::segment_reduce(outer, "sum", counts, /*indices=*/{}, /*offsets=*/{}, /*axis=*/0,
                                                /*unsafe=*/true);
      const int64_t skip = present[0].item<int64_t>() < 0 ? 1 : 0;  // the -1 rows' sum is dropped
      const int64_t used = present.size(0) - skip;
      if (used > 0) {  // unique indices: a gather, an add and a scatter (index_add_ is atomic on CUDA)
        const at::Tensor idx = present.narrow(0, skip, used);
        sum.index_copy_(0, idx, sum.index_select(0, idx).add_(per.narrow(0, skip, used)));
      }
      continue;
    }
    const at::Tensor bounds = at::searchsorted(sorted.narrow(0, i0, len), edges);  // (n + 2,)
    const at::Tensor lengths = bounds.narrow(0, 1, n + 1) - bounds.narrow(0, 0, n + 1);
    // unsafe: skips segment_reduce's own checks of the lengths, which copy them to the host; they sum
    // to len by construction (searchsorted over -1 .. n of ids in [-1, n)).
    const at::Tensor per = at::segment_reduce(outer, "sum", lengths, /*indices=*/{}, /*offsets=*/{}, /*axis=*/0,
                                              /*unsafe=*/true);
    sum.add_(per.narrow(0, 1, n));
  }
}

}  // namespace

Fwd aten_multi_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                       double scaling, const std::optional<at::Tensor>& adapter_scaling) {
  const int64_t out = weight.size(0), n = R.size(0), r = A.size(1);
  const at::Tensor x2 = as_rows(x);
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty(with_last(x.sizes(), out), x.options());
  at::Tensor y2 = x.dim() == 2 ? y : y.view({M, out});
  if (bias.has_value()) {
    at::addmm_out(y2, *bias, x2, weight.t());
  } else {
    at::mm_out(y2, x2, weight.t());
  }
  const at::Tensor xa = rows_times_thin(x2, A).contiguous();  // returned and saved as (M×r) rows
  const Plan p = plan_rows(adapter_ids, n, r);
  const at::Tensor t = low_rank_rows(xa, R, p, scaling, adapter_scaling, false);
  if (t.defined()) y2.addmm_(t, B);
  return {y, xa};
}

Bwd aten_multi_backward(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                        const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                        double scaling, const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R) {
  const int64_t in = weight.size(1), n = R.size(0), r = A.size(1);
  const at::Tensor g2 = as_rows(grad_out);
  const int64_t M = g2.size(0);
  const at::ScalarType dt = grad_out.scalar_type();
  at::Tensor grad_x = grad_out.new_empty({0});
  at::Tensor grad_R = R.new_empty({0});
  if (!need_x && !need_R) return {grad_x, grad_R};
  const Plan p = plan_rows(adapter_ids, n, r);
  at::Tensor u;  // g Bᵀ, (M×r)
  if (p.any_active()) u = rows_times_thin(g2, B.t());
  if (need_x) {
    grad_x = at::empty(with_last(grad_out.sizes(), in), grad_out.options());
    at::Tensor gx2 = grad_out.dim() == 2 ? grad_x : grad_x.view({M, in});
    at::mm_out(gx2, g2, weight);
    const at::Tensor v = p.any_active() ? low_rank_rows(u, R, p, scaling, adapter_scaling, true) : at::Tensor();
    if (v.defined()) gx2.addmm_(v, A.t());
  }
  if (need_R) {
    // Sums over an adapter's rows run in fp32 (fp64 for fp64) even for half inputs, as for one adapter.
    const at::ScalarType acc = at::promote_types(dt, at::kFloat);
    at::Tensor sum = at::zeros({n, r, r}, grad_out.options().dtype(acc));
    if (p.any_active() && p.per_row) {
      per_row_grad_R(sum, xa, u, p, scaling, adapter_scaling);
    } else if (p.any_active() && !p.runs.empty()) {  // each adapter's rows are one run, summed in row order
      const std::vector<double> s = scalings(scaling, adapter_scaling, n);
      for (const Run& run : p.runs) {
        at::Tensor o = sum.select(0, run.adapter);
        at::addmm_out(o, o, as_dtype(xa.narrow(0, run.start, run.rows), acc).t(),
                      as_dtype(u.narrow(0, run.start, run.rows), acc), /*beta=*/0, /*alpha=*/s[run.adapter]);
      }
    } else if (p.any_active()) {
      const Groups g = group_rows(p);
      const std::vector<double> s = scalings(scaling, adapter_scaling, n);
      const at::Tensor xs = as_dtype(xa.index_select(0, g.perm), acc);
      const at::Tensor us = as_dtype(u.index_select(0, g.perm), acc);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t rows = g.start[k + 1] - g.start[k];
        if (rows == 0) continue;
        at::Tensor o = sum.select(0, k);
        at::addmm_out(o, o, xs.narrow(0, g.start[k], rows).t(), us.narrow(0, g.start[k], rows), /*beta=*/0,
                      /*alpha=*/s[k]);
      }
    }
    grad_R = as_dtype(sum, R.scalar_type());
  }
  return {grad_x, grad_R};
}

namespace {

Fwd linear_multi_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                         double scaling, const std::optional<at::Tensor>& adapter_scaling, c10::string_view backend) {
  const Backend b = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // inputs are cast already
  check_multi_inputs(x, weight, bias, A, R, B, adapter_ids, adapter_scaling);
  switch (b) {
    case Backend::kAuto:
    case Backend::kCpp:
    case Backend::kTorch:
      return aten_multi_forward(x, weight, bias, A, R, B, adapter_ids, scaling, adapter_scaling);
    case Backend::kTriton: {  // the Triton interpreter (TRITON_INTERPRET=1)
      auto [y2, xa] = call_python_multi_fwd(as_rows(x), weight, bias, A, R, B,
                                            adapter_ids.reshape({-1}), scaling, adapter_scaling, b);
      return {unflatten_fresh(y2, x.sizes(), weight.size(0)), xa};
    }
    case Backend::kCuda:
      break;
  }
  wrong_device(Backend::kCuda, x.device());
}

Bwd linear_multi_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight,
                         const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& adapter_ids,
                         double scaling, const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R,
                         c10::string_view backend) {
  const Backend b = parse_backend(backend);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_multi_backward_inputs(grad_out, xa, weight, A, R, B, adapter_ids, adapter_scaling, need_R);
  switch (b) {
    case Backend::kAuto:
    case Backend::kCpp:
    case Backend::kTorch:
      return aten_multi_backward(grad_out, xa, weight, A, R, B, adapter_ids, scaling, adapter_scaling, need_x, need_R);
    case Backend::kTriton: {
      auto [gx2, gR] = call_python_multi_bwd(as_rows(grad_out), xa, weight, A, R, B,
                                             adapter_ids.reshape({-1}), scaling, adapter_scaling, need_x, need_R, b);
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
  m.impl("linear_multi_fwd", &loraxs::linear_multi_fwd_cpu);
  m.impl("linear_multi_bwd", &loraxs::linear_multi_bwd_cpu);
}
