// The emulation's runtime: grids, blocks as groups of OS threads, barriers, shared memory, the
// deferred stream with PDL's worst legal order, and reports. See emu.h.
#include "emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace loraxs_emu {

namespace {

thread_local ThreadState t_state;
thread_local bool t_in_kernel = false;

std::chrono::seconds barrier_timeout() {
  const char* v = std::getenv("LORAXS_EMU_TIMEOUT");
  return std::chrono::seconds(v ? std::atoi(v) : 60);
}

std::string demangled(const void* addr) {
  Dl_info info;
  if (dladdr(addr, &info) && info.dli_sname) {
    int status = 0;
    char* s = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string out = status == 0 && s ? s : info.dli_sname;
    std::free(s);
    return out;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "kernel@%p", addr);
  return buf;
}

void print_context(FILE* f) {
  if (!t_in_kernel) return;
  const ThreadState& t = t_state;
  std::fprintf(f, "  in kernel %s, block (%u,%u,%u), thread (%u,%u,%u) (warp %d, lane %d)\n", t.kernel,
               t.block_idx.x, t.block_idx.y, t.block_idx.z, t.thread_idx.x, t.thread_idx.y, t.thread_idx.z,
               t.tid / 32, t.tid % 32);
}

// A barrier over a changing number of participants: an exited thread stops counting (CUDA's
// __syncthreads semantics on sm_70+ for threads that have exited). Timeouts report a deadlock.
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void wait(const char* what) {
    std::unique_lock<std::mutex> l(m_);
    const uint64_t gen = gen_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    if (!cv_.wait_for(l, barrier_timeout(), [&] { return gen_ != gen || broken_; })) {
      const int arrived = arrived_, expected = expected_;
      l.unlock();
      fail("sync", "deadlock at %s: %d of %d threads arrived within the timeout", what, arrived, expected);
    }
    if (gen_ == gen && broken_) {
      l.unlock();
      fail("sync", "%s: a thread of this group exited while the others wait in it", what);
    }
  }
  // Block barrier: the thread stops counting. Warp rendezvous (strict): waiting lanes fail.
  void leave(bool strict) {
    std::lock_guard<std::mutex> l(m_);
    --expected_;
    if (strict && arrived_ > 0) {
      broken_ = true;
      cv_.notify_all();
    } else if (arrived_ > 0 && arrived_ == expected_) {
      release();
    }
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_, arrived_ = 0;
  uint64_t gen_ = 0;
  bool broken_ = false;
};

struct Warp {
  explicit Warp(int lanes) : bar(lanes) {}
  Barrier bar;
  WarpSlots slots[2];
};

struct SharedArray {
  std::string name;
  unsigned char* p;
  size_t bytes;
};

}  // namespace

struct Block {
  Block(int n) : bar(n) {
    for (int w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(std::make_unique<Warp>(n - 32 * w < 32 ? n - 32 * w : 32));
  }
  ~Block() {
    for (auto& s : shared) std::free(s.p);
  }
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::mutex shared_mu;
  std::vector<SharedArray> shared;
};

ThreadState& self() { return t_state; }

void fail(const char* checker, const char* fmt, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "EMU %s: ", checker);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  print_context(stderr);
  std::fflush(stderr);
  std::_Exit(std::strcmp(checker, "memcheck") == 0 ? 10 : 12);
}

void syncthreads() { t_state.block->bar.wait("__syncthreads"); }

void* shared_alloc(const char* name, size_t bytes, size_t align) {
  Block* b = t_state.block;
  std::lock_guard<std::mutex> l(b->shared_mu);
  for (auto& s : b->shared)
    if (s.name == name) return s.p;
  void* p = nullptr;
  if (posix_memalign(&p, align, bytes) != 0) fail("sync", "out of host memory for shared array %s", name);
  std::memset(p, 0xFF, bytes);  // stale shared memory reads as NaN
  b->shared.push_back({name, static_cast<unsigned char*>(p), bytes});
  return p;
}

bool in_shared(const void* p, size_t bytes) {
  Block* b = t_state.block;
  if (!b) return false;
  const unsigned char* c = static_cast<const unsigned char*>(p);
  std::lock_guard<std::mutex> l(b->shared_mu);
  for (auto& s : b->shared)
    if (c >= s.p && c + bytes <= s.p + s.bytes) return true;
  return false;
}

void check_global_aligned(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align)
    fail("memcheck", "%s of %zu bytes at %p: misaligned address", what, align, p);
  if (in_shared(p, 1)) fail("memcheck", "%s at %p reads shared memory through a global load", what, p);
}

WarpSlots& warp_slots_next() {
  Warp& w = *t_state.block->warps[t_state.tid / 32];
  return w.slots[t_state.warp_parity];
}

void warp_arrive(int op, const char* what) {
  Warp& w = *t_state.block->warps[t_state.tid / 32];
  WarpSlots& s = w.slots[t_state.warp_parity];
  const int lane = t_state.tid % 32;
  s.op[lane] = op;
  w.bar.wait(what);
  // Slots alternate between two sets: a lane can be at most one instruction ahead of the slowest,
  // so it never overwrites a set another lane still reads.
  t_state.warp_parity ^= 1u;
  for (int l = 0; l < 32; ++l)
    if (s.op[l] != op) fail("sync", "%s: lane %d executed a different warp-wide instruction (.sync.aligned)", what, l);
}

