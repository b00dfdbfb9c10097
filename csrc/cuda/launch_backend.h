// What the torch-facing CUDA bindings need from the runtime: the current stream, a device guard, launch
// error checks. In the cudasim build the "device" is the CPU: no stream, no guard, ops registered as
// CPU kernels of the peft_kernels_sim namespace.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <torch/library.h>

// TORCH_LIBRARY_IMPL pastes its arguments into names, so the backend's namespace and key go through one
// more macro level to be expanded first.
#define PK_LIBRARY_IMPL_EXPANDED(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#if defined(PEFT_KERNELS_CUDASIM)
#define PK_CUDA_LIBRARY_IMPL(m) PK_LIBRARY_IMPL_EXPANDED(peft_kernels_sim, CPU, m)
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define PK_CUDA_LIBRARY_IMPL(m) PK_LIBRARY_IMPL_EXPANDED(peft_kernels, CUDA, m)
#endif

namespace peft_kernels::cuda {

#if defined(PEFT_KERNELS_CUDASIM)
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

inline void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "peft_kernels: launching ", kernel, " failed: ", cudaGetErrorString(err));
}

}  // namespace peft_kernels::cuda
