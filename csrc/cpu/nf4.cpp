// CPU backend of the NF4 ops: the shared math of peft_kernels/nf4.h in loops parallel over blocks.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dispatch.h"
#include "peft_kernels/nf4_op.h"

namespace peft_kernels::nf4 {
namespace {

using cpu::dispatch;

template <class T> float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }

// ~16K elements per task: enough work per task to amortize at::parallel_for's scheduling.
int64_t grain(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

struct Cpu {
  struct Guard {
    explicit Guard(at::Device) {}
  };

  static void encode(const EncodeParams& p) {
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

  static void quantize8(const Quantize8Params& p) {
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

  static void decode(const DecodeParams& p) {
    dispatch(p.dtype, [&]<class T>() {
      T* out = static_cast<T*>(p.out);
      at::parallel_for(0, p.numel / p.blocksize, grain(p.blocksize), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const float scale = p.nested_absmax != nullptr
                                  ? nested_absmax(p.code8, static_cast<const uint8_t*>(p.absmax)[b],
                                                  p.nested_absmax[b / p.nested_blocksize], *p.offset)
                                  : static_cast<const float*>(p.absmax)[b];
          // The block's 16 possible outputs, each the same single rounded product nf4::decode computes:
          // 16 multiplies and casts per block instead of one per element.
          T level[16];
          for (unsigned c = 0; c < 16; ++c) level[c] = static_cast<T>(nf4::decode(c, scale));
          const uint8_t* __restrict codes = p.codes + b * p.blocksize / 2;
          T* __restrict o = out + b * p.blocksize;
          const int nbytes = p.blocksize / 2;
          for (int i = 0; i < nbytes; ++i) {
            const uint8_t byte = codes[i];
            o[2 * i] = level[high(byte)];
            o[2 * i + 1] = level[low(byte)];
          }
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("nf4_quantize", &quantize_op<Cpu>);
  m.impl("nf4_dequantize", &dequantize_op<Cpu>);
}

}  // namespace peft_kernels::nf4
