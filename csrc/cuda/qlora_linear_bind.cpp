// qlora_linear on CUDA (and in the cudasim build): the LoRA kernels of lora_linear.cu over those of nf4.cu.
#include "backends.h"
#include "peft_kernels/qlora_op.h"

namespace peft_kernels::qlora {

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("qlora_linear_fwd", &forward_op<lora::Gpu, nf4::Gpu>);
  m.impl("qlora_linear_bwd", &backward_op<lora::Gpu, nf4::Gpu>);
}

}  // namespace peft_kernels::qlora
