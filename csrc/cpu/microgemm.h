// AVX-512 fp32 building blocks for CPU kernels whose products are too small for the platform BLAS to run well:
// kron_linear's per-row contractions with 32 x 32 factors are 32 x 32 x 32 products, and the LoRA dropout
// kernels' rank-r products of a block of rows have r = 8..64; a call through ATen (view, dispatch, packing) costs
// as much as their arithmetic. Every matrix here is row-major with explicit
// strides, so a caller reads its operands in place, transposed or not. Callers check cpu::pick_isa() == kAvx512
// first: these functions execute AVX-512F instructions unconditionally.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace peft_kernels::cpu::simd {

// C[i, 0:n] = (accumulate ? C[i, 0:n] : 0) + sum_{p < k} a[i * a_rs + p * a_cs] * b[p * ldb + (0:n)], i < m.
// Elements of a are broadcast (any strides, so a^T costs nothing); rows of b and C are vectors of 16 floats.
void mm_bcast(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate);

// C[i, j] = (accumulate ? C[i, j] : 0) + sum_{r < batch} sum_{q < k} P_r[i, q] * Q_r[j, q], i < m, j < n, with
// P_r[i, q] = p[r * p_bs + i * ldp + q] and Q_r likewise: a batch of products P_r Q_r^T summed, for a reduction
// that runs along the rows of both operands (kron_linear's dA). Each C element is a sum of 16-lane partials held
// in registers over the whole batch and reduced once.
void mm_dot(int64_t m, int64_t n, int64_t batch, int64_t k, const float* p, int64_t ldp, int64_t p_bs, const float* q,
            int64_t ldq, int64_t q_bs, float* c, int64_t ldc, bool accumulate);

// The bf16 forms (cpu::Isa::kAvx512Bf16: vdpbf16ps, two bf16 products per fp32 lane and instruction, twice the
// fp32 FMA rate). Operands are bf16 pairs along the reduction as 32-bit words: a pair of a row-major bf16 matrix
// is two neighbours in its row; "paired rows" [k / 2][n] hold rows 2p and 2p + 1 of a [k, n] matrix interleaved,
// element (2p + h, j) at word p * n + j, half h (pack_rows, round_rows make them).
// C[i, 0:n] (+)= sum_{p < k2} a_p(i) . b_p(0:n), a_p(i) the pair at a[i * a_rs + p * a_cs], b_p(j) at b[p * ldb + j].
void mm_bcast_bf16(int64_t m, int64_t n, int64_t k2, const uint32_t* a, int64_t a_rs, int64_t a_cs, const uint32_t* b,
                   int64_t ldb, float* c, int64_t ldc, bool accumulate);
// mm_dot with pairs: P_r[i, q], Q_r[j, q] pairs at p[r * p_bs + i * ldp + q], q < k2 (all in words).
void mm_dot_bf16(int64_t m, int64_t n, int64_t batch, int64_t k2, const uint32_t* p, int64_t ldp, int64_t p_bs,
                 const uint32_t* q, int64_t ldq, int64_t q_bs, float* c, int64_t ldc, bool accumulate);
// dst[e] = bf16(scale * src[e]), e < n, by the CPU's own conversion (vcvtne2ps2bf16: to nearest even, denormal
// inputs as zero): for intermediates, not for outputs, which narrow rounds exactly as c10 does.
void round_bf16(const float* src, int64_t n, float scale, c10::BFloat16* dst);
// Paired rows of bf16(scale * src), converted as round_bf16, for src [rows, n] (row stride lds, rows even):
// dst [rows / 2, n] words.
void round_rows(const float* src, int64_t rows, int64_t n, int64_t lds, float scale, uint32_t* dst);
// Paired rows of a bf16 matrix src [rows, n] (row stride lds; an odd last row pairs with zeros), its element
// (i, j) zero where keep[i * n + j] == 0 (when keep is given; other values of keep do not scale it).
void pack_rows(const c10::BFloat16* src, int64_t rows, int64_t n, int64_t lds, const float* keep, uint32_t* dst);

// A dropout mask as its 16-bit draws, in element order (dropout.h's draw_runs, draw_row): element e is kept when
// draws[e] >= threshold. Half the bytes of a float keep mask, and no pass to make one.
struct Drawn {
  const uint16_t* draws;
  uint32_t threshold;
};
// pack_rows with element (i, j) zero where it is dropped (keep.draws[i * n + j]).
void pack_rows(const c10::BFloat16* src, int64_t rows, int64_t n, int64_t lds, Drawn keep, uint32_t* dst);
// out[e] = bf16(float(out[e]) + (kept(e) ? scale * v[e] : 0)), e < n: narrow's accumulate, masked by draws.
void narrow_kept(const float* v, int64_t n, Drawn keep, float scale, c10::BFloat16* out);
// dst[e] = keep[e] != 0 ? src[e] : 0, e < n (bf16, exact).
void mask_bf16(const c10::BFloat16* src, int64_t n, const float* keep, c10::BFloat16* dst);

// out[e] = kept(e) ? scale : 0, e < n: a float keep mask from the draws (dropout.h's mask_row).
void keep_mask(Drawn keep, int64_t n, float scale, float* out);

// dst[e] = kept(e) ? src[e] : 0, e < n: dropout applied to bf16 values straight from the draws, 32 lanes at a time.
void drop_bf16(Drawn keep, int64_t n, const c10::BFloat16* src, c10::BFloat16* dst);

// dst[e] = float(src[e]) * (keep ? keep[e] : 1), e < n.
template <class T> void widen(const T* src, int64_t n, const float* keep, float* dst);

// out[e] = T((accumulate ? float(out[e]) : 0) + (keep ? keep[e] : 1) * v[e]), e < n: one rounding, to nearest
// even, bit-identical to c10's conversions.
template <class T> void narrow(const float* v, int64_t n, const float* keep, bool accumulate, T* out);

}  // namespace peft_kernels::cpu::simd
