// The fused LoRA op bodies, written once for every backend:
//   y = x W^T + b + scaling * (dropout(x) A^T) B^T,   x [..., in], W [out, in], A [r, in], B [out, r].
// A Backend also declares `static constexpr bool kFloat64` (whether its kernels take fp64: the CPU's do, for
// gradcheck), `kFusedDxa` (whether its backward computes dxa = dy B itself, lora_params.h) and `kWorkspace`
// (whether its backward takes BackwardParams::workspace for dA's split-M partials). The large products
// (x W^T, dy W, with p = 0 the rank-r ones, and dxa unless kFusedDxa) go to the platform BLAS through ATen; the
// rank-r update of y is an in-place GEMM accumulate (beta = 1), so y is written once. With dropout the Backend's
// kernels apply the Philox mask on the fly:
//   Backend::down(DownParams)          xa = (mask * x) A^T / (1 - p)
//   Backend::backward(BackwardParams)  dx += mask * (dxa A) * s, dA = dxa^T (mask * x) * s, in one pass
// so neither the mask nor the dropped x is ever stored. Saved for backward: x (only when A is trainable)
// and xa [..., r].
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "peft_kernels/alloc.h"
#include "peft_kernels/check.h"
#include "peft_kernels/lora_params.h"
#include "peft_kernels/philox.h"

namespace peft_kernels::lora {

struct Shapes {
  int64_t out, in, r;
};

// Validates the adapter (A [r, in], B [out, r]) and dropout_p against the activation's dtype and device.
inline int64_t check_adapter(const char* op, const at::Tensor& activation, int64_t out, int64_t in, const at::Tensor& a,
                             const at::Tensor& b, double dropout_p) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == in && a.size(0) >= 1, op,
                    ": argument 'lora_A' must be [r, in=", in, "] with r >= 1, got a ", check::describe(a));
  const int64_t r = a.size(0);
  TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == out && b.size(1) == r, op, ": argument 'lora_B' must be [out=", out,
                    ", r=", r, "], got a ", check::describe(b));
  for (const auto& [name, t] : {std::pair{"lora_A", &a}, std::pair{"lora_B", &b}}) {
    check::dtype(op, name, *t, activation.scalar_type());
    check::same_device(op, name, *t, activation.device());
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": argument 'dropout_p' must be in [0, 1), got ", dropout_p);
  return r;
}

// Validates the frozen weight and the adapter against the activation's dtype and device; returns the sizes.
inline Shapes check_weights(const char* op, const char* act, const at::Tensor& activation, const at::Tensor& weight,
                            const at::Tensor& a, const at::Tensor& b, double dropout_p, bool allow_f64) {
  check::float_dtype(op, act, activation.scalar_type(), allow_f64);
  // in >= 1 also keeps the row count m = numel / in defined (in = 0 divided by zero: SIGFPE).
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) >= 1, op,
                    ": argument 'weight' must be 2-D [out, in] with out >= 1 and in >= 1, got a ", check::describe(weight));
  check::dtype(op, "weight", weight, activation.scalar_type());
  check::same_device(op, "weight", weight, activation.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  return {out, in, check_adapter(op, activation, out, in, a, b, dropout_p)};
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t out) {
  if (!bias) return;
  check::dtype(op, "bias", *bias, x.scalar_type());
  check::vector(op, "bias", *bias, out);
  check::same_device(op, "bias", *bias, x.device());
}

// The frozen base layer of plain LoRA, through the BLAS. A base layer provides forward(x2 [m, in]) -> x2 W^T + b
// [m, out] and dx(dy2 [m, out]) -> dy2 W [m, in]; QLoRA's (csrc/include/peft_kernels/qlora_op.h) reads an NF4 W.
struct DenseBase {
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  at::Tensor forward(const at::Tensor& x2) const { return bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t()); }
  at::Tensor dx(const at::Tensor& dy2) const { return at::mm(dy2, weight); }
};

inline Dropout make_dropout(const char* op, double p, const at::Tensor& seed, double scaling) {
  TORCH_CHECK_VALUE(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1, op,
                    ": argument 'seed' must be a one-element int64 tensor on the CPU, got a ", check::describe(seed));
  return {static_cast<uint64_t>(seed.item<int64_t>()), philox::dropout_threshold(p), scaling / (1.0 - p)};
}

template <class Backend, class Base>
std::tuple<at::Tensor, at::Tensor> forward_impl(const char* op, const at::Tensor& x, const Base& base, const Shapes& s,
                                                const at::Tensor& a, const at::Tensor& b, double scaling,
                                                double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.in, op, ": argument 'x' must have last dimension in=", s.in,
                    " (the base weight is [", s.out, ", ", s.in, "]), got a ", check::describe(x));
  const int64_t m = x.numel() / s.in;
  const Dropout drop = make_dropout(op, dropout_p, seed, 1.0);
  typename Backend::Guard guard(x.device());
  const NoAutocast no_autocast;
  // Non-contiguous inputs (e.g. a transposed activation) are accepted like nn.Linear accepts them, at the
  // cost of one copy here; the kernels need rows of x to be contiguous.
  const at::Tensor x2 = x.reshape({m, s.in}).contiguous();
  at::Tensor xa;
  if (dropout_p == 0.0) {
    xa = at::mm(x2, a.t());
  } else {
    xa = empty_output({m, s.r}, x.options());
    if (m > 0) {
      Backend::down(DownParams{x2.data_ptr(), a.contiguous().data_ptr(), xa.data_ptr(),
                               check::float_dtype(op, "x", x.scalar_type(), true), m, s.in, static_cast<int>(s.r),
                               drop});
    }
  }
  at::Tensor y = base.forward(x2);
  y.addmm_(xa, b.t(), 1.0, scaling);
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.out;
  auto xa_shape = x.sizes().vec();
  xa_shape.back() = s.r;
  return {y.view(out_shape), xa.view(xa_shape)};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& a,
                                              const at::Tensor& b, double scaling, double dropout_p, const at::Tensor& seed) {
  constexpr const char* op = "lora_linear";
  const Shapes s = check_weights(op, "x", x, weight, a, b, dropout_p, Backend::kFloat64);
  check_bias(op, bias, x, s.out);
  return forward_impl<Backend>(op, x, DenseBase{weight, bias}, s, a, b, scaling, dropout_p, seed);
}

