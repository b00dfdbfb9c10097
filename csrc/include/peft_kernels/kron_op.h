// The kron_linear op bodies, written once for every backend:
//   y = x W^T + b + scaling * dropout(x) (A ⊗ B)^T,   x [..., in], A [a_out, a_in], B [b_out, b_in],
// in = a_in * b_in, out = a_out * b_out; W [out, in] (frozen) and b [out] are optional, so the same op is the
// bare Kronecker product (no W) and the fused KronA adapter layer. A ⊗ B is never formed: the Backend's
// kernels run the two small contractions of kron.h per row, with the Philox mask applied on the fly:
//   Backend::forward(ForwardParams)    y (+)= scaling / (1 - p) * vec(A (keep * X) B^T)
//   Backend::backward(BackwardParams)  dx (+)= ..., dA, dB in one call (kron_params.h)
// The frozen x W^T and dy W go to the platform BLAS through ATen and the kernels add into their results, so y
// and dx are rounded once. Saved for backward: x only (and only when A or B trains); the mask is redrawn.
// A Backend declares `Guard`, `kFloat64` (fp64 kernels, for gradcheck on the CPU) and `kWorkspace` (whether its
// kernels need the fp32 workspace of kron_params.h).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "peft_kernels/alloc.h"
#include "peft_kernels/check.h"
#include "peft_kernels/kron_params.h"
#include "peft_kernels/lora_op.h"

namespace peft_kernels::kron {

// Validates the factors, the optional frozen weight and bias, and dropout against `activation`: x in forward
// (last_is_in: its last dimension must be in = a_in * b_in) or dy in backward (out = a_out * b_out). Returns the
// factor sizes.
inline Dims check_factors(const char* op, const char* act, const at::Tensor& activation, bool last_is_in,
                          const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& a, const at::Tensor& b, double dropout_p, bool allow_f64) {
  check::float_dtype(op, act, activation.scalar_type(), allow_f64);
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) >= 1 && a.size(1) >= 1, op,
                    ": argument 'A' must be a non-empty 2-D factor [a_out, a_in], got a ", check::describe(a));
  TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) >= 1 && b.size(1) >= 1, op,
                    ": argument 'B' must be a non-empty 2-D factor [b_out, b_in], got a ", check::describe(b));
  const Dims d{a.size(0), a.size(1), b.size(0), b.size(1)};
  const int64_t last = last_is_in ? d.in() : d.out();
  TORCH_CHECK_VALUE(activation.dim() >= 1 && activation.size(-1) == last, op, ": argument '", act,
                    "' must have last dimension ", last_is_in ? "in = a_in * b_in = " : "out = a_out * b_out = ",
                    last_is_in ? d.a_in : d.a_out, " * ", last_is_in ? d.b_in : d.b_out, " = ", last, " (A is ",
                    a.sizes(), ", B is ", b.sizes(), "), got a ", check::describe(activation));
  if (weight) {
    TORCH_CHECK_VALUE(weight->dim() == 2 && weight->size(0) == d.out() && weight->size(1) == d.in(), op,
                      ": argument 'weight' must be [out = a_out * b_out = ", d.out(), ", in = a_in * b_in = ", d.in(),
                      "] for A ", a.sizes(), " and B ", b.sizes(), ", got a ", check::describe(*weight));
  }
  if (bias) check::numel(op, "bias", *bias, d.out());
  for (const auto& [name, t] : {std::pair{"A", &a}, std::pair{"B", &b}}) {
    check::dtype(op, name, *t, activation.scalar_type());
    check::same_device(op, name, *t, activation.device());
  }
  for (const auto& [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (*t) {
      check::dtype(op, name, **t, activation.scalar_type());
      check::same_device(op, name, **t, activation.device());
    }
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": argument 'dropout_p' must be in [0, 1), got ", dropout_p);
  return d;
}

