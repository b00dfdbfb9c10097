// Sparse optimizer step kernels (AdamW, SGD) over k selected entries of a parameter, and their launchers.
// See csrc/include/peft_kernels/masked_adamw_params.h for the layout and masked_adamw.h for the math.
// No torch headers.
#include "launch.h"
#include "masked_adamw_launch.h"
#include "peft_kernels/masked_adamw.h"

namespace peft_kernels::cuda {
namespace {

// One thread per selected entry j (grid-stride): indices, state and a compact grad are read coalesced; param and
// a dense grad are gathered at indices[j], each entry's bytes touched once. Sorted indices keep neighbouring
// threads on nearby addresses, so dense selections coalesce as well.
template <class T, class I, class Update>
__device__ __forceinline__ void each_selected(const sparse::Selection& s, const sparse::ChildMask& child, Update update) {
  T* param = static_cast<T*>(s.param);
  const T* grad = static_cast<const T*>(s.grad);
  const I* idx = static_cast<const I*>(s.indices);
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < s.k; j += int64_t(gridDim.x) * kThreads) {
    const int64_t e = idx[j];
    const float g = load_f32(grad, s.grad_dense ? e : j) * sparse::child_scale(child, e);
    float p = s.master != nullptr ? s.master[j] : load_f32(param, e);
    update(j, p, g);
    if (s.master != nullptr) s.master[j] = p;
    store_f32(param, e, p);
  }
}

template <class T, class I>
__global__ void __launch_bounds__(kThreads) adamw_kernel(sparse::AdamWParams p) {
  each_selected<T, I>(p.sel, p.child, [&](int64_t j, float& w, float g) {
    sparse::adamw_update(w, p.exp_avg[j], p.exp_avg_sq[j], g, p.h);
  });
}

template <class T, class I>
__global__ void __launch_bounds__(kThreads) sgd_kernel(sparse::SGDParams p) {
  each_selected<T, I>(p.sel, p.child, [&](int64_t j, float& w, float g) {
    sparse::sgd_update(w, p.momentum_buffer != nullptr ? p.momentum_buffer + j : nullptr, g, p.h);
  });
}

}  // namespace

cudaError_t masked_adamw(const sparse::AdamWParams& p, cudaStream_t stream) {
  return launch_typed(p.sel.dtype, [&]<class T>() {
    if (p.sel.indices64) KLAUNCH((adamw_kernel<T, int64_t>), grid_for(p.sel.k, kThreads), kThreads, 0, stream, p);
    else KLAUNCH((adamw_kernel<T, int32_t>), grid_for(p.sel.k, kThreads), kThreads, 0, stream, p);
  });
}

cudaError_t masked_sgd(const sparse::SGDParams& p, cudaStream_t stream) {
  return launch_typed(p.sel.dtype, [&]<class T>() {
    if (p.sel.indices64) KLAUNCH((sgd_kernel<T, int64_t>), grid_for(p.sel.k, kThreads), kThreads, 0, stream, p);
    else KLAUNCH((sgd_kernel<T, int32_t>), grid_for(p.sel.k, kThreads), kThreads, 0, stream, p);
  });
}

}  // namespace peft_kernels::cuda
