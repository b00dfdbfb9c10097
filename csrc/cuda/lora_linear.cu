// Fused LoRA dropout kernels and their launchers (see csrc/include/peft_kernels/lora_params.h for the math).
// With p = 0 the op never calls these: every product is a cuBLAS GEMM. No torch headers.
//
// bf16/f16 run on tensor cores (mma.sync m16n8k16, fp32 accumulation; ../shared/GPU_DESIGN.md):
// - down_tc_kernel: xa = keep(x) A^T. 32 rows of x per block, 128 columns per stage through a 4-stage cp.async
//   pipeline (x read once, 16-byte copies), the matching 128 columns of A (<= 64 ranks) beside them.
// - dx_tc_kernel: dx += keep * s * (dxa A), a 128 x 128 dx tile per block, reduction over the ranks.
// - da_tc_kernel + da_reduce_kernel: dA = s dxa^T keep(x), split over M: each block sums <= 512 rows of one
//   64-column slice into an fp32 partial of the caller's workspace; the second kernel adds the partials in
//   split order (deterministic, no float atomics).
// The mask is never stored: every kernel redraws it from Philox, one call per 8 consecutive elements of x
// (philox.h: one call yields the 16-bit draws of a group of 8). 8 elements are exactly one 16-byte chunk of a
// staged tile, or the 8 adjacent dx columns one lane owns, so a thread masks whole chunks with one call: the
// mma fragments instead spread a group over 4 lanes (4 calls, or shuffles, per group). Dropped elements
// become +0 in the tile (exact), and s multiplies the fp32 sums.
// fp32 keeps CUDA-core kernels (down_kernel, dx_kernel, da_kernel): mma.sync has no fp32 inputs.
#include <type_traits>

#include "launch.h"
#include "lora_launch.h"
#include "peft_kernels/philox.h"
#include "peft_kernels/ptx.cuh"

namespace peft_kernels::cuda {
namespace {

constexpr int kRankTile = 8;  // rank outputs per pass of down_kernel: 8 fp32 accumulators per lane

// keep(e) * scale: one Philox evaluation per element (8 draws made, 1 used): the fp32 kernels only.
__device__ __forceinline__ float keep_scale(const lora::Dropout& d, int64_t e) {
  return philox::dropout_draw(d.seed, static_cast<uint64_t>(e)) >= d.threshold ? static_cast<float>(d.scale) : 0.0f;
}

// One warp per row of x: lanes stride over the row (coalesced), each keeps kRankTile partial dot products,
// reduced across the warp by shuffles. Rank tiles beyond the first re-read the row from L1/L2.
template <class T>
__global__ void __launch_bounds__(kThreads) down_kernel(lora::DownParams p) {
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  T* xa = static_cast<T*>(p.xa);
  const int lane = threadIdx.x & 31;
  for (int64_t i = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); i < p.m; i += int64_t(gridDim.x) * kWarps) {
    for (int j0 = 0; j0 < p.r; j0 += kRankTile) {
      float acc[kRankTile] = {};
      for (int64_t k = lane; k < p.in; k += 32) {
        const float xd = keep_scale(p.drop, i * p.in + k) * load_f32(x, i * p.in + k);
        PK_UNROLL
        for (int t = 0; t < kRankTile; ++t) {
          if (j0 + t < p.r) acc[t] += xd * load_f32(a, int64_t(j0 + t) * p.in + k);
        }
      }
      PK_UNROLL
      for (int t = 0; t < kRankTile; ++t) {
        const float v = warp_sum(acc[t]);
        if (lane == 0 && j0 + t < p.r) store_f32(xa, i * p.r + j0 + t, v);
      }
    }
  }
}

// One thread per element of dx: dx += keep * scale * (dxa[i, :] . A[:, k]).
template <class T>
__global__ void __launch_bounds__(kThreads) dx_kernel(lora::BackwardParams p) {
  const T* a = static_cast<const T*>(p.a);
  const T* dxa = static_cast<const T*>(p.dxa);
  T* dx = static_cast<T*>(p.dx);
  const int64_t n = p.m * p.in;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    const int64_t i = e / p.in, k = e - i * p.in;
    float t = 0.0f;
    for (int j = 0; j < p.r; ++j) t += load_f32(dxa, i * p.r + j) * load_f32(a, int64_t(j) * p.in + k);
    store_f32(dx, e, load_f32(dx, e) + keep_scale(p.drop, e) * t);
  }
}

