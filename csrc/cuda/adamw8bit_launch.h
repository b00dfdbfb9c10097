// Launcher of csrc/cuda/adamw8bit.cu: torch-free, asynchronous on `stream`; returns cudaGetLastError().
// Callers skip it for n == 0 (an empty grid is a launch error).
#pragma once
#include <cuda_runtime_api.h>

#include "peft_kernels/adamw8bit_params.h"

namespace peft_kernels::cuda {

cudaError_t adamw8bit(const adamw8bit::Params& p, cudaStream_t stream);

}  // namespace peft_kernels::cuda
