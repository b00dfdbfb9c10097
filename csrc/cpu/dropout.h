// Helpers of the CPU kernels that apply the Philox dropout mask (LoRA's and kron_linear's) on the fly.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "microgemm.h"
#include "peft_kernels/lora_params.h"
#include "peft_kernels/philox.h"
#include "philox_simd.h"

namespace peft_kernels::cpu {

// keep(e) * scale for elements [first, first + n) into out[0, n), drawing up to 512 elements (64 Philox calls of 8
// 16-bit draws, philox.h) per batch. With `avx512` (the caller checked cpu::pick_isa()) the draws become the mask 16
// lanes at a time (one compare, one masked move) instead of a compare and select per element.
template <class Acc> void mask_row(const lora::Dropout& d, int64_t first, int64_t n, Acc* out, bool avx512 = false) {
  constexpr int64_t kPer = philox::kDropoutPerGroup;
  const Acc scale = static_cast<Acc>(d.scale);
  uint32_t words[4 * philox::kBatch];
  for (int64_t e = first; e < first + n;) {
    const int64_t group = e / kPer;
    const int count = static_cast<int>(std::min<int64_t>(philox::kBatch, (first + n - 1) / kPer - group + 1));
    philox::draw_batch_fast(d.seed, static_cast<uint64_t>(group), count, words);
    const int64_t base = group * kPer, stop = std::min<int64_t>(first + n, (group + count) * kPer);
    if constexpr (std::is_same_v<Acc, float>) {
      if (avx512) {
        simd::keep_mask(words, e - base, stop - e, d.threshold, scale, out + (e - first));
        e = stop;
        continue;
      }
    }
    for (; e < stop; ++e) {
      const int64_t i = e - base;
      const uint32_t draw = (words[i >> 1] >> (16 * (i & 1))) & 0xFFFFu;
      out[e - first] = draw >= d.threshold ? scale : Acc(0);
    }
  }
}

}  // namespace peft_kernels::cpu
