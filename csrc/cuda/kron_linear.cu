// kron_linear kernels and their launchers (math and index maps: csrc/include/peft_kernels/kron.h; the design and the
// counters: docs/kron_kernels.md). No torch headers.
//
// bf16/f16 with the shapes of kron::tensor_cores (kron_params.h: every LLaMA width PEFT's factorization gives) run on
// tensor cores (mma.sync m16n8k16, fp32 accumulation). A block keeps A and B in shared memory for its whole life and
// streams rows of x (and dy) through a cp.async ring (3 slots forward, 2 backward), each row a [a_in, b_in] (or
// [a_out, b_out]) tile; A (x) B is never formed, and no intermediate leaves the SM:
// - kron_fwd_tc_kernel: per row, U = A keep(X) (a warp per 16 rows of U, fp32, rounded to T in registers, where its
//   accumulators are already the next product's A fragments), then y (+)= s U B^T, 16-byte stores (B's rows are
//   staged in a permuted order so that a lane holds 8 adjacent outputs).
// - kron_bwd_tc_kernel + kron_reduce_kernel: one pass over dy (and x) per split of rows (kron::grad_splits: 264
//   blocks, <= 512 rows each) for dx and the dA/dB partials. Per row, G = dY B (a warp per 16 rows of G) feeds
//   dA's slice in registers and is staged once in shared memory as T; U^T = X^T A^T (a warp per 16 columns j) feeds
//   dB's slice; then dX^T = G^T A goes through an fp32 staging tile and out as dx (+)= s keep dX with 16-byte loads
//   and stores. The blocks' dA/dB partials are added in split order by the reduce kernel (no float atomics).
// The mask is redrawn from Philox per 16-byte chunk of a staged x row (one call per 8 elements) and never stored.
//
// fp32 and the other shapes take the CUDA-core kernels below the tensor-core ones: each contraction of a row is its
// own kernel with one thread per output element, through an fp32 workspace holding U = A X (or G = dY B) for all
// rows, [m, a_out, b_in]; dA and dB are one block per element, no atomics, so every element is written once and
// results are deterministic.
#include "chunks.h"
#include "kron_launch.h"
#include "launch.h"
#include "tensor_core.h"
#include "peft_kernels/kron.h"
#include "peft_kernels/philox.h"

namespace peft_kernels::cuda {
namespace {

using kron::Dims;

// keep(e) as 0 or 1; no draw when there is no dropout. Each element's draw is recomputed by every thread
// that reads it (a_out times in kron_u_kernel): simple, and identical for any thread layout.
__device__ __forceinline__ float keep(const kron::Dropout& d, int64_t e) {
  return d.threshold == 0 || philox::dropout_draw(d.seed, static_cast<uint64_t>(e)) >= d.threshold ? 1.0f : 0.0f;
}

// The sum of every thread's v, valid in thread 0; all threads of the block must call it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[kWarps];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += partial[w];
  }
  __syncthreads();  // partial is reused by the block's next element
  return total;
}

// U[r] = A (keep * X_r): one thread per element (r, p, j) of U; the threads of a warp take consecutive j, so
// their reads of x are coalesced.
template <class T>
__global__ void __launch_bounds__(kThreads)
kron_u_kernel(const T* x, const T* a, Dims d, int64_t m, kron::Dropout drop, float* u) {
  const int64_t n = m * d.mid();
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    const int64_t r = e / d.mid();
    const kron::Pair pj = kron::split_u(d, e - r * d.mid());
    float acc = 0.0f;
    for (int64_t i = 0; i < d.a_in; ++i) {
      const int64_t xe = r * d.in() + kron::x_at(d, i, pj.inner);
      acc += load_f32(a, kron::a_at(d, pj.outer, i)) * keep(drop, xe) * load_f32(x, xe);
    }
    u[e] = acc;
  }
}

// y[r] = (accumulate ? y[r] : 0) + s * U_r B^T: one thread per element (r, p, q) of y.
template <class T>
__global__ void __launch_bounds__(kThreads)
kron_y_kernel(const float* u, const T* b, Dims d, int64_t m, float s, bool accumulate, T* y) {
  const int64_t n = m * d.out();
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    const int64_t r = e / d.out();
    const kron::Pair pq = kron::split_y(d, e - r * d.out());
    float acc = 0.0f;
    for (int64_t j = 0; j < d.b_in; ++j) {
      acc += u[r * d.mid() + kron::u_at(d, pq.outer, j)] * load_f32(b, kron::b_at(d, pq.inner, j));
    }
    store_f32(y, e, (accumulate ? load_f32(y, e) : 0.0f) + s * acc);
  }
}

