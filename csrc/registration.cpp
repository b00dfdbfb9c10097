// The library's op namespace: every schema (csrc/include/peft_kernels/schemas.h) and build facts.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "cpu/isa.h"
#include "peft_kernels/schemas.h"

namespace peft_kernels {
namespace {

// JSON written at compile time by CMake's definitions: what this binary contains, so that users and tests
// can tell a CPU-only build from a CUDA one without guessing from the environment.
std::string build_info() {
  std::string s = "{\"torch\": \"" TORCH_VERSION "\", \"cuda\": ";
#if defined(PEFT_KERNELS_WITH_CUDA)
  s += "\"" PEFT_KERNELS_CUDA_VERSION "\", \"cuda_arch_list\": \"" PEFT_KERNELS_CUDA_ARCH_LIST "\"}";
#else
  s += "null, \"cuda_arch_list\": \"\"}";
#endif
  return s;
}

// The instruction set the CPU kernels' SIMD paths pick on this machine now (cpu/isa.h: the CPU's best, capped by
// PEFT_KERNELS_CPU_ISA): which of their paths a call takes depends on it.
std::string cpu_isa() {
  switch (cpu::pick_isa()) {
    case cpu::Isa::kScalar: return "scalar";
    case cpu::Isa::kAvx2: return "avx2";
    case cpu::Isa::kAvx512: return "avx512";
    case cpu::Isa::kAvx512Bf16: return "avx512_bf16";
    case cpu::Isa::kAmx: return "amx";
  }
  return "unknown";
}

}  // namespace

TORCH_LIBRARY(peft_kernels, m) {
  define_schemas(m);
  m.def("_build_info() -> str", &build_info);
  m.def("_cpu_isa() -> str", &cpu_isa);
}

}  // namespace peft_kernels
