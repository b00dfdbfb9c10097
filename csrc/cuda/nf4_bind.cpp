// Torch-facing side of csrc/cuda/nf4.cu. Built twice: into _C for CUDA tensors, and with
// -DPEFT_KERNELS_CUDASIM into the test-only _sim library, where the same launchers (compiled by the host
// compiler with csrc/sim/cudasim.h) run on CPU tensors under the op namespace peft_kernels_sim.
#include "backends.h"
#include "peft_kernels/nf4_linear_op.h"

namespace peft_kernels::nf4 {

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("nf4_quantize", &quantize_op<Gpu>);
  m.impl("nf4_dequantize", &dequantize_op<Gpu>);
  m.impl("nf4_linear", &linear_op<Gpu>);
  m.impl("nf4_linear_dx", &linear_dx_op<Gpu>);
}

}  // namespace peft_kernels::nf4
