// Fused LoRA dropout kernels and their launchers (the math: csrc/include/peft_kernels/lora_params.h; the design and
// the counters: docs/lora_kernels.md). With p = 0 the op never calls these: every product is a cuBLAS GEMM. No torch
// headers.
//
// bf16/f16 run on tensor cores (mma.sync m16n8k16, fp32 accumulation; ../shared/GPU_DESIGN.md):
// - down_tc_kernel: xa = s keep(x) A^T. A block takes 16 (32 above 8448 rows) rows of x and <= 64 ranks; x and A
//   stream through a 4-stage cp.async ring 128 columns at a time, x read once; its warps split each stage's 8 k16
//   steps and add their fp32 partials through shared memory in warp order at the end.
// - dx_tc_kernel: dx += keep * s * (dxa A), a 128 x 128 tile of dx per block, the reduction over the ranks; the dx
//   tile itself is copied into shared memory by cp.async at the start, in flight while the products are formed.
// - da_tc_kernel (+ da_reduce_kernel): dA = s dxa^T keep(x), split over M (lora_params.h): a block sums one
//   split's rows for 32 columns and <= 64 ranks, its 8 warps taking the 16-row steps of each 128-row stage in turn;
//   their partials are added in warp order, then the splits' partials in split order by a second kernel.
// fp32 (mma.sync has no fp32 inputs) runs the same tilings on CUDA cores: down_f32_kernel, dx_f32_kernel and
// da_f32_kernel (with the same split-M partials and reduction).
//
// The mask is never stored: every kernel redraws it from Philox (philox.h: one call yields the 16-bit draws of a group
// of 8 consecutive elements of x). A thread masks 16 bytes of x at a time - 8 bf16/f16 elements, one call; 4 fp32
// elements, one call - as they arrive: a staged 16-byte chunk of a tile, or the 8 adjacent dx columns a lane owns
// after the mma (the permuted n index below). Dropped elements become +0 (exact), and s multiplies the fp32 sums.
#include <type_traits>

#include "launch.h"
#include "lora_launch.h"
#include "peft_kernels/philox.h"
#include "peft_kernels/ptx.cuh"
#include "chunks.h"
#include "tensor_core.h"

