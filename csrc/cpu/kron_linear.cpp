// CPU backend of kron_linear: two paths with the same contractions, chosen per call.
//
// Simd (fp32/bf16/fp16 on an AVX-512 CPU, factors of at most kSimdFactorValues each): microgemm.h's register
// tiles, a row of x at a time (see `struct Simd`). A 32 x 32 x 32 product is too small for a BLAS call to pay off
// (view, dispatch and packing per call): `python -P bench/bench_kron_linear.py` runs both paths side by side
// (provider ours-blas is the BLAS path), 1024 -> 1024, M = 2048, 32 x 32 factors, forward + backward, ours /
// frozen Linear over two runs: bf16 1.19-1.23 (SimdBf16; BLAS path 1.44-1.52), fp32 1.12-1.19 (1.18-1.25).
//
// BLAS (fp64, CPUs without AVX-512, larger factors, PEFT_KERNELS_CPU_ISA below avx512). Rows are taken in blocks
// of R rows (about 64K values of x, 256 KiB in fp32: the block's buffers stay in this Zen 4's 1 MiB L2).
// Row-major, a block of x is already X [R * a_in, b_in] (row (r, i) of it is X_r[i, :]) and a block of y is
// Y [R, a_out, b_out], so with no data movement:
//   T  = X B^T          [R * a_in, b_out]   (one GEMM, K = b_in)
//   Y += s * A T_r      per row r           (one batched GEMM with A broadcast, K = a_in, accumulated into y)
// and in backward, with dY [R, a_out, b_out] the block of dy:
//   H  = A^T dY_r       [R, a_in, b_out]    (batched, A^T broadcast)
//   dX += s * keep * (H B)   [R * a_in, b_in] = the block of dx      (one GEMM)
//   dB = s * H^T X           (one GEMM over the whole block, K = R * a_in)
//   dA = s * sum_r dY_r T_r^T (T recomputed: one GEMM, then one batched GEMM and a sum over r).
// The GEMMs (fp32; fp64 for fp64 inputs, so gradcheck sees fp64 math) go to the platform BLAS through ATen. x and
// dy are used in place when they are already fp32 and undropped; otherwise a block is widened (and masked) into a
// contiguous fp32 buffer first, and a bf16/fp16 output is accumulated in fp32 and rounded once.
// The previous version gathered x into [a_in, R * b_in] and scattered the result back from [a_out * R, b_out] (two
// transposing passes around the same GEMMs): its forward cost 1.61x the frozen Linear's forward against 1.20x for a
// plain-torch prototype of this layout (fp32, 1 thread, 1024 -> 1024, M = 2048, 32 x 32 factors, side by side).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "blocks.h"
#include "dispatch.h"
#include "dropout.h"
#include "isa.h"
#include "microgemm.h"
#include "peft_kernels/kron.h"
#include "peft_kernels/kron_op.h"

namespace peft_kernels::kron {
namespace {

using cpu::acc_t;
using cpu::dispatch;
using cpu::mask_row;
using cpu::view;
using cpu::wrap;

struct Blocks {
  int64_t rows, count;  // rows per block (the last may have fewer), number of blocks
  Blocks(const Dims& d, int64_t m) : rows(cpu::block_rows(d.in(), m)), count((m + rows - 1) / rows) {}
};

// `n` values of `src` from `first` on as a contiguous Acc tensor of `sizes`: `src` itself when it is already Acc
// and nothing is masked, else widened (times keep[n] when given) into `buf`.
template <class T, class Acc>
at::Tensor block_in(const T* src, int64_t first, int64_t n, const Acc* keep, Acc* buf, at::IntArrayRef sizes) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (keep == nullptr) return view(src + first, sizes);
  }
  for (int64_t e = 0; e < n; ++e) buf[e] = static_cast<Acc>(src[first + e]);
  if (keep != nullptr) {
    for (int64_t e = 0; e < n; ++e) buf[e] *= keep[e];
  }
  return view(buf, sizes);
}

// out[first + e] = (accumulate ? out[first + e] : 0) + s * (keep ? keep[e] : 1) * v[e], rounded once to T.
template <class T, class Acc>
void block_out(T* out, int64_t first, int64_t n, const Acc* v, Acc s, const Acc* keep, bool accumulate) {
  T* o = out + first;
  for (int64_t e = 0; e < n; ++e) {
    const Acc add = s * (keep != nullptr ? keep[e] * v[e] : v[e]);
    o[e] = static_cast<T>((accumulate ? static_cast<Acc>(o[e]) : Acc(0)) + add);
  }
}

// The AVX-512 path (Simd below) streams both factors once per row of x, so they must sit in the L2 next to the
// row: 64K fp32 values (256 KiB) each at most. Larger factors (A 2 x 2 with B 2048 x 2048) take the BLAS path,
// whose GEMMs block the factor themselves.
constexpr int64_t kSimdFactorValues = 65536;

bool use_simd(DType dtype, const Dims& d) {
  return dtype != DType::kFloat64 && d.a_out * d.a_in <= kSimdFactorValues && d.b_out * d.b_in <= kSimdFactorValues &&
         cpu::pick_isa() >= cpu::Isa::kAvx512;
}

