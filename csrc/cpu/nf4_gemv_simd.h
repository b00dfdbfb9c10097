// Vectorized CPU GEMV for nf4_linear at decode batch sizes (AVX-512 or AVX2+FMA, chosen at run time), and the
// AVX-512 decode of whole blocks.
#pragma once
#include "peft_kernels/nf4_params.h"

namespace peft_kernels::nf4 {

// Computes p (fp32/fp16/bf16 x, in % 32 == 0) with SIMD and returns true; returns false, computing nothing,
// when the CPU or the shape does not allow it (the caller's scalar loop then runs). PEFT_KERNELS_CPU_ISA =
// scalar|avx2|avx512 caps the instruction set (the tests run every path on one machine).
bool gemv_simd(const GemvParams& p);

// Decodes p (fp32/fp16/bf16 output, blocksize % 32 == 0) with AVX-512 and returns true; returns false, decoding
// nothing, otherwise (the caller's scalar loop then runs). The same PEFT_KERNELS_CPU_ISA cap applies.
bool decode_simd(const DecodeParams& p);

}  // namespace peft_kernels::nf4