// One thread per element of dA: a reduction over the m rows, reading a column of x (each warp reads 32
// consecutive columns of a row: coalesced).
template <class T>
__global__ void __launch_bounds__(kThreads) da_kernel(lora::BackwardParams p) {
  const T* x = static_cast<const T*>(p.x);
  const T* dxa = static_cast<const T*>(p.dxa);
  T* da = static_cast<T*>(p.da);
  const int64_t n = int64_t(p.r) * p.in;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    const int64_t j = e / p.in, k = e - j * p.in;
    float acc = 0.0f;
    for (int64_t i = 0; i < p.m; ++i) {
      acc += load_f32(dxa, i * p.r + j) * keep_scale(p.drop, i * p.in + k) * load_f32(x, i * p.in + k);
    }
    store_f32(da, e, acc);
  }
}

// ---- tensor-core kernels (bf16, f16) ----

constexpr int kStages = 4;  // 3 stages in flight while one is multiplied
constexpr int kRankChunk = 64;  // ranks per pass: 64 keeps a block's accumulators at <= 64 fp32 per lane

__host__ __device__ constexpr int round16(int v) { return (v + 15) & ~15; }

// Bit j set: element e0 + j is kept. One Philox call when e0 is a multiple of 8 (every chunk of a row whose
// length is a multiple of 8), two when the 8 elements straddle groups.
__device__ __forceinline__ unsigned keep8(const lora::Dropout& d, uint64_t e0) {
  const uint64_t g0 = e0 >> 3;
  const philox::Draw lo = philox::draw4(d.seed, g0);
  unsigned bits = 0;
  if ((e0 & 7) == 0) {
PK_UNROLL
    for (int j = 0; j < 8; ++j) {
      const uint32_t w = lo.w[j >> 1];
      bits |= (((j & 1) ? w >> 16 : w & 0xFFFFu) >= d.threshold ? 1u : 0u) << j;
    }
    return bits;
  }
  const philox::Draw hi = philox::draw4(d.seed, g0 + 1);
PK_UNROLL
  for (int j = 0; j < 8; ++j) {
    const uint64_t e = e0 + j;
    const unsigned i = unsigned(e >> 1) & 3u;
    const uint32_t w = (e >> 3) == g0 ? philox::word(lo, i) : philox::word(hi, i);
    bits |= (((e & 1) ? w >> 16 : w & 0xFFFFu) >= d.threshold ? 1u : 0u) << j;
  }
  return bits;
}

// Zeroes the dropped 16-bit elements of a chunk (element j is half j & 1 of word j >> 1, low half first).
__device__ __forceinline__ uint4 drop_chunk(uint4 v, unsigned keep) {
  auto mask = [&](int pair) {
    return ((keep >> (2 * pair)) & 1u ? 0x0000FFFFu : 0u) | ((keep >> (2 * pair + 1)) & 1u ? 0xFFFF0000u : 0u);
  };
  v.x &= mask(0);
  v.y &= mask(1);
  v.z &= mask(2);
  v.w &= mask(3);
  return v;
}

// Stages 8 elements src[0 .. n) (n clipped to 8; 0: the chunk is outside the matrix) into 16 bytes of shared
// memory, zero-filled past n. vec: rows are 16-byte aligned with a length that is a multiple of 8, so a chunk is
// whole or absent and goes by cp.async; otherwise 2-byte loads, stored at once.
template <class T>
__device__ __forceinline__ void stage_chunk(uint8_t* dst, const T* src, int64_t n, bool vec, const T* any) {
  if (vec) {
    pk::ptx::cp_async_16(dst, n > 0 ? src : any, n > 0 ? 16 : 0);
    return;
  }
  uint16_t v[8];
PK_UNROLL
  for (int j = 0; j < 8; ++j) v[j] = j < n ? reinterpret_cast<const uint16_t*>(src)[j] : uint16_t(0);
  uint4 packed;
  memcpy(&packed, v, 16);
  store16(dst, packed);
}

