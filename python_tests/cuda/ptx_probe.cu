// One pk::ptx primitive per invocation, on inputs read from files, for python_tests/test_executor_primitives.py:
// the test models each primitive from the documented PTX fragment layouts (../shared/GPU_DESIGN.md) and compares
// every register of every lane. Files are raw little-endian arrays in DIR.
//
//   ptx_probe mma bf16|f16 DIR            a.u32 [32][4], b.u32 [32][2], c.f32 [32][4] -> d.f32 [32][4] and
//                                         d_alias.f32 [32][4] (the same mma with d aliasing c: mma(acc, a, b, acc))
//   ptx_probe ldmatrix 1|2|4 trans|notrans DIR
//                                         rows.u16 [64][8] (a 64-row shared array of 16-byte rows), perm.i32 [32]
//                                         (lane L passes the address of row perm[L]; -1: a misaligned shared
//                                         address, -2: a global address, for lanes whose address must be ignored)
//                                         -> r.u32 [32][count]
//   ptx_probe cp_async DIR                src.u8 [4096], nbytes.i32 [128] (src_bytes per thread, 0..16) ->
//                                         out.u8 [2048]    a 128-thread copy into dynamic shared memory, thread t
//                                                          to chunk (5t+3)%128, wait<0>, barrier, chunk t out
//                                         before.u8/after.u8 [2048]   own chunk read after issue, before the
//                                                          wait (the executor poisons it: 0xFF) / after wait<0>
//                                         groups.u8 [4][2048]   two groups (src[0:2048] with nbytes, then
//                                                          src[2048:4096] in full): own chunk of group 0 and of
//                                                          group 1 after wait<1>; after a barrier, thread t+1's
//                                                          chunk of group 0; after wait<0> and a barrier, its
//                                                          chunk of group 1
//   ptx_probe misuse NAME                 must abort (executor) naming this file's line marked MISUSE(NAME):
//                                         mma_half_warp, block_of_48, ldmatrix_unaligned, ldmatrix_global,
//                                         cp_async_unaligned
#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define KLAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define DYN_SMEM(T, name)                                   \
  extern __shared__ __align__(16) unsigned char dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(dyn_smem_)
#else
#include "cudasim.h"
#endif
#include "peft_kernels/ptx.cuh"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// ---- mma --------------------------------------------------------------------------------------------------------
template <bool kHalf>
__global__ void mma_kernel(const uint32_t* A, const uint32_t* B, const float* C, float* D, float* Dalias) {
  const int L = threadIdx.x;
  uint32_t a[4], b[2];
  float c[4], d[4], acc[4];
  for (int i = 0; i < 4; ++i) {
    a[i] = A[4 * L + i];
    c[i] = C[4 * L + i];
    acc[i] = c[i];
    d[i] = -12345.0f;
  }
  for (int i = 0; i < 2; ++i) b[i] = B[2 * L + i];
  if constexpr (kHalf) {
    pk::ptx::mma_m16n8k16_f16(d, a, b, c);
    pk::ptx::mma_m16n8k16_f16(acc, a, b, acc);
  } else {
    pk::ptx::mma_m16n8k16_bf16(d, a, b, c);
    pk::ptx::mma_m16n8k16_bf16(acc, a, b, acc);
  }
  for (int i = 0; i < 4; ++i) {
    D[4 * L + i] = d[i];
    Dalias[4 * L + i] = acc[i];
  }
}

// ---- ldmatrix ---------------------------------------------------------------------------------------------------
template <int kCount, bool kTrans>
__global__ void ldmatrix_kernel(const uint16_t* rows, const int* perm, uint32_t* R) {
  __shared__ __align__(16) uint16_t s[64][8];
  const int L = threadIdx.x;
  for (int i = L; i < 64 * 8; i += 32) s[i / 8][i % 8] = rows[i];
  __syncthreads();
  const int p = perm[L];
  const void* addr = p >= 0 ? static_cast<const void*>(&s[p][0])
                   : p == -1 ? static_cast<const void*>(&s[1][4])  // 8 bytes off a row
                             : static_cast<const void*>(rows);      // global memory
  uint32_t r[kCount];
  for (int j = 0; j < kCount; ++j) r[j] = 0xDEADBEEFu;
  if constexpr (kCount == 1) {
    if constexpr (kTrans) pk::ptx::ldmatrix_x1_trans(r, addr);
    else pk::ptx::ldmatrix_x1(r, addr);
  } else if constexpr (kCount == 2) {
    if constexpr (kTrans) pk::ptx::ldmatrix_x2_trans(r, addr);
    else pk::ptx::ldmatrix_x2(r, addr);
  } else {
    if constexpr (kTrans) pk::ptx::ldmatrix_x4_trans(r, addr);
    else pk::ptx::ldmatrix_x4(r, addr);
  }
  for (int j = 0; j < kCount; ++j) R[kCount * L + j] = r[j];
}

