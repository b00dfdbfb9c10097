// Tensor-core helpers of the csrc/cuda kernels that use mma.sync (nf4_gemm.cu, lora_linear.cu): the element type
// picks the instruction, and two fp32 values round to one 16-bit pair register.
#pragma once
#include <type_traits>

#include "launch.h"
#include "peft_kernels/ptx.cuh"

namespace peft_kernels::cuda {

// D += A B on one m16n8k16 tile (fragments as the PTX ISA lays them out), T = __half or __nv_bfloat16.
template <class T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    pk::ptx::mma_m16n8k16_f16(d, a, b, d);
  } else {
    pk::ptx::mma_m16n8k16_bf16(d, a, b, d);
  }
}

// Two values as one mma register (or two adjacent 16-bit outputs): `lo` in the low 16 bits, each rounded to nearest.
template <class T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&r, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &h, 4);
  }
  return r;
}

// Raises a kernel's dynamic shared memory limit above the 48 KiB default on the current device: a host-side
// attribute write, cheap next to a launch, and per device, so done before every launch.
template <class K> cudaError_t prepare(K kernel, int64_t bytes) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              int(bytes));
}

}  // namespace peft_kernels::cuda