template <class Backend>
at::Tensor forward_op(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& a, const at::Tensor& b, double scaling, double dropout_p, const at::Tensor& seed) {
  constexpr const char* op = "kron_linear";
  const Dims d = check_factors(op, "x", x, true, weight, bias, a, b, dropout_p, Backend::kFloat64);
  const Dropout drop = lora::make_dropout(op, dropout_p, seed, scaling);
  const int64_t m = x.numel() / d.in();
  typename Backend::Guard guard(x.device());
  const NoAutocast no_autocast;
  // Rows of x must be contiguous for the kernels; a strided x costs one copy here, as for lora_linear.
  const at::Tensor x2 = x.reshape({m, d.in()}).contiguous();
  at::Tensor y;
  if (weight) {
    y = bias ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
  } else if (bias) {
    y = bias->expand({m, d.out()}).contiguous();
  } else {
    y = empty_output({m, d.out()}, x.options());
  }
  if (m > 0) {
    const at::Tensor a2 = a.contiguous(), b2 = b.contiguous();
    const DType dtype = check::float_dtype(op, "x", x.scalar_type(), true);
    const at::Tensor ws =
        Backend::kWorkspace ? at::empty({forward_workspace(m, d, dtype)}, x.options().dtype(at::kFloat)) : at::Tensor();
    Backend::forward(ForwardParams{x2.data_ptr(), a2.data_ptr(), b2.data_ptr(), y.data_ptr(), weight || bias, dtype, m,
                                   d, drop, ws.defined() ? ws.data_ptr<float>() : nullptr});
  }
  auto shape = x.sizes().vec();
  shape.back() = d.out();
  return y.view(shape);
}

// Gradients the caller asked for; the others come back as empty tensors (shape [0]).
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dy, const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
    const at::Tensor& a, const at::Tensor& b, double scaling, double dropout_p, const at::Tensor& seed, bool need_dx,
    bool need_da, bool need_db, bool need_dbias) {
  constexpr const char* op = "kron_linear_bwd";
  const Dims d = check_factors(op, "dy", dy, false, weight, std::nullopt, a, b, dropout_p, Backend::kFloat64);
  const Dropout drop = lora::make_dropout(op, dropout_p, seed, scaling);
  const int64_t m = dy.numel() / d.out();
  const bool need_x = need_da || need_db;
  TORCH_CHECK_VALUE(!need_x || (x.has_value() && x->numel() == m * d.in() && x->size(-1) == d.in()), op,
                    ": argument 'x' (saved input) must have ", m, " rows of in = ", d.in(),
                    " when A or B needs a gradient, got ", x ? check::describe(*x) : std::string("None"));
  if (need_x) {
    check::dtype(op, "x", *x, dy.scalar_type());
    check::same_device(op, "x", *x, dy.device());
  }
  typename Backend::Guard guard(dy.device());
  const NoAutocast no_autocast;
  const auto empty = [&] { return at::empty({0}, dy.options()); };
  const at::Tensor dy2 = dy.reshape({m, d.out()}).contiguous();
  at::Tensor dx = empty(), da = empty(), db = empty(), dbias = empty();
  if (need_dbias) dbias = dy2.sum(0);
  if (need_dx) dx = weight ? at::mm(dy2, *weight) : empty_output({m, d.in()}, dy.options());
  if (need_da) da = empty_output({d.a_out, d.a_in}, dy.options());
  if (need_db) db = empty_output({d.b_out, d.b_in}, dy.options());
  if (m == 0) {
    if (need_da) da.zero_();
    if (need_db) db.zero_();
  } else if (need_dx || need_x) {
    const at::Tensor x2 = need_x ? x->reshape({m, d.in()}).contiguous() : at::Tensor();
    const at::Tensor a2 = a.contiguous(), b2 = b.contiguous();
    const DType dtype = check::float_dtype(op, "dy", dy.scalar_type(), true);
    const at::Tensor ws = Backend::kWorkspace
                              ? at::empty({backward_workspace(m, d, dtype, need_x)}, dy.options().dtype(at::kFloat))
                              : at::Tensor();
    Backend::backward(BackwardParams{dy2.data_ptr(), need_x ? x2.data_ptr() : nullptr, a2.data_ptr(), b2.data_ptr(),
                                     need_dx ? dx.data_ptr() : nullptr, need_da ? da.data_ptr() : nullptr,
                                     need_db ? db.data_ptr() : nullptr, weight.has_value(), dtype, m, d, drop,
                                     ws.defined() ? ws.data_ptr<float>() : nullptr});
  }
  if (need_dx) {
    auto shape = dy.sizes().vec();
    shape.back() = d.in();
    dx = dx.view(shape);
  }
  return {dx, da, db, dbias};
}

}  // namespace peft_kernels::kron
