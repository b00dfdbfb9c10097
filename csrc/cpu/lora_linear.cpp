// CPU backend of the fused LoRA dropout kernels: Philox masks regenerated on the fly, fp32 accumulation.
// Rows are taken in blocks (blocks.h). A block's mask and dropped x (mask * x, widened to fp32) exist only in
// block buffers while the block is worked on; the rank-r products are computed on them:
//   down:      xa[block] = (mask * x[block]) A^T                       [R, r]
//   backward:  dxa[block] = dy[block] B                                 (Cpu::kFusedDxa; rounded to the dtype)
//              dx[block] += mask * s * (dxa[block] A)                  (into a block buffer, then a masked add)
//              dA = sum over blocks, in fixed waves (blocks.h), of s * dxa[block]^T (mask * x[block])
// on an AVX-512 CPU (fp32/bf16/fp16) by microgemm.h's register tiles and vector mask/widen/narrow loops (bf16 with
// even in and r on an AVX512-BF16 CPU: its bf16 pair products, down_bf16 / backward_bf16), elsewhere (fp64, other
// CPUs, PEFT_KERNELS_CPU_ISA below avx512) by ATen's BLAS and scalar loops. Backward draws a block's
// mask once for both gradients: one pass of 32-bit draws over a 2048 x 1024 activation took 1.17 ms on one core
// here, the dropout's 16-bit draws take half the Philox calls (philox.h). The bf16 pair path keeps the mask as the
// draws themselves (2 bytes an element, compared where used) rather than a float mask made by an extra pass.
// Side by side (`python -P bench/bench_qlora.py`, provider ours-blas = the BLAS path, 1024 -> 1024, M = 2048,
// r = 16, dropout 0.1, the QLoRA layer whose LoRA part this is), ours / frozen Linear, median of 13 / 9 runs:
// bf16 1.19 (spread 1.04-1.24; BLAS path 1.44-1.52), fp32 1.16 (1.04-1.20; 1.18-1.33).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "backends.h"
#include "blocks.h"
#include "dispatch.h"
#include "dropout.h"
#include "isa.h"
#include "microgemm.h"
#include "peft_kernels/lora_op.h"
#include "peft_kernels/philox.h"

namespace peft_kernels::lora {
namespace {

using cpu::acc_t;
using cpu::block_rows;
using cpu::dispatch;
using cpu::mask_row;
using cpu::view;
using cpu::wrap;

// out[e] = mask(first + e) * x[first + e] for e < n, in Acc (mask values are 0 or drop.scale).
template <class T, class Acc> void dropped(const Dropout& drop, const T* x, int64_t first, int64_t n, Acc* out) {
  mask_row(drop, first, n, out);
  for (int64_t e = 0; e < n; ++e) out[e] *= static_cast<Acc>(x[first + e]);
}

// fp32/bf16/fp16 on an AVX-512 CPU: the same blocks, the mask drawn into keep 16 lanes at a time, x widened and
// masked by microgemm.h's widen, the rank-r products in its register tiles (down: mm_dot along in; dx: mm_bcast
// with dxa broadcast; dA: mm_bcast over the block's rows with dxa^T broadcast), dx rounded once by narrow.
bool use_simd(DType dtype) { return dtype != DType::kFloat64 && cpu::pick_isa() >= cpu::Isa::kAvx512; }

std::vector<float> widened(const void* src, int64_t n, DType dtype) {
  std::vector<float> out(n);
  dispatch(dtype, [&]<class T>() {
    if constexpr (!std::is_same_v<T, double>) cpu::simd::widen(static_cast<const T*>(src), n, nullptr, out.data());
  });
  return out;
}

template <class T> void down_simd(const DownParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* xa = static_cast<T*>(p.xa);
  const std::vector<float> a = widened(p.a, p.r * p.in, p.dtype);
  const int64_t rows = block_rows(p.in, p.m), blocks = (p.m + rows - 1) / rows;
  at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
    float* keep = cpu::scratch<float>(0, rows * p.in);
    float* xd = cpu::scratch<float>(1, rows * p.in);
    float* out = cpu::scratch<float>(2, rows * p.r);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * rows, n = std::min(rows, p.m - i0);
      mask_row(p.drop, i0 * p.in, n * p.in, keep, true);
      cpu::simd::widen(x + i0 * p.in, n * p.in, keep, xd);
      cpu::simd::mm_dot(n, p.r, 1, p.in, xd, p.in, 0, a.data(), p.in, 0, out, p.r, false);
      cpu::simd::narrow(out, n * p.r, nullptr, false, xa + i0 * p.r);
    }
  });
}

