// bf16 tile products on Intel AMX (AMX-TILE + AMX-BF16, cpu::Isa::kAmx): one TDPBF16PS multiplies a 16 x 32 bf16
// tile by a 32 x 16 one into 16 x 16 fp32 sums, 16K multiply-adds, against 32 per vdpbf16ps. A 32 x 32 x 32
// product (kron_linear's per-row contraction at 32 x 32 factors) measured 64 ns on one core of this Xeon with its
// loads and stores (a standalone loop), against ~400 ns at the vdpbf16ps peak of microgemm.h's tiles.
// Operand layouts are microgemm.h's bf16 ones: A row-major with pairs along k, B as paired rows [k / 2][n].
#pragma once
#include <cstdint>

namespace peft_kernels::cpu::amx {

// The tile configuration (all 8 tiles 16 rows x 64 bytes) loaded on the calling thread for the scope's lifetime,
// released at its end. The configuration is per thread and oneDNN's AMX GEMMs load their own on the same threads,
// so each parallel chunk of a kernel opens one before its first product; the release takes the 8 KiB of tile
// data out of the thread's context switches again.
class Tiles {
 public:
  Tiles();
  ~Tiles();
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// C[i, j] (+)= sum_{r < batch} sum_{p < k2} a_r(i, p) . b_r(p, j), i < m, j < n, fp32 sums of bf16 pair products:
// a_r(i, p) the pair at a[r * a_bs + i * lda + p] (a bf16 matrix row-major, pairs along k), b_r(p, j) the pair at
// b[r * b_bs + p * ldb + j] (paired rows); all strides in 32-bit words. m and n multiples of 16, k2 of 16 (k of 32).
// The sums of a 32 x 32 block of C stay in tiles over the whole batch. Inside a Tiles scope only.
void mm(int64_t m, int64_t n, int64_t k2, int64_t batch, const uint32_t* a, int64_t lda, int64_t a_bs,
        const uint32_t* b, int64_t ldb, int64_t b_bs, float* c, int64_t ldc, bool accumulate);

// dst[j * ldd + i] = src[i * lds + j], i < rows, j < cols, of 32-bit words. The words of a bf16 matrix M are the
// pairs of its rows, so transposing them gives the paired rows of M^T, and transposing M's paired rows gives M^T's
// row-major pairs: how a contraction over the inner (or outer) index of both operands reaches the tiles.
void transpose_words(const uint32_t* src, int64_t rows, int64_t cols, int64_t lds, uint32_t* dst, int64_t ldd);

}  // namespace peft_kernels::cpu::amx