// G[r] = dY_r B: one thread per element (r, p, j) of G.
template <class T>
__global__ void __launch_bounds__(kThreads) kron_g_kernel(const T* dy, const T* b, Dims d, int64_t m, float* g) {
  const int64_t n = m * d.mid();
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    const int64_t r = e / d.mid();
    const kron::Pair pj = kron::split_u(d, e - r * d.mid());
    float acc = 0.0f;
    for (int64_t q = 0; q < d.b_out; ++q) {
      acc += load_f32(dy, r * d.out() + kron::y_at(d, pj.outer, q)) * load_f32(b, kron::b_at(d, q, pj.inner));
    }
    g[e] = acc;
  }
}

// dx[r] = (accumulate ? dx[r] : 0) + s * keep_r * A^T G_r: one thread per element (r, i, j) of dx.
template <class T>
__global__ void __launch_bounds__(kThreads)
kron_dx_kernel(const float* g, const T* a, Dims d, int64_t m, kron::Dropout drop, float s, bool accumulate, T* dx) {
  const int64_t n = m * d.in();
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < n; e += int64_t(gridDim.x) * kThreads) {
    const int64_t r = e / d.in();
    const kron::Pair ij = kron::split_x(d, e - r * d.in());
    float acc = 0.0f;
    for (int64_t p = 0; p < d.a_out; ++p) {
      acc += load_f32(a, kron::a_at(d, p, ij.outer)) * g[r * d.mid() + kron::u_at(d, p, ij.inner)];
    }
    store_f32(dx, e, (accumulate ? load_f32(dx, e) : 0.0f) + s * keep(drop, e) * acc);
  }
}

// dA[p, i] = s * sum over rows r and j of G[r, p, j] keep x[r, i, j]: one block per element of dA.
template <class T>
__global__ void __launch_bounds__(kThreads)
kron_da_kernel(const float* g, const T* x, Dims d, int64_t m, kron::Dropout drop, float s, T* da) {
  const int64_t n = d.a_out * d.a_in, terms = m * d.b_in;
  for (int64_t e = blockIdx.x; e < n; e += gridDim.x) {
    const int64_t p = e / d.a_in, i = e - p * d.a_in;
    float acc = 0.0f;
    for (int64_t t = threadIdx.x; t < terms; t += kThreads) {
      const int64_t r = t / d.b_in, j = t - r * d.b_in;
      const int64_t xe = r * d.in() + kron::x_at(d, i, j);
      acc += g[r * d.mid() + kron::u_at(d, p, j)] * keep(drop, xe) * load_f32(x, xe);
    }
    const float total = block_sum(acc);
    if (threadIdx.x == 0) store_f32(da, e, s * total);
  }
}

// dB[q, j] = s * sum over rows r and p of dY[r, p, q] U[r, p, j]: one block per element of dB.
template <class T>
__global__ void __launch_bounds__(kThreads)
kron_db_kernel(const T* dy, const float* u, Dims d, int64_t m, float s, T* db) {
  const int64_t n = d.b_out * d.b_in, terms = m * d.a_out;
  for (int64_t e = blockIdx.x; e < n; e += gridDim.x) {
    const int64_t q = e / d.b_in, j = e - q * d.b_in;
    float acc = 0.0f;
    for (int64_t t = threadIdx.x; t < terms; t += kThreads) {
      const int64_t r = t / d.a_out, p = t - r * d.a_out;
      acc += load_f32(dy, r * d.out() + kron::y_at(d, p, q)) * u[r * d.mid() + kron::u_at(d, p, j)];
    }
    const float total = block_sum(acc);
    if (threadIdx.x == 0) store_f32(db, e, s * total);
  }
}

// ---- tensor cores (bf16/f16) ----------------------------------------------------------------------------------------

using kron::kTcBackwardStages;
using kron::kTcStages;
using kron::round_up;
using kron::tc_stride;
constexpr int kTcTiles = int(kron::kTcMaxDim / 16);  // 16-wide tiles of the largest factor dimension

// A [rows][cols] row-major factor into the zero-padded shared tile [pad_rows][stride] (columns up to pad_cols), tile
// row t holding source row row_of(t). Once per block: the factors are L2-resident after the first blocks read them.
template <class T, class RowOf>
__device__ void kron_load_factor(T* dst, int stride, const T* src, int rows, int cols, int pad_rows, int pad_cols,
                                 RowOf row_of) {
  const uint16_t* in = reinterpret_cast<const uint16_t*>(src);
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int e = threadIdx.x; e < pad_rows * pad_cols; e += blockDim.x) {
    const int t = e / pad_cols, j = e - t * pad_cols, r = row_of(t);
    out[t * stride + j] = r < rows && j < cols ? in[r * cols + j] : uint16_t(0);
  }
}
__device__ __forceinline__ int kron_same_row(int t) { return t; }