// ---- cp.async ---------------------------------------------------------------------------------------------------
constexpr int kCpThreads = 128;

__device__ inline int cp_dst_chunk(int t) { return (5 * t + 3) % kCpThreads; }  // a bijection of 0..127

__global__ void cp_async_kernel(const uint8_t* src, const int* nbytes, uint8_t* out) {
  DYN_SMEM(uint8_t, s);
  const int t = threadIdx.x;
  for (int i = 0; i < 16; ++i) s[16 * t + i] = 0x5A;
  __syncthreads();
  pk::ptx::cp_async_16(s + 16 * cp_dst_chunk(t), src + 16 * t, nbytes[t]);
  pk::ptx::cp_async_commit();
  pk::ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 16; ++i) out[16 * t + i] = s[16 * t + i];
}

__global__ void cp_async_poison_kernel(const uint8_t* src, const int* nbytes, uint8_t* before, uint8_t* after) {
  __shared__ __align__(16) uint8_t s[kCpThreads * 16];
  const int t = threadIdx.x;
  for (int i = 0; i < 16; ++i) s[16 * t + i] = 0x5A;
  __syncthreads();
  pk::ptx::cp_async_16(s + 16 * t, src + 16 * t, nbytes[t]);
  pk::ptx::cp_async_commit();
  for (int i = 0; i < 16; ++i) before[16 * t + i] = s[16 * t + i];  // undefined on a GPU: the copy is in flight
  pk::ptx::cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) after[16 * t + i] = s[16 * t + i];  // the issuing thread's own chunk: no barrier
}

__global__ void cp_async_groups_kernel(const uint8_t* src, const int* nbytes, uint8_t* out) {
  __shared__ __align__(16) uint8_t s0[kCpThreads * 16];
  __shared__ __align__(16) uint8_t s1[kCpThreads * 16];
  const int t = threadIdx.x, u = (t + 1) % kCpThreads, n = kCpThreads * 16;
  for (int i = 0; i < 16; ++i) s0[16 * t + i] = s1[16 * t + i] = 0x5A;
  __syncthreads();
  pk::ptx::cp_async_16(s0 + 16 * t, src + 16 * t, nbytes[t]);
  pk::ptx::cp_async_commit();
  pk::ptx::cp_async_16(s1 + 16 * t, src + n + 16 * t, 16);
  pk::ptx::cp_async_commit();
  pk::ptx::cp_async_wait<1>();  // group 0 complete, group 1 may still be in flight
  for (int i = 0; i < 16; ++i) {
    out[16 * t + i] = s0[16 * t + i];
    out[n + 16 * t + i] = s1[16 * t + i];  // undefined on a GPU
  }
  __syncthreads();
  for (int i = 0; i < 16; ++i) out[2 * n + 16 * t + i] = s0[16 * u + i];
  pk::ptx::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 16; ++i) out[3 * n + 16 * t + i] = s1[16 * u + i];
}

// ---- misuse: each must abort under the executor, naming the marked line ----------------------------------------
__global__ void misuse_mma_kernel(float* out, int active) {  // lanes >= active skip the mma
  const uint32_t a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u}, b[2] = {0x3f803f80u, 0x3f803f80u};
  const float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (int(threadIdx.x % 32) < active) {
    pk::ptx::mma_m16n8k16_bf16(d, a, b, c);  // MISUSE(mma_half_warp)
  }
  out[threadIdx.x] = d[0];
}

