// Torch-free parameter blocks of the fused LoRA kernels (csrc/cpu/lora_linear.cpp, csrc/cuda/lora_linear.cu).
// Only the dropout path needs them: with p = 0 every LoRA product is a plain GEMM and goes to the BLAS.
// All matrices are row-major and contiguous; x is [m, in], A [r, in], xa and dxa [m, r].
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"

namespace peft_kernels::lora {

// keep(e) = philox::dropout_draw of flat element e = row * in + col >= threshold (philox::dropout_threshold(p));
// kept values are multiplied by scale.
struct Dropout {
  uint64_t seed;
  uint32_t threshold;
  double scale;  // 1 / (1 - p), times the LoRA scaling in backward; kernels round it to their accumulator type
};

// xa[i, j] = sum_k keep(i*in+k) * scale * x[i, k] * A[j, k], accumulated in fp32, stored in dtype.
struct DownParams {
  const void* x;
  const void* a;
  void* xa;
  DType dtype;
  int64_t m, in;
  int r;
  Dropout drop;
};

// With s = drop.scale (which folds in the LoRA scaling):
//   dx[i, k] += keep(i*in+k) * s * sum_j dxa[i, j] * A[j, k]      (if dx is not null; dx already holds dy W)
//   da[j, k]  = sum_i dxa[i, j] * keep(i*in+k) * s * x[i, k]      (if da is not null; stored in dtype)
// dxa = dy B [m, r] (not yet scaled) is an input; a Backend with kFusedDxa (the CPU's) is instead given dxa = null
// with dy [m, out] and B [out, r], and computes each block's dxa itself.
struct BackwardParams {
  const void* x;
  const void* a;
  const void* dxa;
  void* dx;
  void* da;
  DType dtype;
  int64_t m, in;
  int r;
  Dropout drop;
  const void* dy = nullptr;
  const void* b = nullptr;
  int64_t out = 0;
  float* workspace = nullptr;  // GPU bf16/f16 kernels with da: fp32 [backward_workspace(m, in, r)]; null for the CPU
};

// The GPU's dA is split over M: rows of x per fp32 partial (a multiple of its 64-row stages, at most 512 so that
// no block sums more) chosen to give >= 264 blocks (2 per SM of an H100) over the 64-column slices of x where M
// allows, and the number of partials. 2048 x 4096: 448 rows, 5 partials, 320 blocks.
PK_HD int64_t da_split_rows(int64_t m, int64_t in) {
  const int64_t slices = (in + 63) / 64, splits = (264 + slices - 1) / slices;
  const int64_t rows = ((m + splits - 1) / splits + 63) / 64 * 64;
  return rows < 64 ? 64 : (rows > 512 ? 512 : rows);
}
PK_HD int64_t da_splits(int64_t m, int64_t in) { return (m + da_split_rows(m, in) - 1) / da_split_rows(m, in); }

// fp32 elements of BackwardParams::workspace the GPU kernels need: one [r, in] partial of dA per split.
inline int64_t backward_workspace(int64_t m, int64_t in, int r) { return da_splits(m, in) * r * in; }

}  // namespace peft_kernels::lora