// `f` (fp32) of a factor [rows, cols] of dtype T, times `s`, transposed when `transpose` ([cols, rows]).
template <class T> std::vector<float> factor(const void* src, int64_t rows, int64_t cols, float s, bool transpose) {
  const T* f = static_cast<const T*>(src);
  std::vector<float> out(rows * cols);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      out[transpose ? j * rows + i : i * cols + j] = s * static_cast<float>(f[i * cols + j]);
    }
  }
  return out;
}

// dA and dB of the AVX-512 / AMX backward paths: each block of rows writes fp32 partials to its slot of the wave,
// the waves are summed in order (blocks.h: the same whatever the thread count), the sums rounded once to T.
struct WaveGrads {
  const BackwardParams& p;
  int64_t da_size, db_size, wave;
  float* da_part;
  float* db_part;
  std::vector<float> da_sum, db_sum;

  WaveGrads(const BackwardParams& p, const Blocks& blocks)
      : p(p),
        da_size(p.d.a_out * p.d.a_in),
        db_size(p.d.b_out * p.d.b_in),
        wave(cpu::wave_blocks((da_size + db_size) * static_cast<int64_t>(sizeof(float)))),
        da_sum(p.da ? da_size : 0),
        db_sum(p.db ? db_size : 0) {
    const int64_t slots = std::min(blocks.count, wave);
    da_part = cpu::wave_partials<float>(slots * ((p.da ? da_size : 0) + (p.db ? db_size : 0)));
    db_part = da_part + (p.da ? slots * da_size : 0);
  }

  // Block c's partials, in the wave that starts at block w0.
  float* da_slot(int64_t c, int64_t w0) const { return da_part + (c - w0) * da_size; }
  float* db_slot(int64_t c, int64_t w0) const { return db_part + (c - w0) * db_size; }

  // body(c0, c1, w0) over the blocks wave by wave, then dA and dB (those asked for) written as T.
  template <class T, class Body> void run(const Blocks& blocks, Body&& body) {
    cpu::in_waves(blocks.count, wave, body, [&](int64_t n) {
      if (p.da != nullptr) cpu::add_partials(da_sum.data(), da_part, n, da_size);
      if (p.db != nullptr) cpu::add_partials(db_sum.data(), db_part, n, db_size);
    });
    if (p.da != nullptr) cpu::simd::narrow(da_sum.data(), da_size, nullptr, false, static_cast<T*>(p.da));
    if (p.db != nullptr) cpu::simd::narrow(db_sum.data(), db_size, nullptr, false, static_cast<T*>(p.db));
  }
};

// fp32/bf16/fp16 on an AVX-512 CPU: every contraction runs in microgemm.h's register tiles, a row of x at a time
// (its X_r, T_r, H_r stay in L1), the scale s folded into the factors once per call:
//   forward   T_r = X_r B^T,  y_r (+)= (s A) T_r
//   backward  H_r = (s A)^T dY_r,  dx_r (+)= keep_r * (H_r B),  dB += H_r^T X_r,  T'_r = X_r (s B)^T,
//             dA += sum over the block's rows of dY_r T'_r^T (mm_dot: both operands read along their rows).
// Both factors are read in place from L1/L2 by every row; per row 2 products forward and 5 backward, each
// a_in * b_in * b_out or a_out * a_in * b_out multiply-adds (32^3 at the benchmark's shape).
struct Simd {
  template <class T> static void forward(const ForwardParams& p) {
    const Dims d = p.d;
    const T* x = static_cast<const T*>(p.x);
    T* y = static_cast<T*>(p.y);
    const bool dropped = p.drop.threshold != 0;
    const std::vector<float> as = factor<T>(p.a, d.a_out, d.a_in, static_cast<float>(p.drop.scale), false);
    const std::vector<float> bt = factor<T>(p.b, d.b_out, d.b_in, 1.0f, true);
    at::parallel_for(0, p.m, cpu::block_rows(d.in(), p.m), [&](int64_t r0, int64_t r1) {
      constexpr bool fp32 = std::is_same_v<T, float>;
      float* keep = cpu::scratch<float>(0, dropped ? d.in() : 0);
      float* xbuf = cpu::scratch<float>(1, fp32 && !dropped ? 0 : d.in());
      float* t = cpu::scratch<float>(2, d.a_in * d.b_out);
      float* ybuf = cpu::scratch<float>(3, fp32 ? 0 : d.out());
      for (int64_t r = r0; r < r1; ++r) {
        if (dropped) mask_row(Dropout{p.drop.seed, p.drop.threshold, 1.0}, r * d.in(), d.in(), keep, true);
        const float* xr = row_in(x + r * d.in(), d.in(), dropped ? keep : nullptr, xbuf);
        cpu::simd::mm_bcast(d.a_in, d.b_out, d.b_in, xr, d.b_in, 1, bt.data(), d.b_out, t, d.b_out, false);
        if constexpr (fp32) {
          cpu::simd::mm_bcast(d.a_out, d.b_out, d.a_in, as.data(), d.a_in, 1, t, d.b_out, y + r * d.out(), d.b_out,
                              p.accumulate);
        } else {
          cpu::simd::mm_bcast(d.a_out, d.b_out, d.a_in, as.data(), d.a_in, 1, t, d.b_out, ybuf, d.b_out, false);
          cpu::simd::narrow(ybuf, d.out(), nullptr, p.accumulate, y + r * d.out());
        }
      }
    });
  }

