// Launchers of csrc/cuda/lora_linear.cu: torch-free, asynchronous on `stream`; each returns cudaGetLastError().
// Callers skip them for m == 0 (an empty grid is a launch error).
#pragma once
#include <cuda_runtime_api.h>

#include "peft_kernels/lora_params.h"

namespace peft_kernels::cuda {

cudaError_t lora_down(const lora::DownParams& p, cudaStream_t stream);
// Computes dx (if p.dx) and dA (if p.da).
cudaError_t lora_backward(const lora::BackwardParams& p, cudaStream_t stream);

}  // namespace peft_kernels::cuda
