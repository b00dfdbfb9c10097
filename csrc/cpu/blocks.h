// Row blocks and tensor views shared by the CPU kernels that work on x a block of rows at a time (lora_linear's
// dropout path, kron_linear): a block of about 64K values of x is 256 KiB in fp32, so a block's fp32 buffers stay
// inside this Zen 4's 1 MiB L2 while the GEMMs on them run.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "peft_kernels/hd.h"

namespace peft_kernels::cpu {

constexpr int64_t kBlockValues = 65536;  // values of x per block of rows

// Rows per block for rows of `in` values, at least 1 and at most m (m >= 1).
inline int64_t block_rows(int64_t in, int64_t m) {
  return std::clamp<int64_t>(kBlockValues / in, 1, std::max<int64_t>(m, 1));
}

// Weight gradients are summed per row block into partials, then the partials of a wave of consecutive blocks into
// the result, wave after wave: the grouping depends on the shapes alone, so the result is the same whatever the
// thread count. A wave holds at most kWaveBytes of partials (at least kMinWave blocks, so that a wave still spreads
// over threads). A partial can outweigh its block of x: LoRA's dA partial is [r, in], 16 x 11008 values for the 5
// rows of x a block holds at in = 11008; one partial per block of the whole input, as the kernels kept before, was
// 551 MiB at M = 4096 there.
constexpr int64_t kWaveBytes = int64_t{16} << 20, kMinWave = 4, kMaxWave = 64;

// Blocks per wave for partials of `partial_bytes` bytes each.
inline int64_t wave_blocks(int64_t partial_bytes) {
  return std::clamp<int64_t>(kWaveBytes / std::max<int64_t>(partial_bytes, 1), kMinWave, kMaxWave);
}

// Runs body(c0, c1, w0) over the blocks [0, blocks) in parallel, wave by wave (w0: the wave's first block; block c
// writes its partial to slot c - w0), and reduce(n) on the calling thread after each wave of n blocks.
template <class Body, class Reduce> void in_waves(int64_t blocks, int64_t wave, Body&& body, Reduce&& reduce) {
  for (int64_t w0 = 0; w0 < blocks; w0 += wave) {
    const int64_t w1 = std::min(blocks, w0 + wave);
    at::parallel_for(w0, w1, 1, [&](int64_t c0, int64_t c1) { body(c0, c1, w0); });
    reduce(w1 - w0);
  }
}

// sum[e] += parts[k * size + e] for the n partials of a wave, k in order (in_waves' reduce of fp32 partials). The
// elements are split over the threads, each summed in the same order whatever the split: LoRA's dA wave at in = 1024,
// r = 16 reads 32 partials of 64 KiB, and on the calling thread alone the other one waited for it.
inline void add_partials(float* sum, const float* parts, int64_t n, int64_t size) {
  at::parallel_for(0, size, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t e = e0; e < e1; ++e) sum[e] += parts[k * size + e];
    }
  });
}

// Per-thread block buffers, kept for the thread's lifetime and reused by every call (contents undefined on entry;
// `slot` < kScratchSlots names one buffer, distinct slots never alias). The kernels used to build a std::vector per
// buffer on every call: up to 1.75 MiB per thread for a KronA backward, zero-filled, freed, and often handed back to
// the kernel by glibc and faulted in again on the next call. bench_kron_linear.py, bf16, ours / base: 1.56 -> 1.40
// (runs minutes apart, same load). What stays: at most kScratchSlots x kBlockValues values per thread and Acc type
// (2 MiB in fp32) while in <= kBlockValues, only in the slots a kernel used, and on a calling thread its wave
// partials (wave_partials, below: up to kWaveBytes).
constexpr int kScratchSlots = 8;

template <class Acc> Acc* scratch(int slot, int64_t n) {
  thread_local std::array<std::vector<Acc>, kScratchSlots> buffers;
  std::vector<Acc>& b = buffers.at(slot);
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// The partials of a wave as one buffer of n values, owned by the calling thread and written by the workers of
// each wave: its scratch slot kScratchSlots - 1, which no worker body uses. Kept like the block buffers (at most
// kWaveBytes, or kMinWave partials when these are larger); contents undefined on entry, every partial of a wave
// is written whole before it is read. Allocated per call (2 MiB for LoRA's dA at in = 1024, r = 16) they were
// handed back to the OS by glibc and faulted in again on the next call.
template <class Acc> Acc* wave_partials(int64_t n) { return scratch<Acc>(kScratchSlots - 1, n); }

// A row-major matrix src [rows, cols] of T transposed ([cols, rows]) and converted to Out: the small factors the
// kernels read by columns (LoRA's B, KronA's A and B), once per call.
template <class Out, class T> std::vector<Out> transposed(const void* src, int64_t rows, int64_t cols) {
  const T* s = static_cast<const T*>(src);
  std::vector<Out> t(rows * cols);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = static_cast<Out>(s[i * cols + j]);
  }
  return t;
}

// A kernel's buffer (Acc = float or double) as a tensor, no copy.
template <class Acc> at::Tensor view(const Acc* data, at::IntArrayRef sizes) {
  return at::from_blob(const_cast<Acc*>(data), sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value));
}

// A params struct's untyped pointer as a tensor of its dtype, no copy.
inline at::Tensor wrap(const void* ptr, at::IntArrayRef sizes, DType dtype) {
  static constexpr at::ScalarType kTypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
  return at::from_blob(const_cast<void*>(ptr), sizes, kTypes[static_cast<int>(dtype)]);
}

}  // namespace peft_kernels::cpu
