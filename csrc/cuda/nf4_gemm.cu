// Tensor-core NF4 linear layers: y = x W^T (+ bias) for more rows than the GEMV takes, and the input gradient
// dx = dy W, both straight from the packed bitsandbytes NF4 weight (no workspace, no 16-bit copy of W).
//
// Both kernels are one design (../shared/GPU_DESIGN.md): a 128 x 128 output tile per 256-thread block, 8 warps
// of 64 x 32; the activation tile (x or dy) and the packed codes of the weight tile stream through a 4-stage
// cp.async pipeline; the activation's mma A fragments come from ldmatrix.x4 on an XOR-swizzled tile; every
// mma B fragment is built in registers from 4-bit codes (16-entry NF4 table in shared memory, fp32 scale,
// one rounding to bf16/f16: the same 16-bit weight the reference decodes). The weight's scales are decoded
// from the double-quantized bytes inside the kernel, one per 32 weights, a pipeline stage ahead.
//
// Arithmetic intensity against global traffic per 64-deep k step: 2*128*128*64 FLOPs over 16 KiB of
// activation + 4 KiB of codes + 1 KiB of scale bytes and their lookups = ~100 FLOP/B, so L2 keeps up with
// the tensor cores (H100 ridge against DRAM: 295 FLOP/B; blocks sharing a weight tile run together, below).
//
// The mma's n index is permuted onto the weight's rows (forward) or dx's columns (backward): n = c of
// fragment f is row/column 4c + f of the warp's 32. A lane then owns 8 adjacent outputs (columns 8t..8t+7)
// and stores them as one 16-byte vector; in backward it also makes a lane's codes for 4 fragments one
// 16-bit shared load.
#include <cstring>
#include <type_traits>

#include "launch.h"
#include "nf4_launch.h"
#include "peft_kernels/nf4.h"
#include "peft_kernels/ptx.cuh"
#include "tensor_core.h"

