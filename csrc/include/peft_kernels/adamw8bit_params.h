// Torch-free parameter block of the 8-bit AdamW step (csrc/cpu/adamw8bit.cpp, csrc/cuda/adamw8bit.cu).
//
// State layout per parameter of n elements (bitsandbytes' blockwise 8-bit optimizer layout): both moments as
// uint8 codes [n] into a sorted 256-entry map, the first moment into the signed dynamic map, the second (never
// negative) into the unsigned one, each with an fp32 absmax per block of kBlock consecutive elements
// [ceil(n / kBlock)]. A moment's value is map[code] * absmax, one rounding.
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"
#include "peft_kernels/masked_adamw_params.h"

namespace peft_kernels::adamw8bit {

// Elements per absmax. State bytes per element are 2 + 8 / kBlock: 2.03 at 256 (0.254x fp32 AdamW's 8), and
// the quantization error of the moments is set by the block's largest entry; docs/optim8bit.md gives the
// measured trade-off behind 256 (bitsandbytes uses the same).
constexpr int kBlock = 256;
constexpr int kMapSize = 256;

PK_HD int64_t blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

struct Params {
  void* param;       // [n], dtype
  const void* grad;  // [n], dtype
  uint8_t* exp_avg;  // [n] codes into signed_map
  float* exp_avg_absmax;  // [blocks(n)]
  uint8_t* exp_avg_sq;    // [n] codes into unsigned_map
  float* exp_avg_sq_absmax;  // [blocks(n)]
  const float* signed_map;   // [256] sorted
  const float* unsigned_map;  // [256] sorted
  int64_t n;
  DType dtype;
  sparse::AdamWScalars h;  // torch.optim.AdamW's scalars of this step
};

}  // namespace peft_kernels::adamw8bit