  template <class T> static void backward(const BackwardParams& p) {
    const Dims d = p.d;
    const T* x = static_cast<const T*>(p.x);
    const T* dy = static_cast<const T*>(p.dy);
    T* dx = static_cast<T*>(p.dx);
    const bool dropped = p.drop.threshold != 0;
    const float s = static_cast<float>(p.drop.scale);
    const std::vector<float> as = factor<T>(p.a, d.a_out, d.a_in, s, false);
    const std::vector<float> bf = factor<T>(p.b, d.b_out, d.b_in, 1.0f, false);
    const std::vector<float> bst = p.da ? factor<T>(p.b, d.b_out, d.b_in, s, true) : std::vector<float>();
    const bool need_h = dx != nullptr || p.db != nullptr;
    const Blocks blocks(d, p.m);
    WaveGrads grads(p, blocks);
    const auto body = [&](int64_t c0, int64_t c1, int64_t w0) {
      constexpr bool fp32 = std::is_same_v<T, float>;
      const int64_t most = blocks.rows;
      float* keep = cpu::scratch<float>(0, dropped ? d.in() : 0);
      float* xbuf = cpu::scratch<float>(1, x && (!fp32 || dropped) ? d.in() : 0);
      float* dybuf = cpu::scratch<float>(2, fp32 ? 0 : most * d.out());
      float* h = cpu::scratch<float>(3, need_h ? d.a_in * d.b_out : 0);
      float* dxbuf = cpu::scratch<float>(4, dx && !(fp32 && p.accumulate_dx && !dropped) ? d.in() : 0);
      float* t = cpu::scratch<float>(5, p.da ? most * d.a_in * d.b_out : 0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * blocks.rows, rows = std::min(blocks.rows, p.m - r0);
        const float* dys = dybuf;
        if constexpr (fp32) {
          dys = dy + r0 * d.out();
        } else {
          cpu::simd::widen(dy + r0 * d.out(), rows * d.out(), nullptr, dybuf);
        }
        float* db_slot = p.db ? grads.db_slot(c, w0) : nullptr;
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = r0 + i;
          const float* dyr = dys + i * d.out();
          if (dropped) mask_row(Dropout{p.drop.seed, p.drop.threshold, 1.0}, r * d.in(), d.in(), keep, true);
          if (need_h) cpu::simd::mm_bcast(d.a_in, d.b_out, d.a_out, as.data(), 1, d.a_in, dyr, d.b_out, h, d.b_out, false);
          if (dx != nullptr) {
            bool done = false;
            if constexpr (fp32) {
              if (p.accumulate_dx && !dropped) {  // dx holds dy W: the tiles add into it
                cpu::simd::mm_bcast(d.a_in, d.b_in, d.b_out, h, d.b_out, 1, bf.data(), d.b_in, dx + r * d.in(),
                                    d.b_in, true);
                done = true;
              }
            }
            if (!done) {
              cpu::simd::mm_bcast(d.a_in, d.b_in, d.b_out, h, d.b_out, 1, bf.data(), d.b_in, dxbuf, d.b_in, false);
              cpu::simd::narrow(dxbuf, d.in(), dropped ? keep : nullptr, p.accumulate_dx, dx + r * d.in());
            }
          }
          if (x == nullptr) continue;
          const float* xr = row_in(x + r * d.in(), d.in(), dropped ? keep : nullptr, xbuf);
          if (p.db != nullptr) {
            cpu::simd::mm_bcast(d.b_out, d.b_in, d.a_in, h, 1, d.b_out, xr, d.b_in, db_slot, d.b_in, i != 0);
          }
          if (p.da != nullptr) {
            cpu::simd::mm_bcast(d.a_in, d.b_out, d.b_in, xr, d.b_in, 1, bst.data(), d.b_out, t + i * d.a_in * d.b_out,
                                d.b_out, false);
          }
        }
        if (p.da != nullptr && x != nullptr) {
          cpu::simd::mm_dot(d.a_out, d.a_in, rows, d.b_out, dys, d.b_out, d.out(), t, d.b_out, d.a_in * d.b_out,
                            grads.da_slot(c, w0), d.a_in, false);
        }
      }
    };
    grads.run<T>(blocks, body);
  }

  // A row of x as fp32: in place for undropped fp32, else widened into `buf` (times `keep`, the row's mask).
  template <class T> static const float* row_in(const T* src, int64_t n, const float* keep, float* buf) {
    if constexpr (std::is_same_v<T, float>) {
      if (keep == nullptr) return src;
    }
    cpu::simd::widen(src, n, keep, buf);
    return buf;
  }
};

// bf16 on an AVX512-BF16 CPU (cpu::Isa::kAvx512Bf16) with even factor dimensions: Simd's contractions as bf16
// pair products (vdpbf16ps), x, dy and the factors read as bf16, T_r and H_r rounded to bf16 (with s folded in)
// before they enter the second product of their chain, as the bf16 reference rounds A (x) B before its GEMM.
// Operand layouts (microgemm.h): a row-major bf16 matrix gives pairs along its rows as is; the b operands are
// paired rows: B^T and B once per call, dY_r, X_r, T_r and H_r per row.
struct SimdBf16 {
  using bf16 = c10::BFloat16;

