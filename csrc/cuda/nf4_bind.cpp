// Torch-facing side of csrc/cuda/nf4.cu. Built twice: into _C for CUDA tensors, and with
// -DPEFT_KERNELS_CUDASIM into the test-only _sim library, where the same launchers (compiled by the host
// compiler with csrc/sim/cudasim.h) run on CPU tensors under the op namespace peft_kernels_sim.
#include "launch_backend.h"
#include "nf4_launch.h"
#include "peft_kernels/nf4_linear_op.h"

namespace peft_kernels::nf4 {
namespace {

struct Gpu {
  using Guard = cuda::DeviceGuard;
  static constexpr bool kFloat64 = false;
  static void encode(const EncodeParams& p) { cuda::check_launch(cuda::nf4_encode(p, cuda::current_stream()), "nf4_encode"); }
  static void quantize8(const Quantize8Params& p) {
    cuda::check_launch(cuda::nf4_quantize8(p, cuda::current_stream()), "nf4_quantize8");
  }
  static void decode(const DecodeParams& p) { cuda::check_launch(cuda::nf4_decode(p, cuda::current_stream()), "nf4_decode"); }
  static void gemv(const GemvParams& p) { cuda::check_launch(cuda::nf4_gemv(p, cuda::current_stream()), "nf4_gemv"); }
};

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("nf4_quantize", &quantize_op<Gpu>);
  m.impl("nf4_dequantize", &dequantize_op<Gpu>);
  m.impl("nf4_linear", &linear_op<Gpu>);
  m.impl("nf4_linear_dx", &linear_dx_op<Gpu>);
}

}  // namespace peft_kernels::nf4
