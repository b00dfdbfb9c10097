// A 16-bit GEMM written the way our tensor-core kernels are: a 3-stage cp.async pipeline of 64x32 (A) and
// 32x64 (B) tiles, ldmatrix.x4 for A fragments and ldmatrix.x4.trans for B (B is K-major), mma.m16n8k16 into
// fp32. The executor's tests run it against torch.matmul, run its mutants, and count it; nvcc compiles it for
// the SASS check. Shapes: M, N multiples of 64, K a multiple of 32.
//
//   mma_gemm DIR M N K bf16|f16     reads DIR/a.b16 [M,K], DIR/b.b16 [K,N]; writes DIR/c.f32 [M,N]
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define KLAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#else
#include "cudasim.h"
#endif
#include "peft_kernels/ptx.cuh"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

constexpr int kBM = 64, kBN = 64, kBK = 32, kStages = 3;
constexpr int kPadA = kBK + 8, kPadB = kBN + 8;  // 80- and 144-byte rows: ldmatrix's 8 rows hit 8 bank groups

template <bool kHalf, class T>
__global__ void __launch_bounds__(128) gemm_kernel(const T* A, const T* B, float* C, int M, int N, int K) {
  __shared__ __align__(16) T sA[kStages][kBM][kPadA];
  __shared__ __align__(16) T sB[kStages][kBK][kPadB];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;  // each warp: a 32x32 quarter of the block's tile
  float acc[2][4][4];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  auto load_stage = [&](int stage, int k0) {
    for (int i = tid; i < kBM * kBK / 8; i += 128) {
      const int r = i / (kBK / 8), c = i % (kBK / 8);
      pk::ptx::cp_async_16(&sA[stage][r][8 * c], A + size_t(m0 + r) * K + k0 + 8 * c);
    }
    for (int i = tid; i < kBK * kBN / 8; i += 128) {
      const int r = i / (kBN / 8), c = i % (kBN / 8);
      pk::ptx::cp_async_16(&sB[stage][r][8 * c], B + size_t(k0 + r) * N + n0 + 8 * c);
    }
  };
  const int ktiles = K / kBK;
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s * kBK);
    pk::ptx::cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    pk::ptx::cp_async_wait<kStages - 2>();
    __syncthreads();
    const int st = kt % kStages;
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t a[2][4], b[4][2];
      for (int i = 0; i < 2; ++i) pk::ptx::ldmatrix_x4(a[i], &sA[st][wm + 16 * i + (lane & 15)][kk + 8 * (lane >> 4)]);
      for (int j = 0; j < 4; j += 2) {
        uint32_t r[4];
        pk::ptx::ldmatrix_x4_trans(r, &sB[st][kk + (lane & 15)][wn + 8 * j + 8 * (lane >> 4)]);
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) {
          if constexpr (kHalf) pk::ptx::mma_m16n8k16_f16(acc[i][j], a[i], b[j], acc[i][j]);
          else pk::ptx::mma_m16n8k16_bf16(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next * kBK);
    pk::ptx::cp_async_commit();
  }
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 4; ++e)
        C[size_t(m0 + wm + 16 * i + g + 8 * (e >> 1)) * N + n0 + wn + 8 * j + 2 * t + (e & 1)] = acc[i][j][e];
}

#if !defined(__CUDACC__) || defined(MMA_GEMM_MAIN)
static std::vector<uint16_t> read_file(const std::string& path, size_t n) {
  std::vector<uint16_t> v(n);
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(v.data(), 2, n, f) != n) {
    std::fprintf(stderr, "mma_gemm: cannot read %zu values from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: mma_gemm DIR M N K bf16|f16\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int M = std::atoi(argv[2]), N = std::atoi(argv[3]), K = std::atoi(argv[4]);
  const bool half = std::string(argv[5]) == "f16";
  if (M % kBM || N % kBN || K % kBK) {
    std::fprintf(stderr, "mma_gemm: M, N must be multiples of 64 and K of 32\n");
    return 2;
  }
  const bool synthetic = dir == "-";  // counters only: no files, the inputs' values do not matter
  std::vector<uint16_t> a = synthetic ? std::vector<uint16_t>(size_t(M) * K, 0x3f80) : read_file(dir + "/a.b16", size_t(M) * K);
  std::vector<uint16_t> b = synthetic ? std::vector<uint16_t>(size_t(K) * N, 0x3f80) : read_file(dir + "/b.b16", size_t(K) * N);
  void *da, *db, *dc;
  cudaMalloc(&da, a.size() * 2);
  cudaMalloc(&db, b.size() * 2);
  cudaMalloc(&dc, size_t(M) * N * 4);
  cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice);
  const dim3 grid(N / kBN, M / kBM);
  if (half) {
    KLAUNCH((gemm_kernel<true, __half>), grid, 128, 0, nullptr, static_cast<const __half*>(da), static_cast<const __half*>(db),
            static_cast<float*>(dc), M, N, K);
  } else {
    KLAUNCH((gemm_kernel<false, __nv_bfloat16>), grid, 128, 0, nullptr, static_cast<const __nv_bfloat16*>(da),
            static_cast<const __nv_bfloat16*>(db), static_cast<float*>(dc), M, N, K);
  }
  if (cudaDeviceSynchronize() != cudaSuccess) return 3;
  if (!synthetic) {
    std::vector<float> c(size_t(M) * N);
    cudaMemcpy(c.data(), dc, c.size() * 4, cudaMemcpyDeviceToHost);
    std::FILE* f = std::fopen((dir + "/c.f32").c_str(), "wb");
    if (f == nullptr || std::fwrite(c.data(), 4, c.size(), f) != c.size()) return 2;
    std::fclose(f);
  }
  return 0;
}
#endif