template <class T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    pk::ptx::mma_m16n8k16_f16(d, a, b, d);
  } else {
    pk::ptx::mma_m16n8k16_bf16(d, a, b, d);
  }
}

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

template <class T> __device__ __forceinline__ float half_to_f32(uint32_t bits16) {
  const uint16_t b = static_cast<uint16_t>(bits16);
  T v;
  memcpy(&v, &b, 2);
  return load_f32(&v, 0);
}

// Rows of 64 16-bit values (128 bytes, eight 16-byte chunks): chunk c of row r sits at c ^ (r & 7), so the 8
// rows an ldmatrix phase reads hit 8 different bank groups.
__device__ __forceinline__ int offset64(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }
// Rows of 128 values (256 bytes, 16 chunks): the same swizzle on the chunk's low 3 bits.
__device__ __forceinline__ int offset128(int row, int chunk) { return row * 256 + ((chunk ^ (row & 7)) << 4); }

// down_tc_kernel: 8 warps = 2 slices of 16 rows x 4 quarters of the stage's 128 columns (2 k16 steps each), all
// of the chunk's <= 64 ranks: 8 mma per warp and k16 step at r = 64. The 4 quarters' fp32 sums are added through
// shared memory at the end, in quarter order. 32 rows per block: 64 blocks at M = 2048 (x 16 MiB), each reading
// its 256 KiB of x once and A (128 KiB at r = 16) from L2.
constexpr int kDownRows = 32;
constexpr int kDownDepth = 128;
__host__ __device__ constexpr size_t down_stage_bytes(int a_rows) { return size_t(kDownRows + a_rows) * kDownDepth * 2; }

template <class T>
__global__ void __launch_bounds__(kThreads) down_tc_kernel(lora::DownParams p) {
  DYN_SMEM(unsigned char, smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, mat = lane >> 3;
  const int64_t M = p.m, K = p.in;
  const int rank0 = int(blockIdx.y) * kRankChunk;
  const int ranks = p.r - rank0 < kRankChunk ? p.r - rank0 : kRankChunk;
  const int a_rows = round16(ranks);  // A rows staged: zero-filled past r, so padded columns of xa are 0
  const size_t stage_bytes = down_stage_bytes(a_rows);
  const int64_t m0 = int64_t(blockIdx.x) * kDownRows;
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a) + int64_t(rank0) * K;
  const bool vec = K % 8 == 0 && aligned16(p.x) && aligned16(p.a);
  auto x_tile = [&](int s) { return smem + s * stage_bytes; };
  auto a_tile = [&](int s) { return smem + s * stage_bytes + kDownRows * kDownDepth * 2; };

  // Thread tid owns x chunks tid and tid + 256 of a stage (16 chunks per row: 16 lanes read 256 contiguous bytes).
  auto issue = [&](int kt, int s) {
    const int64_t k0 = int64_t(kt) * kDownDepth;
PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads, row = c >> 4, chunk = c & 15;
      const int64_t gr = m0 + row, gk = k0 + chunk * 8;
      const int64_t n = gr < M && gk < K ? (K - gk < 8 ? K - gk : 8) : 0;
      stage_chunk(x_tile(s) + offset128(row, chunk), x + gr * K + gk, n, vec, x);
    }
    for (int c = tid; c < a_rows * 16; c += kThreads) {
      const int row = c >> 4, chunk = c & 15;
      const int64_t gk = k0 + chunk * 8;
      const int64_t n = row < ranks && gk < K ? (K - gk < 8 ? K - gk : 8) : 0;
      stage_chunk(a_tile(s) + offset128(row, chunk), a + row * K + gk, n, vec, a);
    }
  };
  // After the wait a thread's own copies have landed: it masks them before the barrier that publishes the stage.
  auto drop = [&](int kt, int s) {
PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads, row = c >> 4, chunk = c & 15;
      const int64_t gr = m0 + row, gk = int64_t(kt) * kDownDepth + chunk * 8;
      if (gr < M && gk < K) {
        uint8_t* at = x_tile(s) + offset128(row, chunk);
        store16(at, drop_chunk(load16(at), keep8(p.drop, uint64_t(gr * K + gk))));
      }
    }
  };

  const int ktiles = int((K + kDownDepth - 1) / kDownDepth);
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) issue(s, s);
    pk::ptx::cp_async_commit();
  }

  float acc[kRankChunk / 8][4];