  static bool usable(DType dtype, const Dims& d) {
    return dtype == DType::kBFloat16 && d.a_out % 2 == 0 && d.a_in % 2 == 0 && d.b_out % 2 == 0 && d.b_in % 2 == 0 &&
           cpu::pick_isa() >= cpu::Isa::kAvx512Bf16;
  }

  // A bf16 matrix's pairs as words (two neighbours of a row in one 32-bit word).
  static const uint32_t* words(const bf16* m) { return reinterpret_cast<const uint32_t*>(m); }

  // A bf16 factor [rows, cols], transposed ([cols, rows]) when `transpose`: bf16 values moved, none converted.
  static std::vector<bf16> copied(const void* src, int64_t rows, int64_t cols, bool transpose) {
    if (transpose) return cpu::transposed<bf16, bf16>(src, rows, cols);
    const bf16* f = static_cast<const bf16*>(src);
    return std::vector<bf16>(f, f + rows * cols);
  }

  // Paired rows of a factor [rows, cols] (transposed first when `transpose`).
  static std::vector<uint32_t> paired(const void* f, int64_t rows, int64_t cols, bool transpose) {
    const std::vector<bf16> m = copied(f, rows, cols, transpose);
    const int64_t r = transpose ? cols : rows, c = transpose ? rows : cols;
    std::vector<uint32_t> out(r / 2 * c);
    cpu::simd::pack_rows(m.data(), r, c, c, nullptr, out.data());
    return out;
  }

  // x row r (masked by keep when dropped) as bf16: in place, or masked into buf (backward: keep also masks dx).
  static const bf16* row_x(const bf16* x, int64_t n, const float* keep, bf16* buf) {
    if (keep == nullptr) return x;
    cpu::simd::mask_bf16(x, n, keep, buf);
    return buf;
  }

  // The backward's factor operands: A^T [a_in, a_out] row-major (its pairs run along a_out), B as paired rows
  // [b_out / 2][b_in], and B^T's paired rows (for T_r, only when dA is asked for).
  struct Factors {
    std::vector<bf16> at;
    std::vector<uint32_t> bp, btp;
    explicit Factors(const BackwardParams& p)
        : at(copied(p.a, p.d.a_out, p.d.a_in, true)),
          bp(paired(p.b, p.d.b_out, p.d.b_in, false)),
          btp(p.da ? paired(p.b, p.d.b_out, p.d.b_in, true) : std::vector<uint32_t>()) {}
  };

  // C[m, n] = a (m rows of k2 pairs, lda words apart) times b (paired rows [k2][n]): AMX tiles when `tiles`
  // (inside a cpu::amx::Tiles scope), else pair products.
  static void product(bool tiles, int64_t m, int64_t n, int64_t k2, const uint32_t* a, int64_t lda, const uint32_t* b,
                      float* c) {
    if (tiles) {
      cpu::amx::mm(m, n, k2, 1, a, lda, 0, b, n, 0, c, n, false);
    } else {
      cpu::simd::mm_bcast_bf16(m, n, k2, a, lda, 1, b, n, c, n, false);
    }
  }

  // Per row: T_r = X_r B^T, rounded (times s) to paired rows, y_r (+)= A T_r. `tiles`: AmxBf16's products.
  static void forward(const ForwardParams& p, bool tiles = false) {
    const Dims d = p.d;
    const bf16* x = static_cast<const bf16*>(p.x);
    bf16* y = static_cast<bf16*>(p.y);
    const bool dropped = p.drop.threshold != 0;
    const float s = static_cast<float>(p.drop.scale);
    const uint32_t* a = words(static_cast<const bf16*>(p.a));
    const std::vector<uint32_t> btp = paired(p.b, d.b_out, d.b_in, true);  // B^T [b_in / 2][b_out]
    at::parallel_for(0, p.m, cpu::block_rows(d.in(), p.m), [&](int64_t r0, int64_t r1) {
      std::optional<cpu::amx::Tiles> tile_state;
      if (tiles) tile_state.emplace();
      float* t = cpu::scratch<float>(2, d.a_in * d.b_out);
      float* ybuf = cpu::scratch<float>(3, d.out());
      bf16* xbuf = cpu::scratch<bf16>(0, dropped ? d.in() : 0);
      uint32_t* tp = cpu::scratch<uint32_t>(0, d.a_in / 2 * d.b_out);
      for (int64_t r = r0; r < r1; ++r) {
        const bf16* xrow = x + r * d.in();
        if (dropped) {  // the row masked straight from its draws
          cpu::drop_bf16(p.drop, r * d.in(), d.in(), xrow, xbuf);
          xrow = xbuf;
        }
        product(tiles, d.a_in, d.b_out, d.b_in / 2, words(xrow), d.b_in / 2, btp.data(), t);
        cpu::simd::round_rows(t, d.a_in, d.b_out, d.b_out, s, tp);
        product(tiles, d.a_out, d.b_out, d.a_in / 2, a, d.a_in / 2, tp, ybuf);
        cpu::simd::narrow(ybuf, d.out(), nullptr, p.accumulate, y + r * d.out());
      }
    });
  }