__global__ void misuse_block48_kernel(float* out) {
  const uint32_t a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u}, b[2] = {0x3f803f80u, 0x3f803f80u};
  const float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float d[4];
  pk::ptx::mma_m16n8k16_bf16(d, a, b, c);  // MISUSE(block_of_48)
  out[threadIdx.x] = d[0];
}

__global__ void misuse_ldmatrix_kernel(const uint16_t* global, uint32_t* out, int mode) {
  __shared__ __align__(16) uint16_t s[32][8];
  const int L = threadIdx.x;
  for (int i = 0; i < 8; ++i) s[L][i] = uint16_t(L * 8 + i);
  __syncthreads();
  uint32_t r[4];
  if (mode == 0) {
    const void* addr = L == 3 ? static_cast<const void*>(&s[L][4]) : static_cast<const void*>(&s[L][0]);
    pk::ptx::ldmatrix_x4(r, addr);  // MISUSE(ldmatrix_unaligned)
  } else {
    const void* addr = L == 5 ? static_cast<const void*>(global) : static_cast<const void*>(&s[L][0]);
    pk::ptx::ldmatrix_x4(r, addr);  // MISUSE(ldmatrix_global)
  }
  for (int j = 0; j < 4; ++j) out[4 * L + j] = r[j];
}

__global__ void misuse_cp_async_kernel(const uint8_t* src, uint8_t* out) {
  __shared__ __align__(16) uint8_t s[33 * 16];
  const int t = threadIdx.x;
  pk::ptx::cp_async_16(s + 16 * t + (t == 7 ? 8 : 0), src + 16 * t);  // MISUSE(cp_async_unaligned)
  pk::ptx::cp_async_commit();
  pk::ptx::cp_async_wait<0>();
  __syncthreads();
  out[t] = s[16 * t];
}

