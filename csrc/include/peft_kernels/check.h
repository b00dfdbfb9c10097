// Argument checks shared by every backend's torch-facing code (CPU, CUDA, cudasim), so a bad input gets the
// same Python exception whichever device it is on: ValueError/TypeError naming the op, the argument, what
// was expected and what came. Torch-facing only: never included by a kernel file.
#pragma once
#include <ATen/ATen.h>

#include <sstream>
#include <string>

#include "peft_kernels/hd.h"

namespace peft_kernels::check {

inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << " tensor of shape " << t.sizes() << " on " << t.device();
  return s.str();
}

inline void defined(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": argument '", arg, "' must be a tensor, got None");
}

inline void dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": argument '", arg, "' must have dtype ", expected, ", got a ",
                   describe(t));
}

inline void numel(const char* op, const char* arg, const at::Tensor& t, int64_t expected) {
  TORCH_CHECK_VALUE(t.numel() == expected, op, ": argument '", arg, "' must have ", expected, " elements, got a ",
                    describe(t));
}

// A 1-D tensor of `expected` elements (a bias: [1, out] would pass a numel check and then fail to broadcast).
inline void vector(const char* op, const char* arg, const at::Tensor& t, int64_t expected) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == expected, op, ": argument '", arg, "' must have ", expected,
                    " elements in one dimension, got a ", describe(t));
}

inline void contiguous(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": argument '", arg,
                    "' must be contiguous (call .contiguous() first), got strides ", t.strides(), " for a ",
                    describe(t));
}

inline void same_device(const char* op, const char* arg, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": argument '", arg, "' must be on ", device, " like the other inputs, got a ",
                    describe(t));
}

// The element types our kernels read and write: fp32, fp16, bf16, and fp64 where `allow_f64` (CPU kernels
// that gradcheck runs through).
inline DType float_dtype(const char* op, const char* arg, at::ScalarType s, bool allow_f64 = false) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble:
      if (allow_f64) return DType::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, op, ": argument '", arg, "' must be torch.float32, torch.float16 or torch.bfloat16",
                       allow_f64 ? " (or torch.float64 on the CPU)" : "", ", got ", s);
  }
}

// bitsandbytes' 4-bit block sizes: powers of two from 32 to 4096.
inline void nf4_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
                    ": argument 'blocksize' must be a power of two in [32, 4096] (bitsandbytes' block sizes), got ",
                    blocksize);
}

}  // namespace peft_kernels::check
