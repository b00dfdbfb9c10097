// AVX-512 fp32 micro-kernels of microgemm.h. Register tiles, sized for the 32 zmm registers:
//   mm_bcast: 8 rows x 2 vectors (32 columns) of C = 16 accumulators, per step 2 vector loads of b and 8
//             broadcasts of a for 16 FMAs;
//   mm_dot:   4 x 4 elements of C, each a 16-lane accumulator, per step 4 + 4 vector loads for 16 FMAs.
// Column tails use masked loads and stores (no read or write past an operand's end); row tails use the smaller
// tiles of the same template. What it gains over the BLAS for kron_linear: kron_linear.cpp's header.
#include "microgemm.h"

#include <algorithm>
#include <array>
#include <type_traits>
#include <utility>

#include "avx512.h"


namespace peft_kernels::cpu::simd {
namespace {

constexpr int kTileRows = 8, kTileVectors = 2, kDotTile = 4;

PK_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// The accumulators are named variables, not an array: GCC 12 kept a __m512 acc[8][2] in memory and stored all
// 16 of them on every step of the k loop (32 stores per 16 FMAs), which made kron_linear's forward 1.6x slower
// than the same products through ATen (3.6 vs 2.3 ms, the layer of kron_linear.cpp's header). A row or column
// the tile does not have is a variable the compiler drops (`if constexpr`).
#define PK_ZERO2(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define PK_FMA_ROW(i)                                                     \
  if constexpr (MR > i) {                                                 \
    const __m512 s = _mm512_set1_ps(ap[i * a_rs]);                        \
    c##i##0 = _mm512_fmadd_ps(s, b0, c##i##0);                            \
    if constexpr (NV > 1) c##i##1 = _mm512_fmadd_ps(s, b1, c##i##1);      \
  }
#define PK_STORE_ROW(i)                                                   \
  if constexpr (MR > i) {                                                 \
    store_row(c + i * ldc, c##i##0, c##i##1, NV > 1, last, accumulate);   \
  }

// C[row, 0:16 * NV] (+)= v0, v1 (v1 only when two vectors; `last` masks the last vector's lanes).
PK_AVX512 inline void store_row(float* ci, __m512 v0, __m512 v1, bool two, __mmask16 last, bool accumulate) {
  const __mmask16 m0 = two ? __mmask16(0xFFFF) : last;
  if (accumulate) v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, ci));
  _mm512_mask_storeu_ps(ci, m0, v0);
  if (two) {
    if (accumulate) v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(last, ci + 16));
    _mm512_mask_storeu_ps(ci + 16, last, v1);
  }
}

// Rows [0, MR) x vectors [0, NV) of C.
template <int MR, int NV>
PK_AVX512 void tile_bcast(int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb, float* c,
                          int64_t ldc, __mmask16 last, bool accumulate) {
  static_assert(MR >= 1 && MR <= 8 && NV >= 1 && NV <= 2);
  PK_ZERO2(0) PK_ZERO2(1) PK_ZERO2(2) PK_ZERO2(3) PK_ZERO2(4) PK_ZERO2(5) PK_ZERO2(6) PK_ZERO2(7)
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(NV == 1 ? last : __mmask16(0xFFFF), bp);
    const __m512 b1 = NV > 1 ? _mm512_maskz_loadu_ps(last, bp + 16) : _mm512_setzero_ps();
    const float* ap = a + p * a_cs;
    PK_FMA_ROW(0) PK_FMA_ROW(1) PK_FMA_ROW(2) PK_FMA_ROW(3) PK_FMA_ROW(4) PK_FMA_ROW(5) PK_FMA_ROW(6) PK_FMA_ROW(7)
  }
  PK_STORE_ROW(0) PK_STORE_ROW(1) PK_STORE_ROW(2) PK_STORE_ROW(3)
  PK_STORE_ROW(4) PK_STORE_ROW(5) PK_STORE_ROW(6) PK_STORE_ROW(7)
}

#define PK_ZERO4(i) __m512 d##i##0 = _mm512_setzero_ps(), d##i##1 = d##i##0, d##i##2 = d##i##0, d##i##3 = d##i##0;
#define PK_DOT(i, j) \
  if constexpr (MI > i && MJ > j) d##i##j = _mm512_fmadd_ps(P##i, Q##j, d##i##j);
