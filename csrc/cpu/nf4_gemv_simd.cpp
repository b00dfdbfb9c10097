// The NF4 GEMV of nf4_linear for m <= 16 rows on x86-64. A row of W is decoded 32 elements (16 packed bytes)
// at a time: the high nibbles (even elements) and low nibbles (odd elements) become int32 indices into the
// 16-entry NF4 table held in registers (one vpermps on AVX-512, into the table already times the block's scale;
// two vpermps and a blend on AVX2, then times the scale: either way one rounding, exactly nf4::decode's value),
// and each decoded vector is used by all m rows of x. x is reordered once per call to match (even elements, then
// odd, per 32), so no lane shuffle is needed in the inner loop. Scalar decoding (a byte load, a shift and a table
// read per element) ran 3.2x slower than a dense bf16 F.linear at M=1 on 4096x4096 here; the packed weight is 4x
// smaller, so this kernel's aim is the opposite ratio.
#include "nf4_gemv_simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>
#include <vector>

#include "avx512.h"
#include "isa.h"

namespace peft_kernels::nf4 {
namespace {

using cpu::Isa;
using cpu::pick_isa;

// The packed weight streams from memory once per call, a row (in / 2 bytes) after another: the hardware
// prefetcher alone fed one thread ~5 GB/s here (11008 x 4096 bf16, M = 1, after a 64 MiB pass evicted it: 4.47 ms,
// against 5.1 ms for the dense F.linear reading 4x the bytes). Prefetching 2 KiB ahead: 2.37-2.45 ms (1 KiB 2.61,
// 4 KiB 2.44-2.55); with the weight already in cache the prefetches cost 1.79 -> 1.87 ms (then 1.44 with the
// per-block levels of rows_avx512).
constexpr int64_t kPrefetchBytes = 2048;

// Rows n0..n1 of W against R rows of the reordered x (xp [R, in]), sums into yf[i * out + n].
template <int R>
__attribute__((target("avx512f"))) void rows_avx512(const GemvParams& p, const float* xp, int64_t n0, int64_t n1,
                                                      float* yf) {
  const __m512 table = _mm512_loadu_ps(kCode);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const int64_t bs = p.w.blocksize;  // a power of two >= 32: a step's 32 elements share one block
  for (int64_t n = n0; n < n1; ++n) {
    // Even and odd elements sum into separate accumulators: with one, a row's two FMAs per step are dependent,
    // and at M = 1 the step waits on their latency (11008 x 4096 bf16, M = 1, 1 thread: 3.61 -> 3.23 ms).
    __m512 even[R], odd[R];
    for (int i = 0; i < R; ++i) even[i] = odd[i] = _mm512_setzero_ps();
    const int64_t first = n * p.in;
    const uint8_t* codes = p.w.codes + first / 2;
    // The block index advances with k: one division per row, not a 64-bit division per 32 elements, which was
    // most of the step on an AMX Xeon (same case: 6.36 -> 3.61 ms; a dense bf16 F.linear took 4.6 ms there).
    // The block's 16 levels NF4[c] * scale, one product each as nf4::decode's (so the decoded values are the same
    // bits), looked up directly: one multiply per block instead of two per step.
    int64_t block = first / bs, next = (block + 1) * bs - first;
    __m512 levels = _mm512_mul_ps(table, _mm512_set1_ps(block_scale(p.w, block)));
    for (int64_t k = 0; k < p.in; k += 32) {
      if (k == next) {
        next += bs;
        levels = _mm512_mul_ps(table, _mm512_set1_ps(block_scale(p.w, ++block)));
      }
      _mm_prefetch(reinterpret_cast<const char*>(codes + k / 2 + kPrefetchBytes), _MM_HINT_T0);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      const __m128i lo = _mm_and_si128(bytes, nibble);
      const __m512 w_even = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi), levels);
      const __m512 w_odd = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo), levels);
      for (int i = 0; i < R; ++i) {
        const float* xi = xp + i * p.in + k;
        even[i] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xi), even[i]);
        odd[i] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xi + 16), odd[i]);
      }
    }
    for (int i = 0; i < R; ++i) yf[i * p.out + n] = _mm512_reduce_add_ps(_mm512_add_ps(even[i], odd[i]));
  }
}