namespace peft_kernels::cuda {
namespace {

constexpr int kRing = 4;        // cp.async ring: 3 stages in flight while one is multiplied
constexpr int kRankChunk = 64;  // ranks per block: a warp's accumulators stay at <= 64 fp32 (32 in down)
static_assert(kRankChunk == lora::kDaRanks, "dA's blocks are sized in lora_params.h");

__host__ __device__ constexpr int round16(int v) { return (v + 15) & ~15; }
__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int ranks_of(int r, int chunk) {
  return r - chunk * kRankChunk < kRankChunk ? r - chunk * kRankChunk : kRankChunk;
}

template <class T> __device__ __forceinline__ float half_to_f32(uint32_t bits16) {
  const uint16_t b = static_cast<uint16_t>(bits16);
  T v;
  memcpy(&v, &b, 2);
  return load_f32(&v, 0);
}

// Two floats as one 8-byte shared store (the partial sums below: a half-warp's 16 stores then fill 32 banks once).
__device__ __forceinline__ void store_pair(float* at, float lo, float hi) {
  const float v[2] = {lo, hi};
  uint64_t bits;
  memcpy(&bits, v, 8);
  *reinterpret_cast<uint64_t*>(at) = bits;
}

// Swizzled shared tiles of 16-bit values, by row length. The readers are ldmatrix phases (8 consecutive rows, one
// 16-byte chunk each), which must hit 8 different 16-byte bank groups, and the copies (8 consecutive chunks).
// 64 values (128 bytes), filled 2, 4 or 8 chunks a row (16, 32 or 64 ranks of dxa), so that a quarter-warp's copies
// cover 4, 2 or 1 rows: chunk c of row r at c ^ rev(r & 7), rev reversing 3 bits (0 4 2 6 1 5 3 7). Any 8 rows get 8
// different XOR masks, 4 rows 4k .. 4k+3 masks that differ above bit 0 and rows 2k, 2k+1 masks that differ in bit 2:
// every quarter-warp's 8 chunks land in 8 bank groups. (c ^ (r & 7) gave the 2-chunk rows of r = 16 two-way
// conflicts: 9% extra wavefronts in dA.)
__device__ __forceinline__ int offset64(int row, int chunk) {
  const int rev = ((row & 1) << 2) | (row & 2) | ((row >> 2) & 1);
  return row * 128 + ((chunk ^ rev) << 4);
}
// 128 values (256 bytes): the same on the chunk's low 3 bits.
__device__ __forceinline__ int offset128(int row, int chunk) { return row * 256 + ((chunk ^ (row & 7)) << 4); }
// 32 values (64 bytes, 2 rows per 128 bytes): c ^ ((r >> 1) & 3), so that rows r .. r+7 cover all 8 bank groups.
__device__ __forceinline__ int offset32(int row, int chunk) { return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4); }

// ---- down: xa = s keep(x) A^T ----------------------------------------------------------------------------------------

// A block: 16 kSlices rows of x and the <= 64 ranks of its chunk. The ring carries 128 columns per stage: x [16 kSlices
// rows][128] and A [a_rows][128] (a_rows = ranks rounded up to 16, zero-filled), 256-byte rows. Warp w multiplies row
// slice w % kSlices at k16 steps w / kSlices + i * 8 / kSlices of each stage, for every rank: 8 mma per k16 step at
// r = 64. x is read once; each block reads all of A's 128 KiB (r = 16) or 512 KiB (r = 64) from L2.
constexpr int kDownDepth = 128;
constexpr int64_t kDownWideRows = 8448;  // from here 32-row blocks still fill 132 SMs twice (264 blocks)
__host__ __device__ constexpr size_t down_stage_bytes(int rows, int a_rows) {
  return size_t(rows + a_rows) * kDownDepth * 2;
}
// The warps' partial sums at the end: [8 warps][16 rows][a_rows + 8] floats. A row stride of a_rows + 8 words puts
// the 4 rows a half-warp's 8-byte stores write 8 banks apart.
__host__ __device__ constexpr size_t down_part_bytes(int a_rows) { return size_t(kWarps) * 16 * (a_rows + 8) * 4; }

template <class T, int kSlices>
__global__ void __launch_bounds__(kThreads) down_tc_kernel(lora::DownParams p) {
  constexpr int kRows = 16 * kSlices, kParts = kWarps / kSlices;
  DYN_SMEM(unsigned char, smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, mat = lane >> 3, g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, K = p.in;
  const int chunks = int(ceil_div(p.r, kRankChunk));
  const int64_t m0 = int64_t(blockIdx.x / chunks) * kRows;
  const int rank0 = int(blockIdx.x % chunks) * kRankChunk;  // chunks of one row tile are adjacent: x from L2
  const int ranks = ranks_of(p.r, int(blockIdx.x % chunks)), a_rows = round16(ranks);
  const size_t stage_bytes = down_stage_bytes(kRows, a_rows);
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a) + int64_t(rank0) * K;
  const bool vec = K % 8 == 0 && aligned16(p.x) && aligned16(p.a);
  auto x_tile = [&](int s) { return smem + s * stage_bytes; };
  auto a_tile = [&](int s) { return smem + s * stage_bytes + kRows * kDownDepth * 2; };

  // Thread tid owns x chunks tid (+ 256) of a stage: 16 per row, so 16 lanes read 256 contiguous bytes.
  auto issue = [&](int kt, int s) {
    const int64_t k0 = int64_t(kt) * kDownDepth;
PK_UNROLL
    for (int i = 0; i < kSlices; ++i) {
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
    for (int i = 0; i < kSlices; ++i) {
      const int c = tid + i * kThreads, row = c >> 4, chunk = c & 15;
      const int64_t gr = m0 + row, gk = int64_t(kt) * kDownDepth + chunk * 8;
      if (gr < M && gk < K) {
        uint8_t* at = x_tile(s) + offset128(row, chunk);
        store16(at, drop16<T>(load16(at), keep_bits<8>(p.drop, uint64_t(gr * K + gk))));
      }
    }
  };

  const int ktiles = int(ceil_div(K, kDownDepth));
  for (int s = 0; s < kRing - 1; ++s) {
    if (s < ktiles) issue(s, s);
    pk::ptx::cp_async_commit();
  }

  float acc[kRankChunk / 8][4];
PK_UNROLL
  for (int f = 0; f < kRankChunk / 8; ++f)
PK_UNROLL
    for (int j = 0; j < 4; ++j) acc[f][j] = 0.0f;

  const int slice = warp % kSlices, part = warp / kSlices;
  for (int kt = 0; kt < ktiles; ++kt) {
    pk::ptx::cp_async_wait<kRing - 2>();
    drop(kt, kt % kRing);
    __syncthreads();
    if (kt + kRing - 1 < ktiles) issue(kt + kRing - 1, (kt + kRing - 1) % kRing);
    pk::ptx::cp_async_commit();

    const uint8_t* xs = x_tile(kt % kRing);
    const uint8_t* as = a_tile(kt % kRing);
PK_UNROLL
    for (int i = 0; i < kDownDepth / 16 / kParts; ++i) {
      const int ks = part + i * kParts;
      // matrices: rows 0-7 and 8-15 of the slice at k 0-7, then at k 8-15: the A fragment
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

  // Each warp's 16 x a_rows partial (rows g, g + 8; ranks 8f + 2t, +1), then one thread per output adds the kParts
  // warps of its slice in warp order: consecutive threads along an xa row (consecutive words, coalesced stores).
  const int stride = a_rows + 8;
  float* parts = reinterpret_cast<float*>(smem);
PK_UNROLL
  for (int f = 0; f < kRankChunk / 8; ++f) {
    if (f * 8 < a_rows) {
PK_UNROLL
      for (int h = 0; h < 2; ++h) store_pair(parts + (warp * 16 + g + 8 * h) * stride + f * 8 + 2 * t, acc[f][2 * h], acc[f][2 * h + 1]);
    }
  }
  __syncthreads();
  T* xa = static_cast<T*>(p.xa);
  const float scale = static_cast<float>(p.drop.scale);
  for (int q = tid; q < kRows * ranks; q += kThreads) {
    const int row = q / ranks, col = q - row * ranks;
    float sum = 0.0f;
PK_UNROLL
    for (int pp = 0; pp < kParts; ++pp) sum += parts[((pp * kSlices + (row >> 4)) * 16 + (row & 15)) * stride + col];
    if (m0 + row < M) store_f32(xa, (m0 + row) * p.r + rank0 + col, sum * scale);
  }
}

// ---- dx += keep * s * (dxa A) ----------------------------------------------------------------------------------------

// A 128 x 128 tile of dx per block, 8 warps of 64 x 32 (nf4_gemm.cu's layout). A operand: dxa [128 rows][ranks] by
// ldmatrix.x4; B operand: A [ranks][128 columns], built from 8-byte shared loads with the mma's n index permuted onto
// dx columns (n = c of fragment f is column 4c + f of the warp's 32), so that a lane ends with the 8 adjacent columns
// 8t .. 8t+7 of each row it holds: one Philox call for their mask, one 16-byte load and store of dx. A's staged rows
// are 272 bytes (256 + 16): the rows 2t (+1, +8, +9) one B load reads then lie 32 bytes apart modulo 128, and the 16
// lanes of a half-warp hit 16 distinct 8-byte bank pairs. The dx tile (32 KiB) is copied by cp.async behind the first
// rank chunk's operands, so the block's largest read is in flight while the products are formed; its rows are read
// by 2 rows x 4 chunks per quarter-warp, hence chunk c of row r at c ^ 4 (r & 1).
constexpr int kDxTile = 128;
constexpr int kARowBytes = kDxTile * 2 + 16;
constexpr size_t kDxaBytes = size_t(kDxTile) * kRankChunk * 2;
constexpr size_t kDxABytes = size_t(kRankChunk) * kARowBytes;
constexpr size_t kDxSmem = kDxaBytes + kDxABytes + size_t(kDxTile) * kDxTile * 2;  // 65 KiB: opt-in above 48 KiB
__device__ __forceinline__ int dx_offset(int row, int chunk) { return row * 256 + ((chunk ^ ((row & 1) << 2)) << 4); }

template <class T>
__global__ void __launch_bounds__(kThreads) dx_tc_kernel(lora::BackwardParams p) {
  DYN_SMEM(unsigned char, smem);
  uint8_t* dxa_s = smem;
  uint8_t* a_s = smem + kDxaBytes;
  uint8_t* dx_s = smem + kDxaBytes + kDxABytes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, mat = lane >> 3;
  const int g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, K = p.in;
  const int64_t tiles_m = ceil_div(M, kDxTile);
  const int64_t m0 = (int64_t(blockIdx.x) % tiles_m) * kDxTile, c0 = (int64_t(blockIdx.x) / tiles_m) * kDxTile;
  const T* dxa = static_cast<const T*>(p.dxa);
  const T* a = static_cast<const T*>(p.a);
  T* dx = static_cast<T*>(p.dx);
  const bool vec_dxa = p.r % 8 == 0 && aligned16(p.dxa), vec_a = K % 8 == 0 && aligned16(p.a);
  const bool vec = K % 8 == 0 && aligned16(p.dx);
  const int warp_row = (warp & 1) * 64, warp_col = (warp >> 1) * 32;

  auto stage_ranks = [&](int j0, int ranks) {
    const int k16 = round16(ranks) / 16;
    for (int c = tid; c < kDxTile * k16 * 2; c += kThreads) {
      const int row = c / (k16 * 2), chunk = c - row * (k16 * 2);
      const int64_t gr = m0 + row;
      const int left = ranks - chunk * 8;
      stage_chunk(dxa_s + offset64(row, chunk), dxa + gr * p.r + j0 + chunk * 8,
                  gr < M && left > 0 ? (left < 8 ? left : 8) : 0, vec_dxa, dxa);
    }
    for (int c = tid; c < k16 * 16 * 16; c += kThreads) {
      const int row = c >> 4, chunk = c & 15;
      const int64_t gk = c0 + chunk * 8;
      const int64_t n = row < ranks && gk < K ? (K - gk < 8 ? K - gk : 8) : 0;
      stage_chunk(a_s + row * kARowBytes + chunk * 16, a + int64_t(j0 + row) * K + gk, n, vec_a, a);
    }
    pk::ptx::cp_async_commit();
  };
  stage_ranks(0, ranks_of(p.r, 0));
  if (vec) {
    for (int c = tid; c < kDxTile * 16; c += kThreads) {
      const int row = c >> 4, chunk = c & 15;
      const int64_t gr = m0 + row, gk = c0 + chunk * 8;
      const bool ok = gr < M && gk < K;
      pk::ptx::cp_async_16(dx_s + dx_offset(row, chunk), ok ? dx + gr * K + gk : dx, ok ? 16 : 0);
    }
  }
  pk::ptx::cp_async_commit();

  float acc[4][4][4];
PK_UNROLL
  for (int mi = 0; mi < 4; ++mi)
PK_UNROLL
    for (int f = 0; f < 4; ++f)
PK_UNROLL
      for (int j = 0; j < 4; ++j) acc[mi][f][j] = 0.0f;

  for (int j0 = 0; j0 < p.r; j0 += kRankChunk) {
    const int k16 = round16(ranks_of(p.r, j0 / kRankChunk)) / 16;
    if (j0 == 0) {
      pk::ptx::cp_async_wait<1>();  // the operands; the dx tile may still be in flight
    } else {
      __syncthreads();  // the previous chunk's operands are no longer read
      stage_ranks(j0, ranks_of(p.r, j0 / kRankChunk));
      pk::ptx::cp_async_wait<0>();
    }
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
        b[f][0] = (uint32_t(rows4[0] >> (16 * f)) & 0xFFFFu) | uint32_t(rows4[1] >> (16 * f)) << 16;
        b[f][1] = (uint32_t(rows4[2] >> (16 * f)) & 0xFFFFu) | uint32_t(rows4[3] >> (16 * f)) << 16;
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
  pk::ptx::cp_async_wait<0>();
  __syncthreads();

  // Lane (g, t) holds rows g and g + 8 of each 16-row slice at columns 8t + j of the warp's 32 (j < 4 from fragment
  // j's first column, j >= 4 from fragment j - 4's second).
  const float s = static_cast<float>(p.drop.scale);
  const int64_t col = c0 + warp_col + 8 * t;
  if (col >= K) return;
PK_UNROLL
  for (int mi = 0; mi < 4; ++mi) {
PK_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int local = warp_row + mi * 16 + g + 8 * h;
      const int64_t row = m0 + local;
      if (row >= M) continue;
      float v[8];
PK_UNROLL
      for (int j = 0; j < 4; ++j) {
        v[j] = acc[mi][j][2 * h];
        v[j + 4] = acc[mi][j][2 * h + 1];
      }
      const unsigned keep = keep_bits<8>(p.drop, uint64_t(row * K + col));
      T* out = dx + row * K + col;
      if (vec) {
        const uint4 old = load16(dx_s + dx_offset(local, (warp_col >> 3) + t));
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

// ---- dA = s dxa^T keep(x), split over M ------------------------------------------------------------------------------

// Block (column slice, rank chunk, split), slices varying fastest (the blocks in flight share dxa's rows): rows
// [split * rows, +rows) of 32 columns of x and <= 64 ranks. Stages of 128 rows: x [128][32] (64-byte rows, offset32)
// and dxa [128][64] (offset64), 24 KiB. mma M = rank (A operand dxa^T: ldmatrix.x4.trans of the row-major dxa tile),
// N = column (B operand keep(x): ldmatrix.x4.trans, two 8-column blocks each), K = row of x. Warp w multiplies rows
// 16w .. 16w+15 of every stage into all 32 x 64 outputs (64 fp32 per lane), so a warp sums 1/8 of the split's rows;
// the 8 partials are added in warp order through shared memory at the end. With one split the block writes dA (times
// s) itself; otherwise its fp32 partial to workspace[split][rank][column].
constexpr size_t kDaXBytes = size_t(lora::kDaStageRows) * lora::kDaCols * 2;
constexpr size_t kDaStageBytes = kDaXBytes + size_t(lora::kDaStageRows) * kRankChunk * 2;
constexpr size_t kDaSmem = kRing * kDaStageBytes;  // 96 KiB: opt-in above 48 KiB
// The warps' partials: [8][64 ranks][40] floats. Rank rows 40 words apart put the 4 ranks of a half-warp's 8-byte
// stores 8 banks apart.
constexpr int kDaPartStride = lora::kDaCols + 8;
static_assert(size_t(kWarps) * kRankChunk * kDaPartStride * 4 <= kDaSmem, "the partials reuse the stages");

struct DaBlock {
  int64_t c0, i0, i1, split;
  int j0, ranks;
};
__device__ __forceinline__ DaBlock da_block(const lora::BackwardParams& p, int64_t rows) {
  const int64_t slices = ceil_div(p.in, lora::kDaCols), chunks = ceil_div(p.r, kRankChunk);
  const int64_t b = blockIdx.x, rest = b / slices;
  DaBlock d;
  d.c0 = (b % slices) * lora::kDaCols;
  d.j0 = int(rest % chunks) * kRankChunk;
  d.ranks = ranks_of(p.r, int(rest % chunks));
  d.split = rest / chunks;
  d.i0 = d.split * rows;
  d.i1 = d.i0 + rows < p.m ? d.i0 + rows : p.m;
  return d;
}

// One block's sum for (rank, col) of its tile: to dA when there is one split, else to the split's partial.
template <class T>
__device__ __forceinline__ void da_store(const lora::BackwardParams& p, const DaBlock& d, bool direct, int rank, int64_t col,
                                         float sum) {
  const int64_t at = int64_t(d.j0 + rank) * p.in + col;
  if (direct) {
    store_f32(static_cast<T*>(p.da), at, sum * static_cast<float>(p.drop.scale));
  } else {
    p.workspace[d.split * int64_t(p.r) * p.in + at] = sum;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) da_tc_kernel(lora::BackwardParams p) {
  DYN_SMEM(unsigned char, smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, mat = lane >> 3;
  const int g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, K = p.in;
  const DaBlock d = da_block(p, lora::da_split_rows(M, K, p.r, p.dtype));
  const bool direct = lora::da_splits(M, K, p.r, p.dtype) == 1;
  const int k16 = round16(d.ranks) / 16;
  const T* x = static_cast<const T*>(p.x);
  const T* dxa = static_cast<const T*>(p.dxa);
  const bool vec_x = K % 8 == 0 && aligned16(p.x), vec_dxa = p.r % 8 == 0 && aligned16(p.dxa);
  auto x_tile = [&](int s) { return smem + s * kDaStageBytes; };
  auto d_tile = [&](int s) { return smem + s * kDaStageBytes + kDaXBytes; };

  // Thread tid owns x chunks tid and tid + 256 of a stage: 4 per row, so 4 lanes read a row's 64 bytes.
  auto issue = [&](int kt, int s) {
    const int64_t r0 = d.i0 + int64_t(kt) * lora::kDaStageRows;
PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads, row = c >> 2, chunk = c & 3;
      const int64_t gr = r0 + row, gk = d.c0 + chunk * 8;
      const int64_t n = gr < d.i1 && gk < K ? (K - gk < 8 ? K - gk : 8) : 0;
      stage_chunk(x_tile(s) + offset32(row, chunk), x + gr * K + gk, n, vec_x, x);
    }
    for (int c = tid; c < int(lora::kDaStageRows) * k16 * 2; c += kThreads) {
      const int row = c / (k16 * 2), chunk = c - row * (k16 * 2);
      const int64_t gr = r0 + row;
      const int left = d.ranks - chunk * 8;
      stage_chunk(d_tile(s) + offset64(row, chunk), dxa + gr * p.r + d.j0 + chunk * 8,
                  gr < d.i1 && left > 0 ? (left < 8 ? left : 8) : 0, vec_dxa, dxa);
    }
  };
  auto drop = [&](int kt, int s) {
PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads, row = c >> 2, chunk = c & 3;
      const int64_t gr = d.i0 + int64_t(kt) * lora::kDaStageRows + row, gk = d.c0 + chunk * 8;
      if (gr < d.i1 && gk < K) {
        uint8_t* at = x_tile(s) + offset32(row, chunk);
        store16(at, drop16<T>(load16(at), keep_bits<8>(p.drop, uint64_t(gr * K + gk))));
      }
    }
  };

  const int ktiles = int(ceil_div(d.i1 - d.i0, lora::kDaStageRows));
  for (int s = 0; s < kRing - 1; ++s) {
    if (s < ktiles) issue(s, s);
    pk::ptx::cp_async_commit();
  }
  float acc[kRankChunk / 16][4][4];
PK_UNROLL
  for (int mi = 0; mi < kRankChunk / 16; ++mi)
PK_UNROLL
    for (int f = 0; f < 4; ++f)
PK_UNROLL
      for (int j = 0; j < 4; ++j) acc[mi][f][j] = 0.0f;

  for (int kt = 0; kt < ktiles; ++kt) {
    pk::ptx::cp_async_wait<kRing - 2>();
    drop(kt, kt % kRing);
    __syncthreads();
    if (kt + kRing - 1 < ktiles) issue(kt + kRing - 1, (kt + kRing - 1) % kRing);
    pk::ptx::cp_async_commit();
    const uint8_t* xs = x_tile(kt % kRing);
    const uint8_t* ds = d_tile(kt % kRing);
    // matrices (x rows, columns): (0-7, 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) of each 16 columns, transposed:
    // the B fragments of two 8-column blocks
    uint32_t b[4][2];
PK_UNROLL
    for (int pair = 0; pair < 2; ++pair) {
      uint32_t b4[4];
      pk::ptx::ldmatrix_x4_trans(b4, xs + offset32(warp * 16 + (mat & 1) * 8 + (lane & 7), pair * 2 + (mat >> 1)));
      b[2 * pair][0] = b4[0];
      b[2 * pair][1] = b4[1];
      b[2 * pair + 1][0] = b4[2];
      b[2 * pair + 1][1] = b4[3];
    }
PK_UNROLL
    for (int mi = 0; mi < kRankChunk / 16; ++mi) {
      if (mi < k16) {
        // matrices (x rows, ranks): (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15), transposed: dxa^T's A fragment
        uint32_t af[4];
        pk::ptx::ldmatrix_x4_trans(af, ds + offset64(warp * 16 + (mat >> 1) * 8 + (lane & 7), mi * 2 + (mat & 1)));
PK_UNROLL
        for (int f = 0; f < 4; ++f) mma<T>(acc[mi][f], af, b[f]);
      }
    }
  }
  pk::ptx::cp_async_wait<0>();
  __syncthreads();

  // Lane (g, t) holds ranks 16 mi + g (+ 8) at columns 8f + 2t, +1.
  float* parts = reinterpret_cast<float*>(smem);
PK_UNROLL
  for (int mi = 0; mi < kRankChunk / 16; ++mi) {
    if (mi < k16) {
PK_UNROLL
      for (int f = 0; f < 4; ++f)
PK_UNROLL
        for (int h = 0; h < 2; ++h) {
          store_pair(parts + (warp * kRankChunk + mi * 16 + g + 8 * h) * kDaPartStride + f * 8 + 2 * t, acc[mi][f][2 * h],
                     acc[mi][f][2 * h + 1]);
        }
    }
  }
  __syncthreads();
  for (int q = tid; q < d.ranks * int(lora::kDaCols); q += kThreads) {
    const int rank = q / int(lora::kDaCols), col = q % int(lora::kDaCols);
    if (d.c0 + col >= K) continue;
    float sum = 0.0f;
PK_UNROLL
    for (int w = 0; w < kWarps; ++w) sum += parts[(w * kRankChunk + rank) * kDaPartStride + col];
    da_store<T>(p, d, direct, rank, d.c0 + col, sum);
  }
}

// dA = s * (the splits' partials added in split order): one thread per element, coalesced over columns.
template <class T>
__global__ void __launch_bounds__(kThreads) da_reduce_kernel(lora::BackwardParams p) {
  const int64_t n = int64_t(p.r) * p.in, splits = lora::da_splits(p.m, p.in, p.r, p.dtype);
  const float s = static_cast<float>(p.drop.scale);
  T* da = static_cast<T*>(p.da);
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    float sum = 0.0f;
    for (int64_t sp = 0; sp < splits; ++sp) sum += p.workspace[sp * n + e];
    store_f32(da, e, sum * s);
  }
}

// ---- fp32 on CUDA cores ----------------------------------------------------------------------------------------------

// xa = s keep(x) A^T: a block takes 32 rows and the <= 64 ranks of its chunk, 32 columns at a time through shared
// memory: x [32][32] masked as it is stored (a thread's 4 elements, one Philox call), A [64][33] (the pad puts the
// 32 ranks a warp reads at one column into 32 banks). Thread (rank tid & 63, rows 8 (tid >> 6) .. +8): 8 fp32 sums.
template <class T>
__global__ void __launch_bounds__(kThreads) down_f32_kernel(lora::DownParams p) {
  static_assert(std::is_same_v<T, float>, "the 16-bit types take down_tc_kernel");
  __shared__ __align__(16) float xs[32][32];
  __shared__ float as[kRankChunk][33];
  const int tid = threadIdx.x;
  const int64_t M = p.m, K = p.in;
  const int chunks = int(ceil_div(p.r, kRankChunk));
  const int64_t m0 = int64_t(blockIdx.x / chunks) * 32;
  const int rank0 = int(blockIdx.x % chunks) * kRankChunk, ranks = ranks_of(p.r, int(blockIdx.x % chunks));
  const float* x = static_cast<const float*>(p.x);
  const float* a = static_cast<const float*>(p.a) + int64_t(rank0) * K;
  const bool vec = K % 4 == 0 && aligned16(p.x) && aligned16(p.a);
  const int rank = tid & 63, rows0 = (tid >> 6) * 8;
  float acc[8] = {};
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    {
      const int row = tid >> 3, q = tid & 7;
      const int64_t gr = m0 + row, gk = k0 + 4 * q;
      const int64_t n = gr < M && gk < K ? (K - gk < 4 ? K - gk : 4) : 0;
      uint4 v = load_chunk(x + gr * K + gk, n, vec);
      if (n > 0) v = drop16<float>(v, keep_bits<4>(p.drop, uint64_t(gr * K + gk)));
      store16(&xs[row][4 * q], v);
    }
PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads, row = c >> 3, q = c & 7;
      const int64_t gk = k0 + 4 * q;
      const int64_t n = row < ranks && gk < K ? (K - gk < 4 ? K - gk : 4) : 0;
      const uint4 v = load_chunk(a + row * K + gk, n, vec);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
PK_UNROLL
      for (int j = 0; j < 4; ++j) memcpy(&as[row][4 * q + j], &w[j], 4);
    }
    __syncthreads();
    if (rank < ranks) {
      for (int k = 0; k < 32; ++k) {
        const float av = as[rank][k];
PK_UNROLL
        for (int i = 0; i < 8; ++i) acc[i] += xs[rows0 + i][k] * av;
      }
    }
    __syncthreads();
  }
  float* xa = static_cast<float*>(p.xa);
  const float scale = static_cast<float>(p.drop.scale);
PK_UNROLL
  for (int i = 0; i < 8; ++i) {
    const int64_t row = m0 + rows0 + i;
    if (row < M && rank < ranks) xa[row * p.r + rank0 + rank] = acc[i] * scale;
  }
}

// dx += keep * s * (dxa A): one thread per 4 adjacent elements of a dx row (one Philox call, 16-byte A and dx
// accesses where rows allow).
template <class T>
__global__ void __launch_bounds__(kThreads) dx_f32_kernel(lora::BackwardParams p) {
  static_assert(std::is_same_v<T, float>, "the 16-bit types take dx_tc_kernel");
  const float* a = static_cast<const float*>(p.a);
  const float* dxa = static_cast<const float*>(p.dxa);
  float* dx = static_cast<float*>(p.dx);
  const int64_t K = p.in, quads = ceil_div(K, 4), n = p.m * quads;
  const bool vec = K % 4 == 0 && aligned16(p.a) && aligned16(p.dx);
  const float s = static_cast<float>(p.drop.scale);
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    const int64_t i = e / quads, k0 = (e - i * quads) * 4, left = K - k0 < 4 ? K - k0 : 4;
    float acc[4] = {};
    for (int j = 0; j < p.r; ++j) {
      const float dj = dxa[i * p.r + j];
      const uint4 v = load_chunk(a + int64_t(j) * K + k0, left, vec);
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
PK_UNROLL
      for (int c = 0; c < 4; ++c) {
        float av;
        memcpy(&av, &w[c], 4);
        acc[c] += dj * av;
      }
    }
    const unsigned keep = keep_bits<4>(p.drop, uint64_t(i * K + k0));
    float* out = dx + i * K + k0;
    if (vec) {
      float4 o = load16<float4>(out);
      o.x += keep & 1u ? s * acc[0] : 0.0f;
      o.y += keep & 2u ? s * acc[1] : 0.0f;
      o.z += keep & 4u ? s * acc[2] : 0.0f;
      o.w += keep & 8u ? s * acc[3] : 0.0f;
      store16(out, o);
    } else {
      for (int c = 0; c < left; ++c) out[c] += (keep >> c) & 1u ? s * acc[c] : 0.0f;
    }
  }
}

// dA on CUDA cores, split over M like da_tc_kernel (at most 512 rows a split): a block sums its split's rows for 32
// columns and <= 64 ranks, 32 rows at a time through shared memory (x masked as it is stored). Thread (column
// tid & 31, ranks tid >> 5 + 8i): 8 fp32 sums over every row of the split, in row order.
template <class T>
__global__ void __launch_bounds__(kThreads) da_f32_kernel(lora::BackwardParams p) {
  static_assert(std::is_same_v<T, float>, "the 16-bit types take da_tc_kernel");
  __shared__ __align__(16) float xs[32][32];
  __shared__ __align__(16) float ds[32][kRankChunk];
  const int tid = threadIdx.x;
  const int64_t M = p.m, K = p.in;
  const DaBlock d = da_block(p, lora::da_split_rows(M, K, p.r, p.dtype));
  const bool direct = lora::da_splits(M, K, p.r, p.dtype) == 1;
  const float* x = static_cast<const float*>(p.x);
  const float* dxa = static_cast<const float*>(p.dxa);
  const bool vec_x = K % 4 == 0 && aligned16(p.x), vec_dxa = p.r % 4 == 0 && aligned16(p.dxa);
  const int col = tid & 31, rank0 = tid >> 5;
  float acc[8] = {};
  for (int64_t r0 = d.i0; r0 < d.i1; r0 += 32) {
    {
      const int row = tid >> 3, q = tid & 7;
      const int64_t gr = r0 + row, gk = d.c0 + 4 * q;
      const int64_t n = gr < d.i1 && gk < K ? (K - gk < 4 ? K - gk : 4) : 0;
      uint4 v = load_chunk(x + gr * K + gk, n, vec_x);
      if (n > 0) v = drop16<float>(v, keep_bits<4>(p.drop, uint64_t(gr * K + gk)));
      store16(&xs[row][4 * q], v);
    }
PK_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kThreads, row = c >> 4, q = c & 15;
      const int64_t gr = r0 + row;
      const int left = d.ranks - 4 * q;
      store16(&ds[row][4 * q], load_chunk(dxa + gr * p.r + d.j0 + 4 * q, gr < d.i1 && left > 0 ? (left < 4 ? left : 4) : 0,
                                          vec_dxa));
    }
    __syncthreads();
    for (int row = 0; row < 32; ++row) {
      const float xv = xs[row][col];
PK_UNROLL
      for (int i = 0; i < 8; ++i) acc[i] += ds[row][rank0 + 8 * i] * xv;
    }
    __syncthreads();
  }
PK_UNROLL
  for (int i = 0; i < 8; ++i) {
    const int rank = rank0 + 8 * i;
    if (rank < d.ranks && d.c0 + col < K) da_store<float>(p, d, direct, rank, d.c0 + col, acc[i]);
  }
}

// Dynamic shared memory of down_tc_kernel: the ring, or the warps' partials where they are larger. 32 KiB at r = 16,
// 80 KiB at r >= 64 (16-row blocks).
size_t down_smem(int r, int rows) {
  const int a_rows = round16(r < kRankChunk ? r : kRankChunk);
  const size_t ring = kRing * down_stage_bytes(rows, a_rows), parts = down_part_bytes(a_rows);
  return ring > parts ? ring : parts;
}

}  // namespace

cudaError_t lora_down(const lora::DownParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    if constexpr (std::is_same_v<T, float>) {
      const int64_t blocks = ceil_div(p.m, 32) * ceil_div(p.r, kRankChunk);
      KLAUNCH(down_f32_kernel<T>, unsigned(blocks), kThreads, 0, stream, p);
    } else if (p.m >= kDownWideRows) {
      const size_t smem = down_smem(p.r, 32);
      if (prepare(down_tc_kernel<T, 2>, int64_t(smem)) == cudaSuccess) {
        KLAUNCH((down_tc_kernel<T, 2>), unsigned(ceil_div(p.m, 32) * ceil_div(p.r, kRankChunk)), kThreads, smem, stream, p);
      }
    } else {
      const size_t smem = down_smem(p.r, 16);
      if (prepare(down_tc_kernel<T, 1>, int64_t(smem)) == cudaSuccess) {
        KLAUNCH((down_tc_kernel<T, 1>), unsigned(ceil_div(p.m, 16) * ceil_div(p.r, kRankChunk)), kThreads, smem, stream, p);
      }
    }
  });
}

