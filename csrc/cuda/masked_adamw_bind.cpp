// Torch-facing side of csrc/cuda/masked_adamw.cu; built into _C (CUDA) and into _sim (cudasim), like nf4_bind.cpp.
#include "launch_backend.h"
#include "masked_adamw_launch.h"
#include "peft_kernels/masked_adamw_op.h"

namespace peft_kernels::sparse {
namespace {

struct Gpu {
  using Guard = cuda::DeviceGuard;
  static void adamw(const AdamWParams& p) { cuda::check_launch(cuda::masked_adamw(p, cuda::current_stream()), "masked_adamw"); }
  static void sgd(const SGDParams& p) { cuda::check_launch(cuda::masked_sgd(p, cuda::current_stream()), "masked_sgd"); }
};

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("masked_adamw_step_", &adamw_op<Gpu>);
  m.impl("masked_sgd_step_", &sgd_op<Gpu>);
}

}  // namespace peft_kernels::sparse
