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
  float* workspace = nullptr;  // GPU kernels with da and da_splits > 1: fp32 [backward_workspace(...)]; CPU: null
};

// The GPU's dA is a reduction over the m rows of x, split over M: a block sums the rows of one split for kDaCols
// columns of x and <= kDaRanks ranks, and when there are several splits it writes an fp32 partial [r, in] per split
// into BackwardParams::workspace, which a second kernel adds in split order (deterministic, no float atomics).
// The split is sized for >= 264 blocks (2 per SM of an H100) where M allows, in whole 128-row stages, with at most
// 512 rows summed by one thread: the 8 warps of the tensor-core kernel share a split's rows (4096 rows a block), the
// fp32 kernel's threads each sum all of them (512). At in = 4096, r <= 64: 128 column slices, 3 splits (384 blocks)
// at M = 2048 (768 rows) and M = 8192 (2816 rows: 352 per warp); fp32 4 splits of 512 rows at M = 2048.
constexpr int64_t kDaCols = 32;
constexpr int kDaRanks = 64;
constexpr int64_t kDaStageRows = 128;
PK_HD int64_t da_split_rows(int64_t m, int64_t in, int r, DType dtype) {
  const int64_t tiles = (in + kDaCols - 1) / kDaCols * ((r + kDaRanks - 1) / kDaRanks);
  const int64_t want = (264 + tiles - 1) / tiles;
  const int64_t cap = dtype == DType::kFloat32 ? 512 : 8 * 512;
  const int64_t rows = ((m + want - 1) / want + kDaStageRows - 1) / kDaStageRows * kDaStageRows;
  return rows < cap ? rows : cap;
}
PK_HD int64_t da_splits(int64_t m, int64_t in, int r, DType dtype) {
  const int64_t rows = da_split_rows(m, in, r, dtype);
  return (m + rows - 1) / rows;
}

// fp32 elements of BackwardParams::workspace the GPU's dA needs: one [r, in] partial per split, none for one split
// (its kernel writes dA itself).
inline int64_t backward_workspace(int64_t m, int64_t in, int r, DType dtype) {
  const int64_t splits = da_splits(m, in, r, dtype);
  return splits > 1 ? splits * r * in : 0;
}

}  // namespace peft_kernels::lora
