// CPU backend of the NF4 ops: the shared math of peft_kernels/nf4.h in loops parallel over blocks.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstddef>
#include <vector>

#include "backends.h"
#include "dispatch.h"
#include "nf4_gemv_simd.h"
#include "peft_kernels/nf4_linear_op.h"

namespace peft_kernels::nf4 {
namespace {

using cpu::dispatch;

template <class T> float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }

// ~16K elements per task: enough work per task to amortize at::parallel_for's scheduling.
int64_t grain(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

}  // namespace

void Cpu::encode(const EncodeParams& p) {
  dispatch(p.dtype, [&]<class T>() {
    const T* w = static_cast<const T*>(p.weight);
    at::parallel_for(0, p.numel / p.blocksize, grain(p.blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t base = b * p.blocksize;
        float m = 0.0f;
        for (int64_t i = base; i < base + p.blocksize; ++i) m = absmax_step(m, load(w, i));
        const float inv = inv_scale(m);
        for (int64_t i = base; i < base + p.blocksize; i += 2) {
          p.codes[i / 2] = pack(nf4::encode(load(w, i), inv), nf4::encode(load(w, i + 1), inv));
        }
        p.absmax[b] = m;
      }
    });
  });
}

void Cpu::quantize8(const Quantize8Params& p) {
  const int64_t nblocks = (p.numel + p.blocksize - 1) / p.blocksize;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * p.blocksize, end = std::min(begin + p.blocksize, p.numel);
      float m = 0.0f;
      for (int64_t i = begin; i < end; ++i) m = absmax_step(m, p.x[i]);
      const float inv = inv_scale(m);
      for (int64_t i = begin; i < end; ++i) p.q[i] = encode8(p.code, p.x[i], inv);
      p.absmax[b] = m;
    }
  });
}

at::Tensor Cpu::workspace(int64_t numel, const at::TensorOptions& opts) {
  thread_local std::vector<std::byte> buffer;
  const size_t bytes = static_cast<size_t>(numel) * opts.dtype().itemsize();
  if (buffer.size() < bytes) buffer.resize(bytes);
  return at::from_blob(buffer.data(), {numel}, opts);
}

void Cpu::decode(const DecodeParams& p) {
  if (decode_simd(p)) return;
  dispatch(p.dtype, [&]<class T>() {
    T* out = static_cast<T*>(p.out);
    const int bs = p.w.blocksize;
    at::parallel_for(0, p.numel / bs, grain(bs), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t block = p.first_block + b;
        const float scale = block_scale(p.w, block);
        // The block's 16 possible outputs, each the same single rounded product nf4::decode computes:
        // 16 multiplies and casts per block instead of one per element.
        T level[16];
        for (unsigned c = 0; c < 16; ++c) level[c] = static_cast<T>(nf4::decode(c, scale));
        const uint8_t* __restrict codes = p.w.codes + block * bs / 2;
        T* __restrict o = out + b * bs;
        for (int i = 0; i < bs / 2; ++i) {
          const uint8_t byte = codes[i];
          o[2 * i] = level[high(byte)];
          o[2 * i + 1] = level[low(byte)];
        }
      }
    });
  });
}

// The portable path (fp64, in % 32 != 0, or no AVX2; nf4_gemv_simd.cpp otherwise). One task per block of
// output rows: each row of W is decoded once into an accumulator-typed buffer (the 16 levels of each block
// computed once), then dotted with the m <= 16 rows of x, widened once per call.
void Cpu::gemv(const GemvParams& p) {
  if (gemv_simd(p)) return;
  dispatch(p.dtype, [&]<class T>() {
    using Acc = cpu::acc_t<T>;
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    std::vector<Acc> x(p.m * p.in);
    const T* xt = static_cast<const T*>(p.x);
    for (int64_t i = 0; i < p.m * p.in; ++i) x[i] = static_cast<Acc>(xt[i]);
    const int64_t bs = p.w.blocksize;
    at::parallel_for(0, p.out, std::max<int64_t>(1, 16384 / p.in), [&](int64_t n0, int64_t n1) {
      std::vector<Acc> row(p.in);
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t e = n * p.in, end = e + p.in, k = 0; e < end;) {
          const int64_t block = e / bs, stop = std::min(end, (block + 1) * bs);
          const float scale = block_scale(p.w, block);
          Acc level[16];
          for (unsigned c = 0; c < 16; ++c) level[c] = static_cast<Acc>(nf4::decode(c, scale));
          for (; e < stop; ++e) row[k++] = level[code_of(p.w, e)];
        }
        for (int64_t i = 0; i < p.m; ++i) {
          const Acc* xi = x.data() + i * p.in;
          Acc acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < p.in; ++k) acc += xi[k] * row[k];
          y[i * p.out + n] = static_cast<T>(bias != nullptr ? acc + static_cast<Acc>(bias[n]) : acc);
        }
      }
    });
  });
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("nf4_quantize", &quantize_op<Cpu>);
  m.impl("nf4_dequantize", &dequantize_op<Cpu>);
  m.impl("nf4_linear", &linear_op<Cpu>);
  m.impl("nf4_linear_dx", &linear_dx_op<Cpu>);
}

}  // namespace peft_kernels::nf4
