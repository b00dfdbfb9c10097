// NF4 quantization kernels (encode, blockwise 8-bit for double quantization, decode) and their launchers.
// No torch headers: csrc/cuda/nf4_bind.cpp validates tensors, fills the params and calls the launchers.
#include <cstring>

#include "launch.h"
#include "nf4_launch.h"
#include "peft_kernels/nf4.h"

namespace peft_kernels::cuda {
namespace {


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

// ---- The 16-byte paths of decode and GEMV: 64 codes per lane pair ----------------------------------------------
// A lane loads 16 bytes of codes (32 codes, one NF4 block's worth at most: the block size is a power of two >= 32
// and chunks start at multiples of 32 elements, so a chunk has one scale). The elements those codes belong to
// (x in the GEMV, out in decode) move in 16-byte units of U = 16 / sizeof(T) elements (8 bf16/f16, 4 fp32).
// Were lane l to take the units of its own chunk, each warp access would be 16 bytes every 32 * sizeof(T) bytes:
// half of every 32-byte sector, sector efficiency 0.5. So the two lanes of a pair, holding chunks 0 and 1 of 64
// consecutive elements, swap half their codes (two shuffles): lane h then holds the codes of the pair's units
// with parity h, and at each step the pair moves two adjacent units: whole sectors.
template <class T> constexpr int kUnit = 16 / static_cast<int>(sizeof(T));

// The 32 codes lane h of a pair works on, after the swap: word q holds the codes of the pair's elements
// 16q + U*h + 2U*s + t (s < 8/U, t < U) as element j = s*U + t of the word, in memory order (element j is the high
// nibble of byte j/2 when j is even). Words 0-1 come from chunk 0 (scale[0]), words 2-3 from chunk 1.
struct PairCodes {
  uint32_t word[4];
  float scale[2];
};

// c: the 16 code bytes of this lane's chunk h of the pair, own_scale its scale (zeros for a chunk past the end).
// All 32 lanes call it (shuffles).
template <int U>
__device__ __forceinline__ PairCodes swap_codes(const uint4& c, float own_scale, int h) {
  uint32_t keep0, keep1, send0, send1;
  if constexpr (U == 8) {  // units are whole words: chunk h's words 0..3 are the pair's units 4h..4h+3
    keep0 = h ? c.y : c.x, keep1 = h ? c.w : c.z;
    send0 = h ? c.x : c.y, send1 = h ? c.z : c.w;
  } else {  // units are 16-bit halves (4 codes): low halves have even unit numbers
    const uint32_t lo01 = (c.x & 0xFFFFu) | (c.y << 16), hi01 = (c.x >> 16) | (c.y & 0xFFFF0000u);
    const uint32_t lo23 = (c.z & 0xFFFFu) | (c.w << 16), hi23 = (c.z >> 16) | (c.w & 0xFFFF0000u);
    keep0 = h ? hi01 : lo01, keep1 = h ? hi23 : lo23;
    send0 = h ? lo01 : hi01, send1 = h ? lo23 : hi23;
  }
  const uint32_t got0 = __shfl_xor_sync(0xffffffffu, send0, 1), got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
  const float other_scale = __shfl_xor_sync(0xffffffffu, own_scale, 1);
  PairCodes pc;
  pc.word[0] = h ? got0 : keep0, pc.word[1] = h ? got1 : keep1;
  pc.word[2] = h ? keep0 : got0, pc.word[3] = h ? keep1 : got1;
  pc.scale[0] = h ? other_scale : own_scale, pc.scale[1] = h ? own_scale : other_scale;
  return pc;
}

// Byte b of x, zero-extended: one PRMT on the GPU (a shift and a mask otherwise).
__device__ __forceinline__ uint32_t byte_of(uint32_t x, int b) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, 0u, 0x4440u + b);
#else
  return (x >> (8 * b)) & 0xFFu;
#endif
}

