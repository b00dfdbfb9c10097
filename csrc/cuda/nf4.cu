// NF4 quantization kernels (encode, blockwise 8-bit for double quantization, decode) and their launchers.
// No torch headers: csrc/cuda/nf4_bind.cpp validates tensors, fills the params and calls the launchers.
#include <cstring>

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
template <class T>
__global__ void __launch_bounds__(kThreads) decode_kernel(nf4::DecodeParams p) {
  T* out = static_cast<T*>(p.out);
  const int64_t nbytes = p.numel / 2;
  const int64_t first_byte = p.first_block * p.w.blocksize / 2;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < nbytes; i += int64_t(gridDim.x) * kThreads) {
    const float scale = nf4::block_scale(p.w, p.first_block + 2 * i / p.w.blocksize);
    const uint8_t byte = __ldg(p.w.codes + first_byte + i);
    store_f32(out, 2 * i, nf4::decode(nf4::high(byte), scale));
    store_f32(out, 2 * i + 1, nf4::decode(nf4::low(byte), scale));
  }
}

// Eight consecutive elements of x as fp32 with 16-byte loads (two float4, or one uint4 of 16-bit values); the
// caller guarantees 16-byte alignment.
template <class T> __device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T h[8];
    memcpy(h, &raw, sizeof(raw));  // not a pointer cast: reading a uint4 as T is undefined (g++ read zeros)
PK_UNROLL
    for (int j = 0; j < 8; ++j) v[j] = load_f32(h, j);
  }
}

// Small-batch linear: one warp per output row n, accumulating x[i, k] * W[n, k] for all m <= 16 rows of x in
// registers, then one shuffle reduction per row. kVec8 (in % 8 == 0, x 16-byte aligned, codes 4-byte
// aligned): lane l takes elements 8l .. 8l+7, then 8l + 256, ...: one 4-byte load of packed codes, one block
// scale and 16-byte loads of x per 8 elements, and the warp reads 128 consecutive code bytes per step.
// Otherwise lane l takes elements l, l + 32, ... one at a time (any in, e.g. 67). The packed weight is read
// once (0.5 B per weight plus one absmax byte per block); x [m, in] is re-read by every warp from L1/L2.
template <class T, bool kVec8>
__global__ void __launch_bounds__(kThreads) gemv_kernel(nf4::GemvParams p) {
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int lane = threadIdx.x & 31;
  for (int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); n < p.out; n += int64_t(gridDim.x) * kWarps) {
    float acc[nf4::kGemvMaxRows];
PK_UNROLL
    for (int i = 0; i < nf4::kGemvMaxRows; ++i) acc[i] = 0.0f;
    const int64_t row = n * p.in;
    if constexpr (kVec8) {
      for (int64_t k = 8 * lane; k < p.in; k += 256) {
        const int64_t e = row + k;
        const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(p.w.codes + e / 2));
        const float scale = nf4::block_scale(p.w, e / p.w.blocksize);
        float w[8];
PK_UNROLL
        for (int j = 0; j < 4; ++j) {
          const uint8_t byte = static_cast<uint8_t>(word >> (8 * j));  // little-endian: byte j of the 4
          w[2 * j] = nf4::decode(nf4::high(byte), scale);
          w[2 * j + 1] = nf4::decode(nf4::low(byte), scale);
        }
PK_UNROLL
        for (int i = 0; i < nf4::kGemvMaxRows; ++i) {
          if (i < p.m) {
            float v[8];
            load8(x + i * p.in + k, v);
PK_UNROLL
            for (int j = 0; j < 8; ++j) acc[i] += v[j] * w[j];
          }
        }
      }
    } else {
      for (int64_t k = lane; k < p.in; k += 32) {
        const int64_t e = row + k;
        const float w = nf4::decode(nf4::code_of(p.w, e), nf4::block_scale(p.w, e / p.w.blocksize));
PK_UNROLL
        for (int i = 0; i < nf4::kGemvMaxRows; ++i) {
          if (i < p.m) acc[i] += load_f32(x, i * p.in + k) * w;
        }
      }
    }
PK_UNROLL
    for (int i = 0; i < nf4::kGemvMaxRows; ++i) {
      float v = acc[i];
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0 && i < p.m) store_f32(y, i * p.out + n, bias != nullptr ? v + load_f32(bias, n) : v);
    }
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
    KLAUNCH(decode_kernel<T>, grid_for(p.numel / 2, kThreads), kThreads, 0, stream, p);
  });
}

cudaError_t nf4_gemv(const nf4::GemvParams& p, cudaStream_t stream) {
  const bool vec8 = p.in % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(p.w.codes) % 4 == 0;
  return launch_typed(p.dtype, [&]<class T>() {
    if (vec8) KLAUNCH((gemv_kernel<T, true>), grid_for(p.out, kWarps), kThreads, 0, stream, p);
    else KLAUNCH((gemv_kernel<T, false>), grid_for(p.out, kWarps), kThreads, 0, stream, p);
  });
}

}  // namespace peft_kernels::cuda
