// Torch-facing side of csrc/cuda/kron_linear.cu; built into _C (CUDA) and into _sim (cudasim), like lora_linear_bind.cpp.
#include "kron_launch.h"
#include "launch_backend.h"
#include "peft_kernels/kron_op.h"

namespace peft_kernels::kron {
namespace {

struct Gpu {
  using Guard = cuda::DeviceGuard;
  static constexpr bool kFloat64 = false;
  static constexpr bool kWorkspace = true;
  static void forward(const ForwardParams& p) {
    cuda::check_launch(cuda::kron_forward(p, cuda::current_stream()), "kron_forward");
  }
  static void backward(const BackwardParams& p) {
    cuda::check_launch(cuda::kron_backward(p, cuda::current_stream()), "kron_backward");
  }
};

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("kron_linear_fwd", &forward_op<Gpu>);
  m.impl("kron_linear_bwd", &backward_op<Gpu>);
}

}  // namespace peft_kernels::kron
