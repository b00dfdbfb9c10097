// Launchers of csrc/cuda/nf4.cu: torch-free, asynchronous on `stream`; each returns cudaGetLastError().
#pragma once
#include <cuda_runtime_api.h>

#include "peft_kernels/nf4_params.h"

namespace peft_kernels::cuda {

// Requires blocksize even, in [32, 4096], dividing numel.
cudaError_t nf4_encode(const nf4::EncodeParams& p, cudaStream_t stream);
// Requires blocksize == 256 (one 256-thread block per 8-bit block; bitsandbytes' nested block size).
cudaError_t nf4_quantize8(const nf4::Quantize8Params& p, cudaStream_t stream);
cudaError_t nf4_decode(const nf4::DecodeParams& p, cudaStream_t stream);
cudaError_t nf4_gemv(const nf4::GemvParams& p, cudaStream_t stream);

}  // namespace peft_kernels::cuda
