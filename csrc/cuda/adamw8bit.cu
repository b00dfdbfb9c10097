// The 8-bit AdamW step kernel and its launcher. Layout: csrc/include/peft_kernels/adamw8bit_params.h; math:
// adamw8bit.h (the CPU loop runs the same functions). No torch headers.
//
// One warp updates 512 consecutive elements per step of its grid-stride loop: two absmax blocks of 256, 16
// elements per lane, so each code stream (exp_avg, exp_avg_sq) is one 16-byte access per lane and 512
// contiguous bytes per warp. The parameter and its gradient are read in 16-byte vectors too, but with another
// lane order: for fp32, access a of lane L holds elements 128a + 4L .. 128a + 4L + 3 (each instruction 512
// contiguous bytes; lane L's own 16 elements would leave every instruction's sectors half used). The codes move
// between the two orders through 512 bytes of shared memory per stream and warp: 16-byte stores (4 wavefronts,
// the minimum for 512 bytes) and 4- or 8-byte reads of adjacent words (1 or 2 wavefronts).
// Per element the kernel moves 2 x sizeof(T) of parameter, sizeof(T) of gradient and 2 x 2 bytes of codes
// (+ 16 bytes of absmax per 256): 16 bytes for fp32, 10 for bf16. It is bandwidth-bound: 3.35 TB/s moves 210 G
// fp32 elements a second, ~1 ns of one SM's time per 6 elements, against ~60 instructions per element (two
// 8-level tree searches, two decodes, AdamW's 12 flops) spread over 4 schedulers.
// The maps sit in shared memory: the sorted ones for decoding (a gather: lanes with different codes in the same
// bank serialize, which the counters measure) and their trees for encoding (adamw8bit.h).
// Nothing is reduced across warps or blocks: each absmax block belongs to one warp, reduced by shuffles in a fixed
// order, so results do not depend on the launch shape.
#include "adamw8bit_launch.h"
#include "launch.h"
#include "peft_kernels/adamw8bit.h"

