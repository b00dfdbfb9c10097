// Sparse optimizer step kernels (AdamW, SGD) over k selected entries of a parameter, and their launchers.
// See csrc/include/peft_kernels/masked_adamw_params.h for the layout and masked_adamw.h for the math.
// No torch headers.
//
// Two kinds of traffic, one pass per step. The compact streams are contiguous in the selection's position j:
// the indices, the fp32 state [k] (exp_avg and exp_avg_sq, or the momentum buffer), the fp32 master copy of a
// 16-bit param and a compact grad; each thread takes kVec = 4 consecutive entries of each with one 16-byte
// access (int64 indices: two, exchanged between lanes; a 16-bit compact grad: one of 8 bytes), so every warp
// instruction reads whole 32-byte sectors.
// The param, and a dense grad, are gathered at indices[j]: how many sectors that costs is the selection's, not
// the kernel's. At 1% density sorted indices lie ~100 elements (400 bytes of fp32) apart, so every entry has a
// sector of its own and uses 4 of its 32 bytes (2 in bf16); a run of 4 consecutive indices (dense selections)
// is read and written with one 16-byte access instead.
#include "launch.h"
#include "masked_adamw_launch.h"
#include "peft_kernels/masked_adamw.h"

namespace peft_kernels::cuda {
namespace {

// Entries per thread and step: 4 fp32 = 16 bytes of each state stream.
constexpr int kVec = 4;

// The entries of the selection one thread updates in one step: j = at(i) for i < n. A warp's step covers
// 32 * kVec = 128 consecutive entries, laid out over its lanes in one of two ways:
//  * kVector, when every compact stream is 16-byte aligned (torch allocates them so) and all 128 entries are in
//    the selection: lane L takes 4L..4L+3, one 16-byte access per stream, 512 contiguous bytes per warp.
//  * kStrided otherwise (the last, partial 128 of the selection; a state or index tensor that is a view at an
//    unaligned offset): lane L takes L, L+32, L+64, L+96, so each of its 4 accesses of 4 bytes still has the
//    warp read 128 contiguous bytes.
// The choice is the warp's, never a lane's: kVector exchanges indices by shuffles between all 32 lanes.
enum class Layout { kVector, kStrided };

template <Layout L> struct Slot {
  int64_t first;
  int n;  // kVec for kVector, 0..4 for kStrided
  __device__ int64_t at(int i) const { return first + (L == Layout::kStrided ? 32 * i : i); }
};

// The vector of V at entry `first` of a stream of T (`first` a multiple of sizeof(V) / sizeof(T)). Indexing an
// array of V, not casting x + first: with the cast nvcc (13.0, sm_90) split the 16-byte stores of the fp32 state
// into four 4-byte STG.E each, and kept only the loads whole.
template <class V, class T> __device__ __forceinline__ V* vec_at(T* x, int64_t first) {
  return reinterpret_cast<V*>(x) + static_cast<uint64_t>(first) * sizeof(T) / sizeof(V);
}

// A stream of T (fp32 state, or the grad) at the slot's entries, as fp32, and back (round to nearest even): one
// 16-byte (fp32) or 8-byte (16-bit) access for kVector, else one access per entry.
template <class T, Layout L> __device__ __forceinline__ void load_vec(const T* x, const Slot<L>& s, float (&v)[kVec]) {
  if constexpr (L != Layout::kVector) {
PK_UNROLL
    for (int i = 0; i < kVec; ++i)
      if (i < s.n) v[i] = load_f32(x, s.at(i));
  } else if constexpr (sizeof(T) == 4) {
    const float4 a = load16<float4>(vec_at<const float4>(x, s.first));
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  } else {
    const uint2 raw = load8<uint2>(vec_at<const uint2>(x, s.first));
    T h[kVec];
    memcpy(static_cast<void*>(h), &raw, sizeof(raw));  // not a pointer cast: reading a uint2 as T is undefined
PK_UNROLL
    for (int i = 0; i < kVec; ++i) v[i] = load_f32(h, i);
  }
}

template <class T, Layout L> __device__ __forceinline__ void store_vec(T* x, const Slot<L>& s, const float (&v)[kVec]) {
  if constexpr (L != Layout::kVector) {
PK_UNROLL
    for (int i = 0; i < kVec; ++i)
      if (i < s.n) store_f32(x, s.at(i), v[i]);
  } else if constexpr (sizeof(T) == 4) {
    store16(vec_at<float4>(x, s.first), float4{v[0], v[1], v[2], v[3]});
  } else {
    T h[kVec];
PK_UNROLL
    for (int i = 0; i < kVec; ++i) store_f32(h, i, v[i]);
    uint2 raw;
    memcpy(&raw, static_cast<const void*>(h), sizeof(raw));
    store8(vec_at<uint2>(x, s.first), raw);
  }
}

template <class I, Layout L> __device__ __forceinline__ void load_indices(const I* idx, const Slot<L>& s, int64_t (&e)[kVec]) {
  if constexpr (L != Layout::kVector) {
PK_UNROLL
    for (int i = 0; i < kVec; ++i)
      if (i < s.n) e[i] = idx[s.at(i)];
  } else if constexpr (sizeof(I) == 8) {
    // Lane L needs the warp's int64 indices 4L..4L+3: 32 bytes, its 16-byte chunks 2L and 2L+1. Loading those
    // itself would leave each instruction's lanes 32 bytes apart, every sector half used (executor: 0.50).
    // Instead lane L loads chunks L and L+32 (each instruction 512 contiguous bytes) and takes chunks 2L and
    // 2L+1 from lanes 2L % 32 and (2L+1) % 32: their first chunk for L < 16, their second for L >= 16.
    const int lane = threadIdx.x & 31;
    const longlong2* warp_chunks = vec_at<const longlong2>(idx, s.first - kVec * lane);
    const longlong2 a = load16<longlong2>(warp_chunks + lane), b = load16<longlong2>(warp_chunks + lane + 32);
PK_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int src = (2 * lane + h) & 31;
      const long long a0 = __shfl_sync(0xffffffffu, a.x, src), a1 = __shfl_sync(0xffffffffu, a.y, src);
      const long long b0 = __shfl_sync(0xffffffffu, b.x, src), b1 = __shfl_sync(0xffffffffu, b.y, src);
      e[2 * h] = lane < 16 ? a0 : b0;
      e[2 * h + 1] = lane < 16 ? a1 : b1;
    }
  } else {
    const int4 a = load16<int4>(vec_at<const int4>(idx, s.first));
    e[0] = a.x, e[1] = a.y, e[2] = a.z, e[3] = a.w;
  }
}

// Each optimizer's state at a slot: read before its kVec updates, written after them.
struct AdamWState {
  const sparse::AdamWParams& p;
  float m[kVec] = {}, v[kVec] = {};
  template <Layout L> __device__ void load(const Slot<L>& s) {
    load_vec(p.exp_avg, s, m);
    load_vec(p.exp_avg_sq, s, v);
  }
  __device__ void update(int i, float& w, float g) { sparse::adamw_update(w, m[i], v[i], g, p.h); }
  template <Layout L> __device__ void store(const Slot<L>& s) const {
    store_vec(p.exp_avg, s, m);
    store_vec(p.exp_avg_sq, s, v);
  }
};

struct SGDState {
  const sparse::SGDParams& p;
  float buf[kVec] = {};
  template <Layout L> __device__ void load(const Slot<L>& s) {
    if (p.momentum_buffer != nullptr) load_vec(p.momentum_buffer, s, buf);
  }
  // Two calls rather than one with a select of &buf[i] or null: a pointer that may be either keeps nvcc from
  // holding buf in registers, and the whole parameter block went to local memory (120 bytes of stack on sm_90).
  __device__ void update(int i, float& w, float g) {
    if (p.momentum_buffer != nullptr) sparse::sgd_update(w, &buf[i], g, p.h);
    else sparse::sgd_update(w, nullptr, g, p.h);
  }
  template <Layout L> __device__ void store(const Slot<L>& s) const {
    if (p.momentum_buffer != nullptr) store_vec(p.momentum_buffer, s, buf);
  }
};

// One step of one thread: its slot's kVec entries. Every load is issued before the first update: the compact
// streams, then (once the indices are in) the param and dense-grad gathers, so the 4 entries' memory round
// trips are in flight together. Bit for bit the per-entry math of the CPU loop (masked_adamw.h), in the same
// order per entry; entries are independent, so the layout cannot change a result.
template <class T, class I, class State, Layout L, class Params>
__device__ __forceinline__ void step(const Params& p, const Slot<L>& slot) {
  const sparse::Selection& s = p.sel;
  T* param = static_cast<T*>(s.param);
  const T* grad = static_cast<const T*>(s.grad);
  int64_t e[kVec] = {};
  float w[kVec] = {}, g[kVec] = {};
  load_indices(static_cast<const I*>(s.indices), slot, e);
  if (s.master != nullptr) load_vec(s.master, slot, w);
  if (!s.grad_dense) load_vec(grad, slot, g);
  State state{p};
  state.load(slot);
  // kVec consecutive indices from a multiple of kVec (dense selections) are one aligned vector of the param and
  // of a dense grad, when those are 16-byte aligned.
  const bool run = L == Layout::kVector && e[0] % kVec == 0 && e[kVec - 1] - e[0] == kVec - 1 && aligned16(param) &&
                   (!s.grad_dense || aligned16(grad));
  const Slot<Layout::kVector> at_e{e[0], kVec};
  if (run) {
    if (s.master == nullptr) load_vec(param, at_e, w);
    if (s.grad_dense) load_vec(grad, at_e, g);
  } else {
PK_UNROLL
    for (int i = 0; i < kVec; ++i) {
      if (i >= slot.n) continue;
      if (s.master == nullptr) w[i] = load_f32(param, e[i]);
      if (s.grad_dense) g[i] = load_f32(grad, e[i]);
    }
  }
PK_UNROLL
  for (int i = 0; i < kVec; ++i)
    if (i < slot.n) state.update(i, w[i], g[i] * sparse::child_scale(p.child, e[i]));
  state.store(slot);
  if (s.master != nullptr) store_vec(s.master, slot, w);
  if (run) {
    store_vec(param, at_e, w);
  } else {
PK_UNROLL
    for (int i = 0; i < kVec; ++i)
      if (i < slot.n) store_f32(param, e[i], w[i]);
  }
}

// The grid-stride loop over the selection, 128 entries per warp and step.
template <class T, class I, bool kWide, class State, class Params>
__device__ __forceinline__ void each_slot(const Params& p) {
  const int64_t k = p.sel.k;
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * kThreads * kVec;
  for (int64_t base = (int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5)) * 32 * kVec; base < k; base += stride) {
    if constexpr (kWide) {
      if (base + 32 * kVec <= k) {
        step<T, I, State>(p, Slot<Layout::kVector>{base + kVec * lane, kVec});
        continue;
      }
    }
    const int64_t first = base + lane, left = (k - first + 31) / 32;  // entries first + 32 i < k; 0 <= left
    step<T, I, State>(p, Slot<Layout::kStrided>{first, left < kVec ? static_cast<int>(left) : kVec});
  }
}