  static void backward(const BackwardParams& p) {
    const Dims d = p.d;
    const bf16* x = static_cast<const bf16*>(p.x);
    const bf16* dy = static_cast<const bf16*>(p.dy);
    bf16* dx = static_cast<bf16*>(p.dx);
    const bool dropped = p.drop.threshold != 0;
    const float s = static_cast<float>(p.drop.scale);
    const Factors f(p);
    const bool need_h = dx != nullptr || p.db != nullptr;
    const Blocks blocks(d, p.m);
    WaveGrads grads(p, blocks);
    const auto body = [&](int64_t c0, int64_t c1, int64_t w0) {
      const int64_t most = blocks.rows;
      float* keep = cpu::scratch<float>(0, dropped ? d.in() : 0);
      float* h = cpu::scratch<float>(2, need_h ? d.a_in * d.b_out : 0);
      float* dxbuf = cpu::scratch<float>(3, dx ? d.in() : 0);
      float* t = cpu::scratch<float>(4, p.da ? d.a_in * d.b_out : 0);
      bf16* xbuf = cpu::scratch<bf16>(0, x && dropped ? d.in() : 0);
      bf16* hb = cpu::scratch<bf16>(1, dx ? d.a_in * d.b_out : 0);
      bf16* tb = cpu::scratch<bf16>(2, p.da ? most * d.a_in * d.b_out : 0);
      uint32_t* dyp = cpu::scratch<uint32_t>(0, need_h ? d.a_out / 2 * d.b_out : 0);
      uint32_t* hp = cpu::scratch<uint32_t>(1, p.db ? d.a_in / 2 * d.b_out : 0);
      uint32_t* xp = cpu::scratch<uint32_t>(2, p.db ? d.a_in / 2 * d.b_in : 0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * blocks.rows, rows = std::min(blocks.rows, p.m - r0);
        float* db_slot = p.db ? grads.db_slot(c, w0) : nullptr;
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = r0 + i;
          if (dropped) mask_row(Dropout{p.drop.seed, p.drop.threshold, 1.0}, r * d.in(), d.in(), keep, true);
          if (need_h) {
            cpu::simd::pack_rows(dy + r * d.out(), d.a_out, d.b_out, d.b_out, nullptr, dyp);
            cpu::simd::mm_bcast_bf16(d.a_in, d.b_out, d.a_out / 2, words(f.at.data()), d.a_out / 2, 1, dyp, d.b_out, h,
                                     d.b_out, false);
          }
          if (dx != nullptr) {
            cpu::simd::round_bf16(h, d.a_in * d.b_out, s, hb);
            cpu::simd::mm_bcast_bf16(d.a_in, d.b_in, d.b_out / 2, words(hb), d.b_out / 2, 1, f.bp.data(), d.b_in, dxbuf,
                                     d.b_in, false);
            cpu::simd::narrow(dxbuf, d.in(), dropped ? keep : nullptr, p.accumulate_dx, dx + r * d.in());
          }
          if (x == nullptr) continue;
          const bf16* xr = row_x(x + r * d.in(), d.in(), dropped ? keep : nullptr, xbuf);
          if (p.db != nullptr) {
            cpu::simd::round_rows(h, d.a_in, d.b_out, d.b_out, s, hp);
            cpu::simd::pack_rows(xr, d.a_in, d.b_in, d.b_in, nullptr, xp);
            cpu::simd::mm_bcast_bf16(d.b_out, d.b_in, d.a_in / 2, hp, 1, d.b_out, xp, d.b_in, db_slot, d.b_in, i != 0);
          }
          if (p.da != nullptr) {
            cpu::simd::mm_bcast_bf16(d.a_in, d.b_out, d.b_in / 2, words(xr), d.b_in / 2, 1, f.btp.data(), d.b_out, t,
                                     d.b_out, false);
            cpu::simd::round_bf16(t, d.a_in * d.b_out, s, tb + i * d.a_in * d.b_out);
          }
        }
        if (p.da != nullptr && x != nullptr) {
          cpu::simd::mm_dot_bf16(d.a_out, d.a_in, rows, d.b_out / 2, words(dy + r0 * d.out()), d.b_out / 2,
                                 d.out() / 2, words(tb), d.b_out / 2, d.a_in * d.b_out / 2,
                                 grads.da_slot(c, w0), d.a_in, false);
        }
      }
    };
    grads.run<bf16>(blocks, body);
  }
};

// bf16 on an AMX CPU (cpu::Isa::kAmx) with every factor dimension a multiple of 32 (one tile's k; m and n need
// 16): SimdBf16's contractions and roundings as tile products (amx.h), per row forward, and backward per row for
// H_r, dX_r and T_r; dA and dB over a whole block of rows in one batched product each, their sums held in tiles:
//   dA = sum_r dY_r T_r^T   (a: dY_r in place, pairs along b_out; b: paired rows of T_r^T = T_r's words transposed)
//   dB = sum_r H_r^T X_r    (a: H_r^T's pairs = H_r's paired rows transposed; b: X_r's paired rows)
// Both contract over an index that is inner (dA) or outer (dB) in both operands, so one of the two is transposed
// per row (amx::transpose_words). `python -P bench/bench_kron_linear.py --dtype bf16` on this Xeon (AMX, 2 cores),
// ours / frozen Linear, forward + backward: see the README's KronA table.
struct AmxBf16 {
  using bf16 = c10::BFloat16;

