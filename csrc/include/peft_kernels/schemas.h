// Every op schema of the library, declared once. csrc/registration.cpp defines them in the `peft_kernels`
// namespace; the cudasim test build (csrc/sim/registration.cpp) defines the same schemas in
// `peft_kernels_sim`, whose CPU kernels are the CUDA kernel sources run through the CPU executor.
#pragma once
#include <torch/library.h>

namespace peft_kernels {

inline void define_schemas(torch::Library& m) {
  // weight (any shape, numel % blocksize == 0) -> codes uint8 [numel/2], absmax, nested_absmax fp32, offset
  // fp32 []. Without nested_code: absmax fp32 [numel/blocksize], nested_absmax [0], offset 0. With it
  // (double quantization): absmax uint8 [numel/blocksize], nested_absmax fp32 [ceil(numel/blocksize/256)].
  m.def("nf4_quantize(Tensor weight, int blocksize, Tensor? nested_code) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> out [numel] of `dtype`, numel = 2 * codes.numel(); the nested_* and offset arguments are given
  // together (absmax uint8) or not at all (absmax fp32).
  m.def(
      "nf4_dequantize(Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int blocksize, ScalarType dtype) -> Tensor");
  // x [..., in] (fp32/fp16/bf16), the packed NF4 weight [out_features, in] as nf4_dequantize takes it, bias
  // [out] of x's dtype -> y [..., out] = x W^T + bias. No gradient to the weight.
  m.def(
      "nf4_linear(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int blocksize, int out_features, Tensor? bias) -> Tensor");
  // dy [..., out] -> dx [..., in] = dy W (nf4_linear's input gradient).
  m.def(
      "nf4_linear_dx(Tensor dy, Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int out_features) -> Tensor");
  // x [..., in], weight [out, in], bias [out], lora_A [r, in], lora_B [out, r] -> y [..., out], xa [..., r]:
  // y = x weight^T + bias + scaling * xa lora_B^T with xa = dropout(x) lora_A^T. seed: int64 [] on the CPU
  // (a tensor, so a module can draw a fresh one per step inside a compiled graph), keying the Philox mask.
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  // -> (dx [..., in], d lora_A [r, in], d lora_B [out, r], d bias [out]); an output not asked for is empty.
  m.def(
      "lora_linear_bwd(Tensor dy, Tensor? x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, "
      "float dropout_p, Tensor seed, bool need_dx, bool need_dA, bool need_dB, bool need_dbias) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // lora_linear over a frozen NF4 base weight [out_features, in] (given as nf4_linear takes it): same outputs,
  // saved tensors and dropout rules.
  m.def(
      "qlora_linear_fwd(Tensor x, Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int out_features, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  m.def(
      "qlora_linear_bwd(Tensor dy, Tensor? x, Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, int out_features, Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, "
      "float dropout_p, Tensor seed, bool need_dx, bool need_dA, bool need_dB, bool need_dbias) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // x [..., in], weight [out, in] or None (frozen), bias [out] or None, A [a_out, a_in], B [b_out, b_in] with
  // in = a_in * b_in, out = a_out * b_out -> y [..., out] = x weight^T + bias + scaling * dropout(x) (A ⊗ B)^T,
  // A ⊗ B never formed. seed keys the Philox mask as for lora_linear_fwd.
  m.def(
      "kron_linear_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor A, Tensor B, float scaling, float dropout_p, "
      "Tensor seed) -> Tensor");
  // -> (dx [..., in], dA [a_out, a_in], dB [b_out, b_in], d bias [out]); an output not asked for is empty. x (the
  // saved input) is needed only for dA and dB.
  m.def(
      "kron_linear_bwd(Tensor dy, Tensor? x, Tensor? weight, Tensor A, Tensor B, float scaling, float dropout_p, "
      "Tensor seed, bool need_dx, bool need_dA, bool need_dB, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)");
  // One AdamW step (torch.optim.AdamW's math) on the k entries of param at `indices` (strictly increasing flat
  // int32/int64 indices [k]), in place: param [any shape], grad dense (param's numel) or compact [k] of param's
  // dtype, exp_avg and exp_avg_sq fp32 [k], master fp32 [k] for a bf16/fp16 param (None for fp32). step >= 1
  // counts this update (bias correction). child_p < 1 applies Child-Tuning_F's gradient mask: Bernoulli(child_p)
  // per element from Philox (seed, step, element), kept gradients scaled by 1/child_p.
  m.def(
      "masked_adamw_step_(Tensor(a!) param, Tensor grad, Tensor indices, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? master, int step, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float child_p, int seed) -> ()");
  // One SGD step (torch.optim.SGD without dampening / Nesterov) on the same selection; momentum_buffer fp32 [k]
  // when momentum != 0, else None.
  m.def(
      "masked_sgd_step_(Tensor(a!) param, Tensor grad, Tensor indices, Tensor(b!)? momentum_buffer, "
      "Tensor(c!)? master, int step, float lr, float momentum, float weight_decay, float child_p, int seed) -> ()");
  // One torch.optim.AdamW step of a whole parameter with 8-bit moments, in place (adamw8bit_params.h has the
  // layout): param [any shape, n elements] fp32/bf16/fp16 and its grad; exp_avg, exp_avg_sq uint8 [n] codes into
  // signed_map / unsigned_map (fp32 [256], sorted); exp_avg_absmax, exp_avg_sq_absmax fp32 [ceil(n / 256)].
  m.def(
      "adamw8bit_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_absmax, "
      "Tensor(d!) exp_avg_sq, Tensor(e!) exp_avg_sq_absmax, Tensor signed_map, Tensor unsigned_map, int step, "
      "float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
}

}  // namespace peft_kernels