namespace peft_kernels::cuda {
namespace {

constexpr int kTile = 128;   // output tile: rows of x/dy, and columns of y (W rows) or of dx (W columns)
constexpr int kDepth = 64;   // reduction depth per pipeline stage
constexpr int kStages = 4;   // 3 tiles in flight (60 KiB) while one is multiplied
constexpr int kGroup = 32;   // weights per scale lookup: NF4 blocks are powers of two >= 32

// Shared memory of one stage. The activation tile is 128 rows of 64 16-bit values (128 bytes, eight 16-byte
// chunks); chunk c of row r sits at chunk c ^ (r & 7), so the 8 rows an ldmatrix phase reads hit 8 different
// bank groups. The code tiles are swizzled for their readers below; scales are fp32, one per 32 weights.
struct Stage {
  alignas(16) uint8_t act[kTile * kDepth * 2];
  alignas(16) uint8_t codes[kTile * kDepth / 2];
  float scales[kTile * kDepth / kGroup];
};
constexpr size_t kSmemBytes = sizeof(Stage) * kStages;  // 86016 bytes: opt-in above 48 KiB on sm_80..sm_90

__device__ __forceinline__ int act_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// Shared memory beyond the stages: the 256-entry code of the 8-bit absmax, and for the forward kernel with
// double quantization the 8-bit absmax bytes and nested absmax of all blocks its 128 weight rows touch (one
// contiguous range of the absmax array), staged once per thread block: looked up per stage from there, the
// scales cost no global traffic in the main loop (loaded per stage, each thread's byte came from its own
// 32-byte sector: 17% of the GEMM's global traffic at 4096x4096). The bytes are stored with 16 bytes of
// padding after every 128 (q_slot): the 16 rows a warp looks up per stage lie in/blocksize bytes apart, 64 at
// 4096/64, which put them all into 2 banks (8 wavefronts per lookup, 7.8% extra in all); padded, 2 per bank.
__device__ __forceinline__ int64_t q_slot(int64_t byte) { return byte + ((byte >> 7) << 4); }
struct ScaleSmem {
  int64_t nested;  // floats
  int64_t q;       // bytes
};
__host__ __device__ inline ScaleSmem forward_scale_smem(int64_t K, int blocksize, bool double_quant) {
  if (!double_quant) return {0, 0};
  const int64_t span = kTile * K / blocksize + 2;  // whole blocks plus one partial block at each end
  const int64_t chunks = (span + 15 + 15) / 16;
  return {(span / nf4::kNestedBlocksize + 2 + 3) & ~int64_t(3), 16 * (chunks + chunks / 8 + 1)};
}
constexpr size_t kCode8Bytes = 256 * sizeof(float);

// The raw loads of one scale in the backward kernel, whose weight rows are the whole reduction: issued while
// a stage is requested, decoded one iteration later, so that their latency overlaps a stage's mma work
// instead of stalling the thread that requests it.
struct ScaleLoad {
  unsigned q;
  float value;  // nested absmax (double quantization) or the fp32 absmax itself
  bool valid;
};

__device__ __forceinline__ ScaleLoad load_scale(const nf4::Packed& w, int64_t element, bool valid, int shift) {
  ScaleLoad s{0, 0.0f, valid};
  if (valid) {
    const int64_t block = element >> shift;
    if (w.nested_absmax != nullptr) {
      s.q = __ldg(static_cast<const uint8_t*>(w.absmax) + block);
      s.value = __ldg(w.nested_absmax + block / w.nested_blocksize);
    } else {
      s.value = __ldg(static_cast<const float*>(w.absmax) + block);
    }
  }
  return s;
}

// nf4::block_scale's value, bit for bit; 0 outside the weight, so that zero-filled codes there add nothing.
__device__ __forceinline__ float finish_scale(const nf4::Packed& w, const ScaleLoad& s, const float* code8,
                                              float offset) {
  if (!s.valid) return 0.0f;
  if (w.nested_absmax == nullptr) return s.value;
  return nf4::nested_absmax(code8, static_cast<uint8_t>(s.q), s.value, offset);
}

// The 4 x 16 rows of a warp's 64-row slice of the activation tile for k16 step `ks`, as mma A fragments.
__device__ __forceinline__ void load_a(uint32_t (&a)[4][4], const uint8_t* act, int warp_row, int ks, int lane) {
  const int mat = lane >> 3;
PK_UNROLL
  for (int mi = 0; mi < 4; ++mi) {
    const int row = warp_row + mi * 16 + (mat & 1) * 8 + (lane & 7);
    pk::ptx::ldmatrix_x4(a[mi], act + act_offset(row, ks * 2 + (mat >> 1)));
  }
}

// Writes a lane's 8 adjacent outputs (row `row`, columns col..col+7 of an [rows, cols] matrix), v[j] for
// column col + j: one 16-byte store when the row is 16-byte aligned and all 8 exist, else one by one.
template <class T>
__device__ __forceinline__ void store8(T* out, int64_t row, int64_t col, int64_t cols, const float (&v)[8], bool vec) {
  if (vec && col + 8 <= cols) {
    uint4 packed;
    packed.x = pack2<T>(v[0], v[1]);
    packed.y = pack2<T>(v[2], v[3]);
    packed.z = pack2<T>(v[4], v[5]);
    packed.w = pack2<T>(v[6], v[7]);
    store16(out + row * cols + col, packed);
  } else {
PK_UNROLL
    for (int j = 0; j < 8; ++j) {
      if (col + j < cols) store_f32(out, row * cols + col + j, v[j]);
    }
  }
}

// Tile (tile_m, tile_n) of block b: blocks go down the rows of 8 adjacent tile columns before moving on, so
// the blocks in flight at once (132 SMs) share those columns' operand and read a band of rows that L2 holds.
__device__ __forceinline__ void tile_of(int64_t b, int64_t tiles_m, int64_t tiles_n, int64_t& tile_m, int64_t& tile_n) {
  constexpr int64_t kBand = 8;
  const int64_t band = b / (kBand * tiles_m);
  const int64_t first = band * kBand;
  const int64_t width = tiles_n - first < kBand ? tiles_n - first : kBand;
  const int64_t r = b - band * kBand * tiles_m;
  tile_n = first + r % width;
  tile_m = r / width;
}

// The first row and column of this block's output tile in a [rows, cols] output.
struct TileOrigin {
  int64_t row, col;
};
__device__ __forceinline__ TileOrigin block_origin(int64_t rows, int64_t cols) {
  int64_t tile_m, tile_n;
  tile_of(blockIdx.x, (rows + kTile - 1) / kTile, (cols + kTile - 1) / kTile, tile_m, tile_n);
  return {tile_m * kTile, tile_n * kTile};
}

// Requests the stage's activation tile: rows row0 .. +128 and columns k0 .. +64 of a [rows, cols] matrix,
// 4 16-byte chunks per thread; zero-filled outside it.
template <class T>
__device__ __forceinline__ void issue_act(Stage& s, const T* src, int64_t row0, int64_t k0, int64_t rows, int64_t cols,
                                          int tid) {
PK_UNROLL
  for (int i = 0; i < 4; ++i) {
    const int c = tid + i * kThreads, row = c >> 3, chunk = c & 7;
    const int64_t gr = row0 + row, gk = k0 + chunk * 8;
    const bool ok = gr < rows && gk < cols;
    pk::ptx::cp_async_16(s.act + act_offset(row, chunk), ok ? src + gr * cols + gk : src, ok ? 16 : 0);
  }
}

// The cp.async ring both kernels run over `ktiles` stages of depth 64. issue(kt, stage) requests stage kt's
// tiles and returns its thread's raw scale; finish(raw) turns that into the fp32 scale stored at
// scales[tid]. In the main loop the scale requested in one iteration is stored in the next, after the
// barrier, so its load latency overlaps a stage's mma work; it lands in a stage no warp reads before the
// next barrier. compute(stage) multiplies the stage that is complete.
template <class Issue, class Finish, class Compute>
__device__ __forceinline__ void run_pipeline(Stage* stages, int ktiles, int tid, Issue issue, Finish finish,
                                             Compute compute) {
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) stages[s].scales[tid] = finish(issue(s, stages[s]));
    pk::ptx::cp_async_commit();
  }
  decltype(issue(0, stages[0])) pending{};
  int pending_stage = -1;
  for (int kt = 0; kt < ktiles; ++kt) {
    pk::ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (pending_stage >= 0) stages[pending_stage].scales[tid] = finish(pending);
    const int next = kt + kStages - 1;
    pending_stage = -1;
    if (next < ktiles) {
      pending = issue(next, stages[next % kStages]);
      pending_stage = next % kStages;
    }
    pk::ptx::cp_async_commit();
    compute(stages[kt % kStages]);
  }
  pk::ptx::cp_async_wait<0>();
}

