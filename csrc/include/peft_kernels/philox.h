// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based RNG,
// so any kernel can regenerate the random number of element e from (seed, e) alone. Dropout uses it to
// redraw in backward exactly the mask of forward without storing it. peft_kernels/reference.py implements
// the same function with torch integer ops; python_tests/test_lora_linear.py checks they agree bit for bit.
//
// Group g's four 32-bit words are philox(counter = {low32(g), high32(g), low32(stream), high32(stream)},
// key = {low32(seed), high32(seed)}).
// - Dropout (stream 0) draws 16 bits per element: element e's draw is half (e & 1), low half first, of word
//   ((e >> 1) & 3) of group e >> 3, and e is kept when it is >= dropout_threshold(p), p rounded to a multiple of
//   2^-16. One Philox call serves 8 elements instead of 4: the draws were the largest cost of the CPU dropout
//   kernels beside the base GEMMs (2M draws per pass over a 2048 x 1024 activation, 1.17 ms on one core here).
// - Child-Tuning_F's gradient mask (masked_adamw.h) draws 32 bits per element: word (e & 3) of group e >> 2,
//   of stream = the optimizer step (a fresh, independent mask each step from one seed), kept when >=
//   drop_threshold(p).
#pragma once
#include <cstdint>

#include "peft_kernels/hd.h"

namespace peft_kernels::philox {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments (golden ratio, sqrt 3)

struct Draw {
  uint32_t w[4];
};

PK_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// One Philox round on the counter (c0..c3) with key (k0, k1).
PK_HD void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(kMul0, c0, hi0, lo0);
  mulhilo(kMul1, c2, hi1, lo1);
  const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
  c0 = n0;
  c1 = lo1;
  c2 = n2;
  c3 = lo0;
}

// The four draws of 4-element group `group` (elements 4*group .. 4*group+3) of `stream`.
PK_HD Draw draw4(uint64_t seed, uint64_t group, uint64_t stream = 0) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  PK_UNROLL
  for (int r = 0; r < 10; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Draw{{c0, c1, c2, c3}};
}

// Host-side batch (stream 0): the draws of groups first .. first + count - 1 (count <= kBatch), out[4 * g + w] = word w
// of group first + g. The same rounds as draw4, laid out structure-of-arrays so the compiler vectorizes the
// 32x32->64-bit products across groups: one draw4 at a time is a chain of 10 dependent rounds. Measured:
// the dropout overhead of a bf16 LoRA step (1024x1024, M = 2048, r = 16) fell from ~24 ms to ~13 ms.
constexpr int kBatch = 64;

// An AVX2 clone (4 64-bit products per instruction instead of SSE2's 2), picked at load time where the CPU has
// it: the dropout overhead of the bf16 step above went from ~13 to ~10.5 ms. An AVX-512 clone measured slower
// here (~13.5 ms), so there is none.
#if defined(__GNUC__) && !defined(__CUDACC__) && defined(__x86_64__)
#define PK_X86_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PK_X86_CLONES
#endif

PK_X86_CLONES inline void draw_batch(uint64_t seed, uint64_t first, int count, uint32_t* out) {
  uint32_t c0[kBatch], c1[kBatch], c2[kBatch] = {}, c3[kBatch] = {};
  for (int g = 0; g < count; ++g) {
    c0[g] = static_cast<uint32_t>(first + g);
    c1[g] = static_cast<uint32_t>((first + g) >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int g = 0; g < count; ++g) round(c0[g], c1[g], c2[g], c3[g], k0, k1);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  for (int g = 0; g < count; ++g) {
    out[4 * g] = c0[g];
    out[4 * g + 1] = c1[g];
    out[4 * g + 2] = c2[g];
    out[4 * g + 3] = c3[g];
  }
}

// Word i of a draw by selects: indexing w[] with a run-time i puts the draw in GPU local memory (16-byte stack
// frame per thread in ptxas' report), which the resource check rejects.
PK_HD uint32_t word(const Draw& d, unsigned i) {
  const uint32_t lo = (i & 1u) ? d.w[1] : d.w[0];
  const uint32_t hi = (i & 1u) ? d.w[3] : d.w[2];
  return (i & 2u) ? hi : lo;
}

// Element e's 32-bit draw (Child-Tuning_F).
PK_HD uint32_t element(uint64_t seed, uint64_t e, uint64_t stream = 0) {
  return word(draw4(seed, e >> 2, stream), static_cast<unsigned>(e & 3));
}

// Element e's 16-bit dropout draw.
constexpr int kDropoutPerGroup = 8;
PK_HD uint32_t dropout_draw(uint64_t seed, uint64_t e) {
  const uint32_t w = word(draw4(seed, e >> 3), static_cast<unsigned>((e >> 1) & 3));
  return (e & 1) ? w >> 16 : w & 0xFFFFu;
}

// Draws below the threshold are dropped: P(drop) = threshold / 2^32 = p to within 2^-32.
inline uint32_t drop_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t);
}

// Dropout's threshold for p in [0, 1): P(drop) = round(p * 2^16) / 2^16, within 2^-17 of p (at most 65535 / 2^16,
// so a draw of 65535 is always kept). Kept values are still scaled by 1 / (1 - p), as torch's dropout: for p = 0.1
// the expected value moves by a factor of 1 - 6e-6. p * 2^16 + 0.5 is exact in double, so the truncation rounds
// half up, as peft_kernels/reference.py does.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 65536.0 + 0.5;
  return t >= 65535.0 ? 65535u : static_cast<uint32_t>(t);
}

}  // namespace peft_kernels::philox
