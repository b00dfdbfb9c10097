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

// Tensor-core kernels of csrc/cuda/nf4_gemm.cu, for bf16/f16 when in % 32 == 0 and the operands are 16-byte
// aligned (dx also needs out % 8 == 0): the *_supported predicates say whether a call qualifies.
bool nf4_gemm_supported(const nf4::GemmParams& p);
cudaError_t nf4_gemm(const nf4::GemmParams& p, cudaStream_t stream);
bool nf4_linear_dx_supported(const nf4::DxParams& p);
cudaError_t nf4_linear_dx(const nf4::DxParams& p, cudaStream_t stream);

}  // namespace peft_kernels::cuda