// Writes the warp's 64 x 32 accumulators to rows row0 .. +64 (row0 = tile row + the warp's row) and columns
// col0 .. +32 of out [rows, cols], adding bias[j] to a lane's column col0 + 8t + j (an array, not a pointer
// that may be null: a pointer into a register array would put the array in local memory). Lane
// (g, t) holds rows g and g + 8 of each 16-row slice at columns 8t + j (j < 4 from fragment j's first
// column, j >= 4 from fragment j - 4's second): the permuted n index above.
template <class T>
__device__ __forceinline__ void store_acc(T* out, const float (&acc)[4][4][4], int64_t row0, int64_t col, int64_t rows,
                                          int64_t cols, const float (&bias)[8], bool vec, int g) {
PK_UNROLL
  for (int mi = 0; mi < 4; ++mi) {
PK_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + mi * 16 + g + 8 * h;
      if (row >= rows) continue;
      float v[8];
PK_UNROLL
      for (int j = 0; j < 4; ++j) {
        v[j] = acc[mi][j][2 * h] + bias[j];
        v[j + 4] = acc[mi][j][2 * h + 1] + bias[j + 4];
      }
      store8(out, row, col, cols, v, vec);
    }
  }
}

// y [m, out] = x [m, in] W^T (+ bias). Requires in % 32 == 0 and x, codes (and 8-bit absmax) 16-byte aligned
// (nf4_gemm_supported). Warp w computes rows 64 (w & 1) .. +64 and W rows 32 (w >> 1) .. +32 of the tile.
template <class T>
__global__ void __launch_bounds__(kThreads) nf4_gemm_kernel(nf4::GemmParams p) {
  static_assert(kThreads == 256, "one thread per code8 entry and per stage scale");
  DYN_SMEM(unsigned char, smem);
  Stage* stages = reinterpret_cast<Stage*>(smem);
  __shared__ float lut[16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, K = p.in, N = p.out;
  const TileOrigin origin = block_origin(M, N);
  const int64_t m0 = origin.row, n0 = origin.col;
  const T* x = static_cast<const T*>(p.x);
  if (tid < 16) lut[tid] = nf4::kCode[tid];
  const int shift = __ffs(p.w.blocksize) - 1;
  const bool dq = p.w.nested_absmax != nullptr;
  const float offset = dq ? *p.w.offset : 0.0f;

  // The block's scale inputs (double quantization): absmax bytes [first, last) of its rows from a 16-byte
  // aligned start, their nested absmax and the code, before the pipeline starts.
  const ScaleSmem extra = forward_scale_smem(K, p.w.blocksize, dq);
  float* s_code8 = reinterpret_cast<float*>(smem + kSmemBytes);
  float* s_nested = s_code8 + 256;
  uint8_t* s_q = reinterpret_cast<uint8_t*>(s_nested + extra.nested);
  int64_t q_base = 0, nested_base = 0;
  if (dq) {
    const int64_t total = (N * K) >> shift;
    const int64_t first = (n0 * K) >> shift;
    const int64_t rows_end = n0 + kTile < N ? n0 + kTile : N;
    const int64_t last = ((rows_end * K + p.w.blocksize - 1) >> shift) < total ? (rows_end * K + p.w.blocksize - 1) >> shift
                                                                              : total;
    q_base = first & ~int64_t(15);
    const uint8_t* q = static_cast<const uint8_t*>(p.w.absmax);
    for (int64_t c = tid; 16 * c < last - q_base; c += kThreads) {
      const int64_t at = q_base + 16 * c;
      pk::ptx::cp_async_16(s_q + q_slot(16 * c), q + at, total - at < 16 ? int(total - at) : 16);
    }
    nested_base = first / p.w.nested_blocksize;
    for (int64_t i = tid; i <= (last - 1) / p.w.nested_blocksize - nested_base; i += kThreads) {
      s_nested[i] = __ldg(p.w.nested_absmax + nested_base + i);
    }
    s_code8[tid] = __ldg(p.w.code8 + tid);
  }
  pk::ptx::cp_async_commit();
  pk::ptx::cp_async_wait<0>();
  __syncthreads();
  const float* absmax32 = static_cast<const float*>(p.w.absmax);
  auto scale_of = [&](int64_t element, bool ok) -> float {  // nf4::block_scale, bit for bit; 0 outside W
    if (!ok) return 0.0f;
    const int64_t block = element >> shift;
    if (dq) {
      return nf4::nested_absmax(s_code8, s_q[q_slot(block - q_base)], s_nested[block / p.w.nested_blocksize - nested_base],
                                offset);
    }
    return __ldg(absmax32 + block);  // stored one iteration later: the load's latency overlaps a stage
  };

  // Stage loads per thread: 4 activation chunks, 1 code chunk (W row tid / 2, 32 weights) and the scale of
  // W row tid % 128, weights 32 (tid / 128) .. +32, stored at scales[tid] (rows of a warp: distinct banks).
  const int code_row = tid >> 1, code_half = tid & 1;
  const int64_t wrow = n0 + code_row, srow = n0 + (tid & 127);
  auto issue = [&](int kt, Stage& s) {
    const int64_t k0 = int64_t(kt) * kDepth;
    issue_act(s, x, m0, k0, M, K, tid);
    const int64_t gk = k0 + code_half * kGroup;
    const bool ok = wrow < N && gk < K;
    const int swz = code_half ^ ((code_row >> 2) & 1);  // rows 4 apart (one ldmatrix-like quarter) differ
    pk::ptx::cp_async_16(s.codes + code_row * 32 + swz * 16, ok ? p.w.codes + (wrow * K + gk) / 2 : p.w.codes,
                         ok ? 16 : 0);
    const int64_t sk = k0 + (tid >> 7) * kGroup;
    return scale_of(srow * K + sk, srow < N && sk < K);
  };

  float acc[4][4][4] = {};
  const int warp_row = (warp & 1) * 64, warp_col = (warp >> 1) * 32;
  auto compute = [&](const Stage& s) {
PK_UNROLL
    for (int half = 0; half < 2; ++half) {  // 32 weights per row: one 16-byte code load per fragment
      uint32_t b[2][4][2];
PK_UNROLL
      for (int f = 0; f < 4; ++f) {
        const int row = warp_col + 4 * g + f;
        const int swz = half ^ ((row >> 2) & 1);
        const uint4 words = load16(s.codes + row * 32 + swz * 16);
        const float scale = s.scales[half * kTile + row];
        const uint32_t w4[4] = {words.x, words.y, words.z, words.w};
PK_UNROLL
        for (int step = 0; step < 2; ++step) {
          // k 2t, 2t+1 are byte t of the step's first 4 bytes (high nibble first); k 2t+8, 2t+9 byte t of the next 4
PK_UNROLL
          for (int r = 0; r < 2; ++r) {
            const unsigned byte = (w4[2 * step + r] >> (8 * t)) & 0xFFu;
            b[step][f][r] = pack2<T>(mul_rn(lut[byte >> 4], scale), mul_rn(lut[byte & 15u], scale));
          }
        }
      }
PK_UNROLL
      for (int step = 0; step < 2; ++step) {
        uint32_t a[4][4];
        load_a(a, s.act, warp_row, half * 2 + step, lane);
PK_UNROLL
        for (int mi = 0; mi < 4; ++mi)
PK_UNROLL
          for (int f = 0; f < 4; ++f) mma<T>(acc[mi][f], a[mi], b[step][f]);
      }
    }
  };
  run_pipeline(stages, int((K + kDepth - 1) / kDepth), tid, issue, [](float scale) { return scale; }, compute);

  T* y = static_cast<T*>(p.y);
  const T* bias = static_cast<const T*>(p.bias);
  const bool vec = N % 8 == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0;
  const int64_t col = n0 + warp_col + 8 * t;
  float bv[8];
PK_UNROLL
  for (int j = 0; j < 8; ++j) bv[j] = col + j < N && bias != nullptr ? load_f32(bias, col + j) : 0.0f;
  store_acc(y, acc, m0 + warp_row, col, M, N, bv, vec, g);
}

// dx [m, in] = dy [m, out] W. Requires in % 32 == 0, out % 8 == 0, dy and codes 16-byte aligned. The
// reduction runs over W's rows, 64 per stage; warp w computes rows 64 (w & 1) .. +64 and dx columns
// 32 (w >> 1) .. +32 of the block's tile. A lane's B fragments need W rows 2t, 2t+1, 2t+8, 2t+9 of a k16
// step at its columns 4g .. 4g+3 (one per fragment): one 16-bit load per row.
template <class T>
__global__ void __launch_bounds__(kThreads) nf4_dx_kernel(nf4::DxParams p) {
  DYN_SMEM(unsigned char, smem);
  Stage* stages = reinterpret_cast<Stage*>(smem);
  __shared__ float lut[16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, K = p.in, N = p.out;
  const TileOrigin origin = block_origin(M, K);
  const int64_t m0 = origin.row, c0 = origin.col;
  const T* dy = static_cast<const T*>(p.dy);
  if (tid < 16) lut[tid] = nf4::kCode[tid];
  const int shift = __ffs(p.w.blocksize) - 1;
  const float offset = p.w.offset != nullptr ? *p.w.offset : 0.0f;
  float* s_code8 = reinterpret_cast<float*>(smem + kSmemBytes);
  if (p.w.nested_absmax != nullptr) s_code8[tid] = __ldg(p.w.code8 + tid);
  __syncthreads();  // read by finish_scale from the prologue on

  // Stage loads: 4 dy chunks, 1 code chunk (W row tid / 4 of the stage's 64, columns 32 (tid & 3) .. +32) and
  // 1 scale (the same 32 weights) per thread. Code rows are 64 bytes; chunk c of row r sits at c ^ ((r >> 1) & 3)
  // so that the rows 2t (+1, +8, +9) that one 16-bit load instruction reads fall into 4 different chunks.
  const int code_row = tid >> 2, code_chunk = tid & 3;
  auto issue = [&](int kt, Stage& s) {
    const int64_t n0 = int64_t(kt) * kDepth;
    issue_act(s, dy, m0, n0, M, N, tid);
    const int64_t wrow = n0 + code_row, gk = c0 + code_chunk * kGroup;
    const bool ok = wrow < N && gk < K;
    const int swz = code_chunk ^ ((code_row >> 1) & 3);
    pk::ptx::cp_async_16(s.codes + code_row * 64 + swz * 16, ok ? p.w.codes + (wrow * K + gk) / 2 : p.w.codes,
                         ok ? 16 : 0);
    return load_scale(p.w, wrow * K + gk, ok, shift);
  };

  float acc[4][4][4] = {};
  const int warp_row = (warp & 1) * 64, warp_chunk = warp >> 1;
  auto compute = [&](const Stage& s) {
PK_UNROLL
    for (int ks = 0; ks < kDepth / 16; ++ks) {
      uint32_t b[4][2];
      float lo[4][4];  // [row of 2t, 2t+1, 2t+8, 2t+9][fragment]
PK_UNROLL
      for (int r = 0; r < 4; ++r) {
        const int row = ks * 16 + 2 * t + (r & 1) + 8 * (r >> 1);
        const int swz = warp_chunk ^ ((row >> 1) & 3);
        const unsigned codes = *reinterpret_cast<const uint16_t*>(s.codes + row * 64 + swz * 16 + 2 * g);
        const float scale = s.scales[row * 4 + warp_chunk];
        // column 4g + f: byte f / 2 of the two, high nibble for even f
        lo[r][0] = mul_rn(lut[(codes >> 4) & 15u], scale);
        lo[r][1] = mul_rn(lut[codes & 15u], scale);
        lo[r][2] = mul_rn(lut[(codes >> 12) & 15u], scale);
        lo[r][3] = mul_rn(lut[(codes >> 8) & 15u], scale);
      }
PK_UNROLL
      for (int f = 0; f < 4; ++f) {
        b[f][0] = pack2<T>(lo[0][f], lo[1][f]);
        b[f][1] = pack2<T>(lo[2][f], lo[3][f]);
      }
      uint32_t a[4][4];
      load_a(a, s.act, warp_row, ks, lane);
PK_UNROLL
      for (int mi = 0; mi < 4; ++mi)
PK_UNROLL
        for (int f = 0; f < 4; ++f) mma<T>(acc[mi][f], a[mi], b[f]);
    }
  };
  auto finish = [&](const ScaleLoad& raw) { return finish_scale(p.w, raw, s_code8, offset); };
  run_pipeline(stages, int((N + kDepth - 1) / kDepth), tid, issue, finish, compute);

  T* dx = static_cast<T*>(p.dx);
  const bool vec = (reinterpret_cast<uintptr_t>(dx) & 15) == 0;  // K % 32 == 0 keeps every row aligned
  const float no_bias[8] = {};
  store_acc(dx, acc, m0 + warp_row, c0 + warp_chunk * 32 + 8 * t, M, K, no_bias, vec, g);
}

// 163 KiB: the most dynamic shared memory a block may opt into on sm_80 (sm_90: 227 KiB).
constexpr int64_t kMaxSmem = 163 * 1024;

int64_t forward_smem(const nf4::GemmParams& p) {
  const ScaleSmem e = forward_scale_smem(p.in, p.w.blocksize, p.w.nested_absmax != nullptr);
  return int64_t(kSmemBytes + kCode8Bytes) + 4 * e.nested + e.q;
}

}  // namespace

// The staged absmax range grows with in / blocksize: 22 KiB at in = 11008 with blocks of 64; past kMaxSmem
// (in > 38k at blocksize 64, 19k at 32) the call goes to the tiled path instead.
bool nf4_gemm_supported(const nf4::GemmParams& p) {
  return p.dtype != DType::kFloat32 && p.in % kGroup == 0 && p.w.blocksize % kGroup == 0 && aligned16(p.x) &&
         aligned16(p.w.codes) && (p.w.nested_absmax == nullptr || aligned16(p.w.absmax)) && forward_smem(p) <= kMaxSmem;
}

bool nf4_linear_dx_supported(const nf4::DxParams& p) {
  return p.dtype != DType::kFloat32 && p.in % kGroup == 0 && p.out % 8 == 0 && p.w.blocksize % kGroup == 0 &&
         aligned16(p.dy) && aligned16(p.w.codes);
}

cudaError_t nf4_gemm(const nf4::GemmParams& p, cudaStream_t stream) {
  const int64_t blocks = ((p.m + kTile - 1) / kTile) * ((p.out + kTile - 1) / kTile);
  const int64_t smem = forward_smem(p);
  return launch_typed(p.dtype, [&]<class T>() {
    if constexpr (!std::is_same_v<T, float>) {
      if (prepare(nf4_gemm_kernel<T>, smem) == cudaSuccess) {
        KLAUNCH((nf4_gemm_kernel<T>), unsigned(blocks), kThreads, size_t(smem), stream, p);
      }
    }
  });
}

cudaError_t nf4_linear_dx(const nf4::DxParams& p, cudaStream_t stream) {
  const int64_t blocks = ((p.m + kTile - 1) / kTile) * ((p.in + kTile - 1) / kTile);
  constexpr int64_t smem = kSmemBytes + kCode8Bytes;
  return launch_typed(p.dtype, [&]<class T>() {
    if constexpr (!std::is_same_v<T, float>) {
      if (prepare(nf4_dx_kernel<T>, smem) == cudaSuccess) {
        KLAUNCH((nf4_dx_kernel<T>), unsigned(blocks), kThreads, size_t(smem), stream, p);
      }
    }
  });
}

}  // namespace peft_kernels::cuda
