// The emulation's entry: one process per request, so that AddressSanitizer or ThreadSanitizer own
// the whole process (neither can be loaded into a Python interpreter after the fact).
//
//   emu_runner REQUEST OUTPUT
//
// REQUEST is text lines, then raw bytes:
//   buffer NBYTES in|out          one allocation each, exactly NBYTES long (memcheck sees its end);
//                                 `out` buffers start as 0xFF bytes (NaN), like torch.empty's garbage
//   call NAME key=value ...       pointers as b<index>+<byte offset> or null; run in order
//   data                          followed by the bytes of every `in` buffer, in order
// OUTPUT receives the bytes of every `out` buffer, in order. stdout gets one `info` line per call.
// The calls go through the same torch-free launch API as the CUDA binding (kernels/launch.h): the
// dispatch (gemm tile choice, decode_splits, grad_r_splits) is the .cu files' own code.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/common.cuh"
#include "kernels/launch.h"

namespace lc = loraxs::cuda;

namespace {

struct Buffer {
  size_t nbytes;
  bool out;
  unsigned char* p;
};
std::vector<Buffer> g_buffers;

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "emu_runner: %s\n", msg.c_str());
  std::exit(2);
}

struct Call {
  std::string name;
  std::map<std::string, std::string> kv;
  const std::string& get(const std::string& k) const {
    auto it = kv.find(k);
    if (it == kv.end()) die("call " + name + " lacks " + k);
    return it->second;
  }
  int64_t i(const std::string& k) const { return std::stoll(get(k)); }
  double f(const std::string& k) const { return std::stod(get(k)); }
  bool has(const std::string& k) const { return kv.count(k) != 0; }
  void* ptr(const std::string& k) const {
    const std::string& v = get(k);
    if (v == "null") return nullptr;
    const size_t plus = v.find('+');
    if (v[0] != 'b' || plus == std::string::npos) die("bad pointer " + v);
    const size_t idx = std::stoul(v.substr(1, plus - 1));
    const size_t off = std::stoul(v.substr(plus + 1));
    if (idx >= g_buffers.size() || off > g_buffers[idx].nbytes) die("pointer out of its buffer: " + v);
    return g_buffers[idx].p + off;
  }
  lc::Operand op(const std::string& k) const { return {ptr(k), i(k + ".s_row"), i(k + ".s_k")}; }
  lc::DType dt(const std::string& k) const { return static_cast<lc::DType>(i(k)); }
};

void* scratch(size_t nbytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 256, nbytes ? nbytes : 1) != 0) die("out of memory");
  std::memset(p, 0xFF, nbytes);  // a fresh workspace is garbage: NaN
  return p;
}

void check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) die(what + " returned cudaError " + std::to_string(static_cast<int>(e)));
}

// ------------------------------------------------------------------ self-test kernels (one warp)
// ldmatrix: lane l passes shared address sm + rows[l] (in elements); registers go to out[4l + i].
void selftest_ldmatrix(const uint16_t* src, int n, const int* rows, uint32_t* out, bool trans) {
  auto& sm = loraxs_emu::shared<uint16_t[1024]>("sm");
  const int lane = threadIdx.x;
  for (int e = lane; e < n; e += 32) sm[e] = src[e];
  __syncthreads();
  uint32_t r[4];
  if (trans)
    lc::ldmatrix_x4_trans(r, sm + rows[lane]);
  else
    lc::ldmatrix_x4(r, sm + rows[lane]);
  for (int i = 0; i < 4; ++i) out[4 * lane + i] = r[i];
}
template <typename T>
void selftest_mma(const uint32_t* a, const uint32_t* b, const float* c, float* out) {
  const int lane = threadIdx.x;
  const uint32_t af[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  const uint32_t bf[2] = {b[2 * lane], b[2 * lane + 1]};
  float d[4] = {c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3]};
  lc::mma_16816<T>(d, af, bf);
  for (int i = 0; i < 4; ++i) out[4 * lane + i] = d[i];
}
// cp.async deferral, one thread: two groups (16 bytes, then 6 bytes + zero-fill); shared memory is
// snapshotted before any wait, after wait_group 1 and after wait_group 0 (3 × 32 bytes).
void selftest_cp_async(const unsigned char* src, unsigned char* out) {
  auto& sm = loraxs_emu::shared<unsigned char[32]>("sm");
  lc::cp_async_16(sm, src, 16);
  lc::cp_async_commit();
  lc::cp_async_16(sm + 16, src + 16, 6);
  lc::cp_async_commit();
  std::memcpy(out, sm, 32);
  lc::cp_async_wait<1>();
  std::memcpy(out + 32, sm, 32);
  lc::cp_async_wait<0>();
  std::memcpy(out + 64, sm, 32);
}

