// QLoRA op bodies: the fused LoRA op of lora_op.h over a frozen NF4 base layer (nf4_linear_op.h) instead of a
// dense one, in one op call. Same saved tensors (x while A trains, and x A^T) and the same Philox dropout
// regenerated in backward; the base product is nf4_linear's GEMV (m <= 16) or its tiled workspace GEMM.
// Templated on the two backends it composes: Lora (down, backward) and Nf4 (decode, gemv).
#pragma once
#include "peft_kernels/lora_op.h"
#include "peft_kernels/nf4_linear_op.h"

namespace peft_kernels::qlora {

template <class Nf4> struct Nf4Base {
  const char* op;
  const nf4::Weight& w;
  const std::optional<at::Tensor>& bias;
  at::Tensor forward(const at::Tensor& x2) const { return nf4::linear_forward<Nf4>(op, w, x2, bias); }
  at::Tensor dx(const at::Tensor& dy2) const { return nf4::linear_dx<Nf4>(op, w, dy2); }
};

template <class Lora, class Nf4>
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                                              const std::optional<at::Tensor>& nested_absmax,
                                              const std::optional<at::Tensor>& nested_code,
                                              const std::optional<at::Tensor>& offset, int64_t blocksize,
                                              int64_t out_features, const std::optional<at::Tensor>& bias,
                                              const at::Tensor& a, const at::Tensor& b, double scaling,
                                              double dropout_p, const at::Tensor& seed) {
  constexpr const char* op = "qlora_linear";
  const nf4::Weight w = nf4::check_weight(op, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features);
  check::float_dtype(op, "x", x.scalar_type(), Lora::kFloat64);
  check::same_device(op, "x", x, codes.device());
  const lora::Shapes s{w.out, w.in, lora::check_adapter(op, x, w.out, w.in, a, b, dropout_p)};
  lora::check_bias(op, bias, x, w.out);
  return lora::forward_impl<Lora>(op, x, Nf4Base<Nf4>{op, w, bias}, s, a, b, scaling, dropout_p, seed);
}

template <class Lora, class Nf4>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& dy, const std::optional<at::Tensor>& x, const at::Tensor& codes, const at::Tensor& absmax,
    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
    const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& xa, double scaling, double dropout_p, const at::Tensor& seed, bool need_dx,
    bool need_da, bool need_db, bool need_dbias) {
  constexpr const char* op = "qlora_linear_bwd";
  const nf4::Weight w = nf4::check_weight(op, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features);
  check::float_dtype(op, "dy", dy.scalar_type(), Lora::kFloat64);
  check::same_device(op, "dy", dy, codes.device());
  const lora::Shapes s{w.out, w.in, lora::check_adapter(op, dy, w.out, w.in, a, b, dropout_p)};
  return lora::backward_impl<Lora>(op, dy, x, Nf4Base<Nf4>{op, w, std::nullopt}, s, a, b, xa, scaling, dropout_p,
                                   seed, need_dx, need_da, need_db, need_dbias);
}

}  // namespace peft_kernels::qlora