template <class T> void backward_simd(const BackwardParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const std::vector<float> a = widened(p.a, p.r * p.in, p.dtype);
  const bool fused = p.dxa == nullptr;
  const std::vector<float> dxa = fused ? std::vector<float>() : widened(p.dxa, p.m * p.r, p.dtype);
  const std::vector<float> bt = fused ? cpu::transposed<float, T>(p.b, p.out, p.r) : std::vector<float>();
  const int64_t rows = block_rows(p.in, p.m), blocks = (p.m + rows - 1) / rows;
  const int64_t wave = cpu::wave_blocks(p.r * p.in * static_cast<int64_t>(sizeof(float)));
  float* da_part = cpu::wave_partials<float>(p.da ? std::min(blocks, wave) * p.r * p.in : 0);
  std::vector<float> da_sum(p.da ? p.r * p.in : 0);
  cpu::in_waves(
      blocks, wave,
      [&](int64_t c0, int64_t c1, int64_t w0) {
        float* keep = cpu::scratch<float>(0, rows * p.in);
        float* buf = cpu::scratch<float>(1, rows * p.in);
        float* dyw = cpu::scratch<float>(2, fused && !std::is_same_v<T, float> ? rows * p.out : 0);
        float* gf = cpu::scratch<float>(3, fused ? rows * p.r : 0);
        T* gt = nullptr;
        if constexpr (!std::is_same_v<T, float>) gt = cpu::scratch<T>(0, fused ? rows * p.r : 0);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i0 = c * rows, n = std::min(rows, p.m - i0);
          const float* g = gf;
          if (fused) {  // this block's dxa = dy B, rounded to T as the GEMM's output would be
            const float* d = dyw;
            if constexpr (std::is_same_v<T, float>) {
              d = dy + i0 * p.out;
            } else {
              cpu::simd::widen(dy + i0 * p.out, n * p.out, nullptr, dyw);
            }
            cpu::simd::mm_dot(n, p.r, 1, p.out, d, p.out, 0, bt.data(), p.out, 0, gf, p.r, false);
            if constexpr (!std::is_same_v<T, float>) {
              cpu::simd::narrow(gf, n * p.r, nullptr, false, gt);
              cpu::simd::widen(gt, n * p.r, nullptr, gf);
            }
          } else {
            g = dxa.data() + i0 * p.r;
          }
          mask_row(p.drop, i0 * p.in, n * p.in, keep, true);
          if (dx != nullptr) {
            cpu::simd::mm_bcast(n, p.in, p.r, g, p.r, 1, a.data(), p.in, buf, p.in, false);
            cpu::simd::narrow(buf, n * p.in, keep, true, dx + i0 * p.in);
          }
          if (p.da != nullptr) {
            cpu::simd::widen(x + i0 * p.in, n * p.in, keep, buf);
            cpu::simd::mm_bcast(p.r, p.in, n, g, 1, p.r, buf, p.in, da_part + (c - w0) * p.r * p.in, p.in, false);
          }
        }
      },
      [&](int64_t n) {
        if (p.da != nullptr) cpu::add_partials(da_sum.data(), da_part, n, p.r * p.in);
      });
  if (p.da != nullptr) cpu::simd::narrow(da_sum.data(), p.r * p.in, nullptr, false, static_cast<T*>(p.da));
}