void run(const Call& c) {
  std::ostringstream info;
  info << "info " << c.name;
  if (c.name == "gemm") {
    lc::GemmArgs a;
    a.M = c.i("M"), a.N = c.i("N"), a.K1 = c.i("K1"), a.K2 = c.i("K2");
    a.P1 = c.op("P1"), a.Q1 = c.op("Q1");
    if (a.K2 > 0) a.P2 = c.op("P2"), a.Q2 = c.op("Q2");
    a.C = c.ptr("C"), a.s_cm = c.i("s_cm"), a.s_cn = c.i("s_cn");
    a.bias = c.ptr("bias");
    a.alpha = c.f("alpha");
    check(lc::gemm(c.dt("dtype"), a, static_cast<lc::QOrder>(c.i("order")), static_cast<int>(c.i("num_sms")), nullptr),
          "gemm");
  } else if (c.name == "decode" || c.name == "decode_splits") {
    lc::DecodeArgs d;
    d.M = c.i("M"), d.N = c.i("N"), d.K = c.i("K"), d.r = c.i("r");
    d.x = c.ptr("x"), d.s_x = c.i("s_x");
    d.W = c.ptr("W"), d.s_w = c.i("s_w");
    d.A = c.ptr("A"), d.s_a0 = c.i("s_a0"), d.s_a1 = c.i("s_a1");
    d.R = c.ptr("R"), d.s_r0 = c.i("s_r0"), d.s_r1 = c.i("s_r1"), d.r_dtype = c.dt("r_dtype");
    d.B = c.ptr("B"), d.s_b0 = c.i("s_b0"), d.s_b1 = c.i("s_b1");
    d.bias = c.ptr("bias");
    d.scaling = c.f("scaling");
    d.y = c.ptr("y"), d.xa = c.ptr("xa");
    if (c.has("ids")) {  // many adapters: R is a bank
      d.ids = c.ptr("ids"), d.ids_type = static_cast<lc::IndexType>(c.i("ids_type")), d.s_rn = c.i("s_rn");
      d.adapter_scale = static_cast<const double*>(c.ptr("adapter_scale"));
    }
    const lc::DType dt = c.dt("dtype");
    if (!lc::decode_supported(dt, d)) die("decode_supported() is false for these arguments");
    const int splits = lc::decode_splits(d, static_cast<int>(c.i("num_sms")));
    info << " splits=" << splits;
    if (c.name == "decode") {
      float* ws = static_cast<float*>(scratch(lc::decode_workspace_floats(d, splits) * sizeof(float)));
      check(lc::decode_forward_partial(dt, d, splits, ws, nullptr), "decode_forward_partial");
      check(lc::decode_forward_epilogue(dt, d, splits, ws, c.i("pdl") != 0, nullptr), "decode_forward_epilogue");
      loraxs_emu::synchronize();
      std::free(ws);
    }
  } else if (c.name == "grad_r") {
    lc::GradRArgs a;
    a.M = c.i("M"), a.r = c.i("r");
    a.xa = c.ptr("xa"), a.s_xa0 = c.i("s_xa0"), a.s_xa1 = c.i("s_xa1");
    a.u = c.ptr("u"), a.s_u0 = c.i("s_u0"), a.s_u1 = c.i("s_u1");
    a.scaling = c.f("scaling");
    a.out = c.ptr("out"), a.out_dtype = c.dt("out_dtype");
    const lc::DType dt = c.dt("dtype");
    const int splits = lc::grad_r_splits(a.M, a.r);
    info << " splits=" << splits;
    const size_t acc = dt == lc::DType::kDouble ? sizeof(double) : sizeof(float);
    void* ws = scratch(lc::grad_r_workspace_elems(a.r, splits) * acc);
    check(lc::grad_r_partial(dt, a, splits, ws, nullptr), "grad_r_partial");
    check(lc::grad_r_reduce(dt, a, splits, ws, nullptr), "grad_r_reduce");
    loraxs_emu::synchronize();
    std::free(ws);
  } else if (c.name == "multi_rows") {
    lc::MultiRowsArgs a;
    a.M = c.i("M"), a.r = c.i("r"), a.n = c.i("n");
    a.in = c.ptr("in"), a.s_in0 = c.i("s_in0"), a.s_in1 = c.i("s_in1");
    a.R = c.ptr("R"), a.s_rn = c.i("s_rn"), a.s_r0 = c.i("s_r0"), a.s_r1 = c.i("s_r1"), a.r_dtype = c.dt("r_dtype");
    a.transpose_R = c.i("transpose_R") != 0;
    a.ids = c.ptr("ids"), a.ids_type = static_cast<lc::IndexType>(c.i("ids_type"));
    a.adapter_scale = static_cast<const double*>(c.ptr("adapter_scale"));
    a.scaling = c.f("scaling");
    a.out = c.ptr("out");
    check(lc::multi_rows(c.dt("dtype"), a, nullptr), "multi_rows");
  } else if (c.name == "multi_grad_r") {
    lc::MultiGradRArgs a;
    a.r = c.i("r"), a.n = c.i("n");
    a.xa = c.ptr("xa"), a.s_xa0 = c.i("s_xa0"), a.s_xa1 = c.i("s_xa1");
    a.u = c.ptr("u"), a.s_u0 = c.i("s_u0"), a.s_u1 = c.i("s_u1");
    a.perm = static_cast<const int64_t*>(c.ptr("perm")), a.seg = static_cast<const int64_t*>(c.ptr("seg"));
    a.adapter_scale = static_cast<const double*>(c.ptr("adapter_scale"));
    a.scaling = c.f("scaling");
    a.out = c.ptr("out"), a.out_dtype = c.dt("out_dtype");
    check(lc::multi_grad_r(c.dt("dtype"), a, nullptr), "multi_grad_r");
  } else if (c.name == "selftest_ldmatrix") {
    const int n = static_cast<int>(c.i("n"));
    if (n < 1 || n > 1024) die("selftest_ldmatrix: n must be 1..1024");
    loraxs_emu::launcher(selftest_ldmatrix, dim3(1), dim3(32))(
        static_cast<const uint16_t*>(c.ptr("src")), n, static_cast<const int*>(c.ptr("rows")),
        static_cast<uint32_t*>(c.ptr("out")), c.i("trans") != 0);
  } else if (c.name == "selftest_mma") {
    auto k = c.dt("dtype") == lc::DType::kHalf ? selftest_mma<__half> : selftest_mma<__nv_bfloat16>;
    loraxs_emu::launcher(k, dim3(1), dim3(32))(static_cast<const uint32_t*>(c.ptr("a")),
                                               static_cast<const uint32_t*>(c.ptr("b")),
                                               static_cast<const float*>(c.ptr("c")), static_cast<float*>(c.ptr("out")));
  } else if (c.name == "selftest_cp_async") {
    loraxs_emu::launcher(selftest_cp_async, dim3(1), dim3(1))(static_cast<const unsigned char*>(c.ptr("src")),
                                                              static_cast<unsigned char*>(c.ptr("out")));
  } else {
    die("unknown call " + c.name);
  }
  loraxs_emu::synchronize();
  std::cout << info.str() << std::endl;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) die("usage: emu_runner REQUEST OUTPUT");
  std::ifstream in(argv[1], std::ios::binary);
  if (!in) die(std::string("cannot read ") + argv[1]);
  std::vector<Call> calls;
  std::string line;
  bool data = false;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string word;
    ls >> word;
    if (word == "buffer") {
      size_t n;
      std::string kind;
      ls >> n >> kind;
      g_buffers.push_back({n, kind == "out", static_cast<unsigned char*>(scratch(n))});
    } else if (word == "call") {
      Call c;
      ls >> c.name;
      std::string kv;
      while (ls >> kv) {
        const size_t eq = kv.find('=');
        if (eq == std::string::npos) die("bad key=value: " + kv);
        c.kv[kv.substr(0, eq)] = kv.substr(eq + 1);
      }
      calls.push_back(c);
    } else if (word == "data") {
      data = true;
      break;
    } else if (!word.empty()) {
      die("bad request line: " + line);
    }
  }
  if (!data) die("request has no data section");
  for (Buffer& b : g_buffers)
    if (!b.out && !in.read(reinterpret_cast<char*>(b.p), static_cast<std::streamsize>(b.nbytes)))
      die("request data is shorter than its buffers");
  for (const Call& c : calls) run(c);
  std::ofstream out(argv[2], std::ios::binary);
  for (const Buffer& b : g_buffers)
    if (b.out) out.write(reinterpret_cast<const char*>(b.p), static_cast<std::streamsize>(b.nbytes));
  if (!out) die(std::string("cannot write ") + argv[2]);
  for (Buffer& b : g_buffers) std::free(b.p);
  return 0;
}
