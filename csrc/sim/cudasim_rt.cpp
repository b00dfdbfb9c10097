// The cudart entry points that kernel launchers and test drivers call, for the cudasim build: host memory
// stands in for device memory, every launch has already completed when KLAUNCH returns.
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

extern "C" {
// Fresh "device" memory is 0xFF-filled (NaN as float) so a kernel that reads what it never wrote shows it.
cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::malloc(n ? n : 1);
  std::memset(*p, 0xFF, n);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* d, int v, size_t n) {
  std::memset(d, v, n);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "cudasim error"; }
}