// Gradients the caller asked for; the others come back as empty tensors (shape [0]).
template <class Backend, class Base>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const char* op, const at::Tensor& dy, const std::optional<at::Tensor>& x, const Base& base, const Shapes& s,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& xa, double scaling, double dropout_p,
    const at::Tensor& seed, bool need_dx, bool need_da, bool need_db, bool need_dbias) {
  const int64_t out = s.out, in = s.in;
  TORCH_CHECK_VALUE(dy.dim() >= 1 && dy.size(-1) == out, op, ": argument 'dy' must be [..., out=", out, "], got a ",
                    check::describe(dy));
  const int64_t m = dy.numel() / out;
  const Dropout drop = make_dropout(op, dropout_p, seed, scaling);
  TORCH_CHECK_VALUE(xa.numel() == m * s.r && xa.size(-1) == s.r, op, ": argument 'xa' must be [..., r=", s.r,
                    "] with ", m, " rows like dy, got a ", check::describe(xa));
  TORCH_CHECK_VALUE(!need_da || (x.has_value() && x->numel() == m * in), op,
                    ": argument 'x' (saved input) must have ", m, " rows of in=", in, " when lora_A needs a gradient");
  typename Backend::Guard guard(dy.device());
  const NoAutocast no_autocast;
  const auto empty = [&] { return at::empty({0}, dy.options()); };
  const at::Tensor dy2 = dy.reshape({m, out}).contiguous();
  const at::Tensor xa2 = xa.reshape({m, s.r});
  at::Tensor dx = empty(), da = empty(), db = empty(), dbias = empty();
  // dB as (xa^T dy)^T: MKL runs the [r, out] orientation faster here in every case measured (2 threads, 2048 x 1024,
  // r = 16: fp32 1.07 -> 0.73 ms, bf16 0.32 -> 0.27 ms; 320 x 576, r = 8: fp32 111 -> 47 us); the transposing copy
  // touches out * r values. The other rank-r products showed no orientation better for every shape and dtype.
  if (need_db) db = at::mm(xa2.t(), dy2).mul_(scaling).t().contiguous();
  if (need_dbias) dbias = dy2.sum(0);
  if (!need_dx && !need_da) return {dx, da, db, dbias};
  // dxa = dy B [m, r]; the LoRA scaling is applied by the consumers below. With dropout a kFusedDxa backend
  // computes it inside its kernel.
  const bool fused_dxa = Backend::kFusedDxa && dropout_p != 0.0;
  const at::Tensor dxa = fused_dxa ? at::Tensor() : at::mm(dy2, b);
  const at::Tensor x2 = need_da ? x->reshape({m, in}).contiguous() : at::Tensor();
  const at::Tensor b2 = fused_dxa ? b.contiguous() : at::Tensor();
  if (need_dx) dx = base.dx(dy2);
  if (dropout_p == 0.0) {
    if (need_dx) dx.addmm_(dxa, a, 1.0, scaling);
    if (need_da) da = at::mm(dxa.t(), x2).mul_(scaling);
  } else {
    if (need_da) da = empty_output({s.r, in}, dy.options());
    if (m > 0) {
      const DType dtype = check::float_dtype(op, "dy", dy.scalar_type(), true);
      // The GPU's split-M partials of dA (lora_params.h); the CPU needs none.
      const int64_t ws_numel = Backend::kWorkspace && need_da ? backward_workspace(m, in, static_cast<int>(s.r), dtype) : 0;
      const at::Tensor ws = ws_numel > 0 ? at::empty({ws_numel}, dy.options().dtype(at::kFloat)) : at::Tensor();
      Backend::backward(BackwardParams{need_da ? x2.data_ptr() : nullptr, a.contiguous().data_ptr(),
                                       fused_dxa ? nullptr : dxa.data_ptr(), need_dx ? dx.data_ptr() : nullptr,
                                       need_da ? da.data_ptr() : nullptr, dtype, m, in, static_cast<int>(s.r), drop,
                                       dy2.data_ptr(), fused_dxa ? b2.data_ptr() : nullptr, out,
                                       ws.defined() ? ws.data_ptr<float>() : nullptr});
    } else if (need_da) {
      da.zero_();
    }
  }
  if (need_dx) {
    auto shape = dy.sizes().vec();
    shape.back() = in;
    dx = dx.view(shape);
  }
  return {dx, da, db, dbias};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dy, const std::optional<at::Tensor>& x, const at::Tensor& weight, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed, bool need_dx,
    bool need_da, bool need_db, bool need_dbias) {
  constexpr const char* op = "lora_linear_bwd";
  const Shapes s = check_weights(op, "dy", dy, weight, a, b, dropout_p, Backend::kFloat64);
  return backward_impl<Backend>(op, dy, x, DenseBase{weight, std::nullopt}, s, a, b, xa, scaling, dropout_p, seed,
                                need_dx, need_da, need_db, need_dbias);
}

}  // namespace peft_kernels::lora
