// CPU backend of kron_linear. Rows are taken in blocks of R rows (about 64K values of x, 256 KiB in fp32: the
// block's buffers stay in this Zen 4's 1 MiB L2). Row-major, a block of x is already X [R * a_in, b_in] (row
// (r, i) of it is X_r[i, :]) and a block of y is Y [R, a_out, b_out], so with no data movement:
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
#include <type_traits>

#include "blocks.h"
#include "dispatch.h"
#include "dropout.h"
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

struct Cpu {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  static constexpr bool kFloat64 = true;
  static constexpr bool kWorkspace = false;

  static void forward(const ForwardParams& p) {
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
