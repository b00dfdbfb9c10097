// The CUDA backends of the op bodies in csrc/include/peft_kernels/*_op.h: thin wrappers that launch the
// torch-free kernels of csrc/cuda/*.cu on the current stream. Shared by the bindings of every op, so that an
// op built from several of them (qlora_linear: NF4 base + LoRA) composes the same kernels. In the cudasim
// build the same code runs the kernels through the CPU executor.
#pragma once
#include "launch_backend.h"
#include "lora_launch.h"
#include "nf4_launch.h"

namespace peft_kernels {
namespace nf4 {

struct Gpu {
  using Guard = cuda::DeviceGuard;
  static constexpr bool kFloat64 = false;
  static void encode(const EncodeParams& p) { cuda::check_launch(cuda::nf4_encode(p, cuda::current_stream()), "nf4_encode"); }
  static void quantize8(const Quantize8Params& p) {
    cuda::check_launch(cuda::nf4_quantize8(p, cuda::current_stream()), "nf4_quantize8");
  }
  static void decode(const DecodeParams& p) { cuda::check_launch(cuda::nf4_decode(p, cuda::current_stream()), "nf4_decode"); }
  static void gemv(const GemvParams& p) { cuda::check_launch(cuda::nf4_gemv(p, cuda::current_stream()), "nf4_gemv"); }
  // The tensor-core kernels; false (nothing launched) for a call they do not take (fp32, in % 32 != 0).
  static bool gemm(const GemmParams& p) {
    if (!cuda::nf4_gemm_supported(p)) return false;
    cuda::check_launch(cuda::nf4_gemm(p, cuda::current_stream()), "nf4_gemm");
    return true;
  }
  static bool dx(const DxParams& p) {
    if (!cuda::nf4_linear_dx_supported(p)) return false;
    cuda::check_launch(cuda::nf4_linear_dx(p, cuda::current_stream()), "nf4_linear_dx");
    return true;
  }
};

}  // namespace nf4

namespace lora {

struct Gpu {
  using Guard = cuda::DeviceGuard;
  static constexpr bool kFloat64 = false;
  static constexpr bool kFusedDxa = false;  // dxa comes from cuBLAS
  static constexpr bool kWorkspace = true;  // dA's split-M partials
  static void down(const DownParams& p) { cuda::check_launch(cuda::lora_down(p, cuda::current_stream()), "lora_down"); }
  static void backward(const BackwardParams& p) {
    cuda::check_launch(cuda::lora_backward(p, cuda::current_stream()), "lora_backward");
  }
};

}  // namespace lora
}  // namespace peft_kernels
