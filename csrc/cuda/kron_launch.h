// Launchers of csrc/cuda/kron_linear.cu: torch-free, asynchronous on `stream`; each returns cudaGetLastError().
// Callers skip them for m == 0 (an empty grid is a launch error) and pass the fp32 workspace of kron_params.h.
#pragma once
#include <cuda_runtime_api.h>

#include "peft_kernels/kron_params.h"

namespace peft_kernels::cuda {

cudaError_t kron_forward(const kron::ForwardParams& p, cudaStream_t stream);
// Computes dx (if p.dx), dA (if p.da) and dB (if p.db).
cudaError_t kron_backward(const kron::BackwardParams& p, cudaStream_t stream);

}  // namespace peft_kernels::cuda