  static bool usable(DType dtype, const Dims& d) {
    return dtype == DType::kBFloat16 && d.a_out % 32 == 0 && d.a_in % 32 == 0 && d.b_out % 32 == 0 &&
           d.b_in % 32 == 0 && cpu::pick_isa() >= cpu::Isa::kAmx;
  }

  static void forward(const ForwardParams& p) { SimdBf16::forward(p, true); }

  static void backward(const BackwardParams& p) {
    const Dims d = p.d;
    const bf16* x = static_cast<const bf16*>(p.x);
    const bf16* dy = static_cast<const bf16*>(p.dy);
    bf16* dx = static_cast<bf16*>(p.dx);
    const bool dropped = p.drop.threshold != 0;
    const float s = static_cast<float>(p.drop.scale);
    const SimdBf16::Factors f(p);
    const bool need_h = dx != nullptr || p.db != nullptr;
    const Blocks blocks(d, p.m);
    WaveGrads grads(p, blocks);
    // Per row of a block: H_r^T's pairs [b_out][a_in / 2], X_r's paired rows [a_in / 2][b_in], T_r^T's paired rows
    // [b_out / 2][a_in], all a_in * b_out / 2 or in / 2 words.
    const int64_t ht_size = d.b_out * d.a_in / 2, xp_size = d.in() / 2, tt_size = d.b_out * d.a_in / 2;
    const auto body = [&](int64_t c0, int64_t c1, int64_t w0) {
      const cpu::amx::Tiles tiles;
      const int64_t most = blocks.rows;
      const bool db = p.db != nullptr && x != nullptr, da = p.da != nullptr && x != nullptr;
      float* keep = cpu::scratch<float>(0, dropped ? d.in() : 0);
      float* h = cpu::scratch<float>(2, need_h ? d.a_in * d.b_out : 0);
      float* dxbuf = cpu::scratch<float>(3, dx ? d.in() : 0);
      float* t = cpu::scratch<float>(4, da ? d.a_in * d.b_out : 0);
      bf16* xbuf = cpu::scratch<bf16>(0, x && dropped ? d.in() : 0);
      bf16* hb = cpu::scratch<bf16>(1, dx ? d.a_in * d.b_out : 0);
      bf16* tb = cpu::scratch<bf16>(2, da ? d.a_in * d.b_out : 0);
      uint32_t* dyp = cpu::scratch<uint32_t>(0, need_h ? d.a_out / 2 * d.b_out : 0);
      uint32_t* hp = cpu::scratch<uint32_t>(1, db ? d.a_in / 2 * d.b_out : 0);
      uint32_t* ht = cpu::scratch<uint32_t>(2, db ? most * ht_size : 0);
      uint32_t* xp = cpu::scratch<uint32_t>(3, db ? most * xp_size : 0);
      uint32_t* tt = cpu::scratch<uint32_t>(4, da ? most * tt_size : 0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * blocks.rows, rows = std::min(blocks.rows, p.m - r0);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t r = r0 + i;
          if (dropped) mask_row(Dropout{p.drop.seed, p.drop.threshold, 1.0}, r * d.in(), d.in(), keep, true);
          if (need_h) {
            cpu::simd::pack_rows(dy + r * d.out(), d.a_out, d.b_out, d.b_out, nullptr, dyp);
            SimdBf16::product(true, d.a_in, d.b_out, d.a_out / 2, SimdBf16::words(f.at.data()), d.a_out / 2, dyp, h);
          }
          if (dx != nullptr) {
            cpu::simd::round_bf16(h, d.a_in * d.b_out, s, hb);
            SimdBf16::product(true, d.a_in, d.b_in, d.b_out / 2, SimdBf16::words(hb), d.b_out / 2, f.bp.data(), dxbuf);
            cpu::simd::narrow(dxbuf, d.in(), dropped ? keep : nullptr, p.accumulate_dx, dx + r * d.in());
          }
          if (x == nullptr) continue;
          const bf16* xr = SimdBf16::row_x(x + r * d.in(), d.in(), dropped ? keep : nullptr, xbuf);
          if (db) {
            cpu::simd::round_rows(h, d.a_in, d.b_out, d.b_out, s, hp);
            cpu::amx::transpose_words(hp, d.a_in / 2, d.b_out, d.b_out, ht + i * ht_size, d.a_in / 2);
            cpu::simd::pack_rows(xr, d.a_in, d.b_in, d.b_in, nullptr, xp + i * xp_size);
          }
          if (da) {
            SimdBf16::product(true, d.a_in, d.b_out, d.b_in / 2, SimdBf16::words(xr), d.b_in / 2, f.btp.data(), t);
            cpu::simd::round_bf16(t, d.a_in * d.b_out, s, tb);
            cpu::amx::transpose_words(SimdBf16::words(tb), d.a_in, d.b_out / 2, d.b_out / 2, tt + i * tt_size,
                                      d.a_in);
          }
        }
        if (db) {
          cpu::amx::mm(d.b_out, d.b_in, d.a_in / 2, rows, ht, d.a_in / 2, ht_size, xp, d.b_in, xp_size,
                       grads.db_slot(c, w0), d.b_in, false);
        }
        if (da) {
          cpu::amx::mm(d.a_out, d.a_in, d.b_out / 2, rows, SimdBf16::words(dy + r0 * d.out()), d.b_out / 2,
                       d.out() / 2, tt, d.a_in, tt_size, grads.da_slot(c, w0), d.a_in, false);
        }
      }
    };
    grads.run<bf16>(blocks, body);
  }
};