PK_UNROLL
  for (int f = 0; f < kRankChunk / 8; ++f)
PK_UNROLL
    for (int j = 0; j < 4; ++j) acc[f][j] = 0.0f;

  const int slice = warp & 1, quarter = warp >> 1;
  for (int kt = 0; kt < ktiles; ++kt) {
    pk::ptx::cp_async_wait<kStages - 2>();
    drop(kt, kt % kStages);
    __syncthreads();
    if (kt + kStages - 1 < ktiles) issue(kt + kStages - 1, (kt + kStages - 1) % kStages);
    pk::ptx::cp_async_commit();

    const uint8_t* xs = x_tile(kt % kStages);
    const uint8_t* as = a_tile(kt % kStages);
PK_UNROLL
    for (int step = 0; step < 2; ++step) {
      const int ks = quarter * 2 + step;
      uint32_t af[4];
      pk::ptx::ldmatrix_x4(af, xs + offset128(slice * 16 + (mat & 1) * 8 + (lane & 7), ks * 2 + (mat >> 1)));
PK_UNROLL
      for (int n16 = 0; n16 < kRankChunk / 16; ++n16) {
        if (n16 * 16 < a_rows) {
          // matrices: ranks 0-7 at k 0-7 and 8-15, then ranks 8-15: the B fragments of two 8-rank blocks
          uint32_t b4[4];
          pk::ptx::ldmatrix_x4(b4, as + offset128(n16 * 16 + (mat >> 1) * 8 + (lane & 7), ks * 2 + (mat & 1)));
          const uint32_t b0[2] = {b4[0], b4[1]}, b1[2] = {b4[2], b4[3]};
          mma<T>(acc[2 * n16], af, b0);
          mma<T>(acc[2 * n16 + 1], af, b1);
        }
      }
    }
  }
  pk::ptx::cp_async_wait<0>();
  __syncthreads();

  // Partials in fragment order, [warp][8-rank block][register][lane] (a warp's stores: 32 consecutive floats).
  float* part = reinterpret_cast<float*>(smem);
PK_UNROLL
  for (int f = 0; f < kRankChunk / 8; ++f) {
    if (f * 8 < a_rows) {
PK_UNROLL
      for (int j = 0; j < 4; ++j) part[((warp * 8 + f) * 4 + j) * 32 + lane] = acc[f][j];
    }
  }
  __syncthreads();
  T* xa = static_cast<T*>(p.xa);
  const float scale = static_cast<float>(p.drop.scale);
  // One thread per output, consecutive threads along an xa row (coalesced stores).
  for (int q = tid; q < kDownRows * ranks; q += kThreads) {
    const int row = q / ranks, col = q - row * ranks;
    const int g = row & 7, h = (row >> 3) & 1, f = col >> 3, t = (col & 7) >> 1;
    const int reg = 2 * h + (col & 1), src = g * 4 + t;
    float sum = 0.0f;
PK_UNROLL
    for (int qu = 0; qu < 4; ++qu) sum += part[(((qu * 2 + (row >> 4)) * 8 + f) * 4 + reg) * 32 + src];
    if (m0 + row < M) store_f32(xa, (m0 + row) * p.r + rank0 + col, sum * scale);
  }
}

