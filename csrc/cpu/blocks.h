// Row blocks and tensor views shared by the CPU kernels that work on x a block of rows at a time (lora_linear's
// dropout path, kron_linear): a block of about 64K values of x is 256 KiB in fp32, so a block's fp32 buffers stay
// inside this Zen 4's 1 MiB L2 while the GEMMs on them run.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include "peft_kernels/hd.h"

namespace peft_kernels::cpu {

constexpr int64_t kBlockValues = 65536;  // values of x per block of rows

// Rows per block for rows of `in` values, at least 1 and at most m (m >= 1).
inline int64_t block_rows(int64_t in, int64_t m) {
  return std::clamp<int64_t>(kBlockValues / in, 1, std::max<int64_t>(m, 1));
}

// A kernel's buffer (Acc = float or double) as a tensor, no copy.
template <class Acc> at::Tensor view(const Acc* data, at::IntArrayRef sizes) {
  return at::from_blob(const_cast<Acc*>(data), sizes, at::TensorOptions().dtype(c10::CppTypeToScalarType<Acc>::value));
}

// A params struct's untyped pointer as a tensor of its dtype, no copy.
inline at::Tensor wrap(const void* ptr, at::IntArrayRef sizes, DType dtype) {
  static constexpr at::ScalarType kTypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
  return at::from_blob(const_cast<void*>(ptr), sizes, kTypes[static_cast<int>(dtype)]);
}

}  // namespace peft_kernels::cpu