// ---------------------------------------------------------------------------------- grids
namespace {

struct Grid {
  std::string name;
  LaunchSpec spec;
  Body body;
};

std::unique_ptr<Grid> g_pending;   // the last launch, not yet run (the stream is one deep)
Grid* g_primary = nullptr;         // while a PDL dependent runs: its primary, until griddepcontrol.wait runs it
bool g_primary_done = false;

// OS threads for the CUDA threads of one block, reused block after block: creating and joining
// 256 threads per block made a grad_R reduce at r = 256 (256 blocks) take 10 s under ASan. The
// hand-over (mutex + condition variable) orders a block's threads before the next block's, as a
// join would. Two pools: the second runs a PDL primary from inside its dependent's block.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> l(m_);
      stop_ = true;
    }
    work_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void run(int n, const std::function<void(int)>& job) {
    while (static_cast<int>(threads_.size()) < n) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
    }
    {
      std::lock_guard<std::mutex> l(m_);
      job_ = &job;
      active_ = n;
      done_ = 0;
      ++gen_;
    }
    work_.notify_all();
    std::unique_lock<std::mutex> l(m_);
    done_cv_.wait(l, [&] { return done_ == active_; });
    job_ = nullptr;
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> l(m_);
    for (;;) {
      work_.wait(l, [&] { return stop_ || gen_ != seen; });
      if (stop_) return;
      seen = gen_;
      if (id >= active_) continue;
      const std::function<void(int)>* job = job_;
      l.unlock();
      (*job)(id);
      l.lock();
      if (++done_ == active_) done_cv_.notify_one();
    }
  }
  std::mutex m_;
  std::condition_variable work_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0, done_ = 0;
  uint64_t gen_ = 0;
  bool stop_ = false;
};

Pool& pool(int depth) {
  static Pool pools[2];
  return pools[depth];
}

void run_grid(const Grid& g) {
  const dim3 gd = g.spec.grid, bd = g.spec.block;
  const int n = static_cast<int>(bd.x * bd.y * bd.z);
  if (n < 1 || n > 1024) fail("sync", "launch of %s with %d threads per block", g.name.c_str(), n);
  if (g.spec.smem != 0) fail("sync", "launch of %s asks for dynamic shared memory, which the emulation lacks", g.name.c_str());
  Pool& workers = pool(t_in_kernel ? 1 : 0);
  for (unsigned bz = 0; bz < gd.z; ++bz)
    for (unsigned by = 0; by < gd.y; ++by)
      for (unsigned bx = 0; bx < gd.x; ++bx) {
        Block block(n);
        const std::function<void(int)> job = [&](int tid) {
          ThreadState& t = t_state;
          t = ThreadState{};
          t.kernel = g.name.c_str();
          t.block = &block;
          t.tid = tid;
          t.block_dim = bd;
          t.grid_dim = gd;
          t.block_idx = uint3{bx, by, bz};
          t.thread_idx = uint3{static_cast<unsigned>(tid % bd.x), static_cast<unsigned>(tid / bd.x % bd.y),
                               static_cast<unsigned>(tid / (bd.x * bd.y))};
          char tname[16];
          std::snprintf(tname, sizeof tname, "b%u,%u,%u t%d", bx, by, bz, tid);
          pthread_setname_np(pthread_self(), tname);
          t_in_kernel = true;
          g.body();
          size_t pending = t.open.size();
          for (auto& grp : t.groups) pending += grp.size();
          if (pending) fail("sync", "thread exits with %zu cp.async copies never retired by cp.async.wait_group", pending);
          t_in_kernel = false;
          t.block = nullptr;
          block.warps[tid / 32]->bar.leave(true);
          block.bar.leave(false);
        };
        workers.run(n, job);
      }
}

}  // namespace

void enqueue(const void* kernel_addr, const LaunchSpec& spec, Body body) {
  auto g = std::make_unique<Grid>(Grid{demangled(kernel_addr), spec, std::move(body)});
  if (spec.pdl && g_pending) {
    // Programmatic dependent launch, worst legal order: the dependent starts before its primary has
    // run at all; the primary runs when the dependent's first block reaches griddepcontrol.wait
    // (after that block's code before the wait), or after the dependent if it never waits.
    std::unique_ptr<Grid> primary = std::move(g_pending);
    g_primary = primary.get();
    g_primary_done = false;
    run_grid(*g);
    if (!g_primary_done) run_grid(*primary);
    g_primary = nullptr;
    return;
  }
  synchronize();
  g_pending = std::move(g);
}

void synchronize() {
  if (g_pending) {
    std::unique_ptr<Grid> g = std::move(g_pending);
    run_grid(*g);
  }
}

void pdl_launch_dependents() {}

void pdl_wait_primary() {
  if (!g_primary) return;  // not launched as a PDL dependent, or the primary already ran
  // Every thread of this block has run its code before the wait before the primary starts.
  syncthreads();
  if (t_state.tid == 0 && !g_primary_done) {
    const ThreadState saved = t_state;
    const bool saved_in = t_in_kernel;
    run_grid(*g_primary);  // in new threads; this thread's state is its own
    t_state = saved;
    t_in_kernel = saved_in;
    g_primary_done = true;
  }
  syncthreads();
}

namespace {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
void on_sanitizer_death() {
  std::fprintf(stderr, "EMU: the sanitizer report above is from this CUDA thread:\n");
  print_context(stderr);
  if (!t_in_kernel) std::fprintf(stderr, "  (host code, not a kernel thread)\n");
}
struct InstallDeathCallback {
  InstallDeathCallback() { __sanitizer_set_death_callback(on_sanitizer_death); }
} install_death_callback;
#endif
}  // namespace

}  // namespace loraxs_emu

// One device, number 0 (see cudaFuncGetAttributes in emu.h).
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