// dx_tc_kernel: a 128 x 128 tile of dx per block, 8 warps of 64 x 32 (nf4_gemm.cu's layout). A operand: dxa
// [128 rows, ranks] via ldmatrix.x4; B operand: A [ranks, 128 columns], built from 8-byte shared loads with the
// mma's n index permuted onto dx columns (n = c of fragment f is column 4c + f of the warp's 32), so that a lane
// ends with 8 adjacent columns 8t .. 8t+7 of each row it holds: one Philox call for their mask, one 16-byte load
// and store of dx. A's staged rows are 272 bytes (256 + 16): the rows 2t a B load reads then lie 32 bytes apart
// modulo 128, and the 16 lanes of a half-warp hit 16 distinct 8-byte bank pairs.
constexpr int kDxTile = 128;
constexpr int kARowBytes = kDxTile * 2 + 16;
constexpr size_t kDxSmem = size_t(kDxTile) * kRankChunk * 2 + size_t(kRankChunk) * kARowBytes;  // 33 KiB: no opt-in

template <class T>
__global__ void __launch_bounds__(kThreads) dx_tc_kernel(lora::BackwardParams p) {
  DYN_SMEM(unsigned char, smem);
  uint8_t* dxa_s = smem;
  uint8_t* a_s = smem + kDxTile * kRankChunk * 2;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, mat = lane >> 3;
  const int g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, K = p.in;
  const int64_t tiles_m = (M + kDxTile - 1) / kDxTile;
  const int64_t m0 = (int64_t(blockIdx.x) % tiles_m) * kDxTile, c0 = (int64_t(blockIdx.x) / tiles_m) * kDxTile;
  const T* dxa = static_cast<const T*>(p.dxa);
  const T* a = static_cast<const T*>(p.a);
  const bool vec_dxa = p.r % 8 == 0 && aligned16(p.dxa), vec_a = K % 8 == 0 && aligned16(p.a);
  const int warp_row = (warp & 1) * 64, warp_col = (warp >> 1) * 32;

  float acc[4][4][4];
PK_UNROLL
  for (int mi = 0; mi < 4; ++mi)
PK_UNROLL
    for (int f = 0; f < 4; ++f)
PK_UNROLL
      for (int j = 0; j < 4; ++j) acc[mi][f][j] = 0.0f;

  for (int j0 = 0; j0 < p.r; j0 += kRankChunk) {
    const int ranks = p.r - j0 < kRankChunk ? p.r - j0 : kRankChunk, k16 = round16(ranks) / 16;
    if (j0 > 0) __syncthreads();  // the previous chunk's tiles are no longer read
    for (int c = tid; c < kDxTile * k16 * 2; c += kThreads) {
      const int row = c / (k16 * 2), chunk = c - row * (k16 * 2);
      const int64_t gr = m0 + row;
      const int j = chunk * 8, left = ranks - j;
      stage_chunk(dxa_s + offset64(row, chunk), dxa + gr * p.r + j0 + j, gr < M && left > 0 ? (left < 8 ? left : 8) : 0,
                  vec_dxa, dxa);
    }
    for (int c = tid; c < k16 * 16 * 16; c += kThreads) {
      const int row = c >> 4, chunk = c & 15;
      const int64_t gk = c0 + chunk * 8;
      const int64_t n = row < ranks && gk < K ? (K - gk < 8 ? K - gk : 8) : 0;
      stage_chunk(a_s + row * kARowBytes + chunk * 16, a + int64_t(j0 + row) * K + gk, n, vec_a, a);
    }
    pk::ptx::cp_async_commit();
    pk::ptx::cp_async_wait<0>();
    __syncthreads();
    for (int ks = 0; ks < k16; ++ks) {
      uint64_t rows4[4];  // A rows 2t, 2t+1, 2t+8, 2t+9 of the step at the lane's columns 4g .. 4g+3
PK_UNROLL
      for (int r4 = 0; r4 < 4; ++r4) {
        const int row = ks * 16 + 2 * t + (r4 & 1) + 8 * (r4 >> 1);
        rows4[r4] = *reinterpret_cast<const uint64_t*>(a_s + row * kARowBytes + (warp_col + 4 * g) * 2);
      }
      uint32_t b[4][2];
PK_UNROLL
      for (int f = 0; f < 4; ++f) {
        b[f][0] = uint32_t(rows4[0] >> (16 * f)) & 0xFFFFu | uint32_t(rows4[1] >> (16 * f)) << 16;
        b[f][1] = uint32_t(rows4[2] >> (16 * f)) & 0xFFFFu | uint32_t(rows4[3] >> (16 * f)) << 16;
      }
PK_UNROLL
      for (int mi = 0; mi < 4; ++mi) {
        uint32_t af[4];
        pk::ptx::ldmatrix_x4(af, dxa_s + offset64(warp_row + mi * 16 + (mat & 1) * 8 + (lane & 7), ks * 2 + (mat >> 1)));
PK_UNROLL
        for (int f = 0; f < 4; ++f) mma<T>(acc[mi][f], af, b[f]);
      }
    }
  }

  T* dx = static_cast<T*>(p.dx);
  const float s = static_cast<float>(p.drop.scale);
  const bool vec = K % 8 == 0 && aligned16(p.dx);
  const int64_t col = c0 + warp_col + 8 * t;
  if (col >= K) return;
PK_UNROLL
  for (int mi = 0; mi < 4; ++mi) {
PK_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + warp_row + mi * 16 + g + 8 * h;
      if (row >= M) continue;
      float v[8];
PK_UNROLL
      for (int j = 0; j < 4; ++j) {
        v[j] = acc[mi][j][2 * h];
        v[j + 4] = acc[mi][j][2 * h + 1];
      }
      const unsigned keep = keep8(p.drop, uint64_t(row * K + col));
      T* out = dx + row * K + col;
      if (vec && col + 8 <= K) {
        const uint4 old = load16(out);
        const uint32_t w[4] = {old.x, old.y, old.z, old.w};
        uint32_t o[4];
PK_UNROLL
        for (int j = 0; j < 4; ++j) {
          const float lo = half_to_f32<T>(w[j]) + ((keep >> (2 * j)) & 1u ? s * v[2 * j] : 0.0f);
          const float hi = half_to_f32<T>(w[j] >> 16) + ((keep >> (2 * j + 1)) & 1u ? s * v[2 * j + 1] : 0.0f);
          o[j] = pack2<T>(lo, hi);
        }
        store16(out, uint4{o[0], o[1], o[2], o[3]});
      } else {
PK_UNROLL
        for (int j = 0; j < 8; ++j) {
          if (col + j < K) store_f32(out, j, load_f32(out, j) + ((keep >> j) & 1u ? s * v[j] : 0.0f));
        }
      }
    }
  }
}

