// The NF4 linear op bodies, written once for every backend: y = x W^T + b with W the packed NF4 weight
// [out, in] (bitsandbytes' layout, any blocksize, with or without double quantization), and its input
// gradient dx = dy W. W never gets a gradient. A Backend provides, beyond nf4_op.h's,
//   static constexpr bool kFloat64;                 // whether its kernels take fp64 (the CPU's do, for gradcheck)
//   static void gemv(const nf4::GemvParams&);       // m <= kGemvMaxRows: one streaming pass over the packed weight
// and may provide kernels that multiply by the packed weight directly (CUDA: tensor cores), each returning
// false, having done nothing, for a call it does not take (dtype, alignment, shape):
//   static bool gemm(const nf4::GemmParams&);       // m > kGemmMinRows
//   static bool dx(const nf4::DxParams&);           // any m
// Larger m (training, prefill) decodes W in row tiles into one workspace of at most workspace_bytes() and
// multiplies each tile through the platform BLAS: no full-precision copy of the weight is kept, and the peak
// extra memory is min(W in x's dtype, workspace_bytes()) plus two NF4 blocks. A Backend may provide
//   static at::Tensor workspace(int64_t numel, const at::TensorOptions&);   // the workspace, reused across calls
// (the CPU's: one per calling thread, kept); otherwise each call allocates it (CUDA: the caching allocator).
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <optional>

#include "peft_kernels/nf4_op.h"

