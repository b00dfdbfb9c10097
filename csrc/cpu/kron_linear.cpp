// CPU backend of kron_linear. Rows are taken in blocks of R rows (about 64K values of x, 256 KiB in fp32: the
// block's buffers stay in this Zen 4's 1 MiB L2). For a block, our loops gather the rows with the Kronecker index
// maps of kron.h into layouts where both contractions of every row become one GEMM each for the whole block:
//   P  [a_in, R * b_in]        P[i, (r, j)] = keep * x[r, i, j]        (our gather: mask, widen to fp32)
//   U  = A P  [a_out, R * b_in]                                          (one GEMM, K = a_in)
//   Y' = U B^T, U viewed [a_out * R, b_in]  -> [a_out * R, b_out]        (one GEMM, K = b_in)
//   y[r, p, q] (+)= s * Y'[(p, r), q]                                    (our scatter: scale, add, one rounding)
// and in backward D' [a_out * R, b_out] (dy gathered the same way), G = D' B, dX = A^T G, dA += G P^T,
// dB += D'^T (A P). The GEMMs (fp32; fp64 for fp64 inputs, so gradcheck sees fp64 math) go to the platform BLAS
// through ATen. Per-row loops with compiler-vectorized axpys instead (the first version) cost 2.28x the frozen
// layer's bf16 training step at 1024 -> 1024, M = 2048, 32 x 32 factors (1.61x in fp32); these GEMMs 1.60x
// (1.36x in fp32), measured side by side by bench/bench_kron_linear.py on the shared 2-core machine.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dispatch.h"
#include "dropout.h"
#include "peft_kernels/kron.h"
#include "peft_kernels/kron_op.h"

namespace peft_kernels::kron {
namespace {

using cpu::acc_t;
using cpu::dispatch;
using cpu::mask_row;

constexpr int64_t kBlockValues = 65536;  // values of x per block of rows

struct Blocks {
  int64_t rows, count;  // rows per block (the last may have fewer), number of blocks
  Blocks(const Dims& d, int64_t m) : rows(std::clamp<int64_t>(kBlockValues / d.in(), 1, m)), count((m + rows - 1) / rows) {}
};

// The 0/1 dropout mask of rows [r0, r0 + rows) into keep[rows * in]; nothing without dropout.
template <class Acc> void block_mask(const Dropout& drop, const Dims& d, int64_t r0, int64_t rows, Acc* keep) {
  if (drop.threshold != 0) mask_row(Dropout{drop.seed, drop.threshold, 1.0}, r0 * d.in(), rows * d.in(), keep);
}

// P[i, r * b_in + j] = keep[r, i, j] * x[r0 + r, i, j] for the block's rows.
template <class T, class Acc>
void gather_x(const Dropout& drop, const T* x, const Dims& d, int64_t r0, int64_t rows, const Acc* keep, Acc* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + (r0 + r) * d.in();
    for (int64_t i = 0; i < d.a_in; ++i) {
      Acc* o = out + (i * rows + r) * d.b_in;
      const int64_t k0 = x_at(d, i, 0);
      for (int64_t j = 0; j < d.b_in; ++j) o[j] = static_cast<Acc>(xr[k0 + j]);
      if (drop.threshold != 0) {
        for (int64_t j = 0; j < d.b_in; ++j) o[j] *= keep[r * d.in() + k0 + j];
      }
    }
  }
}

// D'[p * rows + r, q] = dy[r0 + r, p, q] for the block's rows.
template <class T, class Acc> void gather_dy(const T* dy, const Dims& d, int64_t r0, int64_t rows, Acc* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* dyr = dy + (r0 + r) * d.out();
    for (int64_t p = 0; p < d.a_out; ++p) {
      Acc* o = out + (p * rows + r) * d.b_out;
      const int64_t k0 = y_at(d, p, 0);
      for (int64_t q = 0; q < d.b_out; ++q) o[q] = static_cast<Acc>(dyr[k0 + q]);
    }
  }
}