// bf16 with even r and in on an AVX512-BF16 CPU: the same products as bf16 pair products (vdpbf16ps, microgemm.h).
// x, A and dxa are bf16 already, so this rounds nothing the fp32 tiles do not: exact products, fp32 sums. The mask
// zeroes dropped elements of x (copied in bf16, or packed as paired rows for dA) and its scale is applied to the
// fp32 results instead.
bool use_bf16(const DType dtype, int64_t in, int r) {
  return dtype == DType::kBFloat16 && in % 2 == 0 && r % 2 == 0 && cpu::pick_isa() >= cpu::Isa::kAvx512Bf16;
}

using bf16 = c10::BFloat16;
const uint32_t* words(const void* m) { return static_cast<const uint32_t*>(m); }

// The two products of a block of rows by a factor (down: x A^T along in; backward: dy B along out), C[n, r] =
// rows[n, k2 pairs] q[r, k2 pairs]^T, on AMX tiles (amx.h) where the CPU has them and r is a multiple of 16 and k2
// of 16: the tiles take the first n - n % 16 rows, mm_dot_bf16 the rest. On AMX the tiles' b operand is q's words
// transposed (the paired rows of q^T), made once per call. With dx's and dA's products on tiles too
// (backward_bf16), `python -P bench/isa_pairs.py --layer qlora|lora --pairs 100` (bf16, r = 16, dropout 0.1, the
// step on avx512_bf16 and amx alternated in one process): QLoRA 8.36 -> 7.63 ms, LoRA 7.98 -> 7.34 ms (medians of
// the per-pair differences 0.71 / 0.63 ms; the first two tile products alone gave 0.31-0.45 / 0.26).
struct ByFactor {
  const uint32_t* q;
  int64_t r, k2;
  std::vector<uint32_t> qt;  // empty: no tiles

  ByFactor(const uint32_t* q, int64_t r, int64_t k2) : q(q), r(r), k2(k2) {
    if (cpu::pick_isa() >= cpu::Isa::kAmx && r % 16 == 0 && k2 % 16 == 0) {
      qt.resize(k2 * r);
      cpu::amx::transpose_words(q, r, k2, k2, qt.data(), r);
    }
  }
  bool tiles() const { return !qt.empty(); }

  // out[n, r] for rows [n, k2 words]; inside a cpu::amx::Tiles scope when tiles().
  void operator()(int64_t n, const uint32_t* rows, float* out) const {
    const int64_t done = tiles() ? n - n % 16 : 0;
    if (done > 0) cpu::amx::mm(done, r, k2, 1, rows, k2, 0, qt.data(), r, 0, out, r, false);
    if (done < n) {
      cpu::simd::mm_dot_bf16(n - done, r, 1, k2, rows + done * k2, k2, 0, q, k2, 0, out + done * r, r, false);
    }
  }
};

void down_bf16(const DownParams& p) {
  const bf16* x = static_cast<const bf16*>(p.x);
  bf16* xa = static_cast<bf16*>(p.xa);
  const float scale = static_cast<float>(p.drop.scale);
  const int64_t rows = block_rows(p.in, p.m), blocks = (p.m + rows - 1) / rows;
  const ByFactor by_a(words(p.a), p.r, p.in / 2);
  at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
    std::optional<cpu::amx::Tiles> tiles;
    if (by_a.tiles()) tiles.emplace();
    float* out = cpu::scratch<float>(1, rows * p.r);
    bf16* xm = cpu::scratch<bf16>(0, rows * p.in);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * rows, n = std::min(rows, p.m - i0);
      cpu::drop_bf16(p.drop, i0 * p.in, n * p.in, x + i0 * p.in, xm);
      by_a(n, words(xm), out);
      for (int64_t e = 0; e < n * p.r; ++e) out[e] *= scale;
      cpu::simd::narrow(out, n * p.r, nullptr, false, xa + i0 * p.r);
    }
  });
}

