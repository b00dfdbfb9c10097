// Torch-free parameter blocks of the NF4 kernels. The CPU loops (csrc/cpu/nf4.cpp) and the CUDA launchers
// (csrc/cuda/nf4.cu, also built for cudasim) take the same structs, so one op body (csrc/nf4_op.h) drives all
// three backends. All pointers address contiguous memory on the backend's device.
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"

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

// codes [numel/2] -> out [numel]. absmax is fp32 [numel/blocksize] when nested_absmax is null; otherwise
// uint8 [numel/blocksize] decoded as code8[q] * nested_absmax[block / nested_blocksize] + *offset.
struct DecodeParams {
  const uint8_t* codes;
  const void* absmax;
  const float* nested_absmax;
  const float* code8;
  const float* offset;
  int nested_blocksize;
  void* out;
  DType dtype;
  int64_t numel;
  int blocksize;
};

}  // namespace peft_kernels::nf4