#define PK_DOT_ROW(i) PK_DOT(i, 0) PK_DOT(i, 1) PK_DOT(i, 2) PK_DOT(i, 3)
#define PK_LOAD(v, n, src, ld) \
  const __m512 v##n = (M##v > n) ? _mm512_maskz_loadu_ps(mask, src + n * ld + e) : _mm512_setzero_ps();
#define PK_SUM(i, j)                                                        \
  if constexpr (MI > i && MJ > j) {                                         \
    const float sum = _mm512_reduce_add_ps(d##i##j);                        \
    c[i * ldc + j] = accumulate ? c[i * ldc + j] + sum : sum;               \
  }
#define PK_SUM_ROW(i) PK_SUM(i, 0) PK_SUM(i, 1) PK_SUM(i, 2) PK_SUM(i, 3)

template <int MI, int MJ>
PK_AVX512 void tile_dot(int64_t batch, int64_t k, const float* p, int64_t ldp, int64_t p_bs, const float* q,
                        int64_t ldq, int64_t q_bs, float* c, int64_t ldc, bool accumulate) {
  static_assert(MI >= 1 && MI <= 4 && MJ >= 1 && MJ <= 4);
  constexpr int MP = MI, MQ = MJ;
  PK_ZERO4(0) PK_ZERO4(1) PK_ZERO4(2) PK_ZERO4(3)
  for (int64_t r = 0; r < batch; ++r) {
    const float* pr = p + r * p_bs;
    const float* qr = q + r * q_bs;
    for (int64_t e = 0; e < k; e += 16) {
      const __mmask16 mask = tail_mask(k - e);
      PK_LOAD(P, 0, pr, ldp) PK_LOAD(P, 1, pr, ldp) PK_LOAD(P, 2, pr, ldp) PK_LOAD(P, 3, pr, ldp)
      PK_LOAD(Q, 0, qr, ldq) PK_LOAD(Q, 1, qr, ldq) PK_LOAD(Q, 2, qr, ldq) PK_LOAD(Q, 3, qr, ldq)
      PK_DOT_ROW(0) PK_DOT_ROW(1) PK_DOT_ROW(2) PK_DOT_ROW(3)
    }
  }
  PK_SUM_ROW(0) PK_SUM_ROW(1) PK_SUM_ROW(2) PK_SUM_ROW(3)
}

#undef PK_ZERO2
#undef PK_FMA_ROW
#undef PK_STORE_ROW
#undef PK_ZERO4
#undef PK_DOT
#undef PK_DOT_ROW
#undef PK_LOAD
#undef PK_SUM
#undef PK_SUM_ROW

// The bf16 tiles: the same shapes, a step being a pair of k (vdpbf16ps adds both products into each lane).
#define PK_DP_ROW(i)                                                                              \
  if constexpr (MR > i) {                                                                         \
    const __m512bh s = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[i * a_rs]));              \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, s, b0);                                                   \
    if constexpr (NV > 1) c##i##1 = _mm512_dpbf16_ps(c##i##1, s, b1);                             \
  }
