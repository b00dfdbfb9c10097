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
  float* workspace;  // GPU kernels only: forward_workspace() fp32 elements; null for the CPU
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
  float* workspace;  // GPU kernels only: backward_workspace() fp32 elements; null for the CPU
};

// The CUDA kernels' tensor-core path (csrc/cuda/kron_linear.cu, docs/kron_kernels.md): bf16/f16 with b_in and
// b_out multiples of 8 (rows of x, y and of the [a, b] views start on 16-byte boundaries), every factor dimension
// at most 128 after rounding up to 16 (a warp keeps one 16-row slice of U, G or of the dA/dB partials in
// registers: <= 64 fp32 or 32 packed registers each), and the shared memory of every kernel within the
// 163 KiB an A100 grants one block (an H100 grants 227 KiB). Other shapes and fp32 take the CUDA-core kernels.
constexpr int64_t kTcMaxDim = 128;
constexpr int64_t kTcStages = 3;              // forward cp.async ring: 2 rows in flight while one is multiplied
constexpr int64_t kTcBackwardStages = 2;      // backward ring (x and dy rows): 1 in flight (kron_linear.cu says why)
constexpr int64_t kTcSmemLimit = 166912;      // bytes: A100's opt-in maximum per block
constexpr int64_t kTcRowBlocks = 264;         // forward blocks, backward splits: 2 per SM of a 132-SM H100
constexpr int64_t kTcMaxSplitRows = 512;      // dA/dB: no block sums more rows than this

PK_HD int64_t round_up(int64_t v, int64_t k) { return (v + k - 1) / k * k; }
// Shared row stride (elements) of a tile with n columns: rounded up to 16 plus 8, an odd number of 16-byte
// chunks, so the 8 consecutive rows an ldmatrix phase reads fall in 8 different bank groups.
PK_HD int64_t tc_stride(int64_t n) { return round_up(n, 16) + 8; }
// fp32 row stride of dx's staging tile [a_in][b_in]: 4 mod 16 words, so the 32 lanes of a fragment store
// (rows 2t, columns g) hit 32 different banks.
PK_HD int64_t tc_dx_stage_stride(const Dims& d) { return round_up(d.b_in, 16) + 4; }

// Shared memory bytes of the tensor-core kernels (the layouts are in kron_linear.cu).
PK_HD int64_t tc_forward_smem(const Dims& d) {
  return 2 * (round_up(d.a_out, 16) * tc_stride(d.a_in) + round_up(d.b_out, 32) * tc_stride(d.b_in) +
              kTcStages * round_up(d.a_in, 16) * tc_stride(d.b_in));
}
// Backward: the ring of (x, dy) row pairs, G of one row, and dX's fp32 staging tile.
PK_HD int64_t tc_backward_smem(const Dims& d) {
  const int64_t slot = round_up(d.a_in, 16) * tc_stride(d.b_in) + round_up(d.a_out, 16) * tc_stride(d.b_out);
  return 2 * (round_up(d.a_out, 16) * tc_stride(d.a_in) + round_up(d.b_out, 16) * tc_stride(d.b_in) +
              kTcBackwardStages * slot + round_up(d.a_out, 16) * tc_stride(d.b_in)) +
         4 * d.a_in * tc_dx_stage_stride(d);
}

PK_HD bool tensor_cores(const Dims& d, DType dtype) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return false;
  if (d.b_in % 8 != 0 || d.b_out % 8 != 0) return false;
  if (round_up(d.a_out, 16) > kTcMaxDim || round_up(d.a_in, 16) > kTcMaxDim) return false;
  if (round_up(d.b_out, 16) > kTcMaxDim || round_up(d.b_in, 16) > kTcMaxDim) return false;
  return tc_forward_smem(d) <= kTcSmemLimit && tc_backward_smem(d) <= kTcSmemLimit;
}

// Backward blocks (split-M for dA/dB): 264 (2 per SM) when there are that many rows, more when a block would sum more
// than 512 rows.
PK_HD int64_t grad_splits(int64_t m) {
  const int64_t by_rows = (m + kTcMaxSplitRows - 1) / kTcMaxSplitRows;
  const int64_t splits = by_rows > kTcRowBlocks ? by_rows : kTcRowBlocks;
  return splits < m ? splits : m;
}
PK_HD int64_t grad_rows_per_split(int64_t m) { return (m + grad_splits(m) - 1) / grad_splits(m); }
// The splits' partial dA and dB, [splits][a_out * a_in + b_out * b_in] fp32.
PK_HD int64_t grad_partial_elements(const Dims& d) { return d.a_out * d.a_in + d.b_out * d.b_in; }

// fp32 elements of workspace the GPU kernels need. Forward: U [m, a_out * b_in] on the CUDA-core path, none on the
// tensor-core path. Backward: G and U (CUDA cores), or the dA/dB split partials (tensor cores, only when A or B
// needs a gradient).
inline int64_t forward_workspace(int64_t m, const Dims& d, DType dtype) {
  return tensor_cores(d, dtype) ? 0 : m * d.mid();
}
inline int64_t backward_workspace(int64_t m, const Dims& d, DType dtype, bool factor_grads) {
  if (!tensor_cores(d, dtype)) return 2 * m * d.mid();
  return factor_grads ? grad_splits(m) * grad_partial_elements(d) : 0;
}

}  // namespace peft_kernels::kron
