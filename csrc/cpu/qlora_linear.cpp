// CPU registration of qlora_linear: the LoRA kernels of lora_linear.cpp over the NF4 kernels of nf4.cpp.
#include <torch/library.h>

#include "backends.h"
#include "peft_kernels/qlora_op.h"

namespace peft_kernels::qlora {

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("qlora_linear_fwd", &forward_op<lora::Cpu, nf4::Cpu>);
  m.impl("qlora_linear_bwd", &backward_op<lora::Cpu, nf4::Cpu>);
}

}  // namespace peft_kernels::qlora
