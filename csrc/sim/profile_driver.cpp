// pk_simprof: runs one op's CUDA kernels on the executor with synthetic inputs, for their counters
// (peft_kernels.sim.profile and bench/kernel_counters.py). The kernel sources are compiled with the counters'
// instrumentation (cudasim_count.cpp); this file is not. One JSON line per launch goes to CUDASIM_PROFILE.
//
//   pk_simprof nf4_gemv      M IN OUT DTYPE       GEMV over a double-quantized NF4 weight [OUT, IN], blocksize 64
//   pk_simprof nf4_decode    IN OUT DTYPE         dequantize the whole weight (merge/export)
//   pk_simprof nf4_gemm      M IN OUT DTYPE       tensor-core y = x W^T (M > 8), DTYPE bf16 or f16
//   pk_simprof nf4_linear_dx M IN OUT DTYPE       tensor-core dx = dy W, DTYPE bf16 or f16
//   pk_simprof lora_down     M IN R DTYPE         xa = dropout(x) A^T, Philox dropout p = 0.1
//   pk_simprof lora_backward M IN R DTYPE         dx += mask * s dxa A and dA = s dxa^T (mask * x), split-M partials
//   pk_simprof kron_forward  M AO AI BO BI DTYPE  y += x (A kron B)^T, dropout p = 0.1
//   pk_simprof kron_backward M AO AI BO BI DTYPE  dx, dA, dB
//   pk_simprof masked_adamw  NUMEL K BITS COMPACT DTYPE
//                                                 one sparse AdamW step over K sorted indices (int BITS: 32 or
//                                                 64), the grad compact [K] (COMPACT 1) or dense [NUMEL] (0);
//                                                 16-bit DTYPE with an fp32 master copy. Buffers are named for
//                                                 the per-buffer counters.
//   pk_simprof adamw8bit     NUMEL DTYPE          one 8-bit AdamW step of a parameter of NUMEL elements; its codes
//                                                 start uniformly random (every lane of a warp decodes a
//                                                 different map entry: the most bank conflicts a real state
//                                                 can cause) with absmax 0.5. Buffers are named.
//
// DTYPE: bf16, f16 or f32. Values are a fixed pseudo-random pattern: counters do not depend on them (no kernel
// here branches on data, except the sparse indices, which are spread evenly as a magnitude mask would be, and the
// 8-bit optimizer's map lookups, whose shared-memory banks follow the codes).
#include "adamw8bit_launch.h"
#include "kron_launch.h"
#include "lora_launch.h"
#include "masked_adamw_launch.h"
#include "nf4_launch.h"
#include "peft_kernels/philox.h"

#include <cuda_runtime_api.h>

#include "cudasim.h"  // label_buffer

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
using namespace peft_kernels;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "pk_simprof: %s\n", what.c_str());
  std::exit(2);
}

size_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Device memory holding `count` elements of `t` with values in [-1, 1).
void* values(size_t count, DType t, uint32_t salt) {
  std::vector<unsigned char> host(count * elem_size(t));
  uint32_t s = 0x9E3779B9u ^ salt;
  for (size_t i = 0; i < count; ++i) {
    s = s * 1664525u + 1013904223u;
    const float v = float(int32_t(s) >> 8) / float(1 << 23);
    if (t == DType::kFloat32) {
      std::memcpy(&host[4 * i], &v, 4);
    } else {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      const uint16_t h = t == DType::kBFloat16 ? uint16_t(bits >> 16) : uint16_t(0x3800 | (bits >> 23 & 0x3FF));
      std::memcpy(&host[2 * i], &h, 2);
    }
  }
  void* dev = nullptr;
  cudaMalloc(&dev, host.size());
  cudaMemcpy(dev, host.data(), host.size(), cudaMemcpyHostToDevice);
  return dev;
}

void* bytes(size_t n, uint8_t fill) {
  void* dev = nullptr;
  cudaMalloc(&dev, n ? n : 1);
  cudaMemset(dev, fill, n);
  return dev;
}

DType dtype_of(const std::string& s) {
  if (s == "bf16") return DType::kBFloat16;
  if (s == "f16") return DType::kFloat16;
  if (s == "f32") return DType::kFloat32;
  die("DTYPE must be bf16, f16 or f32, got " + s);
}