template <class T, class I, bool kWide>
__global__ void __launch_bounds__(kThreads) adamw_kernel(sparse::AdamWParams p) {
  each_slot<T, I, kWide, AdamWState>(p);
}

template <class T, class I, bool kWide>
__global__ void __launch_bounds__(kThreads) sgd_kernel(sparse::SGDParams p) {
  each_slot<T, I, kWide, SGDState>(p);
}

// kVec entries per thread, 1,024 per 256-thread block. 4096 x 4096 at 1% (k = 167,772) is 164 blocks, so each
// of an H100's 132 SMs holds one or two, all resident at once (ptxas: 39-60 registers a thread, room for 4
// blocks of 256 per SM). A thread's first loads are 64
// bytes (int64 indices, exp_avg, exp_avg_sq), its gathers 8 sectors of 32 bytes (param and dense grad at 4
// indices): a block keeps 16 KB, then 64 KB, in flight, against the ~16 KB per SM that 3.35 TB/s at ~700 ns
// DRAM latency needs (Little's law, docs: GPU_DESIGN.md). Larger selections get more blocks, up to grid_for's
// 65,535 (67M entries); beyond that the loop strides.
unsigned grid(int64_t k) { return grid_for((k + kVec - 1) / kVec, kThreads); }

// The 16-byte layout needs every compact stream 16-byte aligned (a null pointer is).
bool wide(const sparse::Selection& s, const float* state0, const float* state1) {
  return aligned16(s.indices) && aligned16(s.master) && (s.grad_dense || aligned16(s.grad)) && aligned16(state0) &&
         aligned16(state1);
}

}  // namespace