#define PK_ZERO2(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define PK_STORE_ROW(i)                                                   \
  if constexpr (MR > i) {                                                 \
    store_row(c + i * ldc, c##i##0, c##i##1, NV > 1, last, accumulate);   \
  }

template <int MR, int NV>
PK_AVX512_BF16 void tile_bcast_bf16(int64_t k2, const uint32_t* a, int64_t a_rs, int64_t a_cs, const uint32_t* b,
                                    int64_t ldb, float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  static_assert(MR >= 1 && MR <= 8 && NV >= 1 && NV <= 2);
  PK_ZERO2(0) PK_ZERO2(1) PK_ZERO2(2) PK_ZERO2(3) PK_ZERO2(4) PK_ZERO2(5) PK_ZERO2(6) PK_ZERO2(7)
  for (int64_t p = 0; p < k2; ++p) {
    const uint32_t* bp = b + p * ldb;
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(NV == 1 ? last : __mmask16(0xFFFF), bp);
    const __m512bh b1 = (__m512bh)(NV > 1 ? _mm512_maskz_loadu_epi32(last, bp + 16) : _mm512_setzero_si512());
    const uint32_t* ap = a + p * a_cs;
    PK_DP_ROW(0) PK_DP_ROW(1) PK_DP_ROW(2) PK_DP_ROW(3) PK_DP_ROW(4) PK_DP_ROW(5) PK_DP_ROW(6) PK_DP_ROW(7)
  }
  PK_STORE_ROW(0) PK_STORE_ROW(1) PK_STORE_ROW(2) PK_STORE_ROW(3)
  PK_STORE_ROW(4) PK_STORE_ROW(5) PK_STORE_ROW(6) PK_STORE_ROW(7)
}

#define PK_ZERO4(i) __m512 d##i##0 = _mm512_setzero_ps(), d##i##1 = d##i##0, d##i##2 = d##i##0, d##i##3 = d##i##0;
#define PK_DOT(i, j) \
  if constexpr (MI > i && MJ > j) d##i##j = _mm512_dpbf16_ps(d##i##j, P##i, Q##j);
#define PK_DOT_ROW(i) PK_DOT(i, 0) PK_DOT(i, 1) PK_DOT(i, 2) PK_DOT(i, 3)
#define PK_LOAD(v, n, src, ld) \
  const __m512bh v##n = (__m512bh)((M##v > n) ? _mm512_maskz_loadu_epi32(mask, src + n * ld + e) : _mm512_setzero_si512());
#define PK_SUM(i, j)                                                        \
  if constexpr (MI > i && MJ > j) {                                         \
    const float sum = _mm512_reduce_add_ps(d##i##j);                        \
    c[i * ldc + j] = accumulate ? c[i * ldc + j] + sum : sum;               \
  }
#define PK_SUM_ROW(i) PK_SUM(i, 0) PK_SUM(i, 1) PK_SUM(i, 2) PK_SUM(i, 3)

template <int MI, int MJ>
PK_AVX512_BF16 void tile_dot_bf16(int64_t batch, int64_t k2, const uint32_t* p, int64_t ldp, int64_t p_bs,
                                  const uint32_t* q, int64_t ldq, int64_t q_bs, float* c, int64_t ldc, bool accumulate) {
  static_assert(MI >= 1 && MI <= 4 && MJ >= 1 && MJ <= 4);
  constexpr int MP = MI, MQ = MJ;
  PK_ZERO4(0) PK_ZERO4(1) PK_ZERO4(2) PK_ZERO4(3)
  for (int64_t r = 0; r < batch; ++r) {
    const uint32_t* pr = p + r * p_bs;
    const uint32_t* qr = q + r * q_bs;
    for (int64_t e = 0; e < k2; e += 16) {
      const __mmask16 mask = tail_mask(k2 - e);
      PK_LOAD(P, 0, pr, ldp) PK_LOAD(P, 1, pr, ldp) PK_LOAD(P, 2, pr, ldp) PK_LOAD(P, 3, pr, ldp)
      PK_LOAD(Q, 0, qr, ldq) PK_LOAD(Q, 1, qr, ldq) PK_LOAD(Q, 2, qr, ldq) PK_LOAD(Q, 3, qr, ldq)
      PK_DOT_ROW(0) PK_DOT_ROW(1) PK_DOT_ROW(2) PK_DOT_ROW(3)
    }
  }
  PK_SUM_ROW(0) PK_SUM_ROW(1) PK_SUM_ROW(2) PK_SUM_ROW(3)
}

#undef PK_DP_ROW
#undef PK_ZERO2
#undef PK_STORE_ROW
#undef PK_ZERO4
#undef PK_DOT
#undef PK_DOT_ROW
#undef PK_LOAD
#undef PK_SUM
#undef PK_SUM_ROW

using BcastFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, __mmask16,
                         bool);
using DotFn = void (*)(int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                       int64_t, bool);

// kBcast[mr - 1][nv - 1] and kDot[mi - 1][mj - 1]: the tile for a tail of mr rows / nv vectors.
template <int NV, int... R> constexpr std::array<BcastFn, sizeof...(R)> bcast_row(std::integer_sequence<int, R...>) {
  return {&tile_bcast<R + 1, NV>...};
}
template <int MJ, int... I> constexpr std::array<DotFn, sizeof...(I)> dot_col(std::integer_sequence<int, I...>) {
  return {&tile_dot<I + 1, MJ>...};
}
constexpr auto kRows = std::make_integer_sequence<int, kTileRows>{};
constexpr auto kDotRows = std::make_integer_sequence<int, kDotTile>{};
constexpr std::array<std::array<BcastFn, kTileRows>, kTileVectors> kBcast = {bcast_row<1>(kRows), bcast_row<2>(kRows)};
constexpr std::array<std::array<DotFn, kDotTile>, kDotTile> kDot = {dot_col<1>(kDotRows), dot_col<2>(kDotRows),
                                                                     dot_col<3>(kDotRows), dot_col<4>(kDotRows)};

using BcastBf16Fn = void (*)(int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float*, int64_t,
                             __mmask16, bool);
using DotBf16Fn = void (*)(int64_t, int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t,
                           float*, int64_t, bool);
template <int NV, int... R>
constexpr std::array<BcastBf16Fn, sizeof...(R)> bcast_bf16_row(std::integer_sequence<int, R...>) {
  return {&tile_bcast_bf16<R + 1, NV>...};
}
template <int MJ, int... I> constexpr std::array<DotBf16Fn, sizeof...(I)> dot_bf16_col(std::integer_sequence<int, I...>) {
  return {&tile_dot_bf16<I + 1, MJ>...};
}
constexpr std::array<std::array<BcastBf16Fn, kTileRows>, kTileVectors> kBcastBf16 = {bcast_bf16_row<1>(kRows),
                                                                                     bcast_bf16_row<2>(kRows)};
constexpr std::array<std::array<DotBf16Fn, kDotTile>, kDotTile> kDotBf16 = {
    dot_bf16_col<1>(kDotRows), dot_bf16_col<2>(kDotRows), dot_bf16_col<3>(kDotRows), dot_bf16_col<4>(kDotRows)};

PK_AVX512 inline __m512 load16(const float* src, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, src); }
PK_AVX512 inline __m512 load16(const c10::BFloat16* src, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
PK_AVX512 inline __m512 load16(const c10::Half* src, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src));
}