// A double-quantized NF4 weight of `numel` elements (blocksize 64, nested blocks of 256), as bitsandbytes
// stores it: packed codes, an 8-bit code per block, fp32 nested absmax, the 256-entry code and the offset.
nf4::Packed packed_weight(int64_t numel) {
  const int64_t blocks = numel / 64;
  std::vector<float> code8(256);
  for (int i = 0; i < 256; ++i) code8[i] = (i - 127.5f) / 127.5f;
  void* code = nullptr;
  cudaMalloc(&code, 256 * 4);
  cudaMemcpy(code, code8.data(), 256 * 4, cudaMemcpyHostToDevice);
  const float offset = 0.05f, nested = 0.01f;
  void* off = nullptr;
  cudaMalloc(&off, 4);
  cudaMemcpy(off, &offset, 4, cudaMemcpyHostToDevice);
  const int64_t nested_blocks = (blocks + 255) / 256;
  std::vector<float> nest(size_t(nested_blocks), nested);
  void* nest_dev = nullptr;
  cudaMalloc(&nest_dev, nest.size() * 4);
  cudaMemcpy(nest_dev, nest.data(), nest.size() * 4, cudaMemcpyHostToDevice);
  return {static_cast<const uint8_t*>(bytes(size_t(numel / 2), 0x5A)), bytes(size_t(blocks), 0x80),
          static_cast<const float*>(nest_dev), static_cast<const float*>(code), static_cast<const float*>(off),
          nf4::kNestedBlocksize, 64};
}

lora::Dropout dropout(double p, double scaling) {
  return {2024, philox::dropout_threshold(p), scaling / (1.0 - p)};
}

