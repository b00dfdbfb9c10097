// AMX tile products of amx.h. Tiles: 0-3 hold a block of C (2 x 2 tiles of 16 x 16 fp32), 4-5 the A tiles of
// its two row halves (16 rows x 32 bf16), 6-7 the B tiles of its two column halves (16 pair rows x 16 columns).
// A 32 x 32 block of C takes 4 TDPBF16PS per 4 tile loads; m or n of 16 drop the second row or column tiles.
#include "amx.h"

#include <immintrin.h>

#include <algorithm>

#include "avx512.h"

#define PK_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

namespace peft_kernels::cpu::amx {
namespace {

// The layout of LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) Config {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

template <int MT, int NT>
PK_AMX void block(int64_t k2, int64_t batch, const uint32_t* a, int64_t lda, int64_t a_bs, const uint32_t* b,
                  int64_t ldb, int64_t b_bs, float* c, int64_t ldc, bool accumulate) {
  static_assert(MT >= 1 && MT <= 2 && NT >= 1 && NT <= 2);
  const int64_t sa = lda * 4, sb = ldb * 4, sc = ldc * 4;  // strides in bytes
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if constexpr (NT > 1) _tile_loadd(1, c + 16, sc);
    if constexpr (MT > 1) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  }
  for (int64_t r = 0; r < batch; ++r) {
    for (int64_t p = 0; p < k2; p += 16) {
      const uint32_t* ap = a + r * a_bs + p;
      const uint32_t* bp = b + r * b_bs + p * ldb;
      _tile_loadd(4, ap, sa);
      if constexpr (MT > 1) _tile_loadd(5, ap + 16 * lda, sa);
      _tile_loadd(6, bp, sb);
      if constexpr (NT > 1) _tile_loadd(7, bp + 16, sb);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (MT > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (NT > 1) _tile_stored(1, c + 16, sc);
  if constexpr (MT > 1) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, c + 16 * ldc + 16, sc);
}

using BlockFn = void (*)(int64_t, int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, int64_t,
                         float*, int64_t, bool);
constexpr BlockFn kBlocks[2][2] = {{&block<1, 1>, &block<1, 2>}, {&block<2, 1>, &block<2, 2>}};

PK_AVX512 inline __mmask16 first(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// A block of at most 16 x 16 words: rows < 16 read as zeros, columns past `cols` not written.
PK_AVX512 void transpose16(const uint32_t* src, int64_t rows, int64_t cols, int64_t lds, uint32_t* dst, int64_t ldd) {
  __m512i r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < rows ? _mm512_maskz_loadu_epi32(first(cols), src + i * lds) : _mm512_setzero_si512();
  }
  // Rows 2i, 2i + 1 interleaved, then rows 4g..4g + 3: lane L of u[4g + c] is column 4L + c of those four rows.
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  // Column 4L + c of all 16 rows: lane L of u[c], u[4 + c], u[8 + c], u[12 + c] (a 4 x 4 transpose of lanes).
  const __mmask16 out = first(rows);
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    const __m512i col[4] = {_mm512_shuffle_i32x4(v0, v2, 0x88), _mm512_shuffle_i32x4(v0, v2, 0xDD),
                            _mm512_shuffle_i32x4(v1, v3, 0x88), _mm512_shuffle_i32x4(v1, v3, 0xDD)};
    for (int l = 0; l < 4; ++l) {
      const int j = 4 * l + c;
      if (j < cols) _mm512_mask_storeu_epi32(dst + j * ldd, out, col[l]);
    }
  }
}

PK_AMX void load_config() {
  Config config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  // GCC 12 does not see LDTILECFG read the struct and dropped the stores of colsb and rows (a configuration of
  // empty tiles, on which the first tile instruction faulted): the barrier makes them happen first.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

PK_AMX void release() { _tile_release(); }

}  // namespace

Tiles::Tiles() { load_config(); }

Tiles::~Tiles() { release(); }

void mm(int64_t m, int64_t n, int64_t k2, int64_t batch, const uint32_t* a, int64_t lda, int64_t a_bs,
        const uint32_t* b, int64_t ldb, int64_t b_bs, float* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; i += 32) {
    const int mt = m - i >= 32 ? 2 : 1;
    for (int64_t j = 0; j < n; j += 32) {
      const int nt = n - j >= 32 ? 2 : 1;
      kBlocks[mt - 1][nt - 1](k2, batch, a + i * lda, lda, a_bs, b + j, ldb, b_bs, c + i * ldc + j, ldc, accumulate);
    }
  }
}

void transpose_words(const uint32_t* src, int64_t rows, int64_t cols, int64_t lds, uint32_t* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; i += 16) {
    for (int64_t j = 0; j < cols; j += 16) {
      transpose16(src + i * lds + j, std::min<int64_t>(16, rows - i), std::min<int64_t>(16, cols - j), lds,
                  dst + j * ldd + i, ldd);
    }
  }
}

}  // namespace peft_kernels::cpu::amx
