// Host twins of the inline PTX in csrc/cuda/kernels/common.cuh, written from the PTX ISA (9.0):
//   cp.async / cp.async.commit_group / cp.async.wait_group   "Data Movement and Conversion
//       Instructions: cp.async", with the zero-fill of src-size < cp-size;
//   ldmatrix .x4 [.trans]                                     "Warp Level Matrix Load Instruction:
//       ldmatrix" (9.7.14.5.15), figure "ldmatrix fragment" (row = lane / 4, pair 2·(lane % 4));
//   mma.sync.m16n8k16 .f32.{f16,bf16}                         "Matrix Fragments for mma.m16n8k16
//       with floating point type" (9.7.14.5.8): A a0..a7, B b0..b3, C/D c0..c3 (groupID = lane / 4,
//       threadID_in_group = lane % 4).
// Each twin checks what the hardware would fault on or leave undefined (state space, alignment,
// operand size) and reports through the "memcheck" checker; warp-wide twins also check that all 32
// lanes executed the same instruction and none has exited (.sync.aligned: undefined otherwise).
#pragma once

#include <cstdint>
#include <cstring>

namespace loraxs_emu {
namespace ptx {

// ---------------------------------------------------------------------------------- cp.async
inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  if (!in_shared(smem, 16)) fail("memcheck", "cp.async destination %p is not 16 bytes of shared memory", smem);
  if (reinterpret_cast<uintptr_t>(smem) % 16 || reinterpret_cast<uintptr_t>(gmem) % 16)
    fail("memcheck", "cp.async addresses not aligned to cp-size 16: shared %p, global %p", smem, gmem);
  if (src_bytes < 0 || src_bytes > 16) fail("memcheck", "cp.async src-size %d outside 0..16", src_bytes);
  if (src_bytes > 0 && in_shared(gmem, 1)) fail("memcheck", "cp.async source %p is shared memory", gmem);
  PendingCopy c;
  c.dst = static_cast<unsigned char*>(smem);
  // The source is read at issue (so memcheck blames the issuing thread at this line); the bytes
  // past src-size are zeros, and nothing is read when src-size is 0.
  const volatile unsigned char* s = static_cast<const unsigned char*>(gmem);
  for (int i = 0; i < 16; ++i) c.data[i] = i < src_bytes ? s[i] : 0;
  self().open.push_back(c);
}
inline void cp_async_commit() {
  ThreadState& t = self();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}
// Retires every committed group but the newest n: only now do their bytes land in shared memory.
inline void cp_async_wait(int n) {
  ThreadState& t = self();
  while (static_cast<int>(t.groups.size()) > n) {
    for (const PendingCopy& c : t.groups.front()) std::memcpy(c.dst, c.data, 16);
    t.groups.erase(t.groups.begin());
  }
}

// ---------------------------------------------------------------------------------- ldmatrix
// .x4: lanes 8i..8i+7 give the row addresses of matrix i (8 rows of 8 b16 elements, 16 bytes each).
// Register i of lane l holds, low half first: without .trans row l/4, elements 2(l%4) and 2(l%4)+1;
// with .trans the transposed matrix, i.e. element l/4 of rows 2(l%4) and 2(l%4)+1.
enum Op { kLdmatrix = 1, kLdmatrixTrans = 2, kMmaF16 = 3, kMmaBF16 = 4 };

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  const int lane = self().tid & 31;
  if (!in_shared(smem, 16)) fail("memcheck", "ldmatrix row address %p (lane %d) is not 16 bytes of shared memory", smem, lane);
  if (reinterpret_cast<uintptr_t>(smem) % 16) fail("memcheck", "ldmatrix row address %p (lane %d) not 16-byte aligned", smem, lane);
  WarpSlots& w = warp_slots_next();
  w.addr[lane] = smem;
  warp_arrive(trans ? kLdmatrixTrans : kLdmatrix, trans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(w.addr[8 * i + g]);
      lo = row[2 * t];
      hi = row[2 * t + 1];
    } else {
      lo = static_cast<const uint16_t*>(w.addr[8 * i + 2 * t])[g];
      hi = static_cast<const uint16_t*>(w.addr[8 * i + 2 * t + 1])[g];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

// ---------------------------------------------------------------------------------- mma.sync
template <typename T>
inline double b16_value(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same_v<T, __half>)
    return static_cast<double>(__half2float(v));
  else
    return static_cast<double>(__bfloat162float(v));
}

// A (16×16, row): element (row, k) is in lane 4·(row % 8) + (k % 8) / 2, register (row ≥ 8) + 2·(k ≥ 8),
// half k % 2. B (16×8, col): element (k, n) is in lane 4n + (k % 8) / 2, register k ≥ 8, half k % 2.
// D: lane (g, t) owns d0, d1 = D[g][2t, 2t+1] and d2, d3 = D[g+8][2t, 2t+1].
// The products of 16-bit operands are exact in fp64 and the 16 of them plus c are summed in k
// order in fp64, then rounded once to fp32: the ISA leaves the internal order and rounding of the
// accumulation unspecified, so this is one legal result, not the bits of a particular GPU.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = self().tid & 31;
  WarpSlots& w = warp_slots_next();
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) w.b[lane][i] = b[i];
  warp_arrive(std::is_same_v<T, __half> ? kMmaF16 : kMmaBF16, "mma.sync.m16n8k16");
  auto A = [&](int row, int k) {
    const uint32_t reg = w.a[4 * (row % 8) + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return b16_value<T>(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xffffu));
  };
  auto B = [&](int k, int n) {
    const uint32_t reg = w.b[4 * n + (k % 8) / 2][k >= 8 ? 1 : 0];
    return b16_value<T>(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xffffu));
  };
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    double s = d[i];
    for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
    d[i] = static_cast<float>(s);
  }
}

}  // namespace ptx
}  // namespace loraxs_emu
