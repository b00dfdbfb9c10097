// Every op schema of the library, declared once. csrc/registration.cpp defines them in the `peft_kernels`
// namespace; the cudasim test build (csrc/sim/registration.cpp) defines the same schemas in
// `peft_kernels_sim`, whose CPU kernels are the CUDA kernel sources run through the CPU executor.
#pragma once
#include <torch/library.h>

namespace peft_kernels {

inline void define_schemas(torch::Library& m) {
  // weight (any shape, numel % blocksize == 0) -> codes uint8 [numel/2], absmax, nested_absmax fp32, offset
  // fp32 []. Without nested_code: absmax fp32 [numel/blocksize], nested_absmax [0], offset 0. With it
  // (double quantization): absmax uint8 [numel/blocksize], nested_absmax fp32 [ceil(numel/blocksize/256)].
  m.def("nf4_quantize(Tensor weight, int blocksize, Tensor? nested_code) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> out [numel] of `dtype`, numel = 2 * codes.numel(); the nested_* and offset arguments are given
  // together (absmax uint8) or not at all (absmax fp32).
  m.def(
      "nf4_dequantize(Tensor codes, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int blocksize, ScalarType dtype) -> Tensor");
}

}  // namespace peft_kernels
