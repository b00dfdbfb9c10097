// The library's op namespace: every schema (csrc/include/peft_kernels/schemas.h) and build facts.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

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

}  // namespace

TORCH_LIBRARY(peft_kernels, m) {
  define_schemas(m);
  m.def("_build_info() -> str", &build_info);
}

}  // namespace peft_kernels