namespace peft_kernels::nf4 {

// 32 MiB: a 4096x4096 bf16 weight decodes in one tile and a 11008x4096 one in three, so every BLAS call keeps
// >= 4096 rows; the bf16 copy of all of a 7B model's linear weights (13 GB) is what it stands in for.
// PEFT_KERNELS_NF4_WORKSPACE_BYTES overrides it (the tests force many block-unaligned tiles with a few bytes).
inline int64_t workspace_bytes() {
  const char* env = std::getenv("PEFT_KERNELS_NF4_WORKSPACE_BYTES");
  return env != nullptr ? std::max<long long>(1, std::atoll(env)) : int64_t(32) << 20;
}

struct Weight {
  Packed w;
  int64_t out, in;
};

inline Weight check_weight(const char* op, const at::Tensor& codes, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features) {
  const auto [w, n] = check_packed(op, codes, absmax, nested_absmax, nested_code, offset, blocksize);
  TORCH_CHECK_VALUE(out_features >= 1 && n % out_features == 0, op, ": argument 'out_features' must divide the ",
                    n, " weight elements, got ", out_features);
  return {w, out_features, n / out_features};
}

// Calls f(n0, n1, tile) for row tiles [n0, n1) of W, tile = W[n0:n1] [n1 - n0, in] decoded to `dtype`; tiles
// reuse one workspace (stream order keeps that safe on CUDA). A tile starts mid-block when in is not a
// multiple of blocksize: whole blocks are decoded and the tile is a view at the right offset.
template <class Backend, class F>
void for_each_tile(const Weight& w, DType dtype, const at::TensorOptions& opts, F&& f) {
  const int64_t bs = w.w.blocksize;
  const int64_t row_bytes = w.in * static_cast<int64_t>(opts.dtype().itemsize());
  const int64_t rows = std::min(w.out, std::max<int64_t>(1, workspace_bytes() / row_bytes));
  at::Tensor ws;
  if constexpr (requires { Backend::workspace(int64_t{}, opts); }) {
    ws = Backend::workspace(rows * w.in + 2 * bs, opts);
  } else {
    ws = at::empty({rows * w.in + 2 * bs}, opts);
  }
  for (int64_t n0 = 0; n0 < w.out; n0 += rows) {
    const int64_t n1 = std::min(w.out, n0 + rows);
    const int64_t b0 = n0 * w.in / bs, b1 = (n1 * w.in + bs - 1) / bs;
    Backend::decode(DecodeParams{w.w, b0, ws.data_ptr(), dtype, (b1 - b0) * bs});
    f(n0, n1, ws.narrow(0, n0 * w.in - b0 * bs, (n1 - n0) * w.in).view({n1 - n0, w.in}));
  }
}

// y [m, out] = x2 [m, in] W^T (+ bias); x2 contiguous.
template <class Backend>
at::Tensor linear_forward(const char* op, const Weight& w, const at::Tensor& x2, const std::optional<at::Tensor>& bias) {
  const DType dtype = check::float_dtype(op, "x", x2.scalar_type(), Backend::kFloat64);
  const int64_t m = x2.size(0);
  at::Tensor y = empty_output({m, w.out}, x2.options());
  if (m == 0) return y;
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  const GemvParams p{w.w, x2.data_ptr(), bias ? b.data_ptr() : nullptr, y.data_ptr(), dtype, m, w.in, w.out};
  if constexpr (requires { Backend::gemm(p); }) {
    if (m > kGemmMinRows && Backend::gemm(p)) return y;
  }
  if (m <= kGemvMaxRows) {
    Backend::gemv(p);
    return y;
  }
  for_each_tile<Backend>(w, dtype, x2.options(), [&](int64_t n0, int64_t n1, const at::Tensor& tile) {
    at::Tensor cols = y.narrow(1, n0, n1 - n0);
    if (bias) {
      at::addmm_out(cols, b.narrow(0, n0, n1 - n0), x2, tile.t());
    } else {
      at::mm_out(cols, x2, tile.t());
    }
  });
  return y;
}

// dx [m, in] = dy2 [m, out] W: the tiles split the reduction over out, so with several tiles a 16-bit dx
// would be rounded once per tile; their partial products are summed in fp32 instead (extra m x in x 6 bytes,
// only when the weight takes more than one tile: a bf16 4096x4096 weight does not).
template <class Backend> at::Tensor linear_dx(const char* op, const Weight& w, const at::Tensor& dy2) {
  const DType dtype = check::float_dtype(op, "dy", dy2.scalar_type(), Backend::kFloat64);
  const int64_t m = dy2.size(0);
  at::Tensor dx = empty_output({m, w.in}, dy2.options());
  if (m == 0) return dx;
  if constexpr (requires { Backend::dx(DxParams{}); }) {
    if (Backend::dx(DxParams{w.w, dy2.data_ptr(), dx.data_ptr(), dtype, m, w.in, w.out})) return dx;
  }
  const bool wide = dtype == DType::kFloat32 || dtype == DType::kFloat64;
  at::Tensor acc;
  for_each_tile<Backend>(w, dtype, dy2.options(), [&](int64_t n0, int64_t n1, const at::Tensor& tile) {
    const at::Tensor g = dy2.narrow(1, n0, n1 - n0);
    if (n0 == 0) {
      at::mm_out(dx, g, tile);
    } else if (wide) {
      dx.addmm_(g, tile);
    } else {
      if (!acc.defined()) acc = dx.to(at::kFloat);
      acc.add_(at::mm(g, tile));
    }
  });
  if (acc.defined()) dx.copy_(acc);
  return dx;
}

template <class Backend>
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                     const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "nf4_linear";
  const Weight w = check_weight(op, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == w.in, op, ": argument 'x' must be [..., in=", w.in, "] (the weight is [",
                    w.out, ", ", w.in, "]), got a ", check::describe(x));
  check::same_device(op, "x", x, codes.device());
  if (bias) {
    check::dtype(op, "bias", *bias, x.scalar_type());
    check::vector(op, "bias", *bias, w.out);
    check::same_device(op, "bias", *bias, x.device());
  }
  typename Backend::Guard guard(x.device());
  const NoAutocast no_autocast;
  const at::Tensor y = linear_forward<Backend>(op, w, x.reshape({-1, w.in}).contiguous(), bias);
  auto shape = x.sizes().vec();
  shape.back() = w.out;
  return y.view(shape);
}

template <class Backend>
at::Tensor linear_dx_op(const at::Tensor& dy, const at::Tensor& codes, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                        const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features) {
  constexpr const char* op = "nf4_linear_dx";
  const Weight w = check_weight(op, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features);
  TORCH_CHECK_VALUE(dy.dim() >= 1 && dy.size(-1) == w.out, op, ": argument 'dy' must be [..., out=", w.out,
                    "], got a ", check::describe(dy));
  check::same_device(op, "dy", dy, codes.device());
  typename Backend::Guard guard(dy.device());
  const NoAutocast no_autocast;
  const at::Tensor dx = linear_dx<Backend>(op, w, dy.reshape({-1, w.out}).contiguous());
  auto shape = dy.sizes().vec();
  shape.back() = w.in;
  return dx.view(shape);
}

}  // namespace peft_kernels::nf4