// da_tc_kernel: block (column slice, split) sums rows [split * rows, +rows) of dxa^T keep(x) for 64 columns of x
// and the ranks of the chunk (grid.y), 64 rows per stage through the cp.async pipeline. mma M index = rank
// (A operand dxa^T: ldmatrix.x4.trans of the row-major dxa tile), N = column (B operand keep(x), K-major:
// ldmatrix.x2.trans), K = row of x. Warp w owns columns 8w .. 8w+7 and every 16-rank block. The fp32 partial
// goes to workspace[split][rank][column] with 8-byte stores (a warp: 32 contiguous bytes per rank row).
constexpr int kDaCols = 64;
constexpr int kDaDepth = 64;
constexpr size_t kDaStageBytes = size_t(kDaDepth) * kDaCols * 2 + size_t(kDaDepth) * kRankChunk * 2;  // 16 KiB
constexpr size_t kDaSmem = kStages * kDaStageBytes;  // 64 KiB: opt-in above 48 KiB

template <class T>
__global__ void __launch_bounds__(kThreads) da_tc_kernel(lora::BackwardParams p) {
  DYN_SMEM(unsigned char, smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, mat = lane >> 3;
  const int g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, K = p.in;
  const int64_t rows = lora::da_split_rows(M, K);
  const int64_t c0 = int64_t(blockIdx.x) * kDaCols, split = blockIdx.z, i0 = split * rows;
  const int64_t i1 = i0 + rows < M ? i0 + rows : M;
  const int j0 = int(blockIdx.y) * kRankChunk;
  const int ranks = p.r - j0 < kRankChunk ? p.r - j0 : kRankChunk, k16 = round16(ranks) / 16;
  const T* x = static_cast<const T*>(p.x);
  const T* dxa = static_cast<const T*>(p.dxa);
  const bool vec_x = K % 8 == 0 && aligned16(p.x), vec_dxa = p.r % 8 == 0 && aligned16(p.dxa);
  auto x_tile = [&](int s) { return smem + s * kDaStageBytes; };
  auto d_tile = [&](int s) { return smem + s * kDaStageBytes + kDaDepth * kDaCols * 2; };

  // Thread tid owns x chunks tid and tid + 256 of a stage (8 per row: 8 lanes read a row's 128 bytes).
  auto issue = [&](int kt, int s) {
    const int64_t r0 = i0 + int64_t(kt) * kDaDepth;
PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads, row = c >> 3, chunk = c & 7;
      const int64_t gr = r0 + row, gk = c0 + chunk * 8;
      const int64_t n = gr < i1 && gk < K ? (K - gk < 8 ? K - gk : 8) : 0;
      stage_chunk(x_tile(s) + offset64(row, chunk), x + gr * K + gk, n, vec_x, x);
    }
    for (int c = tid; c < kDaDepth * k16 * 2; c += kThreads) {
      const int row = c / (k16 * 2), chunk = c - row * (k16 * 2);
      const int64_t gr = r0 + row;
      const int left = ranks - chunk * 8;
      stage_chunk(d_tile(s) + offset64(row, chunk), dxa + gr * p.r + j0 + chunk * 8,
                  gr < i1 && left > 0 ? (left < 8 ? left : 8) : 0, vec_dxa, dxa);
    }
  };
  auto drop = [&](int kt, int s) {
PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads, row = c >> 3, chunk = c & 7;
      const int64_t gr = i0 + int64_t(kt) * kDaDepth + row, gk = c0 + chunk * 8;
      if (gr < i1 && gk < K) {
        uint8_t* at = x_tile(s) + offset64(row, chunk);
        store16(at, drop_chunk(load16(at), keep8(p.drop, uint64_t(gr * K + gk))));
      }
    }
  };

  const int ktiles = int((i1 - i0 + kDaDepth - 1) / kDaDepth);  // <= 8: rows <= 512
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) issue(s, s);
    pk::ptx::cp_async_commit();
  }
  float acc[kRankChunk / 16][4];
