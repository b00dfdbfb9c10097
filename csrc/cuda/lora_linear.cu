// Fused LoRA dropout kernels and their launchers (see csrc/include/peft_kernels/lora_params.h for the math).
// With p = 0 the op never calls these: every product is a cuBLAS GEMM. No torch headers.
#include "launch.h"
#include "lora_launch.h"
#include "peft_kernels/philox.h"

namespace peft_kernels::cuda {
namespace {

constexpr int kRankTile = 8;  // rank outputs per pass of down_kernel: 8 fp32 accumulators per lane

// keep(e) * scale: one Philox evaluation per element (8 draws made, 1 used). Simple and the same for every
// thread layout; a GPU-tuned version would share each Philox call among 8 neighbouring elements.
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

}  // namespace

cudaError_t lora_down(const lora::DownParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() { KLAUNCH(down_kernel<T>, grid_for(p.m, kWarps), kThreads, 0, stream, p); });
}

cudaError_t lora_backward(const lora::BackwardParams& p, cudaStream_t stream) {
  return launch_typed(p.dtype, [&]<class T>() {
    if (p.dx != nullptr) KLAUNCH(dx_kernel<T>, grid_for(p.m * p.in, kThreads), kThreads, 0, stream, p);
    if (p.da != nullptr) KLAUNCH(da_kernel<T>, grid_for(int64_t(p.r) * p.in, kThreads), kThreads, 0, stream, p);
  });
}

}  // namespace peft_kernels::cuda