PK_AVX512 inline void store16(float* dst, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(dst, mask, v); }
PK_AVX512 inline void store16(c10::BFloat16* dst, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(dst, mask, to_bf16_bits(v));
}
PK_AVX512 inline void store16(c10::Half* dst, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(dst, mask, to_fp16_bits(v));
}

template <class T> PK_AVX512 void widen_avx512(const T* src, int64_t n, const float* keep, float* dst) {
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 mask = tail_mask(n - e);
    __m512 v = load16(src + e, mask);
    if (keep != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, keep + e));
    _mm512_mask_storeu_ps(dst + e, mask, v);
  }
}

template <class T> PK_AVX512 void narrow_avx512(const float* v, int64_t n, const float* keep, bool accumulate, T* out) {
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 mask = tail_mask(n - e);
    __m512 add = _mm512_maskz_loadu_ps(mask, v + e);
    if (keep != nullptr) add = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, keep + e), add);
    if (accumulate) add = _mm512_add_ps(load16(out + e, mask), add);
    store16(out + e, add, mask);
  }
}

}  // namespace

PK_AVX512 void mm_bcast(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                        int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j0 = 0; j0 < n; j0 += 16 * kTileVectors) {
    const int64_t cols = std::min<int64_t>(16 * kTileVectors, n - j0);
    const int64_t nv = (cols + 15) / 16;
    const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
    for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, m - i0);
      kBcast[nv - 1][mr - 1](k, a + i0 * a_rs, a_rs, a_cs, b + j0, ldb, c + i0 * ldc + j0, ldc, last, accumulate);
    }
  }
}

PK_AVX512 void mm_dot(int64_t m, int64_t n, int64_t batch, int64_t k, const float* p, int64_t ldp, int64_t p_bs,
                      const float* q, int64_t ldq, int64_t q_bs, float* c, int64_t ldc, bool accumulate) {
  for (int64_t i0 = 0; i0 < m; i0 += kDotTile) {
    const int64_t mi = std::min<int64_t>(kDotTile, m - i0);
    for (int64_t j0 = 0; j0 < n; j0 += kDotTile) {
      const int64_t mj = std::min<int64_t>(kDotTile, n - j0);
      kDot[mj - 1][mi - 1](batch, k, p + i0 * ldp, ldp, p_bs, q + j0 * ldq, ldq, q_bs, c + i0 * ldc + j0, ldc,
                           accumulate);
    }
  }
}

