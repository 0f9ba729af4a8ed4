// Backend names, the Python backends behind the dispatcher, and what "auto" runs on a CUDA device.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>

#include "loraxs.h"

namespace loraxs {

Backend parse_backend(std::string_view name) {
  if (name == "auto") return Backend::kAuto;
  if (name == "torch") return Backend::kTorch;
  if (name == "cpp") return Backend::kCpp;
  if (name == "triton") return Backend::kTriton;
  if (name == "cuda") return Backend::kCuda;
  TORCH_CHECK_VALUE(false, "unknown backend '", std::string(name),
                    "'; choose one of 'auto', 'torch', 'cpp', 'triton', 'cuda'");
}

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::kAuto: return "auto";
    case Backend::kTorch: return "torch";
    case Backend::kCpp: return "cpp";
    case Backend::kTriton: return "triton";
    case Backend::kCuda: return "cuda";
  }
  return "?";
}

void wrong_device(Backend b, const at::Device& device) {
  if (b == Backend::kCuda) {
    TORCH_CHECK(false, "backend 'cuda' is the C++ extension's CUDA kernel and needs CUDA tensors; tensors are on ",
                device);
  }
  TORCH_CHECK(false, "backend 'cpp' is the C++ extension's CPU kernel; tensors are on ", device);
}

// ------------------------------------------------------------------------------- Python backends
// py_fwd / py_bwd have no C++ kernel: loraxs_kernels/ops/python_backends.py registers the Python one
// for CPU and CUDA. Only a call that runs "torch" or "triton" pays for Python; "auto" on the CPU,
// the CUDA C++ kernels and "auto"'s cuBLAS path never do.
namespace {
c10::OperatorHandle py_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}
}  // namespace

namespace {
std::atomic<bool> g_triton_installed{false};
}  // namespace

// Registered as loraxs::set_triton_installed(bool): Python says whether `triton` can be imported
// (checked once, without importing it: the import costs seconds and most calls never need it).
void set_triton_installed(bool installed) { g_triton_installed.store(installed); }
bool triton_installed() { return g_triton_installed.load(); }

Fwd call_python_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, double scaling, Backend b) {
  static const auto op = py_op("loraxs::py_fwd")
                             .typed<Fwd(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                        c10::string_view)>();
  const at::DispatchKey key = x.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU;
  TORCH_CHECK(op.hasKernelForDispatchKey(key), "backend '", backend_name(b), "' is not registered for ", x.device(),
              " tensors: import loraxs_kernels (which registers the Python backends) before calling the op");
  return op.call(x, weight, bias, A, R, B, scaling, backend_name(b));
}

Bwd call_python_bwd(const at::Tensor& grad_out, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                    const at::Tensor& R, const at::Tensor& B, double scaling, bool need_x, bool need_R, Backend b) {
  static const auto op = py_op("loraxs::py_bwd")
                             .typed<Bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, double, bool, bool, c10::string_view)>();
  return op.call(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend_name(b));
}

Fwd call_python_multi_fwd(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& A, const at::Tensor& R, const at::Tensor& B, const at::Tensor& ids,
                          double scaling, const std::optional<at::Tensor>& adapter_scaling, Backend b) {
  static const auto op =
      py_op("loraxs::py_multi_fwd")
          .typed<Fwd(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                     const std::optional<at::Tensor>&, c10::string_view)>();
  const at::DispatchKey key = x2.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU;
  TORCH_CHECK(op.hasKernelForDispatchKey(key), "backend '", backend_name(b), "' is not registered for ", x2.device(),
              " tensors: import loraxs_kernels (which registers the Python backends) before calling the op");
  return op.call(x2, weight, bias, A, R, B, ids, scaling, adapter_scaling, backend_name(b));
}

Bwd call_python_multi_bwd(const at::Tensor& g2, const at::Tensor& xa, const at::Tensor& weight, const at::Tensor& A,
                          const at::Tensor& R, const at::Tensor& B, const at::Tensor& ids, double scaling,
                          const std::optional<at::Tensor>& adapter_scaling, bool need_x, bool need_R, Backend b) {
  static const auto op =
      py_op("loraxs::py_multi_bwd")
          .typed<Bwd(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, double, const std::optional<at::Tensor>&, bool, bool,
                     c10::string_view)>();
  return op.call(g2, xa, weight, A, R, B, ids, scaling, adapter_scaling, need_x, need_R, backend_name(b));
}

// ------------------------------------------------------------------------------ "auto" on CUDA
// The measured table: for each GPU name, dtype, M bucket and rank bucket, the faster backend in
// forward + backward. Python reads auto_table.json (written only by tools/tune_auto from a benchmark
// run) and hands each entry to set_auto_choice when it loads the library. The buckets are those of
// loraxs_kernels/backends/auto_table.py; tests compare the two.
namespace {
constexpr std::array<int64_t, 5> kMBuckets = {1, 16, 128, 2048, 8192};
constexpr std::array<int64_t, 4> kRBuckets = {4, 16, 64, 256};

template <size_t N>
size_t bucket(int64_t v, const std::array<int64_t, N>& buckets) {
  for (size_t i = 0; i < N; ++i) {
    if (v <= buckets[i]) return i;
  }
  return N - 1;
}

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 0;
    case at::kBFloat16: return 1;
    case at::kFloat: return 2;
    case at::kDouble: return 3;
    default: return -1;
  }
}

