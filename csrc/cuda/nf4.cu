// NF4 quantization kernels (encode, blockwise 8-bit for double quantization, decode) and their launchers.
// No torch headers: csrc/cuda/nf4_bind.cpp validates tensors, fills the params and calls the launchers.
#include "launch.h"
#include "nf4_launch.h"
#include "peft_kernels/nf4.h"

namespace peft_kernels::cuda {
namespace {

__device__ __forceinline__ float warp_absmax(float m) {
  for (int offset = 16; offset > 0; offset >>= 1) m = nf4::absmax_step(m, __shfl_xor_sync(0xffffffffu, m, offset));
  return m;
}

// One warp per NF4 block: lane l owns element pairs l, l+32, ... (one byte of output each), so a warp reads
// 64 consecutive elements per step (coalesced) and blocksize 64 — the common case — is one pair per lane.
// Pass 1 finds the block's absmax with a shuffle reduction; pass 2 re-reads the block (from L1/L2: at most
// 16 KiB per warp) and writes packed codes.
template <class T>
__global__ void __launch_bounds__(kThreads) encode_kernel(nf4::EncodeParams p) {
  const T* w = static_cast<const T*>(p.weight);
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = p.numel / p.blocksize;
  const int pairs = p.blocksize / 2;
  for (int64_t b = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < nblocks; b += int64_t(gridDim.x) * kWarps) {
    const int64_t base = b * p.blocksize;
    float m = 0.0f;
    for (int j = lane; j < pairs; j += 32) {
      m = nf4::absmax_step(m, load_f32(w, base + 2 * j));
      m = nf4::absmax_step(m, load_f32(w, base + 2 * j + 1));
    }
    m = warp_absmax(m);
    const float inv = nf4::inv_scale(m);
    for (int j = lane; j < pairs; j += 32) {
      const uint8_t hi = nf4::encode(load_f32(w, base + 2 * j), inv);
      const uint8_t lo = nf4::encode(load_f32(w, base + 2 * j + 1), inv);
      p.codes[base / 2 + j] = nf4::pack(hi, lo);
    }
    if (lane == 0) p.absmax[b] = m;
  }
}

// One thread block per 8-bit block (blocksize 256 for double quantization): the 256-entry code is staged in
// shared memory (each element snaps to bitsandbytes' 65536-step grid, then bisects it in 8 steps), and the block absmax is a shuffle reduction per
// warp followed by one across the 8 warp partials.
__global__ void __launch_bounds__(kThreads) quantize8_kernel(nf4::Quantize8Params p) {
  __shared__ float s_code[256];
  __shared__ float s_part[kWarps];
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  s_code[tid] = p.code[tid];
  const int64_t nblocks = (p.numel + p.blocksize - 1) / p.blocksize;
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t begin = b * p.blocksize;
    const int64_t end = begin + p.blocksize < p.numel ? begin + p.blocksize : p.numel;
    float m = 0.0f;
    for (int64_t i = begin + tid; i < end; i += kThreads) m = nf4::absmax_step(m, p.x[i]);
    m = warp_absmax(m);
    if (lane == 0) s_part[warp] = m;
    __syncthreads();
    if (warp == 0) {
      m = warp_absmax(lane < kWarps ? s_part[lane] : 0.0f);
      if (lane == 0) s_part[0] = m;
    }
    __syncthreads();
    m = s_part[0];
    const float inv = nf4::inv_scale(m);
    for (int64_t i = begin + tid; i < end; i += kThreads) p.q[i] = nf4::encode8(s_code, p.x[i], inv);
    if (tid == 0) p.absmax[b] = m;
    __syncthreads();  // s_part[0] is rewritten by the next block's reduction
  }
}

// One thread per packed byte (two outputs). With double quantization the block's absmax is rebuilt from its
// 8-bit code on the fly (3 cached loads), so no fp32 absmax array is ever materialized.
template <class T, bool kNested>
__global__ void __launch_bounds__(kThreads) decode_kernel(nf4::DecodeParams p) {
  T* out = static_cast<T*>(p.out);
  const int64_t nbytes = p.numel / 2;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < nbytes; i += int64_t(gridDim.x) * kThreads) {
    const int64_t block = 2 * i / p.blocksize;
    float scale;
    if constexpr (kNested) {
      const uint8_t q = static_cast<const uint8_t*>(p.absmax)[block];
      scale = nf4::nested_absmax(p.code8, q, __ldg(p.nested_absmax + block / p.nested_blocksize), __ldg(p.offset));
    } else {
      scale = __ldg(static_cast<const float*>(p.absmax) + block);
    }
    const uint8_t byte = __ldg(p.codes + i);
    store_f32(out, 2 * i, nf4::decode(nf4::high(byte), scale));
    store_f32(out, 2 * i + 1, nf4::decode(nf4::low(byte), scale));
  }
}

}  // namespace

cudaError_t nf4_encode(const nf4::EncodeParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    KLAUNCH(encode_kernel<T>, grid_for(p.numel / p.blocksize, kWarps), kThreads, 0, stream, p);
  });
}

cudaError_t nf4_quantize8(const nf4::Quantize8Params& p, cudaStream_t stream) {
  KLAUNCH(quantize8_kernel, grid_for((p.numel + p.blocksize - 1) / p.blocksize, 1), kThreads, 0, stream, p);
  return cudaGetLastError();
}

cudaError_t nf4_decode(const nf4::DecodeParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    auto* kernel = p.nested_absmax != nullptr ? &decode_kernel<T, true> : &decode_kernel<T, false>;
    KLAUNCH(kernel, grid_for(p.numel / 2, kThreads), kThreads, 0, stream, p);
  });
}

}  // namespace peft_kernels::cuda
