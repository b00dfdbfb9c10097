// CPU backend of the 8-bit AdamW step: blocks of kBlock elements in parallel, each decoded, updated and
// re-encoded in one pass through a per-block fp32 scratch of its new moments (2 KiB on the stack).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dispatch.h"
#include "peft_kernels/adamw8bit.h"
#include "peft_kernels/adamw8bit_op.h"

namespace peft_kernels::adamw8bit {
namespace {

using cpu::dispatch;

// Blocks per task: 64 x 256 elements at ~20 ns each (two 8-step bisections dominate) is ~0.3 ms of work,
// which amortizes at::parallel_for's scheduling.
constexpr int64_t kGrainBlocks = 64;

struct Cpu {
  struct Guard {
    explicit Guard(at::Device) {}
  };

  static void step(const Params& p) {
    float signed_tree[kMapSize], unsigned_tree[kMapSize];
    for (int t = 0; t < kMapSize; ++t) {
      signed_tree[t] = p.signed_map[tree_source(t)];
      unsigned_tree[t] = p.unsigned_map[tree_source(t)];
    }
    dispatch(p.dtype, [&]<class T>() {
      T* param = static_cast<T*>(p.param);
      const T* grad = static_cast<const T*>(p.grad);
      at::parallel_for(0, blocks(p.n), kGrainBlocks, [&](int64_t b0, int64_t b1) {
        float m[kBlock], v[kBlock];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t first = b * kBlock;
          const int len = static_cast<int>(std::min<int64_t>(kBlock, p.n - first));
          const float am = p.exp_avg_absmax[b], av = p.exp_avg_sq_absmax[b];
          float max_m = 0.0f, max_v = 0.0f;
          for (int i = 0; i < len; ++i) {
            const int64_t e = first + i;
            m[i] = decode(p.signed_map, p.exp_avg[e], am);
            v[i] = decode(p.unsigned_map, p.exp_avg_sq[e], av);
            float w = static_cast<float>(param[e]);
            sparse::adamw_update(w, m[i], v[i], static_cast<float>(grad[e]), p.h);
            param[e] = static_cast<T>(w);
            max_m = nf4::absmax_step(max_m, m[i]);
            max_v = nf4::absmax_step(max_v, v[i]);
          }
          p.exp_avg_absmax[b] = max_m;
          p.exp_avg_sq_absmax[b] = max_v;
          const float inv_m = nf4::inv_scale(max_m), inv_v = nf4::inv_scale(max_v);
          for (int i = 0; i < len; ++i) {
            p.exp_avg[first + i] = encode(signed_tree, m[i], inv_m);
            p.exp_avg_sq[first + i] = encode(unsigned_tree, v[i], inv_v);
          }
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) { m.impl("adamw8bit_step_", &step_op<Cpu>); }

}  // namespace peft_kernels::adamw8bit