// Zeroes the padding of a ring tile [pad_rows][stride] whose first rows x cols the copies fill: rows >= rows and
// columns cols .. pad_cols. The copies never write there, so once per block; an mma reads padding times a zero of the
// other operand, and zero (not stale NaN) keeps that product zero.
template <class T>
__device__ void kron_zero_padding(T* tile, int stride, int rows, int cols, int pad_rows, int pad_cols) {
  uint16_t* t = reinterpret_cast<uint16_t*>(tile);
  for (int e = threadIdx.x; e < pad_rows * pad_cols; e += blockDim.x) {
    const int i = e / pad_cols, j = e - i * pad_cols;
    if (i >= rows || j >= cols) t[i * stride + j] = 0;
  }
}

// Starts the copies of one row of a [m, rows * cols] activation (cols % 8 == 0) into the ring tile [rows][stride]:
// 16-byte chunk c of the row is tile element (8c / cols, 8c % cols).
template <class T> __device__ void kron_stage_row(T* tile, int stride, const T* row, int n, int cols, bool vec) {
  for (int c = threadIdx.x; c < n / 8; c += blockDim.x) {
    const int e = 8 * c, i = e / cols, j = e - i * cols;
    stage_chunk(reinterpret_cast<uint8_t*>(tile + i * stride + j), row + e, 8, vec, row);
  }
}

// Zeroes the dropped elements of a staged x row (flat offset row_start of the row in x): one Philox call per chunk.
template <class T>
__device__ void kron_mask_row(T* tile, int stride, int n, int cols, uint64_t row_start, const kron::Dropout& drop) {
  for (int c = threadIdx.x; c < n / 8; c += blockDim.x) {
    const int e = 8 * c, i = e / cols, j = e - i * cols;
    uint8_t* at = reinterpret_cast<uint8_t*>(tile + i * stride + j);
    store16(at, drop16<T>(load16(at), keep_bits<8>(drop, row_start + uint64_t(e))));
  }
}

// Runs the block's rows k = 0 .. n-1 through an S-slot ring: issue(k, slot) starts row k's copies into a slot,
// body(k, slot) uses them once every thread's copies have landed. Slot (k - 1) % S is refilled only after the barrier
// that follows every warp's body(k - 1).
template <int S, class Issue, class Body> __device__ __forceinline__ void kron_rows(int64_t n, Issue issue, Body body) {
  for (int s = 0; s < S - 1; ++s) {
    if (s < n) issue(s, s);
    pk::ptx::cp_async_commit();
  }
  for (int64_t k = 0; k < n; ++k) {
    pk::ptx::cp_async_wait<S - 2>();
    __syncthreads();
    if (k + S - 1 < n) issue(k + S - 1, int((k + S - 1) % S));
    pk::ptx::cp_async_commit();
    body(k, int(k % S));
  }
  pk::ptx::cp_async_wait<0>();
}

// dst[0 .. 8) = (accumulate ? dst : 0) + s * v, rounded once to T: one 16-byte load and store when vec.
template <class T>
__device__ __forceinline__ void kron_add8(T* dst, const float (&v)[8], float s, bool accumulate, bool vec) {
  if (vec) {
    T old[8];
    if (accumulate) {
      const uint4 bits = load16(dst);
      memcpy(old, &bits, 16);
    }
    uint32_t out[4];
PK_UNROLL
    for (int j = 0; j < 4; ++j) {
      const float lo = (accumulate ? load_f32(old, 2 * j) : 0.0f) + s * v[2 * j];
      const float hi = (accumulate ? load_f32(old, 2 * j + 1) : 0.0f) + s * v[2 * j + 1];
      out[j] = pack2<T>(lo, hi);
    }
    store16(dst, uint4{out[0], out[1], out[2], out[3]});
  } else {
PK_UNROLL
    for (int j = 0; j < 8; ++j) store_f32(dst, j, (accumulate ? load_f32(dst, j) : 0.0f) + s * v[j]);
  }
}

// The four registers of an m16n8k16 A fragment (k = the 16 columns of two adjacent n8 accumulator tiles, rounded to
// T): an accumulator tile's (row g, columns 2t, 2t+1) and (row g + 8, ...) are exactly a0a1 and a2a3 of it.
template <class T>
__device__ __forceinline__ void kron_as_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

template <class T> __device__ __forceinline__ void kron_mma2(float (&lo)[4], float (&hi)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[4]) {
  const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
  mma<T>(lo, a, b0);
  mma<T>(hi, a, b1);
}

