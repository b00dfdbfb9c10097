// The per-element and per-block math of the 8-bit AdamW step, shared by the CPU loop and the CUDA kernel (and so
// by the cudasim build). One step of one block of kBlock elements:
//   1. decode both moments: m = signed_map[code] * absmax_m, v = unsigned_map[code] * absmax_v;
//   2. torch.optim.AdamW's update in fp32 with the decoded moments (sparse::adamw_update, the same roundings as
//      the sparse optimizers and torch's single-tensor CPU AdamW);
//   3. the new moments' absmax over the block, then each moment's code: the map entry nearest to
//      moment * (1 / absmax) (a tie keeps the lower entry), found by a search over the map's tree (below).
// The parameter is updated with the unquantized new moments; only what is stored is 8-bit (as bitsandbytes).
#pragma once
#include <cstdint>

#include "peft_kernels/adamw8bit_params.h"
#include "peft_kernels/hd.h"
#include "peft_kernels/masked_adamw.h"
#include "peft_kernels/nf4.h"

namespace peft_kernels::adamw8bit {

PK_HD float decode(const float* map, uint8_t q, float absmax) { return mul_rn(map[q], absmax); }

// The encoder searches the map in Eytzinger (breadth-first) order: tree[0] = map[0] and node t in [1, 256), at
// level k = floor(log2 t), holds map[(2 (t - 2^k) + 1) * (128 >> k)], the entry the k-th bisection step of
// nf4::nearest8 compares. Level k's nodes are 2^k adjacent words, so on the GPU a warp's reads of levels 0-5
// fall in distinct shared-memory banks (or broadcast) and levels 6 and 7 cost at most 2 and 4 wavefronts:
// 12 in all where a bisection over the sorted map costs up to 47 (its step-s nodes all share bank s % 32).
PK_HD int tree_source(int t) {
  if (t == 0) return 0;
  int level = 0;
  while ((2 << level) <= t) ++level;
  return (2 * (t - (1 << level)) + 1) * (128 >> level);
}

// The code of x in a map scaled by absmax, given inv = nf4::inv_scale(absmax) and the map's tree: the entry
// nearest to s = x * inv clamped to [-1, 1] (the clamp catches a product that rounds just past 1), a tie keeping
// the lower entry; bit for bit nf4::nearest8(map, s). The descent keeps the last node <= s (map[lo]) and the
// last node > s (map[lo + 1], which exists unless lo = 255) instead of reading them again afterwards.
PK_HD uint8_t encode(const float* tree, float x, float inv) {
  float s = mul_rn(x, inv);
  s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
  float below = tree[0], above = 0.0f;
  bool has_above = false;
  unsigned t = 1;
PK_UNROLL
  for (int level = 0; level < 8; ++level) {
    const float node = tree[t];
    const bool right = node <= s;
    below = right ? node : below;
    above = right ? above : node;
    has_above = has_above || !right;
    t = 2 * t + (right ? 1u : 0u);
  }
  unsigned q = t - 256;
  if (has_above) {
    const float d_lo = s - below, d_hi = above - s;
    if ((d_hi < 0.0f ? -d_hi : d_hi) < (d_lo < 0.0f ? -d_lo : d_lo)) ++q;
  }
  return static_cast<uint8_t>(q);
}

}  // namespace peft_kernels::adamw8bit
