// Kernel-side prelude of every csrc/cuda/*.cu file. Under nvcc it is plain CUDA; in the cudasim build
// (g++ -x c++ -DPEFT_KERNELS_CUDASIM) the same source runs on the CPU through csrc/sim/cudasim.h.
#pragma once
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define KLAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define DYN_SMEM(T, name) extern __shared__ T name[]
#elif defined(PEFT_KERNELS_CUDASIM)
#include "cudasim.h"
#else
#error "csrc/cuda sources build with nvcc, or with the host compiler and -DPEFT_KERNELS_CUDASIM"
#endif

#include <cstdint>
#include <cstring>

#include "peft_kernels/hd.h"
#include "peft_kernels/nf4.h"

namespace peft_kernels::cuda {

// Threads per block of every kernel here: 8 warps, enough to hide latency on sm_80..sm_90 while leaving
// registers for 8 blocks per SM.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <class T> __device__ __forceinline__ float load_f32(const T* p, int64_t i);
template <> __device__ __forceinline__ float load_f32<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float load_f32<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load_f32<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// Round-to-nearest-even stores, as torch's .to(dtype) and bitsandbytes' CPU casts do. The 16-bit value goes
// through a local: GCC's instrumentation (the executor's counters) does not see a store whose right-hand side
// is an out-of-line call returning a struct, and the host's __float2bfloat16_rn is one.
template <class T> __device__ __forceinline__ void store_f32(T* p, int64_t i, float v);
template <> __device__ __forceinline__ void store_f32<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void store_f32<__half>(__half* p, int64_t i, float v) {
  const __half h = __float2half_rn(v);
  p[i] = h;
}
template <> __device__ __forceinline__ void store_f32<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  p[i] = h;
}

// 16-byte loads and stores (global or shared; 16-byte aligned). nvcc emits one LD/ST.128 for a uint4/float4.
// The host compiler splits a uint4 whose members are used one by one into four 4-byte accesses, which the
// executor's counters would see as four warp instructions (4x the sectors, and shared bank conflicts an
// LDS.128 does not have); a 16-byte scalar keeps it one access there.
__host__ __device__ inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <class V = uint4> __device__ __forceinline__ V load16(const void* p) {
  static_assert(sizeof(V) == 16, "a 16-byte vector type");
#if defined(__CUDACC__)
  return *static_cast<const V*>(p);
#else
  const unsigned __int128 bits = *static_cast<const unsigned __int128*>(p);
  V v;
  memcpy(static_cast<void*>(&v), &bits, 16);
  return v;
#endif
}
template <class V> __device__ __forceinline__ void store16(void* p, const V& v) {
  static_assert(sizeof(V) == 16, "a 16-byte vector type");
#if defined(__CUDACC__)
  *static_cast<V*>(p) = v;
#else
  unsigned __int128 bits;
  memcpy(&bits, static_cast<const void*>(&v), 16);
  *static_cast<unsigned __int128*>(p) = bits;
#endif
}

// 8-byte loads and stores (8-byte aligned), for four 16-bit values: one LD/ST.64 under nvcc, and one access for
// the executor's counters, as with load16.
template <class V = uint2> __device__ __forceinline__ V load8(const void* p) {
  static_assert(sizeof(V) == 8, "an 8-byte vector type");
  const uint64_t bits = *static_cast<const uint64_t*>(p);
  V v;
  memcpy(static_cast<void*>(&v), &bits, 8);
  return v;
}
template <class V> __device__ __forceinline__ void store8(void* p, const V& v) {
  static_assert(sizeof(V) == 8, "an 8-byte vector type");
  uint64_t bits;
  memcpy(&bits, static_cast<const void*>(&v), 8);
  *static_cast<uint64_t*>(p) = bits;
}

// The sum of v over the 32 lanes of a warp, in every lane (all lanes must call it).
__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The max of |v| over the 32 lanes of a warp, in every lane (all lanes must call it): NaN-propagating, so that a
// NaN reaches an absmax (and the checks on it) as on the CPU; the xor butterfly combines in the same order in
// every lane.
__device__ __forceinline__ float warp_absmax(float m) {
  for (int offset = 16; offset > 0; offset >>= 1) m = nf4::absmax_step(m, __shfl_xor_sync(0xffffffffu, m, offset));
  return m;
}

// Runs launch.template operator()<T>() with T the CUDA element type of `dtype`, then reports the launch's
// error: every launcher dispatches its dtype here, once. fp64 never reaches a GPU kernel (the op bodies
// reject it for GPU backends), so it is an invalid value.
template <class F> cudaError_t launch_typed(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch.template operator()<float>(); break;
    case DType::kFloat16: launch.template operator()<__half>(); break;
    case DType::kBFloat16: launch.template operator()<__nv_bfloat16>(); break;
    case DType::kFloat64: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Grid size for a grid-stride loop over `work` items of `per_block` each: capped so huge tensors reuse
// blocks instead of exceeding gridDim.x limits (65535 blocks keep every SM of an H200 busy many times over).
inline unsigned grid_for(int64_t work, int per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace peft_kernels::cuda
