// Shared pieces of the AVX-512 CPU code (microgemm.cpp, nf4_gemv_simd.cpp): the target attribute and the fp32 ->
// 16-bit roundings, bit-identical to c10's conversions. Only for functions that run after cpu::pick_isa() said
// kAvx512 (isa.h).
#pragma once
#include <immintrin.h>

// GCC 12 warns inside its own AVX-512 headers (the `__Y = __Y` idiom of _mm512_undefined_*, inlined into the
// including file): -Wmaybe-uninitialized / -Wuninitialized false positives, one per intrinsic use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// BW and VL for the 16-bit masked loads and stores; BF16 for vdpbf16ps (cpu::Isa::kAvx512Bf16 only).
#define PK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define PK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace peft_kernels::cpu::simd {

// c10's round-to-nearest-even: bits + 0x7FFF + (bit 16), then the high half; NaN becomes 0x7FC0.
PK_AVX512 inline __m256i to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

PK_AVX512 inline __m256i to_fp16_bits(__m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

}  // namespace peft_kernels::cpu::simd