// Where lane `lane` points ldmatrix.x4 in the 16 x 16 block at (row0, col0) of a shared tile with row stride
// `stride`, for the two orders the products need of its four 8 x 8 matrices:
// - kron_frag16: lane l gives row l & 15, column half l >> 4 - an mma A fragment (plain), or the B fragments of two
//   n8 tiles from a tile stored [k][n] (.trans);
// - kron_frag8x2: lane l gives row (l >> 4) * 8 + (l & 7), column half (l >> 3) & 1 - the B fragments of two n8 tiles
//   from a tile stored [n][k] (plain), or an A fragment from a tile stored [k][m] (.trans).
template <class T> __device__ __forceinline__ T* kron_frag16(T* tile, int stride, int row0, int col0, int lane) {
  return tile + (row0 + (lane & 15)) * stride + col0 + (lane >> 4) * 8;
}
template <class T> __device__ __forceinline__ T* kron_frag8x2(T* tile, int stride, int row0, int col0, int lane) {
  return tile + (row0 + (lane >> 4) * 8 + (lane & 7)) * stride + col0 + ((lane >> 3) & 1) * 8;
}

// Forward. Shared: A [a_out16][tc_stride(a_in)], B [b_out32][tc_stride(b_in)] with row 32c + 8n + k holding B row
// 32c + 8 (k >> 1) + 2n + (k & 1) (mma n index k of n-tile n: lane (g, t) then holds the 8 adjacent columns
// 32c + 8t .. +7 of y), and the ring of x rows [a_in16][tc_stride(b_in)]. Warp w takes the 16-row slices w, w + warps,
// ... of U: U = A X over a_in (k16 steps ik) for 16 columns j at a time, each rounded into one A fragment ua[jk]; then
// Y = U B^T over b_in, 32 columns of y at a time.
template <class T>
__global__ void __launch_bounds__(kThreads) kron_fwd_tc_kernel(kron::ForwardParams p) {
  DYN_SMEM(unsigned char, smem);
  const Dims d = p.d;
  const int ao = int(d.a_out), ai = int(d.a_in), bo = int(d.b_out), bi = int(d.b_in), in = ai * bi;
  const int ao16 = int(round_up(ao, 16)), ai16 = int(round_up(ai, 16)), bi16 = int(round_up(bi, 16));
  const int bo32 = int(round_up(bo, 32)), sa = int(tc_stride(ai)), sx = int(tc_stride(bi));
  T* sa_tile = reinterpret_cast<T*>(smem);
  T* sb_tile = sa_tile + ao16 * sa;
  T* ring = sb_tile + bo32 * sx;
  const int slot_elems = ai16 * sx;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5, g = lane >> 2, t = lane & 3;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  kron_load_factor(sa_tile, sa, static_cast<const T*>(p.a), ao, ai, ao16, ai16, kron_same_row);
  kron_load_factor(sb_tile, sx, static_cast<const T*>(p.b), bo, bi, bo32, bi16, [](int r) {
    const int w = r & 31;
    return (r & ~31) + 8 * ((w & 7) >> 1) + 2 * (w >> 3) + (w & 1);
  });
  for (int s = 0; s < kTcStages; ++s) kron_zero_padding(ring + s * slot_elems, sx, ai, bi, ai16, bi16);
  const bool xvec = aligned16(x), yvec = aligned16(y);
  const float s = static_cast<float>(p.drop.scale);
  const int nj = bi16 / 16, ni = ai16 / 16;
  const int64_t rows = (p.m - blockIdx.x + gridDim.x - 1) / gridDim.x;
  const auto row_of = [&](int64_t k) { return int64_t(blockIdx.x) + k * gridDim.x; };
  kron_rows<kTcStages>(
      rows,
      [&](int64_t k, int slot) { kron_stage_row(ring + slot * slot_elems, sx, x + row_of(k) * in, in, bi, xvec); },
      [&](int64_t k, int slot) {
        const int64_t r = row_of(k);
        T* tile = ring + slot * slot_elems;
        if (p.drop.threshold != 0) {
          kron_mask_row(tile, sx, in, bi, uint64_t(r * in), p.drop);
          __syncthreads();
        }
        for (int pt = warp; pt < ao16 / 16; pt += warps) {
          uint32_t ua[kTcTiles][4];
PK_UNROLL
          for (int jk = 0; jk < kTcTiles; ++jk) {
            if (jk >= nj) break;
            float lo[4] = {}, hi[4] = {};
            for (int ik = 0; ik < ni; ++ik) {
              uint32_t af[4], bf[4];
              pk::ptx::ldmatrix_x4(af, kron_frag16(sa_tile, sa, pt * 16, ik * 16, lane));
              pk::ptx::ldmatrix_x4_trans(bf, kron_frag16(tile, sx, ik * 16, jk * 16, lane));
              kron_mma2<T>(lo, hi, af, bf);
            }
            kron_as_a<T>(ua[jk], lo, hi);
          }
          for (int c = 0; c < bo32 / 32; ++c) {
            float acc[4][4] = {};
PK_UNROLL
            for (int jk = 0; jk < kTcTiles; ++jk) {
              if (jk >= nj) break;
              uint32_t lo[4], hi[4];
              pk::ptx::ldmatrix_x4(lo, kron_frag8x2(sb_tile, sx, c * 32, jk * 16, lane));
              pk::ptx::ldmatrix_x4(hi, kron_frag8x2(sb_tile, sx, c * 32 + 16, jk * 16, lane));
              kron_mma2<T>(acc[0], acc[1], ua[jk], lo);
              kron_mma2<T>(acc[2], acc[3], ua[jk], hi);
            }
            const int q0 = c * 32 + 8 * t;
PK_UNROLL
            for (int h = 0; h < 2; ++h) {
              const int prow = pt * 16 + g + 8 * h;
              if (prow >= ao || q0 >= bo) continue;
              const float v[8] = {acc[0][2 * h], acc[0][2 * h + 1], acc[1][2 * h], acc[1][2 * h + 1],
                                  acc[2][2 * h], acc[2][2 * h + 1], acc[3][2 * h], acc[3][2 * h + 1]};
              kron_add8(y + r * d.out() + prow * bo + q0, v, s, p.accumulate, yvec);
            }
          }
        }
      });
}

