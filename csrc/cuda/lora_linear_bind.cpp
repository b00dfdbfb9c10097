// Torch-facing side of csrc/cuda/lora_linear.cu; built into _C (CUDA) and into _sim (cudasim), like nf4_bind.cpp.
#include "launch_backend.h"
#include "lora_launch.h"
#include "peft_kernels/lora_op.h"

namespace peft_kernels::lora {
namespace {

struct Gpu {
  using Guard = cuda::DeviceGuard;
  static constexpr bool kFloat64 = false;
  static void down(const DownParams& p) { cuda::check_launch(cuda::lora_down(p, cuda::current_stream()), "lora_down"); }
  static void backward(const BackwardParams& p) {
    cuda::check_launch(cuda::lora_backward(p, cuda::current_stream()), "lora_backward");
  }
};

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("lora_linear_fwd", &forward_op<Gpu>);
  m.impl("lora_linear_bwd", &backward_op<Gpu>);
}

}  // namespace peft_kernels::lora
