// CPU backend of the fused LoRA dropout kernels: Philox masks regenerated on the fly, fp32 accumulation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "backends.h"
#include "dispatch.h"
#include "dropout.h"
#include "peft_kernels/lora_op.h"
#include "peft_kernels/philox.h"

namespace peft_kernels::lora {
namespace {

using cpu::dispatch;

using cpu::acc_t;
using cpu::mask_row;
using cpu::widen;

}  // namespace

// One task per block of rows; each row is masked into a fp32 buffer, then r dot products with A.
void Cpu::down(const DownParams& p) {
  dispatch(p.dtype, [&]<class T>() {
    using Acc = acc_t<T>;
    const T* x = static_cast<const T*>(p.x);
    T* xa = static_cast<T*>(p.xa);
    const std::vector<Acc> a = widen<Acc>(static_cast<const T*>(p.a), p.r * p.in);
    at::parallel_for(0, p.m, std::max<int64_t>(1, 4096 / p.in), [&](int64_t i0, int64_t i1) {
      std::vector<Acc> xd(p.in);
      for (int64_t i = i0; i < i1; ++i) {
        mask_row(p.drop, i * p.in, p.in, xd.data());
        const T* xi = x + i * p.in;
        for (int64_t k = 0; k < p.in; ++k) xd[k] *= static_cast<Acc>(xi[k]);
        for (int j = 0; j < p.r; ++j) {
          const Acc* aj = a.data() + j * p.in;
          Acc acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < p.in; ++k) acc += xd[k] * aj[k];
          xa[i * p.r + j] = static_cast<T>(acc);
        }
      }
    });
  });
}

// One task per block of columns, so the dA reduction over rows needs no atomics: each task walks all rows
// of its columns once, reading x and updating dx in the same pass.
void Cpu::backward(const BackwardParams& p) {
  dispatch(p.dtype, [&]<class T>() {
    using Acc = acc_t<T>;
    const T* x = static_cast<const T*>(p.x);
    T* dx = static_cast<T*>(p.dx);
    T* da = static_cast<T*>(p.da);
    const std::vector<Acc> a = widen<Acc>(static_cast<const T*>(p.a), p.r * p.in);
    const std::vector<Acc> dxa = widen<Acc>(static_cast<const T*>(p.dxa), p.m * p.r);
    const int64_t chunk = std::max<int64_t>(64, (p.in + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads()));
    const int64_t nchunks = (p.in + chunk - 1) / chunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<Acc> keep(chunk), t(chunk), acc(da ? p.r * chunk : 0);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k0 = c * chunk, n = std::min(chunk, p.in - k0);
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t i = 0; i < p.m; ++i) {
          mask_row(p.drop, i * p.in + k0, n, keep.data());
          const Acc* g = dxa.data() + i * p.r;
          if (dx != nullptr) {
            std::fill(t.begin(), t.begin() + n, Acc(0));
            for (int j = 0; j < p.r; ++j) {
              const Acc* aj = a.data() + j * p.in + k0;
              for (int64_t k = 0; k < n; ++k) t[k] += g[j] * aj[k];
            }
            T* dxi = dx + i * p.in + k0;
            for (int64_t k = 0; k < n; ++k) dxi[k] = static_cast<T>(static_cast<Acc>(dxi[k]) + keep[k] * t[k]);
          }
          if (da != nullptr) {
            const T* xi = x + i * p.in + k0;
            for (int64_t k = 0; k < n; ++k) keep[k] *= static_cast<Acc>(xi[k]);
            for (int j = 0; j < p.r; ++j) {
              Acc* accj = acc.data() + j * chunk;
              for (int64_t k = 0; k < n; ++k) accj[k] += g[j] * keep[k];
            }
          }
        }
        if (da != nullptr) {
          for (int j = 0; j < p.r; ++j) {
            for (int64_t k = 0; k < n; ++k) da[j * p.in + k0 + k] = static_cast<T>(acc[j * chunk + k]);
          }
        }
      }
    });
  });
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("lora_linear_fwd", &forward_op<Cpu>);
  m.impl("lora_linear_bwd", &backward_op<Cpu>);
}

}  // namespace peft_kernels::lora