template <class Acc> at::Tensor block_tensor(std::vector<Acc>& buf, int64_t rows_, int64_t cols) {
  return at::from_blob(buf.data(), {rows_, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value));
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
      const Blocks blocks(d, p.m);
      at::parallel_for(0, blocks.count, 1, [&](int64_t c0, int64_t c1) {
        std::vector<Acc> keep(p.drop.threshold ? blocks.rows * d.in() : 0), xp(blocks.rows * d.in());
        std::vector<Acc> u(blocks.rows * d.mid()), yp(blocks.rows * d.out());
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * blocks.rows, rows = std::min(blocks.rows, p.m - r0);
          block_mask(p.drop, d, r0, rows, keep.data());
          gather_x(p.drop, x, d, r0, rows, keep.data(), xp.data());
          at::Tensor ut = block_tensor(u, d.a_out, rows * d.b_in);
          at::mm_out(ut, a, block_tensor(xp, d.a_in, rows * d.b_in));
          at::Tensor ypt = block_tensor(yp, d.a_out * rows, d.b_out);
          at::mm_out(ypt, ut.view({d.a_out * rows, d.b_in}), bt);
          for (int64_t r = 0; r < rows; ++r) {
            T* yr = y + (r0 + r) * d.out();
            for (int64_t pp = 0; pp < d.a_out; ++pp) {
              const Acc* src = yp.data() + (pp * rows + r) * d.b_out;
              T* dst = yr + y_at(d, pp, 0);
              for (int64_t q = 0; q < d.b_out; ++q) {
                dst[q] = static_cast<T>((p.accumulate ? static_cast<Acc>(dst[q]) : Acc(0)) + s * src[q]);
              }
            }
          }
        }
      });
    });
  }

  // dA and dB are summed per block, then the blocks in order: deterministic whatever the thread count.
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
      const Blocks blocks(d, p.m);
      const at::Tensor da_part = at::zeros({blocks.count, d.a_out, d.a_in}, acc_type);
      const at::Tensor db_part = at::zeros({blocks.count, d.b_out, d.b_in}, acc_type);
      at::parallel_for(0, blocks.count, 1, [&](int64_t c0, int64_t c1) {
        std::vector<Acc> keep(p.drop.threshold ? blocks.rows * d.in() : 0), xp(x ? blocks.rows * d.in() : 0);
        std::vector<Acc> dyp(blocks.rows * d.out()), g(blocks.rows * d.mid()), u(p.db ? blocks.rows * d.mid() : 0);
        std::vector<Acc> dxp(dx ? blocks.rows * d.in() : 0);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * blocks.rows, rows = std::min(blocks.rows, p.m - r0);
          block_mask(p.drop, d, r0, rows, keep.data());
          gather_dy(dy, d, r0, rows, dyp.data());
          const at::Tensor dypt = block_tensor(dyp, d.a_out * rows, d.b_out);
          at::Tensor gt = block_tensor(g, d.a_out * rows, d.b_in);
          at::mm_out(gt, dypt, b);
          const at::Tensor g2 = gt.view({d.a_out, rows * d.b_in});
          if (dx != nullptr) {
            at::Tensor dxt = block_tensor(dxp, d.a_in, rows * d.b_in);
            at::mm_out(dxt, a.t(), g2);
            for (int64_t r = 0; r < rows; ++r) {
              T* dxr = dx + (r0 + r) * d.in();
              for (int64_t i = 0; i < d.a_in; ++i) {
                const Acc* src = dxp.data() + (i * rows + r) * d.b_in;
                const int64_t k0 = x_at(d, i, 0);
                for (int64_t j = 0; j < d.b_in; ++j) {
                  const Acc v = s * (p.drop.threshold ? keep[r * d.in() + k0 + j] * src[j] : src[j]);
                  dxr[k0 + j] = static_cast<T>((p.accumulate_dx ? static_cast<Acc>(dxr[k0 + j]) : Acc(0)) + v);
                }
              }
            }
          }
          if (x == nullptr) continue;
          gather_x(p.drop, x, d, r0, rows, keep.data(), xp.data());
          const at::Tensor xpt = block_tensor(xp, d.a_in, rows * d.b_in);
          if (p.da != nullptr) da_part[c].addmm_(g2, xpt.t());
          if (p.db != nullptr) {
            at::Tensor ut = block_tensor(u, d.a_out, rows * d.b_in);
            at::mm_out(ut, a, xpt);
            db_part[c].addmm_(dypt.t(), ut.view({d.a_out * rows, d.b_in}));
          }
        }
      });
      // Summing the fixed blocks in order, not per-thread partials, keeps the result independent of threads.
      if (p.da != nullptr) finish(da_part, s, static_cast<T*>(p.da));
      if (p.db != nullptr) finish(db_part, s, static_cast<T*>(p.db));
    });
  }

  static at::Tensor wrap(const void* ptr, at::IntArrayRef sizes, DType dtype) {
    static constexpr at::ScalarType kTypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
    return at::from_blob(const_cast<void*>(ptr), sizes, kTypes[static_cast<int>(dtype)]);
  }

  template <class T, class Acc> static void finish(const at::Tensor& parts, Acc s, T* out) {
    const at::Tensor sum = parts.sum(0).mul_(s).contiguous();
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