void backward_bf16(const BackwardParams& p) {
  const bf16* x = static_cast<const bf16*>(p.x);
  const bf16* dxa = static_cast<const bf16*>(p.dxa);
  const bf16* dy = static_cast<const bf16*>(p.dy);
  const bool fused = dxa == nullptr;  // then out is even: dy B as pair products along out
  const std::vector<bf16> bt = fused ? cpu::transposed<bf16, bf16>(p.b, p.out, p.r) : std::vector<bf16>();
  const ByFactor by_b(words(bt.data()), fused ? p.r : 0, p.out / 2);  // r = 0: no product (dxa given)
  bf16* dx = static_cast<bf16*>(p.dx);
  const float scale = static_cast<float>(p.drop.scale);
  // dx's and dA's products on AMX tiles too where r is a multiple of 16 and in of 32: dx = dxa A over k = r, which
  // the tiles take in steps of 32 (r = 16 is zero-padded: half the tile's work, still ~8x the pair products' rate),
  // dA = dxa^T (mask x) over the block's rows (whole blocks of a multiple of 32 rows; a last, shorter block takes
  // the pair products). The tiles' a operand for dA is dxa^T's pairs: the block's paired rows of dxa transposed.
  const bool tiles = cpu::pick_isa() >= cpu::Isa::kAmx && p.r % 16 == 0 && p.in % 32 == 0;
  const int64_t r_pad = tiles ? (p.r + 31) / 32 * 32 : p.r;
  std::vector<uint32_t> ap(r_pad / 2 * p.in);  // A as paired rows [r / 2][in], then zero rows up to r_pad / 2
  cpu::simd::pack_rows(static_cast<const bf16*>(p.a), p.r, p.in, p.in, nullptr, ap.data());
  const int64_t rows = block_rows(p.in, p.m), blocks = (p.m + rows - 1) / rows;
  const int64_t wave = cpu::wave_blocks(p.r * p.in * static_cast<int64_t>(sizeof(float)));
  float* da_part = cpu::wave_partials<float>(p.da ? std::min(blocks, wave) * p.r * p.in : 0);
  std::vector<float> da_sum(p.da ? p.r * p.in : 0);
  cpu::in_waves(
      blocks, wave,
      [&](int64_t c0, int64_t c1, int64_t w0) {
        std::optional<cpu::amx::Tiles> tile_state;
        if (tiles || by_b.tiles()) tile_state.emplace();
        uint16_t* draws = cpu::scratch<uint16_t>(0, rows * p.in);
        float* buf = cpu::scratch<float>(1, p.dx ? rows * p.in : 0);
        uint32_t* xp = cpu::scratch<uint32_t>(0, p.da ? (rows + 1) / 2 * p.in : 0);
        uint32_t* gp = cpu::scratch<uint32_t>(1, p.da ? (rows + 1) / 2 * p.r : 0);
        uint32_t* gt = cpu::scratch<uint32_t>(2, tiles && p.da ? p.r * (rows + 1) / 2 : 0);
        uint32_t* gpad = cpu::scratch<uint32_t>(3, tiles && dx && r_pad != p.r ? rows * r_pad / 2 : 0);
        float* gf = cpu::scratch<float>(2, fused ? rows * p.r : 0);
        bf16* gb = cpu::scratch<bf16>(0, fused ? rows * p.r : 0);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i0 = c * rows, n = std::min(rows, p.m - i0);
          const bf16* g = gb;
          if (fused) {  // this block's dxa = dy B, rounded to bf16 as the GEMM's output would be
            by_b(n, words(dy + i0 * p.out), gf);
            cpu::simd::narrow(gf, n * p.r, nullptr, false, gb);
          } else {
            g = dxa + i0 * p.r;
          }
          cpu::draw_row(p.drop, i0 * p.in, n * p.in, draws);
          const cpu::simd::Drawn keep{draws, p.drop.threshold};
          if (dx != nullptr) {
            const int64_t done = tiles ? n - n % 16 : 0;
            if (done > 0) {
              const uint32_t* ga = words(g);
              if (r_pad != p.r) {  // dxa's rows as r_pad / 2 words, the pairs past r / 2 zero
                for (int64_t i = 0; i < done; ++i) {
                  std::copy_n(ga + i * p.r / 2, p.r / 2, gpad + i * r_pad / 2);
                  std::fill_n(gpad + i * r_pad / 2 + p.r / 2, (r_pad - p.r) / 2, 0u);
                }
                ga = gpad;
              }
              cpu::amx::mm(done, p.in, r_pad / 2, 1, ga, r_pad / 2, 0, ap.data(), p.in, 0, buf, p.in, false);
            }
            if (done < n) {
              cpu::simd::mm_bcast_bf16(n - done, p.in, p.r / 2, words(g + done * p.r), p.r / 2, 1, ap.data(), p.in,
                                       buf + done * p.in, p.in, false);
            }
            cpu::simd::narrow_kept(buf, n * p.in, keep, scale, dx + i0 * p.in);
          }
          if (p.da != nullptr) {
            float* slot = da_part + (c - w0) * p.r * p.in;
            cpu::simd::pack_rows(x + i0 * p.in, n, p.in, p.in, keep, xp);
            cpu::simd::pack_rows(g, n, p.r, p.r, nullptr, gp);
            if (tiles && n % 32 == 0) {
              cpu::amx::transpose_words(gp, n / 2, p.r, p.r, gt, n / 2);
              cpu::amx::mm(p.r, p.in, n / 2, 1, gt, n / 2, 0, xp, p.in, 0, slot, p.in, false);
            } else {
              cpu::simd::mm_bcast_bf16(p.r, p.in, (n + 1) / 2, gp, 1, p.r, xp, p.in, slot, p.in, false);
            }
          }
        }
      },
      [&](int64_t n) {
        if (p.da != nullptr) cpu::add_partials(da_sum.data(), da_part, n, p.r * p.in);
      });
  if (p.da != nullptr) {
    for (float& v : da_sum) v *= scale;
    cpu::simd::narrow(da_sum.data(), p.r * p.in, nullptr, false, static_cast<bf16*>(p.da));
  }
}

}  // namespace

