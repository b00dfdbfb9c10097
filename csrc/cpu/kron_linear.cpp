// CPU backend of kron_linear: per row of x, the two small contractions of kron.h (U = A X, Y = U B^T) in row
// buffers that stay in L1 (a 1024-wide row with 32 x 32 factors: three 4 KiB fp32 buffers), the Philox mask
// applied as the row is loaded; fp32 accumulation (fp64 for fp64 inputs, so gradcheck sees fp64 math).
// Every inner loop is an axpy or a dot product over a contiguous row of length b_in or b_out, which the
// compiler vectorizes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dispatch.h"
#include "dropout.h"
#include "peft_kernels/kron.h"
#include "peft_kernels/kron_op.h"

namespace peft_kernels::kron {
namespace {

using cpu::acc_t;
using cpu::dispatch;
using cpu::mask_row;
using cpu::widen;

// The factors widened to Acc, and their transposes: A^T [a_in, a_out] and B^T [b_in, b_out] turn the
// contractions over p and j into axpys along contiguous rows.
template <class Acc> struct Factors {
  std::vector<Acc> a, at, b, bt;

  template <class T> Factors(const T* a_, const T* b_, const Dims& d)
      : a(widen<Acc>(a_, d.a_out * d.a_in)), at(a.size()), b(widen<Acc>(b_, d.b_out * d.b_in)), bt(b.size()) {
    for (int64_t p = 0; p < d.a_out; ++p)
      for (int64_t i = 0; i < d.a_in; ++i) at[i * d.a_out + p] = a[a_at(d, p, i)];
    for (int64_t q = 0; q < d.b_out; ++q)
      for (int64_t j = 0; j < d.b_in; ++j) bt[j * d.b_out + q] = b[b_at(d, q, j)];
  }
};

template <class Acc> void axpy(Acc alpha, const Acc* x, Acc* y, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += alpha * x[k];
}

template <class Acc> Acc dot(const Acc* x, const Acc* y, int64_t n) {
  Acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k] * y[k];
  return s;
}

// xd = keep * x[row] (the mask without the 1 / (1 - p) factor, which the callers fold into their scale);
// keep (if not null) receives the 0/1 mask.
template <class T, class Acc>
void load_row(const Dropout& drop, const T* x, int64_t row, int64_t in, Acc* xd, Acc* keep) {
  const T* xr = x + row * in;
  for (int64_t k = 0; k < in; ++k) xd[k] = static_cast<Acc>(xr[k]);
  if (drop.threshold == 0) return;
  const Dropout unit{drop.seed, drop.threshold, 1.0};
  mask_row(unit, row * in, in, keep);
  for (int64_t k = 0; k < in; ++k) xd[k] *= keep[k];
}

// u = A X for one row: u[p, :] = sum_i A[p, i] X[i, :].
template <class Acc> void contract_a(const Dims& d, const Acc* a, const Acc* xd, Acc* u) {
  std::fill(u, u + d.mid(), Acc(0));
  for (int64_t p = 0; p < d.a_out; ++p)
    for (int64_t i = 0; i < d.a_in; ++i) axpy(a[a_at(d, p, i)], xd + x_at(d, i, 0), u + u_at(d, p, 0), d.b_in);
}

struct Cpu {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  static constexpr bool kFloat64 = true;
  static constexpr bool kWorkspace = false;

  static void forward(const ForwardParams& p) {
    dispatch(p.dtype, [&]<class T>() {
      using Acc = acc_t<T>;
      const Dims d = p.d;
      const T* x = static_cast<const T*>(p.x);
      T* y = static_cast<T*>(p.y);
      const Factors<Acc> f(static_cast<const T*>(p.a), static_cast<const T*>(p.b), d);
      const Acc s = static_cast<Acc>(p.drop.scale);
      at::parallel_for(0, p.m, std::max<int64_t>(1, 4096 / d.in()), [&](int64_t r0, int64_t r1) {
        std::vector<Acc> xd(d.in()), keep(p.drop.threshold ? d.in() : 0), u(d.mid()), t(d.out());
        for (int64_t r = r0; r < r1; ++r) {
          load_row(p.drop, x, r, d.in(), xd.data(), keep.data());
          contract_a(d, f.a.data(), xd.data(), u.data());
          // t = U B^T: t[p, :] = sum_j U[p, j] B^T[j, :]
          std::fill(t.begin(), t.end(), Acc(0));
          for (int64_t pp = 0; pp < d.a_out; ++pp)
            for (int64_t j = 0; j < d.b_in; ++j)
              axpy(u[u_at(d, pp, j)], f.bt.data() + j * d.b_out, t.data() + y_at(d, pp, 0), d.b_out);
          T* yr = y + r * d.out();
          for (int64_t k = 0; k < d.out(); ++k)
            yr[k] = static_cast<T>((p.accumulate ? static_cast<Acc>(yr[k]) : Acc(0)) + s * t[k]);
        }
      });
    });
  }

