// The 8-bit AdamW step op body (adamw8bit_step_), written once for every backend. A Backend provides
//   struct Guard { explicit Guard(at::Device); };
//   static void step(const adamw8bit::Params&);   // csrc/cpu/adamw8bit.cpp or the CUDA launcher
// and this header validates every argument before any kernel writes: a bad call raises ValueError/TypeError
// naming the argument and leaves param and state untouched.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#include "peft_kernels/adamw8bit_params.h"
#include "peft_kernels/check.h"
#include "peft_kernels/masked_adamw_op.h"

namespace peft_kernels::adamw8bit {

inline void check_codes(const char* op, const char* arg, const at::Tensor& t, int64_t n, const at::Device& device) {
  check::dtype(op, arg, t, at::kByte);
  check::numel(op, arg, t, n);
  check::contiguous(op, arg, t);
  check::same_device(op, arg, t, device);
}

inline void check_map(const char* op, const char* arg, const at::Tensor& t, const at::Device& device) {
  check::dtype(op, arg, t, at::kFloat);
  check::numel(op, arg, t, kMapSize);
  check::contiguous(op, arg, t);
  check::same_device(op, arg, t, device);
}

template <class Backend>
void step_op(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_absmax,
             const at::Tensor& exp_avg_sq, const at::Tensor& exp_avg_sq_absmax, const at::Tensor& signed_map,
             const at::Tensor& unsigned_map, int64_t step, double lr, double beta1, double beta2, double eps,
             double weight_decay) {
  constexpr const char* op = "adamw8bit_step_";
  const sparse::AdamWScalars h = sparse::adamw_scalars(op, step, lr, beta1, beta2, eps, weight_decay);
  const DType dtype = check::float_dtype(op, "param", param.scalar_type());
  check::contiguous(op, "param", param);
  const at::Device device = param.device();
  const int64_t n = param.numel();
  check::dtype(op, "grad", grad, param.scalar_type());
  check::numel(op, "grad", grad, n);
  check::contiguous(op, "grad", grad);
  check::same_device(op, "grad", grad, device);
  check_codes(op, "exp_avg", exp_avg, n, device);
  check_codes(op, "exp_avg_sq", exp_avg_sq, n, device);
  sparse::check_state(op, "exp_avg_absmax", exp_avg_absmax, blocks(n), device);
  sparse::check_state(op, "exp_avg_sq_absmax", exp_avg_sq_absmax, blocks(n), device);
  check_map(op, "signed_map", signed_map, device);
  check_map(op, "unsigned_map", unsigned_map, device);
  if (n == 0) return;
  typename Backend::Guard guard(device);
  Backend::step(Params{param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr<uint8_t>(), exp_avg_absmax.data_ptr<float>(),
                       exp_avg_sq.data_ptr<uint8_t>(), exp_avg_sq_absmax.data_ptr<float>(),
                       signed_map.data_ptr<float>(), unsigned_map.data_ptr<float>(), n, dtype, h});
}

}  // namespace peft_kernels::adamw8bit
