// The x86-64 instruction set the CPU kernels' SIMD paths may use, decided per call: the best the CPU has, capped
// by PEFT_KERNELS_CPU_ISA = scalar|avx2|avx512|avx512_bf16 (read on every call, so the tests run every path on one
// machine). kAvx512Bf16 adds the bf16 dot products (vdpbf16ps: Zen 4, Cooper Lake, Sapphire Rapids).
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace peft_kernels::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline Isa pick_isa() {
  Isa best = Isa::kScalar;
  // BW and VL for the 16-bit masked loads and stores of microgemm.cpp; every AVX-512 x86 since Skylake-X has them.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    best = __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::kAvx2;
  }
  const char* cap = std::getenv("PEFT_KERNELS_CPU_ISA");
  if (cap == nullptr) return best;
  Isa limit;
  if (std::strcmp(cap, "scalar") == 0) {
    limit = Isa::kScalar;
  } else if (std::strcmp(cap, "avx2") == 0) {
    limit = Isa::kAvx2;
  } else if (std::strcmp(cap, "avx512") == 0) {
    limit = Isa::kAvx512;
  } else if (std::strcmp(cap, "avx512_bf16") == 0) {
    limit = Isa::kAvx512Bf16;
  } else {
    TORCH_CHECK_VALUE(false, "PEFT_KERNELS_CPU_ISA must be scalar, avx2, avx512 or avx512_bf16, got '", cap, "'");
  }
  return static_cast<int>(limit) < static_cast<int>(best) ? limit : best;
}

}  // namespace peft_kernels::cpu
