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

// keep(e) * scale for elements [first, first + n) into out[0, n), drawing up to 256 elements per batch.
// With `avx512` (the caller checked cpu::pick_isa()) the draws become the mask 16 lanes at a time (one compare, one
// masked move) instead of a compare and select per element.
template <class Acc> void mask_row(const lora::Dropout& d, int64_t first, int64_t n, Acc* out, bool avx512 = false) {
  const Acc scale = static_cast<Acc>(d.scale);
  uint32_t draws[4 * philox::kBatch];
  for (int64_t e = first; e < first + n;) {
    const uint64_t group = static_cast<uint64_t>(e) >> 2;
    const int64_t groups_left = ((first + n - 1) >> 2) - static_cast<int64_t>(group) + 1;
    const int count = static_cast<int>(std::min<int64_t>(philox::kBatch, groups_left));
    philox::draw_batch_fast(d.seed, group, count, draws);
    const int64_t stop = std::min<int64_t>(first + n, static_cast<int64_t>(group + count) * 4);
    if constexpr (std::is_same_v<Acc, float>) {
      if (avx512) {
        simd::keep_mask(draws + (e - 4 * static_cast<int64_t>(group)), stop - e, d.threshold, scale, out + (e - first));
        e = stop;
        continue;
      }
    }
    for (; e < stop; ++e) out[e - first] = draws[e - 4 * static_cast<int64_t>(group)] >= d.threshold ? scale : Acc(0);
  }
}

}  // namespace peft_kernels::cpu
