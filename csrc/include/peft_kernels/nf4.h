// NF4 and blockwise 8-bit ("dynamic") quantization math, bit-compatible with bitsandbytes 0.50.
// The one copy of this math: included by csrc/cpu/nf4.cpp, csrc/cuda/nf4.cu and the cudasim build of nf4.cu.
//
// Layout (bitsandbytes' QuantState layout):
//   weight W, numel n (a multiple of the block size B), flattened row-major;
//   codes  uint8 [n/2]: element 2i in the high nibble of byte i, element 2i+1 in the low nibble;
//   absmax fp32 [n/B]: max |W| over each block — or, with double quantization, uint8 [n/B] codes of
//          (absmax - offset) in the 256-entry dynamic map, with fp32 nested_absmax [ceil(n/B/256)] and an
//          fp32 offset = mean(absmax).
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"

namespace peft_kernels::nf4 {

// The 16 NF4 levels (quantiles of N(0,1) scaled to [-1, 1]), the exact fp32 values bitsandbytes stores in
// QuantState.code; python_tests/test_nf4.py checks them against bitsandbytes and peft_kernels.reference.
PK_TABLE float kCode[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Decision boundaries: midpoints (kCode[i] + kCode[i+1]) / 2 rounded to fp32, as bitsandbytes computes them.
// A value exactly on a boundary goes to the lower code (bitsandbytes uses torch.bucketize(right=False)).
PK_TABLE float kMid[15] = {
    (kCode[0] + kCode[1]) / 2,   (kCode[1] + kCode[2]) / 2,   (kCode[2] + kCode[3]) / 2,
    (kCode[3] + kCode[4]) / 2,   (kCode[4] + kCode[5]) / 2,   (kCode[5] + kCode[6]) / 2,
    (kCode[6] + kCode[7]) / 2,   (kCode[7] + kCode[8]) / 2,   (kCode[8] + kCode[9]) / 2,
    (kCode[9] + kCode[10]) / 2,  (kCode[10] + kCode[11]) / 2, (kCode[11] + kCode[12]) / 2,
    (kCode[12] + kCode[13]) / 2, (kCode[13] + kCode[14]) / 2, (kCode[14] + kCode[15]) / 2,
};

// Smallest absmax the scale is computed from: an all-zero block scales by 1/1e-38 and encodes as code 7 (0.0),
// while its stored absmax stays 0 (bitsandbytes clamps the same way).
constexpr float kMinAbsmax = 1e-38f;

constexpr int kNestedBlocksize = 256;  // bitsandbytes double-quantizes absmax in blocks of 256
constexpr int kMinBlocksize = 32;
constexpr int kMaxBlocksize = 4096;

// NaN-propagating max of magnitudes: fmaxf would drop a NaN and hide it from the finiteness check on absmax.
PK_HD float absmax_step(float m, float x) {
  const float a = x < 0.0f ? -x : x;
  return (a > m || a != a) ? a : m;
}

// 1/absmax as bitsandbytes computes it: a correctly rounded fp32 division (not an approximate reciprocal).
PK_HD float inv_scale(float absmax) {
  const float clamped = absmax > kMinAbsmax ? absmax : kMinAbsmax;
  return 1.0f / clamped;
}

// Code of x * inv: the number of boundaries strictly below the clamped scaled value. Fifteen compares with
// compile-time constants and no branches: on the CPU this halved quantization of a 4096x4096 bf16 weight
// against a 4-step binary search (257 vs 530 ms on 2 cores; its branches mispredict on random data), and on
// the GPU the boundaries become instruction immediates instead of 4 dependent table loads (26 vs 32 registers).
PK_HD uint8_t encode(float x, float inv) {
  float s = mul_rn(x, inv);
  s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
  unsigned q = 0;
PK_UNROLL
  for (int i = 0; i < 15; ++i) q += s > kMid[i] ? 1u : 0u;
  return static_cast<uint8_t>(q);
}

PK_HD float decode(unsigned q, float absmax) { return mul_rn(kCode[q & 15u], absmax); }

PK_HD uint8_t pack(uint8_t first, uint8_t second) { return static_cast<uint8_t>((first << 4) | second); }
PK_HD unsigned high(uint8_t byte) { return byte >> 4; }
PK_HD unsigned low(uint8_t byte) { return byte & 15u; }

// ---- blockwise 8-bit quantization with a sorted 256-entry code (bitsandbytes' CPU quantize_blockwise) ----
// bitsandbytes 0.50's CPU kernel does not search the code with the scaled value itself: it rounds
// s = value * (1 / absmax) to a 65536-step grid over [-1, 1], idx = floor(((s + 1) * 0.5) * 65535 + 0.5),
// and returns the code entry nearest to the grid point g = idx / 65535 * 2 - 1 (a lookup table of those
// answers). We compute the same answer without the 64 KiB table: snap to the grid, then bisect the code.
// Checked against bitsandbytes on 3.5M scaled values and 2,000 values where the grid rounding decides
// (python_tests/test_nf4.py repeats the check on every run).
constexpr int kGridSteps = 65535;

PK_HD float grid_point(float s) {
  s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
  const float t = add_rn(mul_rn(mul_rn(add_rn(s, 1.0f), 0.5f), float(kGridSteps)), 0.5f);
  const int idx = static_cast<int>(t);  // t >= 0.5, so truncation is floor
  return add_rn(mul_rn(static_cast<float>(idx) / float(kGridSteps), 2.0f), -1.0f);
}

// Index of the entry of a sorted 256-entry code nearest to g; an exact tie keeps the lower entry.
PK_HD uint8_t nearest8(const float* code, float g) {
  int lo = 0;  // largest i with code[i] <= g (or 0), by bisection over 256 entries: 8 steps
  for (int step = 128; step > 0; step >>= 1) {
    if (code[lo + step] <= g) lo += step;
  }
  if (lo < 255) {
    const float d_lo = g - code[lo];
    const float d_hi = code[lo + 1] - g;
    const float abs_lo = d_lo < 0.0f ? -d_lo : d_lo;
    const float abs_hi = d_hi < 0.0f ? -d_hi : d_hi;
    if (abs_hi < abs_lo) ++lo;
  }
  return static_cast<uint8_t>(lo);
}

PK_HD uint8_t encode8(const float* code, float value, float inv_absmax) {
  return nearest8(code, grid_point(mul_rn(value, inv_absmax)));
}

// The absmax of NF4 block b when it was double-quantized: code8[q] * nested_absmax + offset, two roundings.
PK_HD float nested_absmax(const float* code8, uint8_t q, float nested, float offset) {
  return add_rn(mul_rn(code8[q], nested), offset);
}

}  // namespace peft_kernels::nf4