cudaError_t lora_backward(const lora::BackwardParams& p, cudaStream_t stream) {
  const int64_t splits = lora::da_splits(p.m, p.in, p.r, p.dtype);
  if (p.da != nullptr && splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t da_blocks = ceil_div(p.in, lora::kDaCols) * ceil_div(p.r, kRankChunk) * splits;
  return launch_typed(p.dtype, [&]<class T>() {
    if constexpr (std::is_same_v<T, float>) {
      if (p.dx != nullptr) KLAUNCH(dx_f32_kernel<T>, grid_for(p.m * ceil_div(p.in, 4), kThreads), kThreads, 0, stream, p);
      if (p.da != nullptr) KLAUNCH(da_f32_kernel<T>, unsigned(da_blocks), kThreads, 0, stream, p);
    } else {
      if (p.dx != nullptr && prepare(dx_tc_kernel<T>, int64_t(kDxSmem)) == cudaSuccess) {
        const int64_t blocks = ceil_div(p.m, kDxTile) * ceil_div(p.in, kDxTile);
        KLAUNCH(dx_tc_kernel<T>, unsigned(blocks), kThreads, kDxSmem, stream, p);
      }
      if (p.da != nullptr && prepare(da_tc_kernel<T>, int64_t(kDaSmem)) == cudaSuccess) {
        KLAUNCH(da_tc_kernel<T>, unsigned(da_blocks), kThreads, kDaSmem, stream, p);
      }
    }
    if (p.da != nullptr && splits > 1) {
      KLAUNCH(da_reduce_kernel<T>, grid_for(int64_t(p.r) * p.in, kThreads), kThreads, 0, stream, p);
    }
  });
}

}  // namespace peft_kernels::cuda
