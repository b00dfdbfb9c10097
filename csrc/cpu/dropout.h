// Helpers of the CPU kernels that apply the Philox dropout mask (LoRA's and kron_linear's) on the fly.
#pragma once
#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "microgemm.h"
#include "peft_kernels/lora_params.h"
#include "peft_kernels/philox.h"
#include "philox_simd.h"

namespace peft_kernels::cpu {

// The dropout draws as 16-bit values in element order: the halves of the Philox words, low half first, are in
// element order in memory on a little-endian CPU. may_alias: the words are written as uint32_t.
static_assert(std::endian::native == std::endian::little);
using draw16 = uint16_t __attribute__((may_alias));

// Draws the 16-bit dropout draws (philox.h) of elements [first, first + n) up to 512 at a time (64 Philox calls of 8
// draws) and calls f(draws, o, k) for each run: draws[0, k) are those of elements first + o .. first + o + k - 1.
template <class F> void draw_runs(const lora::Dropout& d, int64_t first, int64_t n, F&& f) {
  constexpr int64_t kPer = philox::kDropoutPerGroup;
  uint32_t words[4 * philox::kBatch];
  for (int64_t e = first; e < first + n;) {
    const int64_t group = e / kPer;
    const int count = static_cast<int>(std::min<int64_t>(philox::kBatch, (first + n - 1) / kPer - group + 1));
    philox::draw_batch_fast(d.seed, static_cast<uint64_t>(group), count, words);
    const int64_t stop = std::min<int64_t>(first + n, (group + count) * kPer);
    f(reinterpret_cast<const draw16*>(words) + (e - group * kPer), e - first, stop - e);
    e = stop;
  }
}

// keep(e) * scale for elements [first, first + n) into out[0, n). With `avx512` (the caller checked
// cpu::pick_isa()) the draws become the mask 16 lanes at a time (one compare, one masked move) instead of a compare
// and select per element.
template <class Acc> void mask_row(const lora::Dropout& d, int64_t first, int64_t n, Acc* out, bool avx512 = false) {
  const Acc scale = static_cast<Acc>(d.scale);
  draw_runs(d, first, n, [&](const draw16* draws, int64_t o, int64_t k) {
    if constexpr (std::is_same_v<Acc, float>) {
      if (avx512) return simd::keep_mask(simd::Drawn{draws, d.threshold}, k, scale, out + o);
    }
    for (int64_t e = 0; e < k; ++e) out[o + e] = draws[e] >= d.threshold ? scale : Acc(0);
  });
}

// The draws of elements [first, first + n) into out[0, n) (simd::Drawn's).
inline void draw_row(const lora::Dropout& d, int64_t first, int64_t n, uint16_t* out) {
  draw_runs(d, first, n, [&](const draw16* draws, int64_t o, int64_t k) { std::memcpy(out + o, draws, 2 * k); });
}

// dst[e] = keep(first + e) ? src[e] : 0 for e < n, bf16, straight from the draws (AVX-512 only: the caller checked).
inline void drop_bf16(const lora::Dropout& d, int64_t first, int64_t n, const c10::BFloat16* src, c10::BFloat16* dst) {
  draw_runs(d, first, n, [&](const draw16* draws, int64_t o, int64_t k) {
    simd::drop_bf16(simd::Drawn{draws, d.threshold}, k, src + o, dst + o);
  });
}

}  // namespace peft_kernels::cpu
