// The sparse optimizer step op bodies (masked_adamw_step_, masked_sgd_step_), written once for every backend.
// A Backend provides
//   struct Guard { explicit Guard(at::Device); };
//   static void adamw(const sparse::AdamWParams&);   // csrc/cpu/masked_adamw.cpp or the CUDA launchers
//   static void sgd(const sparse::SGDParams&);
// and this header validates every argument, indices included, before any kernel writes: a bad call raises
// ValueError/TypeError naming the argument and leaves param and state untouched.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "peft_kernels/check.h"
#include "peft_kernels/masked_adamw_params.h"
#include "peft_kernels/philox.h"

namespace peft_kernels::sparse {

// Position of the first entry of `indices` that is out of [0, numel) or not above its predecessor; -1 if none.
template <class I> int64_t first_bad_index(const I* idx, int64_t k, int64_t numel) {
  int64_t prev = -1;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = idx[j];
    if (e <= prev || e >= numel) return j;
    prev = e;
  }
  return -1;
}

// CPU tensors (the CPU and cudasim backends) are checked by one sequential pass over the k indices (~0.1 ms
// for k = 168K). Device tensors go through ATen reductions and one device-to-host copy of the verdict, a
// synchronization per step that keeps a bad index from ever reaching a kernel.
inline int64_t find_bad_index(const at::Tensor& indices, int64_t numel) {
  const int64_t k = indices.numel();
  if (indices.is_cpu()) {
    return indices.scalar_type() == at::kLong ? first_bad_index(indices.data_ptr<int64_t>(), k, numel)
                                              : first_bad_index(indices.data_ptr<int32_t>(), k, numel);
  }
  const at::Tensor e = indices.to(at::kLong);
  at::Tensor bad = (e < 0) | (e >= numel);
  if (k > 1) bad.slice(0, 1).logical_or_(e.slice(0, 1) <= e.slice(0, 0, k - 1));
  const at::Tensor where = bad.nonzero();
  return where.numel() > 0 ? where[0][0].item<int64_t>() : -1;
}

inline void check_indices(const char* op, const at::Tensor& indices, int64_t numel) {
  const int64_t j = find_bad_index(indices, numel);
  if (j < 0) return;
  const int64_t e = indices[j].item<int64_t>();
  TORCH_CHECK_VALUE(e >= 0 && e < numel, op, ": argument 'indices' must hold flat indices into 'param' in [0, ", numel,
                    "), got indices[", j, "] = ", e);
  const int64_t prev = indices[j - 1].item<int64_t>();
  TORCH_CHECK_VALUE(e != prev, op, ": argument 'indices' must not repeat an entry, got indices[", j - 1,
                    "] = indices[", j, "] = ", e);
  TORCH_CHECK_VALUE(false, op, ": argument 'indices' must be sorted in increasing order, got indices[", j - 1, "] = ",
                    prev, " > indices[", j, "] = ", e);
}

inline void check_state(const char* op, const char* arg, const at::Tensor& t, int64_t k, const at::Device& device) {
  check::dtype(op, arg, t, at::kFloat);
  check::numel(op, arg, t, k);
  check::contiguous(op, arg, t);
  check::same_device(op, arg, t, device);
}

// Validates param, grad, indices and master; returns the Selection the kernels read.
inline Selection check_selection(const char* op, const at::Tensor& param, const at::Tensor& grad,
                                 const at::Tensor& indices, const std::optional<at::Tensor>& master) {
  const DType dtype = check::float_dtype(op, "param", param.scalar_type());
  check::contiguous(op, "param", param);
  const at::Device device = param.device();
  check::dtype(op, "grad", grad, param.scalar_type());
  check::contiguous(op, "grad", grad);
  check::same_device(op, "grad", grad, device);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
                   ": argument 'indices' must have dtype torch.int64 or torch.int32, got a ", check::describe(indices));
  TORCH_CHECK_VALUE(indices.dim() == 1, op, ": argument 'indices' must be 1-D flat indices, got a ",
                    check::describe(indices));
  check::contiguous(op, "indices", indices);
  check::same_device(op, "indices", indices, device);
  const int64_t numel = param.numel(), k = indices.numel();
  // A compact grad [k] holds the selected entries' gradients in order. With k == numel both readings coincide:
  // strictly increasing indices in [0, numel) are then 0..numel-1.
  TORCH_CHECK_VALUE(grad.numel() == numel || grad.numel() == k, op, ": argument 'grad' must have param's ", numel,
                    " elements (dense) or one per index (", k, "), got a ", check::describe(grad));
  const bool low_precision = dtype != DType::kFloat32;
  TORCH_CHECK_VALUE(master.has_value() == low_precision, op, ": argument 'master' must be ",
                    low_precision ? "an fp32 copy [k] of the selected entries for a 16-bit param"
                                  : "None for an fp32 param",
                    ", got ", master ? check::describe(*master) : std::string("None"), " with param ",
                    check::describe(param));
  if (master) check_state(op, "master", *master, k, device);
  check_indices(op, indices, numel);
  return Selection{param.data_ptr(), grad.data_ptr(), indices.data_ptr(), master ? master->data_ptr<float>() : nullptr,
                   dtype, indices.scalar_type() == at::kLong, grad.numel() == numel, k};
}

