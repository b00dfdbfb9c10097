// Output allocation, and the dispatch setting, shared by every op body.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace peft_kernels {

// With PEFT_KERNELS_POISON_OUTPUTS=1 (python_tests/conftest.py sets it) every output starts as NaN (floats)
// or 0xA5 (integers), so a kernel that leaves an element unwritten fails the comparison with the reference
// instead of passing on whatever the allocator handed back. Read once per process.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* e = std::getenv("PEFT_KERNELS_POISON_OUTPUTS");
    return e != nullptr && std::strcmp(e, "1") == 0;
  }();
  return on;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_outputs()) {
    if (t.is_floating_point()) {
      t.fill_(NAN);
    } else {
      t.fill_(0xA5);
    }
  }
  return t;
}

// Autocast is off inside an op body: the op computes in its inputs' dtype (the modules choose it), but the
// ATen products it calls (x W^T through the BLAS, ...) would otherwise be cast to autocast's dtype and mixed
// with our kernels' outputs: fp32 inputs under bf16 autocast failed with "mat1 and mat2 must have the same
// dtype, but got BFloat16 and Float".
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace peft_kernels