using Table = std::array<std::array<std::array<int8_t, kRBuckets.size()>, kMBuckets.size()>, 4>;  // -1: none

struct AutoTable {
  std::shared_mutex mu;
  std::unordered_map<std::string, Table> by_device;
};

AutoTable& auto_table() {
  static AutoTable t;
  return t;
}

int8_t lookup(const std::string& device, at::ScalarType dtype, int64_t M, int64_t r) {
  AutoTable& t = auto_table();
  std::shared_lock<std::shared_mutex> lock(t.mu);
  auto it = t.by_device.find(device);
  const int d = dtype_index(dtype);
  if (it == t.by_device.end() || d < 0) return -1;
  return it->second[d][bucket(M, kMBuckets)][bucket(r, kRBuckets)];
}

}  // namespace

// Registered as loraxs::set_auto_choice(str device_name, ScalarType dtype, int M_bucket, int r_bucket,
// str backend): one measured entry; the bucket values must be the table's own (1, 16, ... / 4, 16, ...).
void set_auto_choice(c10::string_view device_name, at::ScalarType dtype, int64_t m_bucket, int64_t r_bucket,
                     c10::string_view backend) {
  const Backend b = parse_backend(backend);
  TORCH_CHECK_VALUE(b == Backend::kTriton || b == Backend::kCuda || b == Backend::kTorch,
                    "the auto table may choose 'triton', 'cuda' or 'torch', got '", std::string(backend), "'");
  const int d = dtype_index(dtype);
  TORCH_CHECK_VALUE(d >= 0, "the auto table holds float16, bfloat16, float32 and float64, got ", dtype);
  const size_t mi = bucket(m_bucket, kMBuckets), ri = bucket(r_bucket, kRBuckets);
  TORCH_CHECK_VALUE(kMBuckets[mi] == m_bucket && kRBuckets[ri] == r_bucket, "M bucket ", m_bucket, " / rank bucket ",
                    r_bucket, " is not one of the table's buckets");
  AutoTable& t = auto_table();
  std::unique_lock<std::shared_mutex> lock(t.mu);
  auto [it, fresh] = t.by_device.try_emplace(std::string(device_name));
  if (fresh) {
    for (auto& per_m : it->second) {
      for (auto& per_r : per_m) per_r.fill(-1);
    }
  }
  it->second[d][mi][ri] = static_cast<int8_t>(b);
}

void clear_auto_choices() {
  AutoTable& t = auto_table();
  std::unique_lock<std::shared_mutex> lock(t.mu);
  t.by_device.clear();
}

Backend choose_cuda_backend(const CudaContext& c, at::ScalarType dtype, int64_t M, int64_t r) {
  // Below sm_80 neither GPU backend has code (mma.sync bf16, cp.async, ldmatrix; Triton's tables are
  // tuned for sm_80/sm_90 and the decode entries need more shared memory than older GPUs have).
  if (c.cc_major < 8) return Backend::kTorch;
  const int8_t measured = lookup(c.device_name, dtype, M, r);
  if (measured >= 0) {
    const Backend b = static_cast<Backend>(measured);
    if (b == Backend::kTorch || (b == Backend::kTriton && c.triton) || (b == Backend::kCuda && c.cuda_kernels)) {
      return b;
    }
    TORCH_WARN_ONCE("loraxs: the measured auto table picks backend '", backend_name(b), "' on ", c.device_name,
                    ", which is not available here (", b == Backend::kTriton ? "Triton is not installed" :
                    "the extension was built without CUDA kernels", "); running the next best backend instead");
  }
  // fp64, and fp32 when torch forbids TF32: cuBLAS through the ATen schedule. The fused kernels'
  // fp32/fp64 paths are CUDA-core FMA loops, far from cuBLAS's (DGEMM runs on the H100/H200 tensor
  // cores); Triton 3.6 does not compile an fp64 tl.dot at all.
  if (dtype == at::kDouble || (dtype == at::kFloat && !c.tf32)) return Backend::kTorch;
  if (c.triton) return Backend::kTriton;
  TORCH_WARN_ONCE("loraxs: Triton is not installed, so \"auto\" runs ",
                  c.cuda_kernels ? "the CUDA C++ kernels" : "ATen (cuBLAS) calls", " on CUDA tensors");
  if (c.cuda_kernels) return Backend::kCuda;
  return Backend::kTorch;
}

// Registered as loraxs::auto_backend(str device_name, int cc_major, ScalarType dtype, int M, int r,
// bool tf32, bool triton, bool cuda_kernels) -> str: the choice above, callable on any machine (tests).
std::string auto_backend(c10::string_view device_name, int64_t cc_major, at::ScalarType dtype, int64_t M, int64_t r,
                         bool tf32, bool triton, bool cuda_kernels) {
  CudaContext c{std::string(device_name), static_cast<int>(cc_major), tf32, triton, cuda_kernels};
  return backend_name(choose_cuda_backend(c, dtype, M, r));
}

}  // namespace loraxs