// Elements (row, col) and (row, col + 1) of the row-major fp32 [rows][cols] matrix m, those inside it: one 8-byte
// store where both are inside and the address allows.
__device__ __forceinline__ void kron_store_pair(float* m, int cols, int rows, int row, int col, float v0, float v1) {
  if (row >= rows || col >= cols) return;
  float* at = m + int64_t(row) * cols + col;
  if (col + 1 < cols && reinterpret_cast<uintptr_t>(at) % 8 == 0) {
    const float v[2] = {v0, v1};
    uint64_t bits;
    memcpy(&bits, v, 8);
    *reinterpret_cast<uint64_t*>(at) = bits;
  } else {
    at[0] = v0;
    if (col + 1 < cols) at[1] = v1;
  }
}

// Backward: dx, and the dA/dB partials of one split of rows, in one pass over dy (and x). Shared: A
// [a_out16][tc_stride(a_in)], B [b_out16][tc_stride(b_in)], a 2-slot ring of (x row [a_in16][tc_stride(b_in)], dy
// row [a_out16][tc_stride(b_out)]) pairs, G = dY B of the current row [a_out16][tc_stride(b_in)] in T, and dX staged
// as fp32 [a_in][tc_dx_stage_stride]. Per row:
// 1. warp w < a_out16 / 16 forms rows 16w .. +16 of G, 16 columns j at a time (one A fragment, k = j); it adds
//    G X^T to its dA slice (fp32 registers, all a_in columns) and stores the fragment into the shared G;
//    warp w < b_in16 / 16 forms columns 16w .. +16 of U^T = X^T A^T, 16 columns p at a time: its accumulators (rows j,
//    columns p) are exactly the B fragments (k = p, n = j) of dB slice += dY^T U^T (fp32 registers, all b_out rows);
// 2. after a barrier, warp w < b_in16 / 16 forms dX^T = G^T A for its 16 columns j (G^T by ldmatrix.trans of the
//    shared G), 16 columns i at a time, into the staging tile;
// 3. after a barrier the block writes the row 16 bytes at a time, the mask applied there (8 elements per Philox call).
// The dA/dB slices go to workspace [split][a_out * a_in + b_out * b_in] at the end; kron_reduce_kernel adds them up.
// Two slots, not three: the row's work (~200 mma per warp at 64 x 64 factors) hides the next row's copies, and the
// 11008 -> 4096 factors (64 x 86, 64 x 128) then fit the 163 KiB an A100 grants a block (164 192 bytes).
template <class T>
__global__ void __launch_bounds__(kThreads) kron_bwd_tc_kernel(kron::BackwardParams p) {
  DYN_SMEM(unsigned char, smem);
  const Dims d = p.d;
  const int ao = int(d.a_out), ai = int(d.a_in), bo = int(d.b_out), bi = int(d.b_in), in = ai * bi, out = ao * bo;
  const int ao16 = int(round_up(ao, 16)), ai16 = int(round_up(ai, 16)), bi16 = int(round_up(bi, 16));
  const int bo16 = int(round_up(bo, 16)), sa = int(tc_stride(ai)), sx = int(tc_stride(bi)), sy = int(tc_stride(bo));
  const int st = int(kron::tc_dx_stage_stride(d));
  T* sa_tile = reinterpret_cast<T*>(smem);
  T* sb_tile = sa_tile + ao16 * sa;
  T* ring = sb_tile + bo16 * sx;
  const int x_elems = ai16 * sx, slot_elems = x_elems + ao16 * sy;
  T* g_tile = ring + kTcBackwardStages * slot_elems;
  float* stage = reinterpret_cast<float*>(g_tile + ao16 * sx);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  kron_load_factor(sa_tile, sa, static_cast<const T*>(p.a), ao, ai, ao16, ai16, kron_same_row);
  kron_load_factor(sb_tile, sx, static_cast<const T*>(p.b), bo, bi, bo16, bi16, kron_same_row);
  for (int s = 0; s < kTcBackwardStages; ++s) {
    kron_zero_padding(ring + s * slot_elems, sx, ai, bi, ai16, bi16);
    kron_zero_padding(ring + s * slot_elems + x_elems, sy, ao, bo, ao16, bo16);
  }
  const bool need_x = p.da != nullptr || p.db != nullptr, need_dx = p.dx != nullptr;
  const bool xvec = aligned16(x), dyvec = aligned16(dy), dxvec = aligned16(dx);
  const float s = static_cast<float>(p.drop.scale);
  const int np = ao16 / 16, ni = ai16 / 16, nj = bi16 / 16, nq = bo16 / 16;
  const bool do_g = (need_dx || p.da != nullptr) && warp < np, do_db = p.db != nullptr && warp < nj;
  const int64_t per = kron::grad_rows_per_split(p.m), first = blockIdx.x * per;
  const int64_t rows = p.m - first < per ? p.m - first : per;
  float da[2 * kTcTiles][4] = {};
  float db[kTcTiles][2][4] = {};
  kron_rows<kTcBackwardStages>(
      rows,
      [&](int64_t k, int slot) {
        T* tile = ring + slot * slot_elems;
        if (need_x) kron_stage_row(tile, sx, x + (first + k) * in, in, bi, xvec);
        kron_stage_row(tile + x_elems, sy, dy + (first + k) * out, out, bo, dyvec);
      },
      [&](int64_t k, int slot) {
        const int64_t r = first + k;
        T* xt = ring + slot * slot_elems;
        const T* yt = xt + x_elems;
        if (need_x && p.drop.threshold != 0) {
          kron_mask_row(xt, sx, in, bi, uint64_t(r * in), p.drop);
          __syncthreads();
        }
        if (do_g) {
          for (int jk = 0; jk < nj; ++jk) {
            float lo[4] = {}, hi[4] = {};
            for (int qk = 0; qk < nq; ++qk) {
              uint32_t af[4], bf[4];
              pk::ptx::ldmatrix_x4(af, kron_frag16(yt, sy, warp * 16, qk * 16, lane));
              pk::ptx::ldmatrix_x4_trans(bf, kron_frag16(sb_tile, sx, qk * 16, jk * 16, lane));
              kron_mma2<T>(lo, hi, af, bf);
            }
            uint32_t ga[4];
            kron_as_a<T>(ga, lo, hi);
            if (need_dx) {
              // ga[h] holds G (row g + 8 (h & 1), columns 2t, 2t+1 + 8 (h >> 1)): 4-byte stores, 32 different banks
              // (the row stride is 4 mod 8 words)
              uint32_t* gw = reinterpret_cast<uint32_t*>(g_tile + (warp * 16 + g) * sx + jk * 16 + 2 * t);
              gw[0] = ga[0];
              gw[4 * sx] = ga[1];
              gw[4] = ga[2];
              gw[4 * sx + 4] = ga[3];
            }
            if (p.da != nullptr) {
PK_UNROLL
              for (int ip = 0; ip < kTcTiles; ++ip) {
                if (ip >= ni) break;
                uint32_t bf[4];
                pk::ptx::ldmatrix_x4(bf, kron_frag8x2(xt, sx, ip * 16, jk * 16, lane));
                kron_mma2<T>(da[2 * ip], da[2 * ip + 1], ga, bf);
              }
            }
          }
        }
        if (do_db) {
          for (int pk = 0; pk < np; ++pk) {
            float lo[4] = {}, hi[4] = {};
            for (int ik = 0; ik < ni; ++ik) {
              uint32_t af[4], bf[4];
              pk::ptx::ldmatrix_x4_trans(af, kron_frag8x2(xt, sx, ik * 16, warp * 16, lane));
              pk::ptx::ldmatrix_x4(bf, kron_frag8x2(sa_tile, sa, pk * 16, ik * 16, lane));
              kron_mma2<T>(lo, hi, af, bf);
            }
            const uint32_t ub_lo[2] = {pack2<T>(lo[0], lo[1]), pack2<T>(hi[0], hi[1])};  // columns j 0-7 of the slice
            const uint32_t ub_hi[2] = {pack2<T>(lo[2], lo[3]), pack2<T>(hi[2], hi[3])};  // columns j 8-15
PK_UNROLL
            for (int qt = 0; qt < kTcTiles; ++qt) {
              if (qt >= nq) break;
              uint32_t af[4];
              pk::ptx::ldmatrix_x4_trans(af, kron_frag8x2(yt, sy, pk * 16, qt * 16, lane));
              mma<T>(db[qt][0], af, ub_lo);
              mma<T>(db[qt][1], af, ub_hi);
            }
          }
        }
        if (!need_dx) return;
        __syncthreads();
        if (warp < nj) {
          for (int ic = 0; ic < ni; ++ic) {
            float acc[2][4] = {};
            for (int pk = 0; pk < np; ++pk) {
              uint32_t af[4], bf[4];
              pk::ptx::ldmatrix_x4_trans(af, kron_frag8x2(g_tile, sx, pk * 16, warp * 16, lane));
              pk::ptx::ldmatrix_x4_trans(bf, kron_frag16(sa_tile, sa, pk * 16, ic * 16, lane));
              kron_mma2<T>(acc[0], acc[1], af, bf);
            }
PK_UNROLL
            for (int n = 0; n < 2; ++n) {
PK_UNROLL
              for (int e = 0; e < 4; ++e) {
                const int i = ic * 16 + 8 * n + 2 * t + (e & 1), j = warp * 16 + g + 8 * (e >> 1);
                if (i < ai) stage[i * st + j] = acc[n][e];
              }
            }
          }
        }
        __syncthreads();
        // Lanes 4-7 of each 8 read their chunk's halves in the other order: the 8 lanes' first 16-byte reads then
        // cover 32 different banks (8 chunks of 32 bytes, a bank group of 4 words each).
        const int swap = (lane >> 2) & 1;
        for (int c = threadIdx.x; c < in / 8; c += blockDim.x) {
          const int e = 8 * c, i = e / bi, j = e - i * bi;
          const float4 first4 = load16<float4>(stage + i * st + j + 4 * swap);
          const float4 second4 = load16<float4>(stage + i * st + j + 4 - 4 * swap);
          const float4 lo = swap ? second4 : first4, hi = swap ? first4 : second4;
          const unsigned keep = p.drop.threshold != 0 ? keep_bits<8>(p.drop, uint64_t(r * in + e)) : 0xFFu;
          const float v[8] = {keep & 1u ? lo.x : 0.0f,  keep & 2u ? lo.y : 0.0f,  keep & 4u ? lo.z : 0.0f,
                              keep & 8u ? lo.w : 0.0f,  keep & 16u ? hi.x : 0.0f, keep & 32u ? hi.y : 0.0f,
                              keep & 64u ? hi.z : 0.0f, keep & 128u ? hi.w : 0.0f};
          kron_add8(dx + r * in + e, v, s, p.accumulate_dx, dxvec);
        }
      });
  if (!need_x) return;
  // Lane (g, t) holds columns 2t, 2t+1 of each accumulator tile: one 8-byte store per pair, so a warp's store covers
  // whole 32-byte sectors (4 lanes per row) where the columns are even in number.
  float* part = p.workspace + int64_t(blockIdx.x) * kron::grad_partial_elements(d);
  if (p.da != nullptr && warp < np) {
PK_UNROLL
    for (int n = 0; n < 2 * kTcTiles; ++n) {
PK_UNROLL
      for (int h = 0; h < 2; ++h) {
        kron_store_pair(part, ai, ao, warp * 16 + g + 8 * h, 8 * n + 2 * t, da[n][2 * h], da[n][2 * h + 1]);
      }
    }
  }
  if (do_db) {
PK_UNROLL
    for (int qt = 0; qt < kTcTiles; ++qt) {
PK_UNROLL
      for (int n = 0; n < 2; ++n) {
PK_UNROLL
        for (int h = 0; h < 2; ++h) {
          kron_store_pair(part + ao * ai, bi, bo, qt * 16 + g + 8 * h, warp * 16 + 8 * n + 2 * t, db[qt][n][2 * h],
                          db[qt][n][2 * h + 1]);
        }
      }
    }
  }
}

