// Torch-free parameter blocks of the kron_linear kernels (csrc/cpu/kron_linear.cpp, csrc/cuda/kron_linear.cu).
// All matrices are row-major and contiguous: x [m, in], y and dy [m, out], A [a_out, a_in], B [b_out, b_in]
// (index maps in kron.h). Dropout is LoRA's: element e = row * in + col of x is kept when its 16-bit Philox
// draw (philox::dropout_draw) is >= drop.threshold (threshold 0: no dropout, and no draw is made); drop.scale
// folds in scaling / (1 - p).
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"
#include "peft_kernels/kron.h"
#include "peft_kernels/lora_params.h"

namespace peft_kernels::kron {

using lora::Dropout;

// y[r] = (accumulate ? y[r] : 0) + s * vec(A (keep * X_r) B^T), s = drop.scale, one rounding to dtype.
struct ForwardParams {
  const void* x;
  const void* a;
  const void* b;
  void* y;
  bool accumulate;  // y already holds x W^T + bias (the frozen base layer, computed by the BLAS)
  DType dtype;
  int64_t m;
  Dims d;
  Dropout drop;
  float* workspace;  // GPU kernels only: fp32 [m * d.mid()] for U; null for the CPU
};

// With s = drop.scale, per row r (keep_r the row's mask, X_r = x[r] viewed [a_in, b_in]):
//   dx[r] = (accumulate_dx ? dx[r] : 0) + s * keep_r * vec(A^T dY_r B)              if dx is not null
//   dA    = s * sum_r (dY_r B) (keep_r * X_r)^T                                      if da is not null
//   dB    = s * sum_r dY_r^T A (keep_r * X_r)                                        if db is not null
// dx, dA, dB are written in dtype (each element once); x may be null when neither dA nor dB is asked for.
struct BackwardParams {
  const void* dy;
  const void* x;
  const void* a;
  const void* b;
  void* dx;
  void* da;
  void* db;
  bool accumulate_dx;  // dx already holds dy W
  DType dtype;
  int64_t m;
  Dims d;
  Dropout drop;
  float* workspace;  // GPU kernels only: fp32 [2 * m * d.mid()] for G and U; null for the CPU
};

// fp32 elements of workspace the GPU kernels need (forward: U; backward: G and U).
inline int64_t forward_workspace(int64_t m, const Dims& d) { return m * d.mid(); }
inline int64_t backward_workspace(int64_t m, const Dims& d) { return 2 * m * d.mid(); }

}  // namespace peft_kernels::kron