// The public entry points carry no target attribute (GCC would take one on a template's definition for a second
// version of the function); they call the AVX-512 bodies.
PK_AVX512_BF16 void mm_bcast_bf16(int64_t m, int64_t n, int64_t k2, const uint32_t* a, int64_t a_rs, int64_t a_cs,
                                  const uint32_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j0 = 0; j0 < n; j0 += 16 * kTileVectors) {
    const int64_t cols = std::min<int64_t>(16 * kTileVectors, n - j0);
    const int64_t nv = (cols + 15) / 16;
    const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
    for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
      const int64_t mr = std::min<int64_t>(kTileRows, m - i0);
      kBcastBf16[nv - 1][mr - 1](k2, a + i0 * a_rs, a_rs, a_cs, b + j0, ldb, c + i0 * ldc + j0, ldc, last, accumulate);
    }
  }
}

PK_AVX512_BF16 void mm_dot_bf16(int64_t m, int64_t n, int64_t batch, int64_t k2, const uint32_t* p, int64_t ldp,
                                int64_t p_bs, const uint32_t* q, int64_t ldq, int64_t q_bs, float* c, int64_t ldc,
                                bool accumulate) {
  for (int64_t i0 = 0; i0 < m; i0 += kDotTile) {
    const int64_t mi = std::min<int64_t>(kDotTile, m - i0);
    for (int64_t j0 = 0; j0 < n; j0 += kDotTile) {
      const int64_t mj = std::min<int64_t>(kDotTile, n - j0);
      kDotBf16[mj - 1][mi - 1](batch, k2, p + i0 * ldp, ldp, p_bs, q + j0 * ldq, ldq, q_bs, c + i0 * ldc + j0, ldc,
                               accumulate);
    }
  }
}

PK_AVX512_BF16 void round_bf16(const float* src, int64_t n, float scale, c10::BFloat16* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t e = 0;
  for (; e + 32 <= n; e += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_mul_ps(s, _mm512_loadu_ps(src + e + 16)),
                                           _mm512_mul_ps(s, _mm512_loadu_ps(src + e)));
    _mm512_storeu_si512(dst + e, (__m512i)v);
  }
  for (; e < n; e += 16) {
    const __mmask16 mask = tail_mask(n - e);
    _mm256_mask_storeu_epi16(dst + e, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, src + e))));
  }
}

// Words of two rows of 16-bit values: row i in the low half, row i + 1 in the high half.
PK_AVX512 inline __m512i pair_words(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

PK_AVX512_BF16 void round_rows(const float* src, int64_t rows, int64_t n, int64_t lds, float scale, uint32_t* dst) {
  const __m512 s = _mm512_set1_ps(scale);
  // After vcvtne2ps2bf16 the 16-bit lanes hold row i's 16 values, then row i + 1's: interleave them as words.
  const __m512i interleave = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004,
                                                0x00150005, 0x00160006, 0x00170007, 0x00180008, 0x00190009,
                                                0x001A000A, 0x001B000B, 0x001C000C, 0x001D000D, 0x001E000E,
                                                0x001F000F);
  for (int64_t i = 0; i < rows; i += 2) {
    const float* r0 = src + i * lds;
    const float* r1 = r0 + lds;
    uint32_t* d = dst + (i / 2) * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = tail_mask(n - j);
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, r1 + j)),
                                                _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, r0 + j)));
      _mm512_mask_storeu_epi32(d + j, mask, _mm512_permutexvar_epi16(interleave, (__m512i)both));
    }
  }
}

// Lanes of keep[0:16] (masked by `mask`) that are not 0.
PK_AVX512 inline __mmask16 kept(const float* keep, int64_t e, __mmask16 mask) {
  return keep == nullptr ? mask
                         : mask & _mm512_cmpneq_ps_mask(_mm512_maskz_loadu_ps(mask, keep + e), _mm512_setzero_ps());
}
PK_AVX512 inline __mmask16 kept(Drawn keep, int64_t e, __mmask16 mask) {
  return _mm256_mask_cmpge_epu16_mask(mask, _mm256_maskz_loadu_epi16(mask, keep.draws + e),
                                      _mm256_set1_epi16(static_cast<short>(keep.threshold)));
}

