// CPU backend of the fused LoRA dropout kernels: Philox masks regenerated on the fly, fp32 accumulation.
// Rows are taken in blocks (blocks.h). A block's mask and dropped x (mask * x, widened to fp32) exist only in
// block buffers while the block is worked on; the rank-r products are GEMMs on them through ATen's BLAS:
//   down:      xa[block] = (mask * x[block]) A^T                       [R, r]
//   backward:  dx[block] += mask * s * (dxa[block] A)                  (GEMM into a block buffer, masked add)
//              dA = sum over blocks, in fixed waves (blocks.h), of s * dxa[block]^T (mask * x[block])
// Backward draws a block's mask once for both gradients: one pass of draws over a 2048 x 1024 activation takes
// 1.17 ms on one core here, the largest elementwise cost of the dropout step (its rank-r GEMMs: ~2 ms on two cores;
// the bf16 base layer's forward + backward: ~20 ms).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "backends.h"
#include "blocks.h"
#include "dispatch.h"
#include "dropout.h"
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

}  // namespace

void Cpu::down(const DownParams& p) {
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

// dA: per-block partials summed in waves (blocks.h), the same whatever the thread count.
void Cpu::backward(const BackwardParams& p) {
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