PK_UNROLL
  for (int mi = 0; mi < kRankChunk / 16; ++mi)
PK_UNROLL
    for (int j = 0; j < 4; ++j) acc[mi][j] = 0.0f;

  for (int kt = 0; kt < ktiles; ++kt) {
    pk::ptx::cp_async_wait<kStages - 2>();
    drop(kt, kt % kStages);
    __syncthreads();
    if (kt + kStages - 1 < ktiles) issue(kt + kStages - 1, (kt + kStages - 1) % kStages);
    pk::ptx::cp_async_commit();
    const uint8_t* xs = x_tile(kt % kStages);
    const uint8_t* ds = d_tile(kt % kStages);
PK_UNROLL
    for (int ks = 0; ks < kDaDepth / 16; ++ks) {
      uint32_t b[2];  // rows 0-7 and 8-15 of the step at the warp's 8 columns, transposed
      pk::ptx::ldmatrix_x2_trans(b, xs + offset64(ks * 16 + (mat & 1) * 8 + (lane & 7), warp));
PK_UNROLL
      for (int mi = 0; mi < kRankChunk / 16; ++mi) {
        if (mi < k16) {
          // matrices (x rows, ranks): (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15), transposed
          uint32_t af[4];
          pk::ptx::ldmatrix_x4_trans(af, ds + offset64(ks * 16 + (mat >> 1) * 8 + (lane & 7), mi * 2 + (mat & 1)));
          mma<T>(acc[mi], af, b);
        }
      }
    }
  }
  pk::ptx::cp_async_wait<0>();

  float* ws = p.workspace + split * int64_t(p.r) * K;
  const int64_t col = c0 + warp * 8 + 2 * t;
  const bool pairs = K % 2 == 0;
