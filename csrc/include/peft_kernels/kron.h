// Kronecker index algebra of kron_linear, shared by the CPU kernels (g++), the CUDA kernels (nvcc) and the
// cudasim build of the CUDA kernels.
//
// For A [a_out, a_in], B [b_out, b_in] and one row x of length in = a_in * b_in,
//   (A ⊗ B)[p * b_out + q, i * b_in + j] = A[p, i] * B[q, j],
// so viewing x as the row-major matrix X [a_in, b_in] (x[i * b_in + j] = X[i, j]) gives
//   y = x (A ⊗ B)^T = vec(A X B^T),  y [a_out * b_out], y[p * b_out + q] = (A X B^T)[p, q].
// Every kernel evaluates this as two small contractions per row, never forming A ⊗ B:
//   U = A X    [a_out, b_in]  (contracts the A side, index i)
//   Y = U B^T  [a_out, b_out] (contracts the B side, index j)
// and in backward, with dY the row of dy viewed [a_out, b_out]:
//   G  = dY B      [a_out, b_in]
//   dX = A^T G     [a_in, b_in]
//   dA = sum over rows of G X^T,  dB = sum over rows of dY^T U.
// A 1024 -> 1024 layer with 32 x 32 factors costs 2 * 32 multiply-adds per output element this way, against
// 1024 for x (A ⊗ B)^T with A ⊗ B materialized.
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"

namespace peft_kernels::kron {

struct Dims {
  int64_t a_out, a_in, b_out, b_in;

  PK_HD int64_t in() const { return a_in * b_in; }
  PK_HD int64_t out() const { return a_out * b_out; }
  PK_HD int64_t mid() const { return a_out * b_in; }  // elements of U (and G) per row
};

// Flat offsets inside one row (add row * in / out / mid for the row's start).
PK_HD int64_t x_at(const Dims& d, int64_t i, int64_t j) { return i * d.b_in + j; }
PK_HD int64_t y_at(const Dims& d, int64_t p, int64_t q) { return p * d.b_out + q; }
PK_HD int64_t u_at(const Dims& d, int64_t p, int64_t j) { return p * d.b_in + j; }
PK_HD int64_t a_at(const Dims& d, int64_t p, int64_t i) { return p * d.a_in + i; }
PK_HD int64_t b_at(const Dims& d, int64_t q, int64_t j) { return q * d.b_in + j; }

// The inverse maps: which (outer, inner) pair a flat offset of x, y or U holds.
struct Pair {
  int64_t outer, inner;
};
PK_HD Pair split_x(const Dims& d, int64_t k) { return {k / d.b_in, k % d.b_in}; }
PK_HD Pair split_y(const Dims& d, int64_t k) { return {k / d.b_out, k % d.b_out}; }
PK_HD Pair split_u(const Dims& d, int64_t k) { return {k / d.b_in, k % d.b_in}; }

}  // namespace peft_kernels::kron