void Cpu::down(const DownParams& p) {
  if (use_bf16(p.dtype, p.in, p.r)) return down_bf16(p);
  if (use_simd(p.dtype)) {
    dispatch(p.dtype, [&]<class T>() {
      if constexpr (!std::is_same_v<T, double>) down_simd<T>(p);
    });
    return;
  }
  dispatch(p.dtype, [&]<class T>() {
    using Acc = acc_t<T>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<Acc>::value;
    const T* x = static_cast<const T*>(p.x);
    T* xa = static_cast<T*>(p.xa);
    const at::Tensor at_ = wrap(p.a, {p.r, p.in}, p.dtype).to(acc_type).t();
    const int64_t rows = block_rows(p.in, p.m), blocks = (p.m + rows - 1) / rows;
    at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
      Acc* xd = cpu::scratch<Acc>(0, rows * p.in);
      Acc* out = cpu::scratch<Acc>(1, std::is_same_v<T, Acc> ? 0 : rows * p.r);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * rows, n = std::min(rows, p.m - i0);
        dropped(p.drop, x, i0 * p.in, n * p.in, xd);
        Acc* dst = out;
        if constexpr (std::is_same_v<T, Acc>) dst = xa + i0 * p.r;  // fp32 / fp64: the GEMM writes xa itself
        at::Tensor o = view(dst, {n, p.r});
        at::mm_out(o, view(xd, {n, p.in}), at_);
        if constexpr (!std::is_same_v<T, Acc>) {
          for (int64_t e = 0; e < n * p.r; ++e) xa[i0 * p.r + e] = static_cast<T>(out[e]);
        }
      }
    });
  });
}

