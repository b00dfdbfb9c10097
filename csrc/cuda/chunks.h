// 16-byte chunks of a row-major activation for the csrc/cuda kernels that stage it in shared memory and apply the
// LoRA/KronA dropout mask there (lora_linear.cu, kron_linear.cu): the Philox keep bits of a chunk, the masking, and
// the copy (cp.async when the rows are 16-byte aligned, a plain load and store otherwise).
#pragma once
#include <type_traits>

#include "launch.h"
#include "peft_kernels/lora_params.h"
#include "peft_kernels/philox.h"
#include "peft_kernels/ptx.cuh"

namespace peft_kernels::cuda {

// Bit j set: element e0 + j of x (flat, row-major) is kept. N = 8 (16 bytes of bf16/f16) or 4 (of fp32): one Philox
// call when the N elements lie in one group of 8, which every chunk of a row does when the row length is a multiple
// of N; otherwise two calls (4 elements per call).
template <int N> __device__ __forceinline__ unsigned keep_bits(const lora::Dropout& d, uint64_t e0) {
  const unsigned s = unsigned(e0 & 7);
  const philox::Draw lo = philox::draw4(d.seed, e0 >> 3);
  const philox::Draw hi = s + N > 8 ? philox::draw4(d.seed, (e0 >> 3) + 1) : lo;
  unsigned bits = 0;
PK_UNROLL
  for (int j = 0; j < N; ++j) {
    const unsigned e = s + j;
    const uint32_t w = e < 8 ? philox::word(lo, (e >> 1) & 3u) : philox::word(hi, (e >> 1) & 3u);
    bits |= ((e & 1u ? w >> 16 : w & 0xFFFFu) >= d.threshold ? 1u : 0u) << j;
  }
  return bits;
}

// Zeroes the dropped elements of 16 bytes of T: element j of a 16-bit chunk is half j & 1 (low first) of word j >> 1;
// of an fp32 chunk, word j.
template <class T> __device__ __forceinline__ uint4 drop16(uint4 v, unsigned keep) {
  auto mask = [&](int word) -> uint32_t {
    if constexpr (sizeof(T) == 4) return (keep >> word) & 1u ? 0xFFFFFFFFu : 0u;
    return ((keep >> (2 * word)) & 1u ? 0x0000FFFFu : 0u) | ((keep >> (2 * word + 1)) & 1u ? 0xFFFF0000u : 0u);
  };
  return uint4{v.x & mask(0), v.y & mask(1), v.z & mask(2), v.w & mask(3)};
}

// The E = 16 / sizeof(T) elements src[0 .. n) as 16 bytes (n clipped to E; 0 past the matrix), zero past n. vec:
// rows 16-byte aligned with a multiple of E elements, so a chunk is whole or absent: one 16-byte load.
template <class T> __device__ __forceinline__ uint4 load_chunk(const T* src, int64_t n, bool vec) {
  if (vec) return n > 0 ? load16(src) : uint4{0u, 0u, 0u, 0u};
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
  constexpr int E = 16 / sizeof(T);
  Bits v[E];
PK_UNROLL
  for (int j = 0; j < E; ++j) v[j] = j < n ? reinterpret_cast<const Bits*>(src)[j] : Bits(0);
  uint4 packed;
  memcpy(&packed, v, 16);
  return packed;
}

// Stages a chunk (load_chunk's) into 16 bytes of shared memory: by cp.async when vec (zero-filled when absent),
// else loaded and stored at once.
template <class T>
__device__ __forceinline__ void stage_chunk(uint8_t* dst, const T* src, int64_t n, bool vec, const T* any) {
  if (vec) {
    pk::ptx::cp_async_16(dst, n > 0 ? src : any, n > 0 ? 16 : 0);
  } else {
    store16(dst, load_chunk(src, n, false));
  }
}

}  // namespace peft_kernels::cuda