// ---- host side --------------------------------------------------------------------------------------------------
namespace {

std::string g_dir;

template <class T> std::vector<T> load(const char* name, size_t n) {
  const std::string path = g_dir + "/" + name;
  std::vector<T> v(n);
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr || std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "ptx_probe: cannot read %zu values from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

template <class T> void store(const char* name, const std::vector<T>& v) {
  const std::string path = g_dir + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
    std::fprintf(stderr, "ptx_probe: cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

template <class T> T* to_device(const std::vector<T>& v) {
  void* p = nullptr;
  cudaMalloc(&p, v.size() * sizeof(T));
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}

template <class T> T* device_buffer(size_t n) {
  void* p = nullptr;
  cudaMalloc(&p, n * sizeof(T));
  return static_cast<T*>(p);
}

template <class T> std::vector<T> to_host(const T* p, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

void sync_or_die() {
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    std::fprintf(stderr, "ptx_probe: kernel failed: %s\n", cudaGetErrorString(e));
    std::exit(3);
  }
}

int probe_mma(bool half) {
  const auto a = load<uint32_t>("a.u32", 32 * 4);
  const auto b = load<uint32_t>("b.u32", 32 * 2);
  const auto c = load<float>("c.f32", 32 * 4);
  uint32_t *da = to_device(a), *db = to_device(b);
  float *dc = to_device(c), *dd = device_buffer<float>(32 * 4), *dalias = device_buffer<float>(32 * 4);
  if (half) KLAUNCH(mma_kernel<true>, 1, 32, 0, nullptr, da, db, dc, dd, dalias);
  else KLAUNCH(mma_kernel<false>, 1, 32, 0, nullptr, da, db, dc, dd, dalias);
  sync_or_die();
  store("d.f32", to_host(dd, 32 * 4));
  store("d_alias.f32", to_host(dalias, 32 * 4));
  return 0;
}

template <int kCount> int probe_ldmatrix(bool trans) {
  const auto rows = load<uint16_t>("rows.u16", 64 * 8);
  const auto perm = load<int32_t>("perm.i32", 32);
  for (int p : perm)
    if (p < -2 || p >= 64) {
      std::fprintf(stderr, "ptx_probe: perm value %d out of range\n", p);
      return 2;
    }
  uint16_t* drows = to_device(rows);
  int32_t* dperm = to_device(perm);
  uint32_t* dr = device_buffer<uint32_t>(32 * kCount);
  if (trans) KLAUNCH((ldmatrix_kernel<kCount, true>), 1, 32, 0, nullptr, drows, dperm, dr);
  else KLAUNCH((ldmatrix_kernel<kCount, false>), 1, 32, 0, nullptr, drows, dperm, dr);
  sync_or_die();
  store("r.u32", to_host(dr, 32 * kCount));
  return 0;
}

int probe_cp_async() {
  constexpr int n = kCpThreads * 16;
  const auto src = load<uint8_t>("src.u8", 2 * n);
  const auto nbytes = load<int32_t>("nbytes.i32", kCpThreads);
  uint8_t* dsrc = to_device(src);
  int32_t* dn = to_device(nbytes);
  uint8_t *out = device_buffer<uint8_t>(n), *before = device_buffer<uint8_t>(n), *after = device_buffer<uint8_t>(n),
          *groups = device_buffer<uint8_t>(4 * n);
  KLAUNCH(cp_async_kernel, 1, kCpThreads, n, nullptr, dsrc, dn, out);
  KLAUNCH(cp_async_poison_kernel, 1, kCpThreads, 0, nullptr, dsrc, dn, before, after);
  KLAUNCH(cp_async_groups_kernel, 1, kCpThreads, 0, nullptr, dsrc, dn, groups);
  sync_or_die();
  store("out.u8", to_host(out, n));
  store("before.u8", to_host(before, n));
  store("after.u8", to_host(after, n));
  store("groups.u8", to_host(groups, 4 * n));
  return 0;
}

int probe_misuse(const std::string& name) {
  float* fout = device_buffer<float>(64);
  uint32_t* uout = device_buffer<uint32_t>(32 * 4);
  uint16_t* g16 = device_buffer<uint16_t>(64);
  uint8_t* g8 = device_buffer<uint8_t>(33 * 16);
  uint8_t* o8 = device_buffer<uint8_t>(32);
  if (name == "mma_half_warp") {
    KLAUNCH(misuse_mma_kernel, 1, 32, 0, nullptr, fout, 16);
  } else if (name == "block_of_48") {
    KLAUNCH(misuse_block48_kernel, 1, 48, 0, nullptr, fout);
  } else if (name == "ldmatrix_unaligned") {
    KLAUNCH(misuse_ldmatrix_kernel, 1, 32, 0, nullptr, g16, uout, 0);
  } else if (name == "ldmatrix_global") {
    KLAUNCH(misuse_ldmatrix_kernel, 1, 32, 0, nullptr, g16, uout, 1);
  } else if (name == "cp_async_unaligned") {
    KLAUNCH(misuse_cp_async_kernel, 1, 32, 0, nullptr, g8, o8);
  } else {
    std::fprintf(stderr, "ptx_probe: unknown misuse %s\n", name.c_str());
    return 2;
  }
  sync_or_die();
  std::fprintf(stderr, "ptx_probe: misuse %s was not detected\n", name.c_str());
  return 0;  // the test expects an abort; a clean exit is the failure it reports
}

int usage() {
  std::fprintf(stderr,
               "usage: ptx_probe mma bf16|f16 DIR | ldmatrix 1|2|4 trans|notrans DIR | cp_async DIR | misuse NAME\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  const std::string what = argv[1];
  if (what == "mma" && argc == 4) {
    const std::string type = argv[2];
    if (type != "bf16" && type != "f16") return usage();
    g_dir = argv[3];
    return probe_mma(type == "f16");
  }
  if (what == "ldmatrix" && argc == 5) {
    const std::string count = argv[2], mode = argv[3];
    if (mode != "trans" && mode != "notrans") return usage();
    g_dir = argv[4];
    const bool trans = mode == "trans";
    if (count == "1") return probe_ldmatrix<1>(trans);
    if (count == "2") return probe_ldmatrix<2>(trans);
    if (count == "4") return probe_ldmatrix<4>(trans);
    return usage();
  }
  if (what == "cp_async" && argc == 3) {
    g_dir = argv[2];
    return probe_cp_async();
  }
  if (what == "misuse" && argc == 3) return probe_misuse(argv[2]);
  return usage();
}