__attribute__((target("avx2,fma"))) inline __m256 lookup16(__m256i idx, __m256 low8, __m256 high8) {
  // vpermps reads the low 3 index bits; bit 3 (moved to the sign bit) picks the table half.
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low8, idx), _mm256_permutevar8x32_ps(high8, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int R>
__attribute__((target("avx2,fma"))) void rows_avx2(const GemvParams& p, const float* xp, int64_t n0, int64_t n1,
                                                    float* yf) {
  const __m256 low8 = _mm256_loadu_ps(kCode), high8 = _mm256_loadu_ps(kCode + 8);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const int64_t bs = p.w.blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const int64_t first = n * p.in;
    const uint8_t* codes = p.w.codes + first / 2;
    int64_t block = first / bs, next = (block + 1) * bs - first;  // as rows_avx512
    __m256 scale = _mm256_set1_ps(block_scale(p.w, block));
    for (int64_t k = 0; k < p.in; k += 32) {
      if (k == next) {
        next += bs;
        scale = _mm256_set1_ps(block_scale(p.w, ++block));
      }
      _mm_prefetch(reinterpret_cast<const char*>(codes + k / 2 + kPrefetchBytes), _MM_HINT_T0);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      const __m128i lo = _mm_and_si128(bytes, nibble);
      const __m256 w[4] = {
          _mm256_mul_ps(lookup16(_mm256_cvtepu8_epi32(hi), low8, high8), scale),
          _mm256_mul_ps(lookup16(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), low8, high8), scale),
          _mm256_mul_ps(lookup16(_mm256_cvtepu8_epi32(lo), low8, high8), scale),
          _mm256_mul_ps(lookup16(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), low8, high8), scale),
      };
      for (int i = 0; i < R; ++i) {
        const float* xi = xp + i * p.in + k;
        for (int j = 0; j < 4; ++j) acc[i] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xi + 8 * j), acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) {
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i]), _mm256_extractf128_ps(acc[i], 1));
      const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
      yf[i * p.out + n] = _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
    }
  }
}

using RowsFn = void (*)(const GemvParams&, const float*, int64_t, int64_t, float*);

template <int... Rs> constexpr std::array<RowsFn, sizeof...(Rs)> avx512_table(std::integer_sequence<int, Rs...>) {
  return {&rows_avx512<Rs + 1>...};
}
template <int... Rs> constexpr std::array<RowsFn, sizeof...(Rs)> avx2_table(std::integer_sequence<int, Rs...>) {
  return {&rows_avx2<Rs + 1>...};
}

// 8 rows of x per pass on both: AVX2 has 16 registers, and with AVX-512 a pass of more rows ran super-linearly
// slower here (4096x4096 bf16, 1 thread: 8 rows 8.5-12.6 ms, 10 rows 25 ms, 16 rows 54-57 ms; the accumulators
// no longer stay in registers), so m = 16 runs as two passes of 8.
constexpr int kRowsPerPass = 8;
constexpr auto kAvx512Rows = avx512_table(std::make_integer_sequence<int, kRowsPerPass>{});
constexpr auto kAvx2Rows = avx2_table(std::make_integer_sequence<int, kRowsPerPass>{});

template <class T> void reorder_x(const GemvParams& p, float* xp) {
  const T* x = static_cast<const T*>(p.x);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t k = 0; k < p.in; k += 32) {
      const T* src = x + i * p.in + k;
      float* dst = xp + i * p.in + k;
      for (int j = 0; j < 16; ++j) {
        dst[j] = static_cast<float>(src[2 * j]);
        dst[16 + j] = static_cast<float>(src[2 * j + 1]);
      }
    }
  }
}

template <class T> void finish(const GemvParams& p, const float* yf) {
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t n = 0; n < p.out; ++n) {
      const float v = yf[i * p.out + n];
      y[i * p.out + n] = static_cast<T>(bias != nullptr ? v + static_cast<float>(bias[n]) : v);
    }
  }
}

template <class F> void typed(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f.template operator()<float>(); break;
    case DType::kFloat16: f.template operator()<c10::Half>(); break;
    case DType::kBFloat16: f.template operator()<c10::BFloat16>(); break;
    case DType::kFloat64: break;
  }
}

}  // namespace

