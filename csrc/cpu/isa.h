// The x86-64 instruction set the CPU kernels' SIMD paths may use, decided per call: the best the CPU has, capped
// by PEFT_KERNELS_CPU_ISA = scalar|avx2|avx512|avx512_bf16|amx (read on every call, so the tests run every path on
// one machine). kAvx512Bf16 adds the bf16 dot products (vdpbf16ps: Zen 4, Cooper Lake, Sapphire Rapids); kAmx the
// bf16 tile products (AMX-BF16: Sapphire Rapids and later Xeons), once Linux has granted the process the tile state.
#pragma once
#include <c10/util/Exception.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace peft_kernels::cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// Linux (5.16 and later) hands the 8 KiB AMX tile data state to a process only on request (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); a tile instruction without it faults. Asked once per process: the
// grant covers every thread, those already running included. oneDNN asks the same for its own AMX GEMMs.
inline bool amx_granted() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool granted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

inline Isa pick_isa() {
  Isa best = Isa::kScalar;
  // BW and VL for the 16-bit masked loads and stores of microgemm.cpp; every AVX-512 x86 since Skylake-X has them.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    best = __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
    if (best == Isa::kAvx512Bf16 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
        amx_granted()) {
      best = Isa::kAmx;
    }
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
  } else if (std::strcmp(cap, "amx") == 0) {
    limit = Isa::kAmx;
  } else {
    TORCH_CHECK_VALUE(false, "PEFT_KERNELS_CPU_ISA must be scalar, avx2, avx512, avx512_bf16 or amx, got '", cap, "'");
  }
  return static_cast<int>(limit) < static_cast<int>(best) ? limit : best;
}

}  // namespace peft_kernels::cpu