// dA = s * (sum over splits of the partials' first a_count elements) and dB likewise of the b_count after them, the
// splits added in order (deterministic): one thread per element, a warp reading 128 consecutive bytes of each split.
// One launch for both; a null output is skipped.
template <class T>
__global__ void __launch_bounds__(kThreads) kron_reduce_kernel(const float* partial, int64_t splits, int64_t a_count,
                                                               T* da, int64_t b_count, T* db, float s) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x, stride = a_count + b_count;
  T* out = e < a_count ? da : db;
  if (e >= stride || out == nullptr) return;
  float sum = 0.0f;
  for (int64_t sp = 0; sp < splits; ++sp) sum += partial[sp * stride + e];
  store_f32(out, e < a_count ? e : e - a_count, s * sum);
}

inline unsigned kron_row_blocks(int64_t m) { return unsigned(m < kron::kTcRowBlocks ? m : kron::kTcRowBlocks); }

// Blocks for the one-block-per-element reductions.
inline unsigned reduce_grid(int64_t elements) { return static_cast<unsigned>(elements < 65535 ? elements : 65535); }

}  // namespace

cudaError_t kron_forward(const kron::ForwardParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    const Dims d = p.d;
    if constexpr (sizeof(T) == 2) {
      if (kron::tensor_cores(d, p.dtype)) {
        const int64_t smem = kron::tc_forward_smem(d);
        if (prepare(kron_fwd_tc_kernel<T>, smem) != cudaSuccess) return;  // launch_typed reports the error
        KLAUNCH(kron_fwd_tc_kernel<T>, kron_row_blocks(p.m), 32 * int(round_up(d.a_out, 16) / 16), smem, stream, p);
        return;
      }
    }
    KLAUNCH(kron_u_kernel<T>, grid_for(p.m * d.mid(), kThreads), kThreads, 0, stream, static_cast<const T*>(p.x),
            static_cast<const T*>(p.a), d, p.m, p.drop, p.workspace);
    KLAUNCH(kron_y_kernel<T>, grid_for(p.m * d.out(), kThreads), kThreads, 0, stream,
            static_cast<const float*>(p.workspace), static_cast<const T*>(p.b), d, p.m, static_cast<float>(p.drop.scale),
            p.accumulate, static_cast<T*>(p.y));
  });
}

