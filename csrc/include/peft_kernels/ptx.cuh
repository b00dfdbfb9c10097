// Tensor-core and async-copy primitives: inline PTX under nvcc, the CPU executor's emulation (csrc/sim) under
// the host compiler with -DPEFT_KERNELS_CUDASIM. The names and signatures are fixed: code outside the project
// calls them. Fragment layouts are the PTX ISA's (../shared/GPU_DESIGN.md; the executor's tests model them).
//
//   mma_m16n8k16_{bf16,f16}: D = A·B + C, A 16×16 row-major (4 regs), B 16×8 "col" (2 regs), C/D fp32 (4).
//   ldmatrix_x{1,2,4}[_trans]: 1, 2 or 4 8×8 b16 matrices from shared memory; lane 8j+r gives row r of
//     matrix j (a 16-byte-aligned address); .trans hands out the transposed fragment.
//   cp_async_16: 16 bytes global -> shared (.cg, L2 only); src_bytes < 16 zero-fills the rest.
//   cp_async_commit / cp_async_wait<N>: close the thread's pending copies into a group / wait until at most
//     N groups are pending. A wait makes the data visible to the waiting thread only: others need a barrier.
//
// Under the executor every primitive also checks what the hardware leaves undefined (all 32 lanes present,
// aligned addresses inside shared memory) and aborts with the caller's file:line; the trailing
// source_location parameter exists only there, so callers use the signatures above unchanged.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)

namespace pk::ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace pk::ptx

#elif defined(PEFT_KERNELS_CUDASIM)

#include <source_location>

namespace cudasim::ptx {
using Loc = std::source_location;
// Implemented in csrc/sim/cudasim_rt.cpp. `half` selects f16 (true) or bf16 (false) inputs; `count` is the
// number of 8x8 matrices of an ldmatrix.
void mma_m16n8k16(bool half, float* d, const uint32_t* a, const uint32_t* b, const float* c, const Loc& loc);
void ldmatrix(int count, bool trans, uint32_t* r, const void* smem, const Loc& loc);
void cp_async_16(void* smem, const void* gmem, int src_bytes, const Loc& loc);
void cp_async_commit(const Loc& loc);
void cp_async_wait(int n, const Loc& loc);
}  // namespace cudasim::ptx

namespace pk::ptx {
using Loc = std::source_location;

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                              const Loc& loc = Loc::current()) {
  ::cudasim::ptx::mma_m16n8k16(false, d, a, b, c, loc);
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                             const Loc& loc = Loc::current()) {
  ::cudasim::ptx::mma_m16n8k16(true, d, a, b, c, loc);
}
inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem, const Loc& loc = Loc::current()) {
  ::cudasim::ptx::ldmatrix(1, false, r, smem, loc);
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem, const Loc& loc = Loc::current()) {
  ::cudasim::ptx::ldmatrix(1, true, r, smem, loc);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem, const Loc& loc = Loc::current()) {
  ::cudasim::ptx::ldmatrix(2, false, r, smem, loc);
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem, const Loc& loc = Loc::current()) {
  ::cudasim::ptx::ldmatrix(2, true, r, smem, loc);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem, const Loc& loc = Loc::current()) {
  ::cudasim::ptx::ldmatrix(4, false, r, smem, loc);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem, const Loc& loc = Loc::current()) {
  ::cudasim::ptx::ldmatrix(4, true, r, smem, loc);
}
inline void cp_async_16(void* smem, const void* gmem, int src_bytes = 16, const Loc& loc = Loc::current()) {
  ::cudasim::ptx::cp_async_16(smem, gmem, src_bytes, loc);
}
inline void cp_async_commit(const Loc& loc = Loc::current()) { ::cudasim::ptx::cp_async_commit(loc); }
template <int N> inline void cp_async_wait(const Loc& loc = Loc::current()) {
  static_assert(N >= 0, "cp.async.wait_group N needs N >= 0");
  ::cudasim::ptx::cp_async_wait(N, loc);
}
}  // namespace pk::ptx

#else
#error "peft_kernels/ptx.cuh builds with nvcc, or with the host compiler and -DPEFT_KERNELS_CUDASIM"
#endif