// dA: per-block partials summed in waves (blocks.h), the same whatever the thread count. dxa = null (kFusedDxa):
// the AVX-512 paths compute it per block (the bf16 pair path when out is even); the others get it from the BLAS.
void Cpu::backward(const BackwardParams& params) {
  BackwardParams p = params;
  const bool pairs = use_bf16(p.dtype, p.in, p.r);
  at::Tensor dxa;
  if (p.dxa == nullptr && (pairs ? p.out % 2 != 0 : !use_simd(p.dtype))) {
    dxa = at::mm(wrap(p.dy, {p.m, p.out}, p.dtype), wrap(p.b, {p.out, p.r}, p.dtype));
    p.dxa = dxa.data_ptr();
  }
  if (pairs) return backward_bf16(p);
  if (use_simd(p.dtype)) {
    dispatch(p.dtype, [&]<class T>() {
      if constexpr (!std::is_same_v<T, double>) backward_simd<T>(p);
    });
    return;
  }
  dispatch(p.dtype, [&]<class T>() {
    using Acc = acc_t<T>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<Acc>::value;
    const T* x = static_cast<const T*>(p.x);
    T* dx = static_cast<T*>(p.dx);
    T* da = static_cast<T*>(p.da);
    const at::Tensor a = wrap(p.a, {p.r, p.in}, p.dtype).to(acc_type);
    const at::Tensor dxa = wrap(p.dxa, {p.m, p.r}, p.dtype).to(acc_type);
    const int64_t rows = block_rows(p.in, p.m), blocks = (p.m + rows - 1) / rows;
    const int64_t wave = cpu::wave_blocks(p.r * p.in * static_cast<int64_t>(sizeof(Acc)));
    const at::Tensor da_part = da != nullptr ? at::empty({std::min(blocks, wave), p.r, p.in}, acc_type) : at::Tensor();
    const at::Tensor da_sum = da != nullptr ? at::zeros({p.r, p.in}, acc_type) : at::Tensor();
    cpu::in_waves(
        blocks, wave,
        [&](int64_t c0, int64_t c1, int64_t w0) {
          Acc* buf = cpu::scratch<Acc>(0, rows * p.in);
          Acc* keep = cpu::scratch<Acc>(1, rows * p.in);
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t i0 = c * rows, n = std::min(rows, p.m - i0);
            const at::Tensor g = dxa.narrow(0, i0, n);
            mask_row(p.drop, i0 * p.in, n * p.in, keep);
            if (dx != nullptr) {
              at::Tensor t = view(buf, {n, p.in});
              at::mm_out(t, g, a);
              T* d = dx + i0 * p.in;
              for (int64_t e = 0; e < n * p.in; ++e) d[e] = static_cast<T>(static_cast<Acc>(d[e]) + keep[e] * buf[e]);
            }
            if (da != nullptr) {
              const T* xb = x + i0 * p.in;
              for (int64_t e = 0; e < n * p.in; ++e) buf[e] = keep[e] * static_cast<Acc>(xb[e]);
              at::Tensor part = da_part[c - w0];
              at::mm_out(part, g.t(), view(buf, {n, p.in}));
            }
          }
        },
        [&](int64_t n) {
          if (da != nullptr) da_sum.add_(da_part.narrow(0, 0, n).sum(0));
        });
    if (da != nullptr) {
      const Acc* src = da_sum.data_ptr<Acc>();
      for (int64_t e = 0; e < p.r * p.in; ++e) da[e] = static_cast<T>(src[e]);
    }
  });
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("lora_linear_fwd", &forward_op<Cpu>);
  m.impl("lora_linear_bwd", &backward_op<Cpu>);
}

}  // namespace peft_kernels::lora
