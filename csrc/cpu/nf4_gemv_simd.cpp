// The NF4 GEMV of nf4_linear for m <= 16 rows on x86-64. A row of W is decoded 32 elements (16 packed bytes)
// at a time: the high nibbles (even elements) and low nibbles (odd elements) become int32 indices into the
// 16-entry NF4 table held in registers (one vpermps on AVX-512; two vpermps and a blend on AVX2), times the
// block's scale (one rounding: exactly nf4::decode's value), and each decoded vector is used by all m rows of
// x. x is reordered once per call to match (even elements, then odd, per 32), so no lane shuffle is needed in
// the inner loop. Scalar decoding (a byte load, a shift and a table read per element) ran 3.2x slower than a
// dense bf16 F.linear at M=1 on 4096x4096 here; the packed weight is 4x smaller, so this kernel's aim is the
// opposite ratio.
#include "nf4_gemv_simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <array>
#include <utility>
#include <vector>

#include "isa.h"

namespace peft_kernels::nf4 {
namespace {

using cpu::Isa;
using cpu::pick_isa;

// Rows n0..n1 of W against R rows of the reordered x (xp [R, in]), sums into yf[i * out + n].
template <int R>
__attribute__((target("avx512f"))) void rows_avx512(const GemvParams& p, const float* xp, int64_t n0, int64_t n1,
                                                      float* yf) {
  const __m512 table = _mm512_loadu_ps(kCode);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t first = n * p.in;
    const uint8_t* codes = p.w.codes + first / 2;
    int64_t block = -1;
    __m512 scale = _mm512_setzero_ps();
    for (int64_t k = 0; k < p.in; k += 32) {
      if ((first + k) / p.w.blocksize != block) {
        block = (first + k) / p.w.blocksize;
        scale = _mm512_set1_ps(block_scale(p.w, block));
      }
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k / 2));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      const __m128i lo = _mm_and_si128(bytes, nibble);
      const __m512 w_even = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi), table), scale);
      const __m512 w_odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo), table), scale);
      for (int i = 0; i < R; ++i) {
        const float* xi = xp + i * p.in + k;
        acc[i] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xi), acc[i]);
        acc[i] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xi + 16), acc[i]);
      }
    }
    for (int i = 0; i < R; ++i) yf[i * p.out + n] = _mm512_reduce_add_ps(acc[i]);
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
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    const int64_t first = n * p.in;
    const uint8_t* codes = p.w.codes + first / 2;
    int64_t block = -1;
    __m256 scale = _mm256_setzero_ps();
    for (int64_t k = 0; k < p.in; k += 32) {
      if ((first + k) / p.w.blocksize != block) {
        block = (first + k) / p.w.blocksize;
        scale = _mm256_set1_ps(block_scale(p.w, block));
      }
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
      const RowsFn fn = isa == Isa::kAvx512 ? kAvx512Rows[rows - 1] : kAvx2Rows[rows - 1];
      fn(p, xp.data() + i0 * p.in, n0, n1, yf.data() + i0 * p.out);
    }
  });
  typed(p.dtype, [&]<class T>() { finish<T>(p, yf.data()); });
  return true;
}

}  // namespace peft_kernels::nf4
