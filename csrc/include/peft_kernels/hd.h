// Portability macros shared by the CPU sources (g++), the CUDA sources (nvcc) and the cudasim build of the
// CUDA sources (g++ with csrc/sim/cudasim.h, which defines __host__/__device__ away).
#pragma once

#if defined(__CUDACC__) || defined(PEFT_KERNELS_CUDASIM)
#define PK_HD __host__ __device__ __forceinline__
#else
#define PK_HD inline
#endif

// A table that device code indexes at run time must be a __device__ object in nvcc's device pass (a host
// constexpr array would be copied into local memory per thread, which the ptxas check rejects); the host
// pass and the CPU build see a plain constexpr array with the same initializer.
#if defined(__CUDA_ARCH__)
#define PK_TABLE __device__ constexpr
#else
#define PK_TABLE constexpr
#endif

// Full unrolling of short constant-trip loops, spelled for each compiler.
#if defined(__CUDACC__)
#define PK_UNROLL _Pragma("unroll")
#else
#define PK_UNROLL _Pragma("GCC unroll 16")
#endif

namespace peft_kernels {

// Element types a kernel can read or write; the torch-facing code maps at::ScalarType onto this so that
// kernel files never include torch headers. kFloat64 exists for the CPU kernels that must pass float64
// gradcheck; GPU kernels take the other three.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// IEEE single-precision multiply and add, each rounded on its own. nvcc contracts a*b+c into one FMA by
// default, which rounds once and would make our dequantized scales differ from bitsandbytes' in the last bit.
PK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

}  // namespace peft_kernels
