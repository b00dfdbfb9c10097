// CPU backend of the fused LoRA dropout kernels: Philox masks regenerated on the fly, fp32 accumulation.
// Rows are taken in blocks of about 64K values of x (256 KiB in fp32, inside this Zen 4's 1 MiB L2). A block's
// dropped x (mask * x, widened to fp32) exists only in that buffer while the block is worked on; the rank-r
// products are GEMMs on it through ATen's BLAS:
//   down:      xa[block] = (mask * x[block]) A^T                       [R, r]
//   backward:  dx[block] += mask * s * (dxa[block] A)                  (GEMM into a block buffer, masked add)
//              dA = sum over blocks, in order, of s * dxa[block]^T (mask * x[block])
// The previous version computed the same sums with per-row dot products and axpys over the r rows of A; this one
// hands the K = in (down) and K = R (dA) reductions to the BLAS.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "backends.h"
#include "dispatch.h"
#include "dropout.h"
#include "peft_kernels/lora_op.h"
#include "peft_kernels/philox.h"

namespace peft_kernels::lora {
namespace {

using cpu::acc_t;
using cpu::dispatch;
using cpu::mask_row;

constexpr int64_t kBlockValues = 65536;  // values of x per block of rows

template <class Acc> at::Tensor view(const Acc* data, at::IntArrayRef sizes) {
  return at::from_blob(const_cast<Acc*>(data), sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value));
}

at::Tensor wrap(const void* ptr, at::IntArrayRef sizes, DType dtype) {
  static constexpr at::ScalarType kTypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
  return at::from_blob(const_cast<void*>(ptr), sizes, kTypes[static_cast<int>(dtype)]);
}

int64_t block_rows(int64_t in, int64_t m) { return std::clamp<int64_t>(kBlockValues / in, 1, std::max<int64_t>(m, 1)); }

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
      std::vector<Acc> xd(rows * p.in), out(std::is_same_v<T, Acc> ? 0 : rows * p.r);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * rows, n = std::min(rows, p.m - i0);
        dropped(p.drop, x, i0 * p.in, n * p.in, xd.data());
        Acc* dst = out.data();
        if constexpr (std::is_same_v<T, Acc>) dst = xa + i0 * p.r;  // fp32 / fp64: the GEMM writes xa itself
        at::Tensor o = view(dst, {n, p.r});
        at::mm_out(o, view(xd.data(), {n, p.in}), at_);
        if constexpr (!std::is_same_v<T, Acc>) {
          for (int64_t e = 0; e < n * p.r; ++e) xa[i0 * p.r + e] = static_cast<T>(out[e]);
        }
      }
    });
  });
}

// dA is summed per block, then the blocks in order: deterministic whatever the thread count.
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
    const at::Tensor da_part = da != nullptr ? at::empty({blocks, p.r, p.in}, acc_type) : at::Tensor();
    at::parallel_for(0, blocks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<Acc> buf(rows * p.in), keep(dx != nullptr ? rows * p.in : 0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * rows, n = std::min(rows, p.m - i0);
        const at::Tensor g = dxa.narrow(0, i0, n);
        if (dx != nullptr) {
          mask_row(p.drop, i0 * p.in, n * p.in, keep.data());
          at::Tensor t = view(buf.data(), {n, p.in});
          at::mm_out(t, g, a);
          T* d = dx + i0 * p.in;
          for (int64_t e = 0; e < n * p.in; ++e) d[e] = static_cast<T>(static_cast<Acc>(d[e]) + keep[e] * buf[e]);
        }
        if (da != nullptr) {
          dropped(p.drop, x, i0 * p.in, n * p.in, buf.data());
          at::Tensor part = da_part[c];
          at::mm_out(part, g.t(), view(buf.data(), {n, p.in}));
        }
      }
    });
    if (da != nullptr) {
      const at::Tensor sum = da_part.sum(0).contiguous();
      const Acc* src = sum.data_ptr<Acc>();
      for (int64_t e = 0; e < p.r * p.in; ++e) da[e] = static_cast<T>(src[e]);
    }
  });
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("lora_linear_fwd", &forward_op<Cpu>);
  m.impl("lora_linear_bwd", &backward_op<Cpu>);
}

}  // namespace peft_kernels::lora
