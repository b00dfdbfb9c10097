// Torch-free parameter blocks of the NF4 kernels. The CPU loops (csrc/cpu/nf4.cpp) and the CUDA launchers
// (csrc/cuda/nf4.cu, also built for cudasim) take the same structs, so one op body (csrc/nf4_op.h) drives all
// three backends. All pointers address contiguous memory on the backend's device.
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"
#include "peft_kernels/nf4.h"

namespace peft_kernels::nf4 {

// weight [numel] -> codes [numel/2], absmax [numel/blocksize]
struct EncodeParams {
  const void* weight;
  DType dtype;
  uint8_t* codes;
  float* absmax;
  int64_t numel;
  int blocksize;
};

// x [numel] fp32 -> q [numel] uint8, absmax [ceil(numel/blocksize)] (the last block may be partial)
struct Quantize8Params {
  const float* x;
  const float* code;  // 256 sorted entries
  uint8_t* q;
  float* absmax;
  int64_t numel;
  int blocksize;
};

// A packed NF4 weight of `numel` elements (row-major [out, in] for the linear kernels). absmax is fp32
// [numel/blocksize] when nested_absmax is null; otherwise uint8 [numel/blocksize] decoded as
// code8[q] * nested_absmax[block / nested_blocksize] + *offset.
struct Packed {
  const uint8_t* codes;
  const void* absmax;
  const float* nested_absmax;
  const float* code8;
  const float* offset;
  int nested_blocksize;
  int blocksize;
};

// The fp32 scale of NF4 block `block`: its absmax, rebuilt from the 8-bit code with double quantization.
PK_HD float block_scale(const Packed& w, int64_t block) {
  if (w.nested_absmax == nullptr) return static_cast<const float*>(w.absmax)[block];
  return nested_absmax(w.code8, static_cast<const uint8_t*>(w.absmax)[block], w.nested_absmax[block / w.nested_blocksize],
                       *w.offset);
}

// The 4-bit code of element e: element 2i is the high nibble of byte i.
PK_HD unsigned code_of(const Packed& w, int64_t e) {
  const uint8_t byte = w.codes[e >> 1];
  return (e & 1) ? low(byte) : high(byte);
}

// Blocks [first_block, first_block + numel/blocksize) of w -> out [numel]. A linear layer decodes its weight
// in row tiles this way, into a bounded workspace.
struct DecodeParams {
  Packed w;
  int64_t first_block;
  void* out;
  DType dtype;
  int64_t numel;
};

// Small-batch linear (decode): y[i, n] = sum_k x[i, k] * W[n, k] (+ bias[n]) for i < m <= kGemvMaxRows,
// W = w as [out, in]. x [m, in], y [m, out], bias [out] or null, all of `dtype`; fp32 accumulation.
constexpr int kGemvMaxRows = 16;
struct GemvParams {
  Packed w;
  const void* x;
  const void* bias;
  void* y;
  DType dtype;
  int64_t m, in, out;
};

// The tensor-core GEMM (CUDA) computes the same product from the same fields. It takes over from the GEMV
// above 8 rows: at 8 rows the GEMV already streams the weight at DRAM speed, and a 128-row tile would spend
// 16x the tensor work on padding.
using GemmParams = GemvParams;
constexpr int kGemmMinRows = 8;

// Input gradient of the linear layer: dx[i, k] = sum_n dy[i, n] * W[n, k], W = w as [out, in]; dy [m, out],
// dx [m, in], both of `dtype` (fp32 accumulation).
struct DxParams {
  Packed w;
  const void* dy;
  void* dx;
  DType dtype;
  int64_t m, in, out;
};

}  // namespace peft_kernels::nf4
