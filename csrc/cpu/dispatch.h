// dtype dispatch for the CPU kernels: calls f.template operator()<T>() with T the C++ type of `dtype`.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "peft_kernels/hd.h"

namespace peft_kernels::cpu {

template <class F> void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f.template operator()<float>(); break;
    case DType::kFloat16: f.template operator()<c10::Half>(); break;
    case DType::kBFloat16: f.template operator()<c10::BFloat16>(); break;
    case DType::kFloat64: f.template operator()<double>(); break;
  }
}

// Accumulator type: fp32 for the 16-bit types and fp32, fp64 for fp64 (so gradcheck sees fp64 math).
template <class T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace peft_kernels::cpu
