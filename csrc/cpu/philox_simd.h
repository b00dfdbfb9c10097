// Host-only batched Philox for the CPU dropout kernels: philox::draw_batch's results, 16 groups (64 draws) per
// AVX-512 step where the CPU has AVX-512F, the portable draw_batch otherwise. The compiler's own vectorization
// of draw_batch needs shuffles around every 32x32->64-bit product; written out, a round is 2 vpmuludq pairs,
// 2 vpmulld and 4 xors per 16 groups: 2M draws (one pass over a 2048x1024 activation) took 5.4 ms with
// draw_batch's AVX2 clone and 2.0 ms this way, on one core here (bit-identical draws).
#pragma once
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "peft_kernels/philox.h"

namespace peft_kernels::philox {

#if defined(__x86_64__)
__attribute__((target("avx512f"))) inline void draw_batch_avx512(uint64_t seed, uint64_t first, int count,
                                                                   uint32_t* out) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kMul0)), m1 = _mm512_set1_epi32(static_cast<int>(kMul1));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int g = 0;
  for (; g + 16 <= count; g += 16) {
    const uint64_t base = first + g;
    const __m512i lo_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    const __m512i hi_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    __m512i c0 = _mm512_add_epi32(lo_base, lanes);
    // Counter = base + lane as 64 bits: a low word that wrapped carries into the high word.
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo_base);
    __m512i c1 = _mm512_mask_add_epi32(hi_base, carry, hi_base, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      // High words of the 32x32->64 products: vpmuludq multiplies the even 32-bit lanes; the odd ones are
      // shifted down first, and their high words already sit in the odd positions.
      const __m512i even0 = _mm512_mul_epu32(c0, m0), odd0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
      const __m512i even1 = _mm512_mul_epu32(c2, m1), odd1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even0, 32), odd0);
      const __m512i hi1 = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even1, 32), odd1);
      const __m512i lo0 = _mm512_mullo_epi32(c0, m0), lo1 = _mm512_mullo_epi32(c2, m1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    // Structure-of-arrays (word w of groups 0..15 in c_w) to draw_batch's layout out[4 * group + w]: unpacks
    // give each 128-bit lane one group's four words, then two rounds of 128-bit lane shuffles order the groups.
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);  // groups 4L, 4L+1
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);  // groups 4L+2, 4L+3
    const __m512i a = _mm512_shuffle_i32x4(u0, u1, 0x44), b = _mm512_shuffle_i32x4(u2, u3, 0x44);
    const __m512i c = _mm512_shuffle_i32x4(u0, u1, 0xEE), d = _mm512_shuffle_i32x4(u2, u3, 0xEE);
    uint32_t* o = out + 4 * g;
    _mm512_storeu_si512(o, _mm512_shuffle_i32x4(a, b, 0x88));       // groups 0..3
    _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(a, b, 0xDD));  // groups 4..7
    _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(c, d, 0x88));  // groups 8..11
    _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(c, d, 0xDD));  // groups 12..15
  }
  if (g < count) draw_batch(seed, first + g, count - g, out + 4 * g);
}

inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}
#endif

// draw_batch's contract (count <= kBatch), on the fastest path this CPU has.
inline void draw_batch_fast(uint64_t seed, uint64_t first, int count, uint32_t* out) {
#if defined(__x86_64__)
  if (has_avx512()) return draw_batch_avx512(seed, first, count, out);
#endif
  draw_batch(seed, first, count, out);
}

}  // namespace peft_kernels::philox
