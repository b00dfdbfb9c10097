// Textbook kernels whose costs are known in advance, to prove the executor's counters right:
//   copy_float4      a float4 per lane, consecutive lanes consecutive: sector efficiency 1.00
//   copy_stride32    a float per lane, lanes 32 floats apart: 4 useful bytes of each 32-byte sector, 0.125
//   transpose        a 32x32 tile through shared memory, read down a column: 32 lanes in one bank, 31 extra
//                    wavefronts per warp read
//   transpose_padded the same with rows of 33 floats: 0 extra
//   broadcast        every lane reads one shared word and one global word: 0 extra, efficiency 1.00
//
//   counters_textbook KERNEL      (run with CUDASIM_PROFILE=FILE, built with cudasim_count.cpp)
#include "cudasim.h"

#include <cstdio>
#include <cstring>
#include <vector>

__global__ void copy_float4(const float4* in, float4* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i];
}

__global__ void copy_stride32(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[32 * i];
}

template <int kPad>
__global__ void transpose(const float* in, float* out) {
  __shared__ float tile[32][32 + kPad];
  tile[threadIdx.y][threadIdx.x] = in[threadIdx.y * 32 + threadIdx.x];
  __syncthreads();
  out[threadIdx.y * 32 + threadIdx.x] = tile[threadIdx.x][threadIdx.y];
}

__global__ void broadcast(const float* in, float* out) {
  __shared__ float word;
  if (threadIdx.x == 0) word = in[0];
  __syncthreads();
  out[threadIdx.x] = word + in[1];
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  constexpr int kN = 4096;
  float *in, *out;
  cudaMalloc(reinterpret_cast<void**>(&in), 32 * kN * sizeof(float));
  cudaMalloc(reinterpret_cast<void**>(&out), kN * sizeof(float));
  cudasim::label_buffer(in, "in");
  cudasim::label_buffer(out, "out");
  std::vector<float> host(32 * kN, 1.0f);
  cudaMemcpy(in, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice);
  const char* k = argv[1];
  if (!std::strcmp(k, "copy_float4")) KLAUNCH(copy_float4, kN / 4 / 128, 128, 0, nullptr, reinterpret_cast<const float4*>(in), reinterpret_cast<float4*>(out));
  else if (!std::strcmp(k, "copy_stride32")) KLAUNCH(copy_stride32, kN / 128, 128, 0, nullptr, in, out);
  else if (!std::strcmp(k, "transpose")) KLAUNCH(transpose<0>, 1, dim3(32, 32), 0, nullptr, in, out);
  else if (!std::strcmp(k, "transpose_padded")) KLAUNCH(transpose<1>, 1, dim3(32, 32), 0, nullptr, in, out);
  else if (!std::strcmp(k, "broadcast")) KLAUNCH(broadcast, 1, 128, 0, nullptr, in, out);
  else return 2;
  return 0;
}
