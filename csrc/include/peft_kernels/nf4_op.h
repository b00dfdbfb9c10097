// The NF4 op bodies, written once for every backend. A Backend provides
//   struct Guard { explicit Guard(at::Device); };            // selects the device (no-op on CPU)
//   static void encode(const nf4::EncodeParams&);           // csrc/cpu/nf4.cpp or the CUDA launchers
//   static void quantize8(const nf4::Quantize8Params&);
//   static void decode(const nf4::DecodeParams&);
// and this header does validation, allocation and the steps between kernels, so CPU, CUDA and the cudasim
// build agree on semantics and error messages by construction.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <utility>

#include "peft_kernels/alloc.h"
#include "peft_kernels/check.h"
#include "peft_kernels/nf4.h"
#include "peft_kernels/nf4_params.h"

namespace peft_kernels::nf4 {

inline void check_nested_code(const char* op, const at::Tensor& code, const at::Device& device) {
  check::dtype(op, "nested_code", code, at::kFloat);
  check::numel(op, "nested_code", code, 256);
  check::contiguous(op, "nested_code", code);
  check::same_device(op, "nested_code", code, device);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_op(const at::Tensor& weight, int64_t blocksize,
                                                                        const std::optional<at::Tensor>& nested_code) {
  constexpr const char* op = "nf4_quantize";
  const DType dtype = check::float_dtype(op, "weight", weight.scalar_type());
  check::nf4_blocksize(op, blocksize);
  const int64_t n = weight.numel();
  TORCH_CHECK_VALUE(n > 0, op, ": argument 'weight' must not be empty, got a ", check::describe(weight));
  TORCH_CHECK_VALUE(n % blocksize == 0, op, ": argument 'weight' must have a number of elements divisible by blocksize=",
                    blocksize, ", got ", n, " elements (", check::describe(weight), ")");
  check::contiguous(op, "weight", weight);
  if (nested_code) check_nested_code(op, *nested_code, weight.device());

  typename Backend::Guard guard(weight.device());
  const auto opts = weight.options();
  const int64_t nblocks = n / blocksize;
  at::Tensor codes = empty_output({n / 2}, opts.dtype(at::kByte));
  at::Tensor absmax = empty_output({nblocks}, opts.dtype(at::kFloat));
  Backend::encode(EncodeParams{weight.data_ptr(), dtype, codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), n,
                               static_cast<int>(blocksize)});
  // absmax propagates NaN and Inf (nf4::absmax_step), so checking it covers the weight with n/blocksize reads.
  // On CUDA this is one host sync per quantization, a one-time cost per weight.
  const at::Tensor bad = (~at::isfinite(absmax)).nonzero();
  if (bad.numel() > 0) {
    const int64_t block = bad[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": argument 'weight' must be finite, but block ", block, " (elements from ",
                      block * blocksize, ") contains NaN or Inf");
  }
  if (!nested_code) {
    return {codes, absmax, at::empty({0}, opts.dtype(at::kFloat)), at::zeros({}, opts.dtype(at::kFloat))};
  }
  // Double quantization exactly as bitsandbytes: offset = absmax.mean() through ATen's reduction (so the
  // offset's bits match theirs on the same device), then (absmax - offset) in 8-bit blocks of 256.
  at::Tensor offset = absmax.mean();
  const at::Tensor centered = absmax - offset;
  const int64_t nested_blocks = (nblocks + kNestedBlocksize - 1) / kNestedBlocksize;
  at::Tensor qabsmax = empty_output({nblocks}, opts.dtype(at::kByte));
  at::Tensor nested_absmax = empty_output({nested_blocks}, opts.dtype(at::kFloat));
  Backend::quantize8(Quantize8Params{centered.data_ptr<float>(), nested_code->data_ptr<float>(),
                                     qabsmax.data_ptr<uint8_t>(), nested_absmax.data_ptr<float>(), nblocks,
                                     kNestedBlocksize});
  return {codes, qabsmax, nested_absmax, offset};
}

// Validates a packed weight's tensors (all on codes' device) and returns them as a Packed view plus the
// number of elements.
inline std::pair<Packed, int64_t> check_packed(const char* op, const at::Tensor& codes, const at::Tensor& absmax,
                                               const std::optional<at::Tensor>& nested_absmax,
                                               const std::optional<at::Tensor>& nested_code,
                                               const std::optional<at::Tensor>& offset, int64_t blocksize) {
  check::nf4_blocksize(op, blocksize);
  check::dtype(op, "codes", codes, at::kByte);
  check::contiguous(op, "codes", codes);
  const int64_t n = 2 * codes.numel();
  TORCH_CHECK_VALUE(n > 0 && n % blocksize == 0, op, ": argument 'codes' must hold a positive multiple of blocksize/2=",
                    blocksize / 2, " bytes, got a ", check::describe(codes));
  const at::Device device = codes.device();
  const int64_t nblocks = n / blocksize;
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value() && nested == offset.has_value(), op,
                    ": arguments 'nested_absmax', 'nested_code' and 'offset' must be given together (double "
                    "quantization) or all be None, got nested_absmax=",
                    nested ? "tensor" : "None", ", nested_code=", nested_code ? "tensor" : "None",
                    ", offset=", offset ? "tensor" : "None");
  check::dtype(op, "absmax", absmax, nested ? at::kByte : at::kFloat);
  check::numel(op, "absmax", absmax, nblocks);
  check::contiguous(op, "absmax", absmax);
  check::same_device(op, "absmax", absmax, device);
  if (nested) {
    check::dtype(op, "nested_absmax", *nested_absmax, at::kFloat);
    check::numel(op, "nested_absmax", *nested_absmax, (nblocks + kNestedBlocksize - 1) / kNestedBlocksize);
    check::contiguous(op, "nested_absmax", *nested_absmax);
    check::same_device(op, "nested_absmax", *nested_absmax, device);
    check_nested_code(op, *nested_code, device);
    check::dtype(op, "offset", *offset, at::kFloat);
    check::numel(op, "offset", *offset, 1);
    check::same_device(op, "offset", *offset, device);
  }
  const Packed w{codes.data_ptr<uint8_t>(),
                 absmax.data_ptr(),
                 nested ? nested_absmax->data_ptr<float>() : nullptr,
                 nested ? nested_code->data_ptr<float>() : nullptr,
                 nested ? offset->data_ptr<float>() : nullptr,
                 kNestedBlocksize,
                 static_cast<int>(blocksize)};
  return {w, n};
}

template <class Backend>
at::Tensor dequantize_op(const at::Tensor& codes, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                         int64_t blocksize, at::ScalarType out_dtype) {
  constexpr const char* op = "nf4_dequantize";
  const DType dtype = check::float_dtype(op, "dtype", out_dtype);
  const auto [w, n] = check_packed(op, codes, absmax, nested_absmax, nested_code, offset, blocksize);
  typename Backend::Guard guard(codes.device());
  at::Tensor out = empty_output({n}, codes.options().dtype(out_dtype));
  Backend::decode(DecodeParams{w, 0, out.data_ptr(), dtype, n});
  return out;
}

}  // namespace peft_kernels::nf4