inline void check_range(const char* op, const char* arg, double v, double lo, double hi, bool hi_closed) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= lo && (hi_closed ? v <= hi : v < hi), op, ": argument '", arg,
                    "' must be in [", lo, ", ", hi, hi_closed ? "]" : ")", ", got ", v);
}

inline ChildMask make_child_mask(const char* op, double child_p, int64_t seed, int64_t step) {
  TORCH_CHECK_VALUE(child_p > 0.0 && child_p <= 1.0, op,
                    ": argument 'child_p' (the Child-Tuning_F keep density) must be in (0, 1], got ", child_p);
  const uint32_t threshold = child_p == 1.0 ? 0u : philox::drop_threshold(1.0 - child_p);
  return {static_cast<uint64_t>(seed), static_cast<uint64_t>(step), threshold, static_cast<float>(1.0 / child_p)};
}

inline void check_step(const char* op, int64_t step) {
  TORCH_CHECK_VALUE(step >= 1, op, ": argument 'step' must be >= 1 (the 1-based count of this update), got ", step);
}

// Validates AdamW's hyperparameters and returns torch.optim.AdamW's scalars for this step (shared by the sparse and
// the 8-bit AdamW ops).
inline AdamWScalars adamw_scalars(const char* op, int64_t step, double lr, double beta1, double beta2, double eps,
                                  double weight_decay) {
  check_step(op, step);
  check_range(op, "lr", lr, 0.0, INFINITY, false);
  check_range(op, "beta1", beta1, 0.0, 1.0, false);
  check_range(op, "beta2", beta2, 0.0, 1.0, false);
  check_range(op, "eps", eps, 0.0, INFINITY, false);
  check_range(op, "weight_decay", weight_decay, 0.0, INFINITY, false);
  const double steps = static_cast<double>(step);
  return {static_cast<float>(1.0 - lr * weight_decay),
          static_cast<float>(1.0 - beta1),
          static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2),
          static_cast<float>(std::sqrt(1.0 - std::pow(beta2, steps))),
          static_cast<float>(eps),
          static_cast<float>(-(lr / (1.0 - std::pow(beta1, steps))))};
}

template <class Backend>
void adamw_op(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& exp_avg,
              const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& master, int64_t step, double lr,
              double beta1, double beta2, double eps, double weight_decay, double child_p, int64_t seed) {
  constexpr const char* op = "masked_adamw_step_";
  const AdamWScalars h = adamw_scalars(op, step, lr, beta1, beta2, eps, weight_decay);
  const ChildMask child = make_child_mask(op, child_p, seed, step);
  const int64_t k = indices.numel();
  check_state(op, "exp_avg", exp_avg, k, param.device());
  check_state(op, "exp_avg_sq", exp_avg_sq, k, param.device());
  const Selection sel = check_selection(op, param, grad, indices, master);
  if (k == 0) return;
  typename Backend::Guard guard(param.device());
  Backend::adamw(AdamWParams{sel, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), h, child});
}

template <class Backend>
void sgd_op(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& indices,
            const std::optional<at::Tensor>& momentum_buffer, const std::optional<at::Tensor>& master, int64_t step,
            double lr, double momentum, double weight_decay, double child_p, int64_t seed) {
  constexpr const char* op = "masked_sgd_step_";
  check_step(op, step);
  check_range(op, "lr", lr, 0.0, INFINITY, false);
  check_range(op, "momentum", momentum, 0.0, 1.0, true);
  check_range(op, "weight_decay", weight_decay, 0.0, INFINITY, false);
  const ChildMask child = make_child_mask(op, child_p, seed, step);
  const int64_t k = indices.numel();
  TORCH_CHECK_VALUE(momentum_buffer.has_value() == (momentum != 0.0), op, ": argument 'momentum_buffer' must be ",
                    momentum != 0.0 ? "an fp32 tensor [k] when momentum != 0" : "None when momentum == 0", ", got ",
                    momentum_buffer ? check::describe(*momentum_buffer) : std::string("None"));
  if (momentum_buffer) check_state(op, "momentum_buffer", *momentum_buffer, k, param.device());
  const Selection sel = check_selection(op, param, grad, indices, master);
  if (k == 0) return;
  const SGDScalars h{static_cast<float>(-lr), static_cast<float>(momentum), static_cast<float>(weight_decay), step == 1};
  typename Backend::Guard guard(param.device());
  Backend::sgd(SGDParams{sel, momentum_buffer ? momentum_buffer->data_ptr<float>() : nullptr, h, child});
}

}  // namespace peft_kernels::sparse
