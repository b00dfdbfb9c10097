// Torch-facing side of csrc/cuda/lora_linear.cu; built into _C (CUDA) and into _sim (cudasim), like nf4_bind.cpp.
#include "backends.h"
#include "peft_kernels/lora_op.h"

namespace peft_kernels::lora {

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("lora_linear_fwd", &forward_op<Gpu>);
  m.impl("lora_linear_bwd", &backward_op<Gpu>);
}

}  // namespace peft_kernels::lora