cudaError_t kron_backward(const kron::BackwardParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    const Dims d = p.d;
    const float s = static_cast<float>(p.drop.scale);
    float* g = p.workspace;
    float* u = p.workspace + p.m * d.mid();
    const T* x = static_cast<const T*>(p.x);
    const T* dy = static_cast<const T*>(p.dy);
    if constexpr (sizeof(T) == 2) {
      if (kron::tensor_cores(d, p.dtype)) {
        const int64_t splits = kron::grad_splits(p.m), stride = kron::grad_partial_elements(d);
        const int64_t np = round_up(d.a_out, 16) / 16, nj = round_up(d.b_in, 16) / 16, smem = kron::tc_backward_smem(d);
        if (prepare(kron_bwd_tc_kernel<T>, smem) != cudaSuccess) return;  // launch_typed reports the error
        KLAUNCH(kron_bwd_tc_kernel<T>, unsigned(splits), 32 * int(np > nj ? np : nj), smem, stream, p);
        if (p.da == nullptr && p.db == nullptr) return;
        KLAUNCH(kron_reduce_kernel<T>, grid_for(stride, kThreads), kThreads, 0, stream,
                static_cast<const float*>(p.workspace), splits, d.a_out * d.a_in, static_cast<T*>(p.da),
                d.b_out * d.b_in, static_cast<T*>(p.db), s);
        return;
      }
    }
    if (p.dx != nullptr || p.da != nullptr) {
      KLAUNCH(kron_g_kernel<T>, grid_for(p.m * d.mid(), kThreads), kThreads, 0, stream, dy,
              static_cast<const T*>(p.b), d, p.m, g);
    }
    if (p.dx != nullptr) {
      KLAUNCH(kron_dx_kernel<T>, grid_for(p.m * d.in(), kThreads), kThreads, 0, stream, static_cast<const float*>(g),
              static_cast<const T*>(p.a), d, p.m, p.drop, s, p.accumulate_dx, static_cast<T*>(p.dx));
    }
    if (p.da != nullptr) {
      KLAUNCH(kron_da_kernel<T>, reduce_grid(d.a_out * d.a_in), kThreads, 0, stream, static_cast<const float*>(g), x,
              d, p.m, p.drop, s, static_cast<T*>(p.da));
    }
    if (p.db != nullptr) {
      KLAUNCH(kron_u_kernel<T>, grid_for(p.m * d.mid(), kThreads), kThreads, 0, stream, x,
              static_cast<const T*>(p.a), d, p.m, p.drop, u);
      KLAUNCH(kron_db_kernel<T>, reduce_grid(d.b_out * d.b_in), kThreads, 0, stream, dy,
              static_cast<const float*>(u), d, p.m, s, static_cast<T*>(p.db));
    }
  });
}

}  // namespace peft_kernels::cuda
