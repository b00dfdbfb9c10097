// The CPU backends of the op bodies in csrc/include/peft_kernels/*_op.h, declared once so that an op built
// from several of them (qlora_linear: NF4 base + LoRA) composes the same kernels. Defined in nf4.cpp and
// lora_linear.cpp.
#pragma once
#include <ATen/ATen.h>

#include "peft_kernels/lora_params.h"
#include "peft_kernels/nf4_params.h"

namespace peft_kernels {
namespace nf4 {

struct Cpu {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  static constexpr bool kFloat64 = true;
  static void encode(const EncodeParams& p);
  static void quantize8(const Quantize8Params& p);
  static void decode(const DecodeParams& p);
  static void gemv(const GemvParams& p);
  // nf4_linear's tile workspace: one per calling thread, kept and reused by every later call (and so across
  // layers): a workspace allocated per call (2 MiB for a 1024 x 1024 bf16 weight, twice per training step) was
  // handed back to the OS by glibc and faulted in again, page by page, on the next call.
  static at::Tensor workspace(int64_t numel, const at::TensorOptions& opts);
};

}  // namespace nf4

namespace lora {

struct Cpu {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  static constexpr bool kFloat64 = true;
  // backward computes dxa = dy B per block of rows, from dy while the block is in cache: oneDNN's bf16 GEMM of
  // [2048, 1024] x [1024, 16] took 0.55 ms here, 0.6 ms of a 2.3 ms dA-only backward.
  static constexpr bool kFusedDxa = true;
  static constexpr bool kWorkspace = false;
  static void down(const DownParams& p);
  static void backward(const BackwardParams& p);
};

}  // namespace lora
}  // namespace peft_kernels