struct Cpu {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  static constexpr bool kFloat64 = true;
  static constexpr bool kWorkspace = false;

  static void forward(const ForwardParams& p) {
    if (use_simd(p.dtype, p.d) && AmxBf16::usable(p.dtype, p.d)) return AmxBf16::forward(p);
    if (use_simd(p.dtype, p.d) && SimdBf16::usable(p.dtype, p.d)) return SimdBf16::forward(p);
    if (use_simd(p.dtype, p.d)) {
      dispatch(p.dtype, [&]<class T>() {
        if constexpr (!std::is_same_v<T, double>) Simd::forward<T>(p);
      });
      return;
    }
    dispatch(p.dtype, [&]<class T>() {
      using Acc = acc_t<T>;
      const Dims d = p.d;
      const T* x = static_cast<const T*>(p.x);
      T* y = static_cast<T*>(p.y);
      const at::ScalarType acc_type = c10::CppTypeToScalarType<Acc>::value;
      const at::Tensor a = wrap(p.a, {d.a_out, d.a_in}, p.dtype).to(acc_type);
      const at::Tensor bt = wrap(p.b, {d.b_out, d.b_in}, p.dtype).to(acc_type).t();
      const Acc s = static_cast<Acc>(p.drop.scale);
      const bool dropped = p.drop.threshold != 0;
      const Blocks blocks(d, p.m);
      at::parallel_for(0, blocks.count, 1, [&](int64_t c0, int64_t c1) {
        // Buffers only where a block cannot be used in place: x that is not Acc or is masked, y that is not Acc
        // or is not accumulated into.
        constexpr bool in_place = std::is_same_v<T, Acc>;
        Acc* keep = cpu::scratch<Acc>(0, dropped ? blocks.rows * d.in() : 0);
        Acc* xbuf = cpu::scratch<Acc>(1, in_place && !dropped ? 0 : blocks.rows * d.in());
        Acc* t = cpu::scratch<Acc>(2, blocks.rows * d.a_in * d.b_out);
        Acc* ybuf = cpu::scratch<Acc>(3, in_place && p.accumulate ? 0 : blocks.rows * d.out());
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * blocks.rows, rows = std::min(blocks.rows, p.m - r0);
          if (dropped) mask_row(Dropout{p.drop.seed, p.drop.threshold, 1.0}, r0 * d.in(), rows * d.in(), keep);
          const at::Tensor xb = block_in(x, r0 * d.in(), rows * d.in(), dropped ? keep : nullptr, xbuf,
                                         {rows * d.a_in, d.b_in});
          at::Tensor tt = view(t, {rows * d.a_in, d.b_out});
          at::mm_out(tt, xb, bt);
          const at::Tensor ab = a.expand({rows, d.a_out, d.a_in});
          const at::Tensor tb = tt.view({rows, d.a_in, d.b_out});
          if constexpr (std::is_same_v<T, Acc>) {
            if (p.accumulate) {  // fp32 / fp64 y: the batched GEMM accumulates into it (beta = 1), y written once
              view(y + r0 * d.out(), {rows, d.a_out, d.b_out}).baddbmm_(ab, tb, 1.0, s);
              continue;
            }
          }
          at::Tensor yb = view(ybuf, {rows, d.a_out, d.b_out});
          at::bmm_out(yb, ab, tb);
          block_out(y, r0 * d.out(), rows * d.out(), ybuf, s, static_cast<const Acc*>(nullptr), p.accumulate);
        }
      });
    });
  }

  // dA and dB are summed per block, then in waves of blocks (blocks.h): the same whatever the thread count.
  static void backward(const BackwardParams& p) {
    if (use_simd(p.dtype, p.d) && AmxBf16::usable(p.dtype, p.d)) return AmxBf16::backward(p);
    if (use_simd(p.dtype, p.d) && SimdBf16::usable(p.dtype, p.d)) return SimdBf16::backward(p);
    if (use_simd(p.dtype, p.d)) {
      dispatch(p.dtype, [&]<class T>() {
        if constexpr (!std::is_same_v<T, double>) Simd::backward<T>(p);
      });
      return;
    }
    dispatch(p.dtype, [&]<class T>() {
      using Acc = acc_t<T>;
      const Dims d = p.d;
      const T* x = static_cast<const T*>(p.x);
      const T* dy = static_cast<const T*>(p.dy);
      T* dx = static_cast<T*>(p.dx);
      const at::ScalarType acc_type = c10::CppTypeToScalarType<Acc>::value;
      const at::Tensor a = wrap(p.a, {d.a_out, d.a_in}, p.dtype).to(acc_type);
      const at::Tensor b = wrap(p.b, {d.b_out, d.b_in}, p.dtype).to(acc_type);
      const Acc s = static_cast<Acc>(p.drop.scale);
      const bool dropped = p.drop.threshold != 0;
      const Blocks blocks(d, p.m);
      // A partial of an unbalanced factorization can be large (B 2048 x 2048 with A 2 x 2: 16 MiB per block):
      // wave_blocks bounds the bytes of a wave's partials.
      const int64_t wave = cpu::wave_blocks((d.a_out * d.a_in + d.b_out * d.b_in) * static_cast<int64_t>(sizeof(Acc)));
      const int64_t slots = std::min(blocks.count, wave);
      const at::Tensor da_part = p.da ? at::empty({slots, d.a_out, d.a_in}, acc_type) : at::Tensor();
      const at::Tensor db_part = p.db ? at::empty({slots, d.b_out, d.b_in}, acc_type) : at::Tensor();
      const at::Tensor da_sum = p.da ? at::zeros({d.a_out, d.a_in}, acc_type) : at::Tensor();
      const at::Tensor db_sum = p.db ? at::zeros({d.b_out, d.b_in}, acc_type) : at::Tensor();
      const auto body = [&](int64_t c0, int64_t c1, int64_t w0) {
        const int64_t most = blocks.rows;
        constexpr bool in_place = std::is_same_v<T, Acc>;  // as in forward: buffers only where needed
        Acc* keep = cpu::scratch<Acc>(0, dropped ? most * d.in() : 0);
        Acc* xbuf = cpu::scratch<Acc>(1, x && (!in_place || dropped) ? most * d.in() : 0);
        Acc* dybuf = cpu::scratch<Acc>(2, in_place ? 0 : most * d.out());
        Acc* h = cpu::scratch<Acc>(3, most * d.a_in * d.b_out);
        Acc* dxbuf = cpu::scratch<Acc>(4, dx && !(in_place && p.accumulate_dx && !dropped) ? most * d.in() : 0);
        Acc* t = cpu::scratch<Acc>(5, p.da ? most * d.a_in * d.b_out : 0);
        Acc* prod = cpu::scratch<Acc>(6, p.da ? most * d.a_out * d.a_in : 0);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * blocks.rows, rows = std::min(blocks.rows, p.m - r0);
          if (dropped) mask_row(Dropout{p.drop.seed, p.drop.threshold, 1.0}, r0 * d.in(), rows * d.in(), keep);
          const Acc* mask = dropped ? keep : nullptr;
          const at::Tensor dyb = block_in(dy, r0 * d.out(), rows * d.out(), static_cast<const Acc*>(nullptr), dybuf,
                                          {rows, d.a_out, d.b_out});
          at::Tensor hb = view(h, {rows, d.a_in, d.b_out});
          at::bmm_out(hb, a.t().expand({rows, d.a_in, d.a_out}), dyb);
          const at::Tensor hf = hb.view({rows * d.a_in, d.b_out});
          if (dx != nullptr) {
            bool done = false;
            if constexpr (std::is_same_v<T, Acc>) {
              if (p.accumulate_dx && !dropped) {  // dx holds dy W: accumulate the GEMM into it (beta = 1)
                view(dx + r0 * d.in(), {rows * d.a_in, d.b_in}).addmm_(hf, b, 1.0, s);
                done = true;
              }
            }
            if (!done) {
              at::Tensor dxb = view(dxbuf, {rows * d.a_in, d.b_in});
              at::mm_out(dxb, hf, b);
              block_out(dx, r0 * d.in(), rows * d.in(), dxbuf, s, mask, p.accumulate_dx);
            }
          }
          if (x == nullptr) continue;
          const at::Tensor xb = block_in(x, r0 * d.in(), rows * d.in(), mask, xbuf, {rows * d.a_in, d.b_in});
          if (p.db != nullptr) {
            at::Tensor part = db_part[c - w0];
            at::mm_out(part, hf.t(), xb);
          }
          if (p.da != nullptr) {
            at::Tensor tt = view(t, {rows * d.a_in, d.b_out});
            at::mm_out(tt, xb, b.t());
            at::Tensor pb = view(prod, {rows, d.a_out, d.a_in});
            at::bmm_out(pb, dyb, tt.view({rows, d.a_in, d.b_out}).transpose(1, 2));
            at::Tensor part = da_part[c - w0];
            at::sum_out(part, pb, {0});
          }
        }
      };
      cpu::in_waves(blocks.count, wave, body, [&](int64_t n) {
        if (p.da != nullptr) da_sum.add_(da_part.narrow(0, 0, n).sum(0));
        if (p.db != nullptr) db_sum.add_(db_part.narrow(0, 0, n).sum(0));
      });
      if (p.da != nullptr) finish(da_sum, s, static_cast<T*>(p.da));
      if (p.db != nullptr) finish(db_sum, s, static_cast<T*>(p.db));
    });
  }

  template <class T, class Acc> static void finish(const at::Tensor& sum, Acc s, T* out) {
    sum.mul_(s);
    const Acc* src = sum.data_ptr<Acc>();
    for (int64_t e = 0; e < sum.numel(); ++e) out[e] = static_cast<T>(src[e]);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("kron_linear_fwd", &forward_op<Cpu>);
  m.impl("kron_linear_bwd", &backward_op<Cpu>);
}

}  // namespace peft_kernels::kron