template <class Keep>
PK_AVX512 void pack_rows_avx512(const c10::BFloat16* src, int64_t rows, int64_t n, int64_t lds, Keep keep,
                                uint32_t* dst) {
  for (int64_t i = 0; i < rows; i += 2) {
    const bool pair = i + 1 < rows;  // an odd last row pairs with zeros
    const c10::BFloat16* r0 = src + i * lds;
    const c10::BFloat16* r1 = pair ? r0 + lds : r0;
    uint32_t* d = dst + (i / 2) * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = tail_mask(n - j);
      // A dropped element loads as 0.
      const __mmask16 m0 = kept(keep, i * n + j, mask);
      const __mmask16 m1 = pair ? kept(keep, (i + 1) * n + j, mask) : __mmask16(0);
      _mm512_mask_storeu_epi32(d + j, mask,
                               pair_words(_mm256_maskz_loadu_epi16(m0, r0 + j), _mm256_maskz_loadu_epi16(m1, r1 + j)));
    }
  }
}

void pack_rows(const c10::BFloat16* src, int64_t rows, int64_t n, int64_t lds, const float* keep, uint32_t* dst) {
  pack_rows_avx512(src, rows, n, lds, keep, dst);
}
void pack_rows(const c10::BFloat16* src, int64_t rows, int64_t n, int64_t lds, Drawn keep, uint32_t* dst) {
  pack_rows_avx512(src, rows, n, lds, keep, dst);
}

PK_AVX512 void narrow_kept(const float* v, int64_t n, Drawn keep, float scale, c10::BFloat16* out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 mask = tail_mask(n - e);
    const __m512 add = _mm512_maskz_mul_ps(kept(keep, e, mask), s, _mm512_maskz_loadu_ps(mask, v + e));
    store16(out + e, _mm512_add_ps(load16(out + e, mask), add), mask);
  }
}

PK_AVX512 void mask_bf16(const c10::BFloat16* src, int64_t n, const float* keep, c10::BFloat16* dst) {
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 mask = tail_mask(n - e);
    _mm256_mask_storeu_epi16(dst + e, mask, _mm256_maskz_loadu_epi16(kept(keep, e, mask), src + e));
  }
}

PK_AVX512 void keep_mask(Drawn keep, int64_t n, float scale, float* out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 mask = tail_mask(n - e);
    _mm512_mask_storeu_ps(out + e, mask, _mm512_maskz_mov_ps(kept(keep, e, mask), s));
  }
}

PK_AVX512 void drop_bf16(Drawn keep, int64_t n, const c10::BFloat16* src, c10::BFloat16* dst) {
  const __m512i thr = _mm512_set1_epi16(static_cast<short>(keep.threshold));
  for (int64_t e = 0; e < n; e += 32) {
    const __mmask32 mask = n - e >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - e)) - 1;
    const __mmask32 live = _mm512_mask_cmpge_epu16_mask(mask, _mm512_maskz_loadu_epi16(mask, keep.draws + e), thr);
    _mm512_mask_storeu_epi16(dst + e, mask, _mm512_maskz_loadu_epi16(live, src + e));
  }
}

template <class T> void widen(const T* src, int64_t n, const float* keep, float* dst) { widen_avx512(src, n, keep, dst); }
template <class T> void narrow(const float* v, int64_t n, const float* keep, bool accumulate, T* out) {
  narrow_avx512(v, n, keep, accumulate, out);
}

template void widen<float>(const float*, int64_t, const float*, float*);
template void widen<c10::BFloat16>(const c10::BFloat16*, int64_t, const float*, float*);
template void widen<c10::Half>(const c10::Half*, int64_t, const float*, float*);
template void narrow<float>(const float*, int64_t, const float*, bool, float*);
template void narrow<c10::BFloat16>(const float*, int64_t, const float*, bool, c10::BFloat16*);
template void narrow<c10::Half>(const float*, int64_t, const float*, bool, c10::Half*);

}  // namespace peft_kernels::cpu::simd