PK_UNROLL
  for (int mi = 0; mi < kRankChunk / 16; ++mi) {
PK_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int rank = mi * 16 + g + 8 * h;
      if (mi >= k16 || rank >= ranks || col >= K) continue;
      float* at = ws + int64_t(j0 + rank) * K + col;
      if (pairs) {
        const float v2[2] = {acc[mi][2 * h], acc[mi][2 * h + 1]};
        uint64_t bits;
        memcpy(&bits, v2, 8);
        *reinterpret_cast<uint64_t*>(at) = bits;
      } else {
        at[0] = acc[mi][2 * h];
        if (col + 1 < K) at[1] = acc[mi][2 * h + 1];
      }
    }
  }
}

// dA = s * (sum of the splits' partials, in split order): one thread per element, coalesced over columns.
template <class T>
__global__ void __launch_bounds__(kThreads) da_reduce_kernel(lora::BackwardParams p) {
  const int64_t n = int64_t(p.r) * p.in, splits = lora::da_splits(p.m, p.in);
  const float s = static_cast<float>(p.drop.scale);
  T* da = static_cast<T*>(p.da);
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    float sum = 0.0f;
    for (int64_t sp = 0; sp < splits; ++sp) sum += p.workspace[sp * n + e];
    store_f32(da, e, sum * s);
  }
}

// Raises the kernel's dynamic shared memory limit (above the 48 KiB default) on the current device; per device,
// so done before every launch.
template <class K> cudaError_t prepare(K kernel, size_t bytes) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              int(bytes));
}

}  // namespace

cudaError_t lora_down(const lora::DownParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    if constexpr (std::is_same_v<T, float>) {
      KLAUNCH(down_kernel<T>, grid_for(p.m, kWarps), kThreads, 0, stream, p);
    } else {
      const int a_rows = round16(p.r < kRankChunk ? p.r : kRankChunk);
      const size_t smem = kStages * down_stage_bytes(a_rows);  // 48 KiB at r = 16, 96 KiB at r >= 64
      const dim3 grid(unsigned((p.m + kDownRows - 1) / kDownRows), unsigned((p.r + kRankChunk - 1) / kRankChunk));
      if (prepare(down_tc_kernel<T>, smem) == cudaSuccess) KLAUNCH(down_tc_kernel<T>, grid, kThreads, smem, stream, p);
    }
  });
}

cudaError_t lora_backward(const lora::BackwardParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    if constexpr (std::is_same_v<T, float>) {
      if (p.dx != nullptr) KLAUNCH(dx_kernel<T>, grid_for(p.m * p.in, kThreads), kThreads, 0, stream, p);
      if (p.da != nullptr) KLAUNCH(da_kernel<T>, grid_for(int64_t(p.r) * p.in, kThreads), kThreads, 0, stream, p);
    } else {
      if (p.dx != nullptr) {
        const int64_t blocks = ((p.m + kDxTile - 1) / kDxTile) * ((p.in + kDxTile - 1) / kDxTile);
        KLAUNCH(dx_tc_kernel<T>, unsigned(blocks), kThreads, kDxSmem, stream, p);
      }
      if (p.da != nullptr) {
        const dim3 grid(unsigned((p.in + kDaCols - 1) / kDaCols), unsigned((p.r + kRankChunk - 1) / kRankChunk),
                        unsigned(lora::da_splits(p.m, p.in)));
        if (prepare(da_tc_kernel<T>, kDaSmem) == cudaSuccess) KLAUNCH(da_tc_kernel<T>, grid, kThreads, kDaSmem, stream, p);
        KLAUNCH(da_reduce_kernel<T>, grid_for(int64_t(p.r) * p.in, kThreads), kThreads, 0, stream, p);
      }
    }
  });
}

}  // namespace peft_kernels::cuda