namespace peft_kernels::cuda {
namespace {

using adamw8bit::kBlock;
using adamw8bit::kMapSize;

constexpr int kPerLane = 16;              // elements per lane and step: one 16-byte access of each code stream
constexpr int kSpan = 32 * kPerLane;      // elements per warp and step
constexpr int kSpanBlocks = kSpan / kBlock;
static_assert(kSpan % kBlock == 0, "a warp's span holds whole absmax blocks");

struct Shared {
  float map[2][kMapSize];   // sorted: [0] signed (exp_avg), [1] unsigned (exp_avg_sq)
  float tree[2][kMapSize];  // the same in the encoder's order
  uint4 codes[kWarps][2][32];
};

// The parameter's layout: kWidth elements per 16-byte access, kAccesses accesses per lane; access a of lane L
// covers elements (32a + L) kWidth + c of the warp's span, all in absmax block a kWidth 32 / kBlock.
template <class T> struct Order {
  static constexpr int kWidth = 16 / static_cast<int>(sizeof(T));
  static constexpr int kAccesses = kPerLane / kWidth;
  static __device__ int element(int a, int lane, int c) { return (32 * a + lane) * kWidth + c; }
  static constexpr __host__ __device__ int block(int a) { return a * kWidth * 32 / kBlock; }
};

// 16 bytes of T as fp32 values, and back (round to nearest even).
template <class T> __device__ __forceinline__ void load_vec(const T* x, float (&v)[Order<T>::kWidth]) {
  const uint4 raw = load16<uint4>(x);
  T h[Order<T>::kWidth];
  memcpy(static_cast<void*>(h), &raw, 16);  // not a pointer cast: reading a uint4 as T is undefined
PK_UNROLL
  for (int c = 0; c < Order<T>::kWidth; ++c) v[c] = load_f32(h, c);
}
template <class T> __device__ __forceinline__ void store_vec(T* x, const float (&v)[Order<T>::kWidth]) {
  T h[Order<T>::kWidth];
PK_UNROLL
  for (int c = 0; c < Order<T>::kWidth; ++c) store_f32(h, c, v[c]);
  uint4 raw;
  memcpy(&raw, static_cast<const void*>(h), 16);
  store16(x, raw);
}

// W codes at `at` in shared memory (4- or 8-byte aligned), as one access, and back.
template <int W> __device__ __forceinline__ void load_codes(const uint8_t* at, uint8_t (&q)[W]) {
  static_assert(W == 4 || W == 8, "a lane reads 4 (fp32) or 8 (16-bit) codes per access");
  if constexpr (W == 4) {
    const uint32_t bits = *reinterpret_cast<const uint32_t*>(at);
    memcpy(q, &bits, 4);
  } else {
    const uint2 bits = load8<uint2>(at);
    memcpy(q, &bits, 8);
  }
}
template <int W> __device__ __forceinline__ void store_codes(uint8_t* at, const uint8_t (&q)[W]) {
  if constexpr (W == 4) {
    uint32_t bits;
    memcpy(&bits, q, 4);
    *reinterpret_cast<uint32_t*>(at) = bits;
  } else {
    uint2 bits;
    memcpy(&bits, q, 8);
    store8(at, bits);
  }
}

// One warp's step over the span [base, base + kSpan). kFull: the span is inside the parameter and every pointer
// 16-byte aligned, so all accesses are vectors; otherwise (the parameter's last span, or a view at an unaligned
// offset) every element is read and written on its own and those past n are skipped.
template <class T, bool kFull>
__device__ __forceinline__ void warp_step(const adamw8bit::Params& p, Shared& sh, int64_t base) {
  using O = Order<T>;
  constexpr int A = O::kAccesses, W = O::kWidth;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T* param = static_cast<T*>(p.param);
  const T* grad = static_cast<const T*>(p.grad);
  uint8_t* staged[2] = {reinterpret_cast<uint8_t*>(sh.codes[warp][0]), reinterpret_cast<uint8_t*>(sh.codes[warp][1])};
  uint8_t* codes[2] = {p.exp_avg, p.exp_avg_sq};
  float* absmax[2] = {p.exp_avg_absmax, p.exp_avg_sq_absmax};
  const int64_t first_block = base / kBlock;
  const int64_t n_blocks = adamw8bit::blocks(p.n);

  float w[A][W], g[A][W], mom[2][A][W];
  uint8_t q[2][A][W];
  float scale[2][kSpanBlocks];
PK_UNROLL
  for (int s = 0; s < 2; ++s)
PK_UNROLL
    for (int b = 0; b < kSpanBlocks; ++b) scale[s][b] = first_block + b < n_blocks ? absmax[s][first_block + b] : 0.0f;
  if constexpr (kFull) {
    __syncwarp();  // the previous step's lanes have read their new codes out of `staged`
PK_UNROLL
    for (int s = 0; s < 2; ++s) store16(staged[s] + 16 * lane, load16<uint4>(codes[s] + base + 16 * lane));
PK_UNROLL
    for (int a = 0; a < A; ++a) {
      load_vec(param + base + O::element(a, lane, 0), w[a]);
      load_vec(grad + base + O::element(a, lane, 0), g[a]);
    }
    __syncwarp();
PK_UNROLL
    for (int s = 0; s < 2; ++s)
PK_UNROLL
      for (int a = 0; a < A; ++a) load_codes(staged[s] + O::element(a, lane, 0), q[s][a]);
  } else {
PK_UNROLL
    for (int a = 0; a < A; ++a)
PK_UNROLL
      for (int c = 0; c < W; ++c) {
        const int64_t e = base + O::element(a, lane, c);
        const bool in = e < p.n;
        w[a][c] = in ? load_f32(param, e) : 0.0f;
        g[a][c] = in ? load_f32(grad, e) : 0.0f;
        q[0][a][c] = in ? codes[0][e] : 0;
        q[1][a][c] = in ? codes[1][e] : 0;
      }
  }

  // Decode, update, and the new moments' magnitude per absmax block (elements past n hold 0 and add nothing).
  float peak[2][kSpanBlocks] = {};
PK_UNROLL
  for (int a = 0; a < A; ++a)
PK_UNROLL
    for (int c = 0; c < W; ++c) {
      const bool in = kFull || base + O::element(a, lane, c) < p.n;
      float& m = mom[0][a][c];
      float& v = mom[1][a][c];
      m = adamw8bit::decode(sh.map[0], q[0][a][c], scale[0][O::block(a)]);
      v = adamw8bit::decode(sh.map[1], q[1][a][c], scale[1][O::block(a)]);
      if (in) sparse::adamw_update(w[a][c], m, v, g[a][c], p.h);
      else m = v = 0.0f;
PK_UNROLL
      for (int s = 0; s < 2; ++s) peak[s][O::block(a)] = nf4::absmax_step(peak[s][O::block(a)], mom[s][a][c]);
    }
  float inv[2][kSpanBlocks];
PK_UNROLL
  for (int s = 0; s < 2; ++s)
PK_UNROLL
    for (int b = 0; b < kSpanBlocks; ++b) {
      peak[s][b] = warp_absmax(peak[s][b]);
      inv[s][b] = nf4::inv_scale(peak[s][b]);
    }
  // Lanes 0-3 store the four new absmax values: one instruction. Selected with compile-time indices: indexing
  // peak by the lane would put it in local memory.
  float value = 0.0f;
  float* to = nullptr;
PK_UNROLL
  for (int s = 0; s < 2; ++s)
PK_UNROLL
    for (int b = 0; b < kSpanBlocks; ++b)
      if (lane == s * kSpanBlocks + b && first_block + b < n_blocks) {
        value = peak[s][b];
        to = absmax[s] + first_block + b;
      }
  if (to != nullptr) *to = value;
PK_UNROLL
  for (int s = 0; s < 2; ++s)
PK_UNROLL
    for (int a = 0; a < A; ++a)
PK_UNROLL
      for (int c = 0; c < W; ++c) q[s][a][c] = adamw8bit::encode(sh.tree[s], mom[s][a][c], inv[s][O::block(a)]);

  if constexpr (kFull) {
PK_UNROLL
    for (int a = 0; a < A; ++a) store_vec(param + base + O::element(a, lane, 0), w[a]);
    __syncwarp();  // every lane has read its old codes out of `staged`
PK_UNROLL
    for (int s = 0; s < 2; ++s)
PK_UNROLL
      for (int a = 0; a < A; ++a) store_codes(staged[s] + O::element(a, lane, 0), q[s][a]);
    __syncwarp();
PK_UNROLL
    for (int s = 0; s < 2; ++s) store16(codes[s] + base + 16 * lane, load16<uint4>(staged[s] + 16 * lane));
  } else {
PK_UNROLL
    for (int a = 0; a < A; ++a)
PK_UNROLL
      for (int c = 0; c < W; ++c) {
        const int64_t e = base + O::element(a, lane, c);
        if (e >= p.n) continue;
        store_f32(param, e, w[a][c]);
        codes[0][e] = q[0][a][c];
        codes[1][e] = q[1][a][c];
      }
  }
}

template <class T, bool kAligned>
__global__ void __launch_bounds__(kThreads) adamw8bit_kernel(adamw8bit::Params p) {
  __shared__ Shared sh;
  // The trees are built from the maps in shared memory: gathering them from global memory, 2 x 256 scattered
  // 4-byte reads per block, was most of the kernel's wasted sectors at LoRA sizes (executor: 0.92 -> 1.00).
  for (int i = threadIdx.x; i < kMapSize; i += kThreads) {
    sh.map[0][i] = p.signed_map[i];
    sh.map[1][i] = p.unsigned_map[i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kMapSize; i += kThreads) {
    const int from = adamw8bit::tree_source(i);
    sh.tree[0][i] = sh.map[0][from];
    sh.tree[1][i] = sh.map[1][from];
  }
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * kWarps * kSpan;
  for (int64_t base = (int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * kSpan; base < p.n; base += stride) {
    if (kAligned && base + kSpan <= p.n) warp_step<T, true>(p, sh, base);
    else warp_step<T, false>(p, sh, base);
  }
}

}  // namespace

// One warp per 512 elements, 8 warps a block: LLaMA-7B's largest LoRA factor (11008 x 64 = 704,512 elements) is
// 173 blocks, one or two per SM of an H100; grid_for caps huge parameters at 65,535 blocks (268M elements)
// and the loop strides beyond that.
cudaError_t adamw8bit(const adamw8bit::Params& p, cudaStream_t stream) {
  const bool aligned = aligned16(p.param) && aligned16(p.grad) && aligned16(p.exp_avg) && aligned16(p.exp_avg_sq);
  const unsigned grid = grid_for((p.n + kSpan - 1) / kSpan, kWarps);
  return launch_typed(p.dtype, [&]<class T>() {
    if (aligned) KLAUNCH((adamw8bit_kernel<T, true>), grid, kThreads, 0, stream, p);
    else KLAUNCH((adamw8bit_kernel<T, false>), grid, kThreads, 0, stream, p);
  });
}

}  // namespace peft_kernels::cuda
