// The per-entry math of the sparse optimizer steps, shared by the CPU loops and the CUDA kernels (and so by
// the cudasim build). Each update follows torch's single-tensor AdamW / SGD on the CPU operation by operation
// and rounding by rounding. One exception: torch's fp32 CPU sqrt is not correctly rounded (AVX-512 kernels,
// torch 2.14.1: 19,661 of 100,013 random values differ from the correctly rounded root by an ulp), so we
// keep IEEE sqrtf, which every backend computes alike. Our AdamW then matches peft_kernels.reference (which
// takes a correctly rounded root) bit for bit and torch.optim.AdamW within a few ulps over 50 steps; SGD
// matches torch.optim.SGD bit for bit (python_tests/test_masked_adamw.py).
#pragma once
#include <cmath>
#include <cstdint>

#include "peft_kernels/hd.h"
#include "peft_kernels/masked_adamw_params.h"
#include "peft_kernels/philox.h"

namespace peft_kernels::sparse {

// The factor Child-Tuning_F applies to element e's gradient: 1/p or 0 by its Bernoulli draw, 1 without a mask.
PK_HD float child_scale(const ChildMask& c, int64_t e) {
  if (c.threshold == 0) return 1.0f;
  return philox::element(c.seed, static_cast<uint64_t>(e), c.step) >= c.threshold ? c.inv_p : 0.0f;
}

// torch: param.mul_(1 - lr*wd); exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad,
// value=1 - beta2); denom = exp_avg_sq.sqrt() / bc2_sqrt + eps; param.addcdiv_(exp_avg, denom, value=-step_size).
// Which of torch's CPU kernels fuse a multiply-add was measured on 100,013 random fp32 values (torch 2.14.1,
// AVX-512 host): lerp is fma(w, end - self, self) for w < 0.5 (else fma(w - 1, end - self, end)), addcmul is
// fma(value * t1, t2, self), addcdiv is self + (value * t1) / t2 unfused, add(alpha) is fma(alpha, other, self);
// any other choice differed from torch in 2-11% of the elements. fmaf, mul_rn and add_rn pin each rounding for
// nvcc too, which would otherwise contract products into adds wherever it can.
PK_HD void adamw_update(float& p, float& m, float& v, float g, const AdamWScalars& h) {
  p = mul_rn(p, h.decay);
  const float w = h.one_minus_beta1;
  m = w < 0.5f ? fmaf(w, g - m, m) : fmaf(w - 1.0f, g - m, g);
  v = fmaf(mul_rn(h.one_minus_beta2, g), g, mul_rn(v, h.beta2));
  const float denom = add_rn(sqrtf(v) / h.bc2_sqrt, h.eps);
  p = add_rn(p, mul_rn(h.neg_step_size, m) / denom);
}

// torch: grad = grad.add(param, alpha=wd) (skipped for wd = 0, as torch does); buf = clone(grad) at the first
// step, else buf.mul_(momentum).add_(grad); param.add_(buf, alpha=-lr).
PK_HD void sgd_update(float& p, float* buf, float g, const SGDScalars& h) {
  if (h.weight_decay != 0.0f) g = fmaf(h.weight_decay, p, g);
  if (buf != nullptr) {
    *buf = h.first_step ? g : add_rn(mul_rn(*buf, h.momentum), g);
    g = *buf;
  }
  p = fmaf(h.neg_lr, g, p);
}

}  // namespace peft_kernels::sparse