// Decode of whole blocks (the training path's weight tiles, nf4_dequantize): the block's 16 levels are
// NF4[c] * scale in one vector (one rounding each: nf4::decode's values), rounded once to the output type; then
// each 16 packed bytes become 32 outputs through one vpermw (16-bit) or two vpermps and a merge (fp32), with the
// index of element 2i (high nibble) and 2i + 1 (low nibble) side by side. The scalar loop (a byte, two shifts and
// two table reads per two elements) took 0.51 ms for a 1024 x 1024 bf16 weight on 2 threads here, twice per
// QLoRA training step.
template <class T>
PK_AVX512 void decode_blocks(const DecodeParams& p, int64_t b0, int64_t b1) {
  const __m512 table = _mm512_loadu_ps(kCode);
  const int64_t bs = p.w.blocksize;
  T* out = static_cast<T*>(p.out);
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  // fp32: outputs 0..15 take (hi, lo) of bytes 0..7, outputs 16..31 those of bytes 8..15.
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t block = p.first_block + b;
    const __m512 levels = _mm512_mul_ps(table, _mm512_set1_ps(block_scale(p.w, block)));
    __m512i levels16 = _mm512_setzero_si512();
    if constexpr (std::is_same_v<T, c10::BFloat16>) levels16 = _mm512_castsi256_si512(cpu::simd::to_bf16_bits(levels));
    if constexpr (std::is_same_v<T, c10::Half>) levels16 = _mm512_castsi256_si512(cpu::simd::to_fp16_bits(levels));
    const uint8_t* codes = p.w.codes + block * bs / 2;
    T* o = out + b * bs;
    for (int64_t i = 0; i < bs / 2; i += 16) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(bytes, 4), nibble);
      const __m512i lo = _mm512_and_si512(bytes, nibble);
      if constexpr (std::is_same_v<T, float>) {
        const __m512 vh = _mm512_permutexvar_ps(hi, levels), vl = _mm512_permutexvar_ps(lo, levels);
        _mm512_storeu_ps(o + 2 * i, _mm512_permutex2var_ps(vh, first, vl));
        _mm512_storeu_ps(o + 2 * i + 16, _mm512_permutex2var_ps(vh, second, vl));
      } else {
        // 32-bit lane j = (lo_j << 16) | hi_j: as 16-bit lanes, hi_j then lo_j (little-endian).
        const __m512i idx = _mm512_or_si512(hi, _mm512_slli_epi32(lo, 16));
        _mm512_storeu_si512(o + 2 * i, _mm512_permutexvar_epi16(idx, levels16));
      }
    }
  }
}

bool decode_simd(const DecodeParams& p) {
  if (p.dtype == DType::kFloat64 || p.w.blocksize % 32 != 0 || pick_isa() < Isa::kAvx512) return false;
  // ~16K elements per task, as the scalar loop.
  const int64_t grain = std::max<int64_t>(1, 16384 / p.w.blocksize);
  typed(p.dtype, [&]<class T>() {
    at::parallel_for(0, p.numel / p.w.blocksize, grain, [&](int64_t b0, int64_t b1) { decode_blocks<T>(p, b0, b1); });
  });
  return true;
}

bool gemv_simd(const GemvParams& p) {
  if (p.dtype == DType::kFloat64 || p.in % 32 != 0 || p.m < 1 || p.m > kGemvMaxRows) return false;
  const Isa isa = pick_isa();
  if (isa == Isa::kScalar) return false;
  std::vector<float> xp(p.m * p.in), yf(p.m * p.out);
  typed(p.dtype, [&]<class T>() { reorder_x<T>(p, xp.data()); });
  // ~64 KiB of packed weight per task.
  const int64_t grain = std::max<int64_t>(1, 131072 / p.in);
  at::parallel_for(0, p.out, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t i0 = 0; i0 < p.m; i0 += kRowsPerPass) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowsPerPass, p.m - i0));
      const RowsFn fn = isa >= Isa::kAvx512 ? kAvx512Rows[rows - 1] : kAvx2Rows[rows - 1];
      fn(p, xp.data() + i0 * p.in, n0, n1, yf.data() + i0 * p.out);
    }
  });
  typed(p.dtype, [&]<class T>() { finish<T>(p, yf.data()); });
  return true;
}

}  // namespace peft_kernels::nf4