cudaError_t masked_adamw(const sparse::AdamWParams& p, cudaStream_t stream) {
  const bool vec = wide(p.sel, p.exp_avg, p.exp_avg_sq);
  return launch_typed(p.sel.dtype, [&]<class T>() {
    if (p.sel.indices64) {
      if (vec) KLAUNCH((adamw_kernel<T, int64_t, true>), grid(p.sel.k), kThreads, 0, stream, p);
      else KLAUNCH((adamw_kernel<T, int64_t, false>), grid(p.sel.k), kThreads, 0, stream, p);
    } else {
      if (vec) KLAUNCH((adamw_kernel<T, int32_t, true>), grid(p.sel.k), kThreads, 0, stream, p);
      else KLAUNCH((adamw_kernel<T, int32_t, false>), grid(p.sel.k), kThreads, 0, stream, p);
    }
  });
}

cudaError_t masked_sgd(const sparse::SGDParams& p, cudaStream_t stream) {
  const bool vec = wide(p.sel, p.momentum_buffer, nullptr);
  return launch_typed(p.sel.dtype, [&]<class T>() {
    if (p.sel.indices64) {
      if (vec) KLAUNCH((sgd_kernel<T, int64_t, true>), grid(p.sel.k), kThreads, 0, stream, p);
      else KLAUNCH((sgd_kernel<T, int64_t, false>), grid(p.sel.k), kThreads, 0, stream, p);
    } else {
      if (vec) KLAUNCH((sgd_kernel<T, int32_t, true>), grid(p.sel.k), kThreads, 0, stream, p);
      else KLAUNCH((sgd_kernel<T, int32_t, false>), grid(p.sel.k), kThreads, 0, stream, p);
    }
  });
}

}  // namespace peft_kernels::cuda
