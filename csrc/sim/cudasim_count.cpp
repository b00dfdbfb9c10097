// Every load and store of a kernel, for the executor's counters (cudasim_prof.h).
//
// GCC's -fsanitize=thread makes the compiler call __tsan_readN / __tsan_writeN (and __tsan_atomic*) around
// each memory access of the code it compiles. Compiling the kernel source that way and linking this file
// instead of the ThreadSanitizer runtime hands us every access of the kernel with the instruction's address
// (our caller): the counters group the lanes' accesses of one instruction into a warp access. Build:
//
//   g++ -std=c++20 -O1 -DPEFT_KERNELS_CUDASIM -fsanitize=thread --param=tsan-instrument-func-entry-exit=0
//       -x c++ -c KERNEL.cu           (the kernel file, includes cudasim.h; only this one instrumented)
//   g++ -std=c++20 -O1 -DPEFT_KERNELS_CUDASIM -c csrc/sim/cudasim_rt.cpp csrc/sim/cudasim_count.cpp
//   g++ *.o -lpthread                 (no -fsanitize at link time: no ThreadSanitizer runtime)
//
// Never link this into a build that uses the real ThreadSanitizer.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace cudasim::prof {
void access(uint64_t pc, const void* p, size_t n, bool write);
}

#define CUDASIM_PC reinterpret_cast<uint64_t>(__builtin_return_address(0))
#define CUDASIM_RW(N)                                                                                       \
  void __tsan_read##N(void* p) { cudasim::prof::access(CUDASIM_PC, p, N, false); }                        \
  void __tsan_write##N(void* p) { cudasim::prof::access(CUDASIM_PC, p, N, true); }                        \
  void __tsan_unaligned_read##N(void* p) { cudasim::prof::access(CUDASIM_PC, p, N, false); }              \
  void __tsan_unaligned_write##N(void* p) { cudasim::prof::access(CUDASIM_PC, p, N, true); }              \
  void __tsan_volatile_read##N(void* p) { cudasim::prof::access(CUDASIM_PC, p, N, false); }               \
  void __tsan_volatile_write##N(void* p) { cudasim::prof::access(CUDASIM_PC, p, N, true); }

// Atomics run as what they are (the executor's own std::atomic members are instrumented too); the counters
// do not cost them.
#define CUDASIM_ATOMIC(BITS, T)                                                                             \
  T __tsan_atomic##BITS##_load(const volatile T* a, int mo) { return __atomic_load_n(a, mo); }              \
  void __tsan_atomic##BITS##_store(volatile T* a, T v, int mo) { __atomic_store_n(a, v, mo); }              \
  T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int mo) { return __atomic_exchange_n(a, v, mo); }    \
  T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int mo) { return __atomic_fetch_add(a, v, mo); }    \
  T __tsan_atomic##BITS##_fetch_sub(volatile T* a, T v, int mo) { return __atomic_fetch_sub(a, v, mo); }    \
  T __tsan_atomic##BITS##_fetch_and(volatile T* a, T v, int mo) { return __atomic_fetch_and(a, v, mo); }    \
  T __tsan_atomic##BITS##_fetch_or(volatile T* a, T v, int mo) { return __atomic_fetch_or(a, v, mo); }      \
  T __tsan_atomic##BITS##_fetch_xor(volatile T* a, T v, int mo) { return __atomic_fetch_xor(a, v, mo); }    \
  T __tsan_atomic##BITS##_fetch_nand(volatile T* a, T v, int mo) { return __atomic_fetch_nand(a, v, mo); }  \
  int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* c, T v, int mo, int fmo) {            \
    return __atomic_compare_exchange_n(a, c, v, false, mo, fmo == 0 ? 0 : 2);                               \
  }                                                                                                         \
  int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* c, T v, int mo, int fmo) {              \
    return __atomic_compare_exchange_n(a, c, v, true, mo, fmo == 0 ? 0 : 2);                                \
  }                                                                                                         \
  T __tsan_atomic##BITS##_compare_exchange_val(volatile T* a, T c, T v, int mo, int fmo) {                  \
    __atomic_compare_exchange_n(a, &c, v, false, mo, fmo == 0 ? 0 : 2);                                     \
    return c;                                                                                               \
  }

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_read_range(void* p, size_t n) { cudasim::prof::access(CUDASIM_PC, p, n, false); }
void __tsan_write_range(void* p, size_t n) { cudasim::prof::access(CUDASIM_PC, p, n, true); }
CUDASIM_RW(1)
CUDASIM_RW(2)
CUDASIM_RW(4)
CUDASIM_RW(8)
CUDASIM_RW(16)
CUDASIM_ATOMIC(8, uint8_t)
CUDASIM_ATOMIC(16, uint16_t)
CUDASIM_ATOMIC(32, uint32_t)
CUDASIM_ATOMIC(64, uint64_t)
void __tsan_atomic_thread_fence(int mo) { __atomic_thread_fence(mo); }
void __tsan_atomic_signal_fence(int mo) { __atomic_signal_fence(mo); }
}