  // One task per block of rows; dA and dB are summed per block, then the blocks in order (deterministic for a
  // given thread count).
  static void backward(const BackwardParams& p) {
    dispatch(p.dtype, [&]<class T>() {
      using Acc = acc_t<T>;
      const Dims d = p.d;
      const T* dy = static_cast<const T*>(p.dy);
      const T* x = static_cast<const T*>(p.x);
      T* dx = static_cast<T*>(p.dx);
      const Factors<Acc> f(static_cast<const T*>(p.a), static_cast<const T*>(p.b), d);
      const Acc s = static_cast<Acc>(p.drop.scale);
      const int64_t nblocks = std::min<int64_t>(p.m, 4 * at::get_num_threads());
      const int64_t na = p.da ? d.a_out * d.a_in : 0, nb = p.db ? d.b_out * d.b_in : 0;
      std::vector<Acc> da_part(nblocks * na, Acc(0)), db_part(nblocks * nb, Acc(0));
      at::parallel_for(0, nblocks, 1, [&](int64_t c0, int64_t c1) {
        std::vector<Acc> dyr(d.out()), g(d.mid()), h(p.dx ? d.in() : 0), xd(d.in()), u(d.mid());
        std::vector<Acc> keep(p.drop.threshold ? d.in() : 0);
        for (int64_t c = c0; c < c1; ++c) {
          Acc* da = da_part.data() + c * na;
          Acc* db = db_part.data() + c * nb;
          for (int64_t r = c * p.m / nblocks; r < (c + 1) * p.m / nblocks; ++r) {
            for (int64_t k = 0; k < d.out(); ++k) dyr[k] = static_cast<Acc>(dy[r * d.out() + k]);
            // G = dY B: g[p, :] = sum_q dY[p, q] B[q, :]
            std::fill(g.begin(), g.end(), Acc(0));
            for (int64_t pp = 0; pp < d.a_out; ++pp)
              for (int64_t q = 0; q < d.b_out; ++q)
                axpy(dyr[y_at(d, pp, q)], f.b.data() + b_at(d, q, 0), g.data() + u_at(d, pp, 0), d.b_in);
            if (x != nullptr) load_row(p.drop, x, r, d.in(), xd.data(), keep.data());
            if (dx != nullptr) {
              // dX = A^T G: h[i, :] = sum_p A^T[i, p] G[p, :]
              std::fill(h.begin(), h.end(), Acc(0));
              for (int64_t i = 0; i < d.a_in; ++i)
                for (int64_t pp = 0; pp < d.a_out; ++pp)
                  axpy(f.at[i * d.a_out + pp], g.data() + u_at(d, pp, 0), h.data() + x_at(d, i, 0), d.b_in);
              if (p.drop.threshold != 0 && x == nullptr) {
                mask_row(Dropout{p.drop.seed, p.drop.threshold, 1.0}, r * d.in(), d.in(), keep.data());
              }
              T* dxr = dx + r * d.in();
              for (int64_t k = 0; k < d.in(); ++k) {
                const Acc v = s * (p.drop.threshold ? keep[k] * h[k] : h[k]);
                dxr[k] = static_cast<T>((p.accumulate_dx ? static_cast<Acc>(dxr[k]) : Acc(0)) + v);
              }
            }
            if (p.da != nullptr) {
              for (int64_t pp = 0; pp < d.a_out; ++pp)
                for (int64_t i = 0; i < d.a_in; ++i)
                  da[a_at(d, pp, i)] += dot(g.data() + u_at(d, pp, 0), xd.data() + x_at(d, i, 0), d.b_in);
            }
            if (p.db != nullptr) {
              contract_a(d, f.a.data(), xd.data(), u.data());
              // dB += dY^T U: dB[q, :] += dY[p, q] U[p, :]
              for (int64_t pp = 0; pp < d.a_out; ++pp)
                for (int64_t q = 0; q < d.b_out; ++q)
                  axpy(dyr[y_at(d, pp, q)], u.data() + u_at(d, pp, 0), db + b_at(d, q, 0), d.b_in);
            }
          }
        }
      });
      const auto finish = [&](void* out, const std::vector<Acc>& part, int64_t n) {
        T* o = static_cast<T*>(out);
        for (int64_t e = 0; e < n; ++e) {
          Acc sum = 0;
          for (int64_t c = 0; c < nblocks; ++c) sum += part[c * n + e];
          o[e] = static_cast<T>(s * sum);
        }
      };
      if (p.da != nullptr) finish(p.da, da_part, na);
      if (p.db != nullptr) finish(p.db, db_part, nb);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("kron_linear_fwd", &forward_op<Cpu>);
  m.impl("kron_linear_bwd", &backward_op<Cpu>);
}

}  // namespace peft_kernels::kron
