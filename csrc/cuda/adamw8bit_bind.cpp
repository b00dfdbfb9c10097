// Torch-facing side of csrc/cuda/adamw8bit.cu; built into _C (CUDA) and into _sim (cudasim), like nf4_bind.cpp.
#include "adamw8bit_launch.h"
#include "launch_backend.h"
#include "peft_kernels/adamw8bit_op.h"

namespace peft_kernels::adamw8bit {
namespace {

struct Gpu {
  using Guard = cuda::DeviceGuard;
  static void step(const Params& p) { cuda::check_launch(cuda::adamw8bit(p, cuda::current_stream()), "adamw8bit"); }
};

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) { m.impl("adamw8bit_step_", &step_op<Gpu>); }

}  // namespace peft_kernels::adamw8bit
