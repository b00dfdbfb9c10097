// kron_linear kernels and their launchers (math and index maps: csrc/include/peft_kernels/kron.h). Each
// contraction of a row is its own kernel with one thread per output element, through an fp32 workspace
// holding U = A X (or G = dY B) for all rows, [m, a_out, b_in]: simple, and the same for any factor shapes
// (11008 = 172 * 64 included), at the cost of one workspace round trip. dA and dB are reductions over all
// rows: one block per element, no atomics, so every element is written once and results are deterministic.
// No torch headers.
#include "kron_launch.h"
#include "launch.h"
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

// Blocks for the one-block-per-element reductions.
inline unsigned reduce_grid(int64_t elements) { return static_cast<unsigned>(elements < 65535 ? elements : 65535); }

}  // namespace

cudaError_t kron_forward(const kron::ForwardParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    const Dims d = p.d;
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