// The NF4 levels of the 8 codes of a word (element j: the high nibble of byte j / 2 when j is even, as stored).
// Four operations put 4 * code of the even and of the odd elements in the bytes of hi and lo, so each level
// is one PRMT (the byte: its offset in s_code) and one shared load: 1.5 operations per code besides the load,
// where a shift and a mask per code take 2.
__device__ __forceinline__ void lookup8(const float* s_code, uint32_t word, float (&level)[8]) {
  const uint32_t hi = (word >> 2) & 0x3C3C3C3Cu, lo = (word << 2) & 0x3C3C3C3Cu;
  const char* base = reinterpret_cast<const char*>(s_code);
PK_UNROLL
  for (int b = 0; b < 4; ++b) {
    level[2 * b] = *reinterpret_cast<const float*>(base + byte_of(hi, b));
    level[2 * b + 1] = *reinterpret_cast<const float*>(base + byte_of(lo, b));
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Shifts for the two divisions of nf4::block_scale: both block sizes are powers of two (check::nf4_blocksize;
// the nested one is bitsandbytes' 256), and a 64-bit division is a ~70-instruction subroutine on the GPU.
struct ScaleShifts {
  int block, nested;
};
__device__ __forceinline__ ScaleShifts scale_shifts(const nf4::Packed& w) {
  return {__ffs(w.blocksize) - 1, __ffs(w.nested_blocksize) - 1};
}

// nf4::block_scale of the block holding element e.
__device__ __forceinline__ float element_scale(const nf4::Packed& w, const ScaleShifts& sh, int64_t e) {
  const int64_t block = e >> sh.block;
  if (w.nested_absmax == nullptr) return static_cast<const float*>(w.absmax)[block];
  return nf4::nested_absmax(w.code8, static_cast<const uint8_t*>(w.absmax)[block], w.nested_absmax[block >> sh.nested],
                            *w.offset);
}

// The 16 NF4 levels in shared memory: 16 consecutive floats sit in 16 distinct banks, so any pattern of
// lookups by a warp is conflict-free. Every thread of the block calls it (barrier).
__device__ __forceinline__ void stage_code(float* s_code) {
  if (threadIdx.x < 16) s_code[threadIdx.x] = nf4::kCode[threadIdx.x];
  __syncthreads();
}

// The U elements at p (16-byte aligned) as fp32, and back (round to nearest even): one 16-byte access each.
template <class T> __device__ __forceinline__ void load_unit(const T* p, float (&v)[kUnit<T>]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = load16<float4>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  } else {
    const uint4 raw = load16<uint4>(p);
    T h[8];
    memcpy(static_cast<void*>(h), &raw, sizeof(raw));  // not a pointer cast: reading a uint4 as T is undefined
PK_UNROLL
    for (int j = 0; j < 8; ++j) v[j] = load_f32(h, j);
  }
}
template <class T> __device__ __forceinline__ void store_unit(T* p, const float (&v)[kUnit<T>]) {
  if constexpr (sizeof(T) == 4) {
    store16(p, float4{v[0], v[1], v[2], v[3]});
  } else {
    T h[8];
PK_UNROLL
    for (int j = 0; j < 8; ++j) store_f32(h, j, v[j]);
    uint4 raw;
    memcpy(&raw, static_cast<const void*>(h), sizeof(raw));
    store16(p, raw);
  }
}

// Dequantize-all, 16-byte path (codes and out 16-byte aligned): a lane pair per 64 outputs, one 16-byte load of
// codes and one scale per lane, then 16-byte stores, two adjacent per pair (whole sectors). A 256-thread block
// covers 4 KiB of codes; with ~8 blocks per SM (32 registers) that is 32 KiB of loads in flight per SM, twice
// what 3.35 TB/s at ~700 ns DRAM latency needs. With double quantization the scale is rebuilt from its 8-bit
// code (element_scale: 3 cached loads per 32 codes), so no fp32 absmax array is ever materialized. Bit-exact
// with the reference: each output is kCode[q] * scale, rounded once.
template <class T>
__global__ void __launch_bounds__(kThreads) decode_kernel(nf4::DecodeParams p) {
  constexpr int U = kUnit<T>;
  __shared__ float s_code[16];
  stage_code(s_code);
  T* out = static_cast<T*>(p.out);
  const ScaleShifts sh = scale_shifts(p.w);
  const uint8_t* codes = p.w.codes + p.first_block * p.w.blocksize / 2;
  const int64_t chunks = p.numel / 32, pairs = (chunks + 1) / 2;
  const int lane = threadIdx.x & 31, h = lane & 1;
  // Warp-uniform trip count: the swap's shuffles need all 32 lanes. A lane past the end re-reads the last chunk
  // (no branch around the loads) and stores nothing.
  for (int64_t d0 = (int64_t(blockIdx.x) * kThreads + (threadIdx.x & ~31)) / 2; d0 < pairs;
       d0 += int64_t(gridDim.x) * (kThreads / 2)) {
    const int64_t d = d0 + (lane >> 1), chunk = min64(2 * d + h, chunks - 1);
    const uint4 c = load16<uint4>(codes + 16 * chunk);
    const float scale = element_scale(p.w, sh, (p.first_block << sh.block) + 32 * chunk);
    const PairCodes pc = swap_codes<U>(c, scale, h);
PK_UNROLL
    for (int q = 0; q < 4; ++q) {
      if (2 * d + q / 2 < chunks) {
        float level[8];
        lookup8(s_code, pc.word[q], level);
PK_UNROLL
        for (int s = 0; s < 8 / U; ++s) {
          float v[U];
PK_UNROLL
          for (int t = 0; t < U; ++t) v[t] = mul_rn(level[s * U + t], pc.scale[q / 2]);
          store_unit(out + 64 * d + 16 * q + U * (h + 2 * s), v);
        }
      }
    }
  }
}

// Dequantize-all, any alignment: one thread per packed byte (two outputs).
template <class T>
__global__ void __launch_bounds__(kThreads) decode_bytes_kernel(nf4::DecodeParams p) {
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

// ---- GEMV: y[i, n] = x[i, :] . W[n, :] for m <= 16 rows of x --------------------------------------------------
constexpr int kGemvRowsPerWarp = 4;  // R: output rows that share each load of x (in registers)
constexpr int kGemvSplit = 4;        // warps splitting one row group's K: 128 lanes x 32 codes = 4096
constexpr int kGemvGroups = kWarps / kGemvSplit;                   // row groups per block
constexpr int kGemvRowsPerBlock = kGemvGroups * kGemvRowsPerWarp;  // 8: 512 blocks at out = 4096

__host__ __device__ constexpr int log2_exact(int v) { return v > 1 ? 1 + log2_exact(v / 2) : 0; }

// Sums a[0..V) over the 32 lanes by recursive halving: at the step with lane distance `offset` a lane keeps the
// half of its values selected by (lane & offset) and adds the partner's copy of that half, so the 5 steps cost
// V/2 + V/4 + ... shuffles instead of 5 V (31 instead of 160 at V = 32). Afterwards a[j] (j < kKept) holds the
// warp's sum of value kKept * (lane >> (5 - kSteps)) + j -- see gemv_kernel.
template <int kLen, int kOffset, int V>
__device__ __forceinline__ void halving_sum(float (&a)[V], int lane) {
  if constexpr (kOffset > 0) {
    if constexpr (kLen > 1) {
      constexpr int kHalf = kLen / 2;
      const bool upper = (lane & kOffset) != 0;
PK_UNROLL
      for (int j = 0; j < kHalf; ++j) {
        const float send = upper ? a[j] : a[j + kHalf];
        const float keep = upper ? a[j + kHalf] : a[j];
        a[j] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
      }
      halving_sum<kHalf, kOffset / 2>(a, lane);
    } else {
      a[0] += __shfl_xor_sync(0xffffffffu, a[0], kOffset);
      halving_sum<1, kOffset / 2>(a, lane);
    }
  }
}

// Small-batch linear, 16-byte path (in % 32 == 0, x and codes 16-byte aligned); kRows is the row bucket
// (1, 2, 4, 8 or 16 >= m: the accumulators stay in registers; rows m..kRows-1 are skipped).
//
// A block is 2 row groups of R = 4 output rows; the 4 warps of a group split K: lane pair d of the group's 64
// takes elements 64d .. 64d+63, then 64 (d + 64), ... (swap_codes above). Per step a lane loads 16 bytes of
// codes for each of its R rows, then each 16-byte unit of x once per row i of x and uses it for all R rows:
// from L1, x costs 4m/R bytes per code byte (bf16) instead of 4m with one row per warp. At out = 4096 the grid
// is 512 blocks (~3.9 per SM on 132 SMs); each step has R x 16 B = 64 B of codes in flight per lane, 16 KiB
// per block: 48 KiB per SM at m = 1 (3 resident blocks: __launch_bounds__ caps registers at 80) and 32 KiB
// up to m = 8 (2 blocks, 128 registers), against ~18 KiB that 3.35 TB/s at ~700 ns latency needs.
//
// The NF4 table is in shared memory. The scale is factored out of each word's 8 products: sum_j x_j code_j,
// then one FMA by the scale -- m (8 + 1) instead of 8 + 8 m operations per 8 codes and output row.
// Reduction: halving_sum within each warp, then the 4 K-split partials of each output are added in a fixed
// order through shared memory (deterministic, no atomics).
template <class T, int kRows>
__global__ void __launch_bounds__(kThreads, kRows == 1 ? 3 : kRows <= 8 ? 2 : 1) gemv_kernel(nf4::GemvParams p) {
  constexpr int U = kUnit<T>, R = kGemvRowsPerWarp;
  constexpr int V = R * kRows;                           // accumulators per lane: a[i * R + r]
  constexpr int kSteps = V < 32 ? log2_exact(V) : 5;  // halving steps
  constexpr int kKept = V >> kSteps, kOwners = V / kKept;
  __shared__ float s_code[16];
  __shared__ float s_part[kGemvSplit][kGemvGroups * V];  // [split][group * V + value], 2 KiB at kRows = 16
  stage_code(s_code);
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int lane = threadIdx.x & 31, h = lane & 1, warp = threadIdx.x >> 5;
  const int group = warp / kGemvSplit, split = warp % kGemvSplit;
  const int64_t chunks = p.in / 32, pairs = (chunks + 1) / 2;
  const ScaleShifts sh = scale_shifts(p.w);
  for (int64_t nb = int64_t(blockIdx.x) * kGemvRowsPerBlock; nb < p.out; nb += int64_t(gridDim.x) * kGemvRowsPerBlock) {
    // Rows past the end re-read row out - 1 and chunks past the end the row's last chunk: the loads need no
    // branches (the shuffles after them must be reached by all lanes), and nothing of them is stored.
    int64_t row_byte[R];
PK_UNROLL
    for (int r = 0; r < R; ++r) row_byte[r] = min64(nb + group * R + r, p.out - 1) * (p.in / 2);
    float a[V] = {};
    for (int64_t d0 = split * 16; d0 < pairs; d0 += kGemvSplit * 16) {  // warp-uniform trip count
      const int64_t d = d0 + (lane >> 1), chunk = min64(2 * d + h, chunks - 1);
      uint4 c[R];
PK_UNROLL
      for (int r = 0; r < R; ++r) c[r] = load16<uint4>(p.w.codes + row_byte[r] + 16 * chunk);
      PairCodes pc[R];
PK_UNROLL
      for (int r = 0; r < R; ++r) pc[r] = swap_codes<U>(c[r], element_scale(p.w, sh, 2 * row_byte[r] + 32 * chunk), h);
PK_UNROLL
      for (int q = 0; q < 4; ++q) {
        if (2 * d + q / 2 >= chunks) continue;  // words of a chunk past the end
        float level[R][8];
PK_UNROLL
        for (int r = 0; r < R; ++r) lookup8(s_code, pc[r].word[q], level[r]);
        const int64_t k = 64 * d + 16 * q + U * h;
PK_UNROLL
        for (int i = 0; i < kRows; ++i) {
          if (i >= p.m) continue;
          float xv[8 / U][U];
PK_UNROLL
          for (int s = 0; s < 8 / U; ++s) load_unit(x + i * p.in + k + 2 * U * s, xv[s]);
PK_UNROLL
          for (int r = 0; r < R; ++r) {
            float dot = 0.0f;
PK_UNROLL
            for (int j = 0; j < 8; ++j) dot += xv[j / U][j % U] * level[r][j];
            a[i * R + r] += dot * pc[r].scale[q / 2];
          }
        }
      }
    }
    halving_sum<V, 16>(a, lane);
    if ((lane & ((32 >> kSteps) - 1)) == 0) {
PK_UNROLL
      for (int j = 0; j < kKept; ++j) s_part[split][group * V + j * kOwners + (lane >> (5 - kSteps))] = a[j];
    }
    __syncthreads();
    // Thread t finishes output (group, value) = (t / V, t % V); a value v = i * R + r lives at
    // position (v % kKept) * kOwners + v / kKept. Consecutive threads read consecutive words: no conflicts.
    if (threadIdx.x < kGemvGroups * V) {
      const int g = threadIdx.x / V, v = threadIdx.x % V;
      const int i = v / R, pos = (v % kKept) * kOwners + v / kKept;
      const int64_t n = nb + g * R + v % R;
      if (i < p.m && n < p.out) {
        float sum = 0.0f;
PK_UNROLL
        for (int s = 0; s < kGemvSplit; ++s) sum += s_part[s][g * V + pos];
        store_f32(y, i * p.out + n, bias != nullptr ? sum + load_f32(bias, n) : sum);
      }
    }
    __syncthreads();  // s_part is rewritten by the next row block
  }
}

// Small-batch linear, any shape and alignment (in % 32 != 0, e.g. 67; odd rows then start on a low nibble):
// one warp per output row n, lane l takes elements l, l + 32, ... one at a time, all m <= 16 rows of x in
// registers, then one shuffle reduction per row.
template <class T>
__global__ void __launch_bounds__(kThreads) gemv_elements_kernel(nf4::GemvParams p) {
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int lane = threadIdx.x & 31;
  for (int64_t n = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); n < p.out; n += int64_t(gridDim.x) * kWarps) {
    float acc[nf4::kGemvMaxRows] = {};
    for (int64_t k = lane; k < p.in; k += 32) {
      const int64_t e = n * p.in + k;
      const float w = nf4::decode(nf4::code_of(p.w, e), nf4::block_scale(p.w, e / p.w.blocksize));
PK_UNROLL
      for (int i = 0; i < nf4::kGemvMaxRows; ++i) {
        if (i < p.m) acc[i] += load_f32(x, i * p.in + k) * w;
      }
    }
PK_UNROLL
    for (int i = 0; i < nf4::kGemvMaxRows; ++i) {
      const float v = warp_sum(acc[i]);
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
  // codes + first_block * blocksize / 2 is 16-byte aligned when codes is (blocksize >= 32).
  const bool vec16 = aligned16(p.w.codes) && aligned16(p.out);
  return launch_typed(p.dtype, [&]<class T>() {
    if (vec16) KLAUNCH(decode_kernel<T>, grid_for(p.numel / 32, kThreads), kThreads, 0, stream, p);
    else KLAUNCH(decode_bytes_kernel<T>, grid_for(p.numel / 2, kThreads), kThreads, 0, stream, p);
  });
}

cudaError_t nf4_gemv(const nf4::GemvParams& p, cudaStream_t stream) {
  const bool vec16 = p.in % 32 == 0 && aligned16(p.x) && aligned16(p.w.codes);
  const unsigned blocks = grid_for(p.out, kGemvRowsPerBlock);
  return launch_typed(p.dtype, [&]<class T>() {
    if (!vec16) KLAUNCH(gemv_elements_kernel<T>, grid_for(p.out, kWarps), kThreads, 0, stream, p);
    else if (p.m == 1) KLAUNCH((gemv_kernel<T, 1>), blocks, kThreads, 0, stream, p);
    else if (p.m == 2) KLAUNCH((gemv_kernel<T, 2>), blocks, kThreads, 0, stream, p);
    else if (p.m <= 4) KLAUNCH((gemv_kernel<T, 4>), blocks, kThreads, 0, stream, p);
    else if (p.m <= 8) KLAUNCH((gemv_kernel<T, 8>), blocks, kThreads, 0, stream, p);
    else KLAUNCH((gemv_kernel<T, 16>), blocks, kThreads, 0, stream, p);
  });
}

}  // namespace peft_kernels::cuda