int64_t arg(char** argv, int i) { return std::atoll(argv[i]); }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) die(std::string(what) + " failed");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) die("usage: pk_simprof OP SHAPE... (see csrc/sim/profile_driver.cpp)");
  const std::string op = argv[1];
  auto need = [&](int n, const char* usage) {
    if (argc != n + 2) die(std::string("usage: pk_simprof ") + op + " " + usage);
  };
  if (op == "nf4_gemv") {
    need(4, "M IN OUT DTYPE");
    const int64_t m = arg(argv, 2), in = arg(argv, 3), out = arg(argv, 4);
    const DType t = dtype_of(argv[5]);
    if (m < 1 || m > nf4::kGemvMaxRows || (in * out) % 64 != 0)
      die("nf4_gemv needs 1 <= M <= 16 and IN*OUT % 64 == 0, got M=" + std::to_string(m) + " IN*OUT=" +
          std::to_string(in * out));
    const nf4::GemvParams p{packed_weight(in * out), values(size_t(m * in), t, 1), nullptr,
                            bytes(size_t(m * out) * elem_size(t), 0xFF), t, m, in, out};
    check(cuda::nf4_gemv(p, nullptr), "nf4_gemv");
  } else if (op == "nf4_decode") {
    need(3, "IN OUT DTYPE");
    const int64_t numel = arg(argv, 2) * arg(argv, 3);
    const DType t = dtype_of(argv[4]);
    if (numel % 64 != 0) die("nf4_decode needs IN*OUT % 64 == 0, got " + std::to_string(numel));
    const nf4::DecodeParams p{packed_weight(numel), 0, bytes(size_t(numel) * elem_size(t), 0xFF), t, numel};
    check(cuda::nf4_decode(p, nullptr), "nf4_decode");
  } else if (op == "nf4_gemm" || op == "nf4_linear_dx") {
    need(4, "M IN OUT DTYPE");
    const int64_t m = arg(argv, 2), in = arg(argv, 3), out = arg(argv, 4);
    const DType t = dtype_of(argv[5]);
    if (m < 1 || in < 1 || out < 1 || (in * out) % 64 != 0)
      die(op + " needs M, IN, OUT >= 1 and IN*OUT % 64 == 0, got M=" + std::to_string(m) + " IN=" +
          std::to_string(in) + " OUT=" + std::to_string(out));
    if (op == "nf4_gemm") {
      const nf4::GemmParams p{packed_weight(in * out), values(size_t(m * in), t, 1), nullptr,
                              bytes(size_t(m * out) * elem_size(t), 0xFF), t, m, in, out};
      if (!cuda::nf4_gemm_supported(p)) die("nf4_gemm takes bf16/f16 with IN % 32 == 0");
      check(cuda::nf4_gemm(p, nullptr), "nf4_gemm");
    } else {
      const nf4::DxParams p{packed_weight(in * out), values(size_t(m * out), t, 1),
                            bytes(size_t(m * in) * elem_size(t), 0xFF), t, m, in, out};
      if (!cuda::nf4_linear_dx_supported(p)) die("nf4_linear_dx takes bf16/f16 with IN % 32 == 0 and OUT % 8 == 0");
      check(cuda::nf4_linear_dx(p, nullptr), "nf4_linear_dx");
    }
  } else if (op == "lora_down" || op == "lora_backward") {
    need(4, "M IN R DTYPE");
    const int64_t m = arg(argv, 2), in = arg(argv, 3);
    const int r = int(arg(argv, 4));
    const DType t = dtype_of(argv[5]);
    const void* x = values(size_t(m * in), t, 1);
    const void* a = values(size_t(r * in), t, 2);
    if (op == "lora_down") {
      check(cuda::lora_down({x, a, bytes(size_t(m * r) * elem_size(t), 0xFF), t, m, in, r, dropout(0.1, 1.0)}, nullptr),
            "lora_down");
    } else {
      auto* ws = static_cast<float*>(bytes(size_t(lora::backward_workspace(m, in, r, t)) * sizeof(float), 0xFF));
      const lora::BackwardParams p{x, a, values(size_t(m * r), t, 3), values(size_t(m * in), t, 4),
                                   bytes(size_t(r * in) * elem_size(t), 0xFF), t, m, in, r, dropout(0.1, 2.0),
                                   nullptr, nullptr, 0, ws};
      check(cuda::lora_backward(p, nullptr), "lora_backward");
    }
  } else if (op == "kron_forward" || op == "kron_backward") {
    need(6, "M AO AI BO BI DTYPE");
    const int64_t m = arg(argv, 2);
    const kron::Dims d{arg(argv, 3), arg(argv, 4), arg(argv, 5), arg(argv, 6)};
    const DType t = dtype_of(argv[7]);
    const void* x = values(size_t(m * d.in()), t, 1);
    const void* a = values(size_t(d.a_out * d.a_in), t, 2);
    const void* b = values(size_t(d.b_out * d.b_in), t, 3);
    if (op == "kron_forward") {
      void* y = values(size_t(m * d.out()), t, 4);
      auto* ws = static_cast<float*>(bytes(size_t(kron::forward_workspace(m, d, t)) * sizeof(float) + 4, 0xFF));
      check(cuda::kron_forward({x, a, b, y, true, t, m, d, dropout(0.1, 1.0), ws}, nullptr), "kron_forward");
    } else {
      const void* dy = values(size_t(m * d.out()), t, 5);
      void* dx = values(size_t(m * d.in()), t, 6);
      void* da = bytes(size_t(d.a_out * d.a_in) * elem_size(t), 0xFF);
      void* db = bytes(size_t(d.b_out * d.b_in) * elem_size(t), 0xFF);
      auto* ws = static_cast<float*>(bytes(size_t(kron::backward_workspace(m, d, t, true)) * sizeof(float) + 4, 0xFF));
      check(cuda::kron_backward({dy, x, a, b, dx, da, db, true, t, m, d, dropout(0.1, 1.0), ws}, nullptr),
            "kron_backward");
    }
  } else if (op == "masked_adamw") {
    need(5, "NUMEL K BITS COMPACT DTYPE");
    const int64_t n = arg(argv, 2), k = arg(argv, 3), bits = arg(argv, 4), compact = arg(argv, 5);
    const DType t = dtype_of(argv[6]);
    if (k < 1 || k > n) die("masked_adamw needs 1 <= K <= NUMEL, got K=" + std::to_string(k) + " NUMEL=" + std::to_string(n));
    if (bits != 32 && bits != 64) die("masked_adamw needs BITS 32 or 64, got " + std::to_string(bits));
    if (bits == 32 && n > INT32_MAX) die("masked_adamw: NUMEL " + std::to_string(n) + " needs 64-bit indices");
    const size_t isize = size_t(bits / 8);
    std::vector<unsigned char> idx(size_t(k) * isize);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = j * n / k;
      const int32_t e32 = int32_t(e);
      std::memcpy(&idx[size_t(j) * isize], bits == 64 ? static_cast<const void*>(&e) : &e32, isize);
    }
    void* idx_dev = nullptr;
    cudaMalloc(&idx_dev, idx.size());
    cudaMemcpy(idx_dev, idx.data(), idx.size(), cudaMemcpyHostToDevice);
    void* param = values(size_t(n), t, 1);
    void* grad = values(size_t(compact ? k : n), t, 2);
    float* master = t == DType::kFloat32 ? nullptr : static_cast<float*>(values(size_t(k), DType::kFloat32, 3));
    float* m = static_cast<float*>(bytes(size_t(k) * 4, 0));
    float* v = static_cast<float*>(bytes(size_t(k) * 4, 0));
    cudasim::label_buffer(idx_dev, "indices");
    cudasim::label_buffer(param, "param");
    cudasim::label_buffer(grad, compact ? "grad (compact)" : "grad (dense)");
    if (master != nullptr) cudasim::label_buffer(master, "master");
    cudasim::label_buffer(m, "exp_avg");
    cudasim::label_buffer(v, "exp_avg_sq");
    const sparse::Selection sel{param, grad, idx_dev, master, t, bits == 64, compact == 0, k};
    const sparse::AdamWScalars h{0.999f, 0.1f, 0.999f, 0.001f, 0.0316f, 1e-8f, -1e-3f};
    const sparse::ChildMask child{0, 1, 0u, 1.0f};
    check(cuda::masked_adamw({sel, m, v, h, child}, nullptr), "masked_adamw");
  } else if (op == "adamw8bit") {
    need(2, "NUMEL DTYPE");
    const int64_t n = arg(argv, 2);
    const DType t = dtype_of(argv[3]);
    if (n < 1) die("adamw8bit needs NUMEL >= 1, got " + std::to_string(n));
    const int64_t blocks = adamw8bit::blocks(n);
    // bitsandbytes' signed and unsigned dynamic maps up to fp32 rounding (peft_kernels.dynamic_map builds the
    // exact ones with torch.linspace): the counters need their order, not their last bits
    std::vector<float> signed_map{0.0f, 1.0f}, unsigned_map{0.0f, 1.0f};
    for (int i = 0; i < 7; ++i) {
      const double scale = std::pow(10.0, i - 6);
      for (int is_signed = 0; is_signed < 2; ++is_signed) {
        const int count = is_signed ? 1 << i : 2 << i;
        for (int j = 0; j < count; ++j) {
          const float mid = float(scale * (0.1 + 0.9 * (j + 0.5) / count));
          (is_signed ? signed_map : unsigned_map).push_back(mid);
          if (is_signed) signed_map.push_back(-mid);
        }
      }
    }
    std::sort(signed_map.begin(), signed_map.end());
    std::sort(unsigned_map.begin(), unsigned_map.end());
    void* maps = nullptr;
    cudaMalloc(&maps, 2 * 256 * 4);
    cudaMemcpy(maps, signed_map.data(), 256 * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(static_cast<float*>(maps) + 256, unsigned_map.data(), 256 * 4, cudaMemcpyHostToDevice);
    std::vector<uint8_t> codes(size_t(2 * n));
    uint32_t s = 0x2545F491u;
    for (auto& c : codes) {
      s = s * 1664525u + 1013904223u;
      c = uint8_t(s >> 24);
    }
    auto* m = static_cast<uint8_t*>(bytes(size_t(n), 0));
    auto* v = static_cast<uint8_t*>(bytes(size_t(n), 0));
    cudaMemcpy(m, codes.data(), size_t(n), cudaMemcpyHostToDevice);
    cudaMemcpy(v, codes.data() + n, size_t(n), cudaMemcpyHostToDevice);
    std::vector<float> half(size_t(blocks), 0.5f);
    auto* m_absmax = static_cast<float*>(bytes(size_t(blocks) * 4, 0));
    auto* v_absmax = static_cast<float*>(bytes(size_t(blocks) * 4, 0));
    cudaMemcpy(m_absmax, half.data(), half.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(v_absmax, half.data(), half.size() * 4, cudaMemcpyHostToDevice);
    void* param = values(size_t(n), t, 1);
    void* grad = values(size_t(n), t, 2);
    cudasim::label_buffer(param, "param");
    cudasim::label_buffer(grad, "grad");
    cudasim::label_buffer(m, "exp_avg codes");
    cudasim::label_buffer(v, "exp_avg_sq codes");
    cudasim::label_buffer(m_absmax, "exp_avg absmax");
    cudasim::label_buffer(v_absmax, "exp_avg_sq absmax");
    cudasim::label_buffer(maps, "maps");
    const sparse::AdamWScalars h{0.999f, 0.1f, 0.999f, 0.001f, 0.0316f, 1e-8f, -1e-3f};
    check(cuda::adamw8bit({param, grad, m, m_absmax, v, v_absmax, static_cast<const float*>(maps),
                           static_cast<const float*>(maps) + 256, n, t, h}, nullptr),
          "adamw8bit");
  } else {
    die("unknown op " + op);
  }
  return 0;
}
