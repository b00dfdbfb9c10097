// Launchers of csrc/cuda/masked_adamw.cu: torch-free, asynchronous on `stream`; each returns cudaGetLastError().
// Callers skip them for k == 0 (an empty grid is a launch error) and validate the indices first.
#pragma once
#include <cuda_runtime_api.h>

#include "peft_kernels/masked_adamw_params.h"

namespace peft_kernels::cuda {

cudaError_t masked_adamw(const sparse::AdamWParams& p, cudaStream_t stream);
cudaError_t masked_sgd(const sparse::SGDParams& p, cudaStream_t stream);

}  // namespace peft_kernels::cuda
