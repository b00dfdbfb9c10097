// Torch-free parameter blocks of the sparse optimizer steps (csrc/cpu/masked_adamw.cpp and
// csrc/cuda/masked_adamw.cu): AdamW and SGD applied to k selected entries of a parameter, addressed by sorted
// flat indices. Optimizer state is fp32 and has length k: it scales with the selection, not the parameter.
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"

namespace peft_kernels::sparse {

// Child-Tuning_F's gradient mask (Xu et al. 2021): at step `step`, element e of the parameter keeps its
// gradient, scaled by 1/p, when its Philox draw (key seed, counter (e >> 2, step)) is >= threshold; otherwise
// its gradient is 0. threshold = 0 means p = 1: no mask, no draw.
struct ChildMask {
  uint64_t seed;
  uint64_t step;
  uint32_t threshold;
  float inv_p;
};

// The selected entries: j = 0..k-1 updates param[indices[j]] (indices strictly increasing, in range: the op
// bodies check this before any kernel runs). grad is dense (read at indices[j]) or compact (read at j).
// master: fp32 [k] copy of the selected entries for fp16/bf16 params (the update is computed on it and
// rounded to nearest into param), null for fp32 params.
struct Selection {
  void* param;
  const void* grad;
  const void* indices;
  float* master;
  DType dtype;
  bool indices64;
  bool grad_dense;
  int64_t k;
};

// torch.optim.AdamW's scalars for one step, computed in double on the host and rounded once to fp32, as
// torch's single-tensor AdamW passes them to its fp32 tensor ops.
struct AdamWScalars {
  float decay;            // 1 - lr * weight_decay
  float one_minus_beta1;  // lerp weight of the first moment
  float beta2, one_minus_beta2;
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
};

struct AdamWParams {
  Selection sel;
  float* exp_avg;     // [k]
  float* exp_avg_sq;  // [k]
  AdamWScalars h;
  ChildMask child;
};

// torch.optim.SGD without dampening or Nesterov: g += weight_decay * p; with momentum, buf = g at the first
// step, else buf = momentum * buf + g; p -= lr * buf.
struct SGDScalars {
  float neg_lr;
  float momentum;
  float weight_decay;
  bool first_step;
};

struct SGDParams {
  Selection sel;
  float* momentum_buffer;  // [k], null when momentum == 0
  SGDScalars h;
  ChildMask child;
};

}  // namespace peft_kernels::sparse
