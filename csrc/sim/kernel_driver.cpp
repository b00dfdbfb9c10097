// Torch-free driver that runs the CUDA kernels of csrc/cuda through cudasim on files, for the sanitizer and
// mutant tests (python_tests/test_cudasim.py): built with -fsanitize=thread or =address and run with
// CUDASIM_MODE=threads, every CUDA thread is an OS thread the sanitizer watches. Python writes the inputs
// and compares the outputs with peft_kernels.reference.
//
//   kernel_driver encode    DIR NUMEL BLOCKSIZE   weight.f32                        -> codes.u8 absmax.f32
//   kernel_driver quantize8 DIR NUMEL             x.f32 code.f32                    -> q.u8 absmax.f32
//   kernel_driver decode    DIR NUMEL BLOCKSIZE [SHIFT] codes.u8 absmax.f32       -> out.f32
//   kernel_driver decode8   DIR NUMEL BLOCKSIZE   codes.u8 q.u8 nested.f32 code.f32 offset.f32 -> out.f32
//   kernel_driver gemv      DIR M IN OUT BLOCKSIZE [SHIFT] x.f32 codes.u8 absmax.f32 bias.f32 -> y.f32
//   kernel_driver gemm      DIR M IN OUT BLOCKSIZE x.f32 codes.u8 q.u8 nested.f32 code.f32 offset.f32 bias.f32 -> y.f32
//   kernel_driver dx        DIR M IN OUT BLOCKSIZE dy.f32 codes.u8 q.u8 nested.f32 code.f32 offset.f32 -> dx.f32
//                           (the tensor-core kernels, bf16 activations: inputs rounded to bf16, outputs widened)
//   kernel_driver lora_down DIR M IN R SEED P DTYPE      x.f32 a.f32                -> xa.f32
//   kernel_driver lora_bwd  DIR M IN R SEED P S DTYPE    x.f32 a.f32 dxa.f32 dx.f32 -> dx.f32 da.f32
//                           (DTYPE f32: the CUDA-core kernels; bf16: the tensor-core ones, inputs rounded to bf16)
//   kernel_driver kron_fwd  DIR M AO AI BO BI SEED P S DTYPE  x.f32 a.f32 b.f32 y.f32 -> y.f32 (y += ...)
//   kernel_driver kron_bwd  DIR M AO AI BO BI SEED P S DTYPE  dy.f32 x.f32 a.f32 b.f32 dx.f32 -> dx.f32 da.f32 db.f32
//                           (DTYPE as for lora; bf16 takes the tensor-core kernels where the factor shapes allow)
//   kernel_driver masked_adamw DIR NUMEL K SEED P VARIANT  param.f32 grad.f32 idx.i64 (2 steps)
//                           -> param.f32 m.f32 v.f32 [master.f32]; VARIANT: i64-dense-f32 (16-byte path, int64
//                           indices, dense fp32 grad), i32-compact-bf16 (int32 indices, compact bf16 grad [K],
//                           bf16 param rounded from param.f32 with an fp32 master copy), unaligned (as the first,
//                           exp_avg and exp_avg_sq 4 bytes off 16-byte alignment: the lane-strided path)
//   kernel_driver adamw8bit DIR NUMEL STEPS VARIANT  param.f32 grad.f32 (STEPS x NUMEL) signed.f32 unsigned.f32
//                           -> param.f32 m.u8 m_absmax.f32 v.u8 v_absmax.f32 after STEPS steps from zero moments;
//                           VARIANT: f32, bf16 (param and grads rounded to bf16), unaligned (f32, param 4 bytes off
//                           16-byte alignment: the element-wise path)
//
// SHIFT (default 0): decode writes out, gemv reads x, SHIFT floats into its allocation: 1 leaves it only 4-byte
// aligned, for the kernels' paths that take any alignment.
#include "launch.h"
#include "adamw8bit.cu"
#include "kron_linear.cu"
#include "lora_linear.cu"
#include "masked_adamw.cu"
#include "nf4.cu"
#include "nf4_gemm.cu"

#include <cmath>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "kernel_driver: %s\n", what.c_str());
  std::exit(2);
}

// Reads DIR/name (exactly `count` elements of T) into fresh cudasim "device" memory, `shift` elements into it.
template <class T> T* load(const std::string& dir, const char* name, size_t count, size_t shift = 0) {
  const std::string path = dir + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) die("cannot open " + path);
  std::vector<T> host(count);
  const size_t got = std::fread(host.data(), sizeof(T), count, f);
  std::fclose(f);
  if (got != count) die(path + ": expected " + std::to_string(count) + " elements, got " + std::to_string(got));
  void* dev = nullptr;
  cudaMalloc(&dev, (count + shift) * sizeof(T));
  T* at = static_cast<T*>(dev) + shift;
  cudaMemcpy(at, host.data(), count * sizeof(T), cudaMemcpyHostToDevice);
  return at;
}

// Fresh device memory is 0xFF-filled by cudasim_rt.cpp, so elements a kernel forgets to write show up.
template <class T> T* alloc(size_t count) {
  void* dev = nullptr;
  cudaMalloc(&dev, count * sizeof(T));
  return static_cast<T*>(dev);
}

template <class T> void save(const std::string& dir, const char* name, const T* dev, size_t count) {
  std::vector<T> host(count);
  cudaMemcpy(host.data(), dev, count * sizeof(T), cudaMemcpyDeviceToHost);
  const std::string path = dir + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(host.data(), sizeof(T), count, f) != count) die("cannot write " + path);
  std::fclose(f);
}

// bf16 device copies of fp32 data and back, for the tensor-core kernels.
__nv_bfloat16* to_bf16(const float* dev, size_t count) {
  std::vector<float> host(count);
  cudaMemcpy(host.data(), dev, count * 4, cudaMemcpyDeviceToHost);
  std::vector<__nv_bfloat16> h16(count);
  for (size_t i = 0; i < count; ++i) h16[i] = __float2bfloat16_rn(host[i]);
  __nv_bfloat16* out = alloc<__nv_bfloat16>(count);
  cudaMemcpy(out, h16.data(), count * 2, cudaMemcpyHostToDevice);
  return out;
}

void save_bf16(const std::string& dir, const char* name, const __nv_bfloat16* dev, size_t count) {
  std::vector<__nv_bfloat16> h16(count);
  cudaMemcpy(h16.data(), dev, count * 2, cudaMemcpyDeviceToHost);
  std::vector<float> host(count);
  for (size_t i = 0; i < count; ++i) host[i] = __bfloat162float(h16[i]);
  const std::string path = dir + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(host.data(), 4, count, f) != count) die("cannot write " + path);
  std::fclose(f);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) die(std::string(what) + " failed");
}

// Device data of a DTYPE argument (f32, or bf16: the tensor-core kernels): inputs read from DIR as fp32 (rounded to
// bf16), outputs written back as fp32.
struct Typed {
  std::string dir;
  bool b16;
  Typed(std::string d, const std::string& dtype) : dir(std::move(d)), b16(dtype == "bf16") {
    if (dtype != "f32" && dtype != "bf16") die("DTYPE must be f32 or bf16, got " + dtype);
  }
  peft_kernels::DType dtype() const { return b16 ? peft_kernels::DType::kBFloat16 : peft_kernels::DType::kFloat32; }
  void* input(const char* name, size_t count) const {
    float* f = load<float>(dir, name, count);
    return b16 ? static_cast<void*>(to_bf16(f, count)) : static_cast<void*>(f);
  }
  void* output(size_t count) const {
    return b16 ? static_cast<void*>(alloc<__nv_bfloat16>(count)) : static_cast<void*>(alloc<float>(count));
  }
  void save_out(const char* name, const void* dev, size_t count) const {
    if (b16) {
      save_bf16(dir, name, static_cast<const __nv_bfloat16*>(dev), count);
    } else {
      save(dir, name, static_cast<const float*>(dev), count);
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  using namespace peft_kernels;
  if (argc < 4) die("usage: kernel_driver encode|quantize8|decode|decode8 DIR NUMEL [BLOCKSIZE]");
  const std::string kernel = argv[1], dir = argv[2];
  const int64_t n = std::atoll(argv[3]);
  const int blocksize = argc > 4 ? std::atoi(argv[4]) : nf4::kNestedBlocksize;
  const size_t nblocks = static_cast<size_t>(n / blocksize);
  if (kernel == "encode") {
    float* w = load<float>(dir, "weight.f32", n);
    uint8_t* codes = alloc<uint8_t>(n / 2);
    float* absmax = alloc<float>(nblocks);
    check(cuda::nf4_encode({w, DType::kFloat32, codes, absmax, n, blocksize}, nullptr), "nf4_encode");
    save(dir, "codes.u8", codes, n / 2);
    save(dir, "absmax.f32", absmax, nblocks);
  } else if (kernel == "quantize8") {
    const size_t blocks8 = static_cast<size_t>((n + blocksize - 1) / blocksize);
    float* x = load<float>(dir, "x.f32", n);
    float* code = load<float>(dir, "code.f32", 256);
    uint8_t* q = alloc<uint8_t>(n);
    float* absmax = alloc<float>(blocks8);
    check(cuda::nf4_quantize8({x, code, q, absmax, n, blocksize}, nullptr), "nf4_quantize8");
    save(dir, "q.u8", q, n);
    save(dir, "absmax.f32", absmax, blocks8);
  } else if (kernel == "decode" || kernel == "decode8") {
    const bool nested = kernel == "decode8";
    const size_t blocks8 = (nblocks + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize;
    uint8_t* codes = load<uint8_t>(dir, "codes.u8", n / 2);
    const void* absmax = nested ? static_cast<const void*>(load<uint8_t>(dir, "q.u8", nblocks))
                                : static_cast<const void*>(load<float>(dir, "absmax.f32", nblocks));
    const size_t shift = argc > 5 ? std::atoi(argv[5]) : 0;
    float* out = alloc<float>(n + shift) + shift;
    nf4::DecodeParams p{{codes, absmax, nullptr, nullptr, nullptr, nf4::kNestedBlocksize, blocksize},
                        0, out, DType::kFloat32, n};
    if (nested) {
      p.w.nested_absmax = load<float>(dir, "nested.f32", blocks8);
      p.w.code8 = load<float>(dir, "code.f32", 256);
      p.w.offset = load<float>(dir, "offset.f32", 1);
    }
    check(cuda::nf4_decode(p, nullptr), "nf4_decode");
    save(dir, "out.f32", out, n);
  } else if (kernel == "gemv") {
    if (argc < 7) die("usage: kernel_driver gemv DIR M IN OUT BLOCKSIZE [SHIFT]");
    const int64_t m = n, in = std::atoll(argv[4]), out = std::atoll(argv[5]);
    const int bs = std::atoi(argv[6]);
    const size_t shift = argc > 7 ? std::atoi(argv[7]) : 0;
    const nf4::Packed w{load<uint8_t>(dir, "codes.u8", in * out / 2),
                        load<float>(dir, "absmax.f32", in * out / bs),
                        nullptr, nullptr, nullptr, nf4::kNestedBlocksize, bs};
    float* y = alloc<float>(m * out);
    const nf4::GemvParams p{w, load<float>(dir, "x.f32", m * in, shift), load<float>(dir, "bias.f32", out), y,
                            DType::kFloat32, m, in, out};
    check(cuda::nf4_gemv(p, nullptr), "nf4_gemv");
    save(dir, "y.f32", y, m * out);
  } else if (kernel == "gemm" || kernel == "dx") {
    if (argc < 7) die("usage: kernel_driver gemm|dx DIR M IN OUT BLOCKSIZE");
    const int64_t m = n, in = std::atoll(argv[4]), out = std::atoll(argv[5]);
    const int bs = std::atoi(argv[6]);
    const int64_t blocks = in * out / bs;
    const nf4::Packed w{load<uint8_t>(dir, "codes.u8", in * out / 2), load<uint8_t>(dir, "q.u8", blocks),
                        load<float>(dir, "nested.f32", (blocks + nf4::kNestedBlocksize - 1) / nf4::kNestedBlocksize),
                        load<float>(dir, "code.f32", 256), load<float>(dir, "offset.f32", 1), nf4::kNestedBlocksize, bs};
    if (kernel == "gemm") {
      const nf4::GemmParams p{w, to_bf16(load<float>(dir, "x.f32", m * in), m * in),
                              to_bf16(load<float>(dir, "bias.f32", out), out), alloc<__nv_bfloat16>(m * out),
                              DType::kBFloat16, m, in, out};
      if (!cuda::nf4_gemm_supported(p)) die("gemm: shape not supported by the tensor-core kernel");
      check(cuda::nf4_gemm(p, nullptr), "nf4_gemm");
      save_bf16(dir, "y.f32", static_cast<const __nv_bfloat16*>(p.y), m * out);
    } else {
      const nf4::DxParams p{w, to_bf16(load<float>(dir, "dy.f32", m * out), m * out), alloc<__nv_bfloat16>(m * in),
                            DType::kBFloat16, m, in, out};
      if (!cuda::nf4_linear_dx_supported(p)) die("dx: shape not supported by the tensor-core kernel");
      check(cuda::nf4_linear_dx(p, nullptr), "nf4_linear_dx");
      save_bf16(dir, "dx.f32", static_cast<const __nv_bfloat16*>(p.dx), m * in);
    }
  } else if (kernel == "lora_down" || kernel == "lora_bwd") {
    const bool bwd = kernel == "lora_bwd";
    if (argc != (bwd ? 10 : 9)) die("usage: kernel_driver lora_down DIR M IN R SEED P DTYPE | lora_bwd DIR M IN R SEED P S DTYPE");
    const int64_t m = n, in = std::atoll(argv[4]);
    const int r = std::atoi(argv[5]);
    const double p = std::atof(argv[7]), scaling = bwd ? std::atof(argv[8]) : 1.0;
    const Typed io(dir, argv[bwd ? 9 : 8]);
    const DType t = io.dtype();
    const lora::Dropout drop{std::strtoull(argv[6], nullptr, 10), philox::dropout_threshold(p), scaling / (1.0 - p)};
    const void* x = io.input("x.f32", m * in);
    const void* a = io.input("a.f32", size_t(r) * in);
    if (!bwd) {
      void* xa = io.output(m * r);
      check(cuda::lora_down({x, a, xa, t, m, in, r, drop}, nullptr), "lora_down");
      io.save_out("xa.f32", xa, m * r);
    } else {
      void* dx = io.input("dx.f32", m * in);
      void* da = io.output(size_t(r) * in);
      const void* dxa = io.input("dxa.f32", m * r);
      float* ws = alloc<float>(size_t(lora::backward_workspace(m, in, r, t)) + 1);  // 0xFF: NaN where never written
      check(cuda::lora_backward({x, a, dxa, dx, da, t, m, in, r, drop, nullptr, nullptr, 0, ws}, nullptr), "lora_backward");
      io.save_out("dx.f32", dx, m * in);
      io.save_out("da.f32", da, size_t(r) * in);
    }
  } else if (kernel == "kron_fwd" || kernel == "kron_bwd") {
    if (argc != 12) die("usage: kernel_driver kron_fwd|kron_bwd DIR M AO AI BO BI SEED P SCALING DTYPE");
    const int64_t m = n;
    const kron::Dims d{std::atoll(argv[4]), std::atoll(argv[5]), std::atoll(argv[6]), std::atoll(argv[7])};
    const double p = std::atof(argv[9]), scaling = std::atof(argv[10]);
    const Typed io(dir, argv[11]);
    const lora::Dropout drop{std::strtoull(argv[8], nullptr, 10), philox::dropout_threshold(p), scaling / (1.0 - p)};
    const void* x = io.input("x.f32", m * d.in());
    const void* a = io.input("a.f32", d.a_out * d.a_in);
    const void* b = io.input("b.f32", d.b_out * d.b_in);
    if (kernel == "kron_fwd") {
      void* y = io.input("y.f32", m * d.out());
      float* ws = alloc<float>(size_t(kron::forward_workspace(m, d, io.dtype())) + 1);
      check(cuda::kron_forward({x, a, b, y, true, io.dtype(), m, d, drop, ws}, nullptr), "kron_forward");
      io.save_out("y.f32", y, m * d.out());
    } else {
      const void* dy = io.input("dy.f32", m * d.out());
      void* dx = io.input("dx.f32", m * d.in());
      void* da = io.output(d.a_out * d.a_in);
      void* db = io.output(d.b_out * d.b_in);
      float* ws = alloc<float>(size_t(kron::backward_workspace(m, d, io.dtype(), true)) + 1);
      check(cuda::kron_backward({dy, x, a, b, dx, da, db, true, io.dtype(), m, d, drop, ws}, nullptr), "kron_backward");
      io.save_out("dx.f32", dx, m * d.in());
      io.save_out("da.f32", da, d.a_out * d.a_in);
      io.save_out("db.f32", db, d.b_out * d.b_in);
    }
  } else if (kernel == "masked_adamw") {
    if (argc < 8) die("usage: kernel_driver masked_adamw DIR NUMEL K SEED CHILD_P VARIANT");
    const int64_t k = std::atoll(argv[4]);
    const double child_p = std::atof(argv[6]);
    const std::string variant = argv[7];
    if (variant != "i64-dense-f32" && variant != "i32-compact-bf16" && variant != "unaligned")
      die("unknown masked_adamw variant " + variant);
    const bool bf16 = variant == "i32-compact-bf16";
    float* param = load<float>(dir, "param.f32", n);
    const float* grad = load<float>(dir, "grad.f32", bf16 ? k : n);
    const int64_t* idx = load<int64_t>(dir, "idx.i64", k);
    const int shift = variant == "unaligned" ? 1 : 0;
    float* m = alloc<float>(k + shift) + shift;
    float* v = alloc<float>(k + shift) + shift;
    cudaMemset(m, 0, k * sizeof(float));
    cudaMemset(v, 0, k * sizeof(float));
    sparse::Selection sel{param, grad, idx, nullptr, DType::kFloat32, true, true, k};
    if (bf16) {
      std::vector<int64_t> idx64(size_t(k), 0);
      cudaMemcpy(idx64.data(), idx, k * 8, cudaMemcpyDeviceToHost);
      std::vector<int32_t> idx32(idx64.begin(), idx64.end());
      int32_t* idx_dev = alloc<int32_t>(k);
      cudaMemcpy(idx_dev, idx32.data(), k * 4, cudaMemcpyHostToDevice);
      std::vector<float> p32(size_t(n), 0.0f), master(size_t(k), 0.0f);
      cudaMemcpy(p32.data(), param, n * 4, cudaMemcpyDeviceToHost);
      for (int64_t j = 0; j < k; ++j) master[size_t(j)] = p32[size_t(idx64[size_t(j)])];  // bf16 values already
      float* master_dev = alloc<float>(k);
      cudaMemcpy(master_dev, master.data(), k * 4, cudaMemcpyHostToDevice);
      sel = {to_bf16(param, n), to_bf16(grad, k), idx_dev, master_dev, DType::kBFloat16, false, false, k};
    }
    // lr 1e-2, betas (0.9, 0.999), eps 1e-8, weight decay 0.1: the scalars as the op body computes them
    const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, wd = 0.1;
    for (int64_t step = 1; step <= 2; ++step) {
      const sparse::AdamWScalars h{float(1.0 - lr * wd), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                                   float(std::sqrt(1.0 - std::pow(beta2, double(step)))), 1e-8f,
                                   float(-(lr / (1.0 - std::pow(beta1, double(step)))))};
      const sparse::ChildMask child{std::strtoull(argv[5], nullptr, 10), uint64_t(step),
                                    child_p == 1.0 ? 0u : philox::drop_threshold(1.0 - child_p), float(1.0 / child_p)};
      check(cuda::masked_adamw({sel, m, v, h, child}, nullptr), "masked_adamw");
    }
    if (bf16) {
      save_bf16(dir, "param.f32", static_cast<const __nv_bfloat16*>(sel.param), n);
      save(dir, "master.f32", sel.master, k);
    } else {
      save(dir, "param.f32", param, n);
    }
    save(dir, "m.f32", m, k);
    save(dir, "v.f32", v, k);
  } else if (kernel == "adamw8bit") {
    if (argc < 6) die("usage: kernel_driver adamw8bit DIR NUMEL STEPS VARIANT");
    const int steps = std::atoi(argv[4]);
    const std::string variant = argv[5];
    if (variant != "f32" && variant != "bf16" && variant != "unaligned") die("unknown adamw8bit variant " + variant);
    const Typed io(dir, variant == "bf16" ? "bf16" : "f32");
    void* param = variant == "unaligned" ? static_cast<void*>(load<float>(dir, "param.f32", n, 1)) : io.input("param.f32", n);
    const void* grads = io.input("grad.f32", size_t(steps) * n);
    const int64_t blocks = adamw8bit::blocks(n);
    uint8_t* m = alloc<uint8_t>(n);
    uint8_t* v = alloc<uint8_t>(n);
    float* m_absmax = alloc<float>(blocks);
    float* v_absmax = alloc<float>(blocks);
    cudaMemset(m, 127, n);  // the code of 0.0 in the signed map
    cudaMemset(v, 0, n);
    cudaMemset(m_absmax, 0, blocks * 4);
    cudaMemset(v_absmax, 0, blocks * 4);
    const float* signed_map = load<float>(dir, "signed.f32", 256);
    const float* unsigned_map = load<float>(dir, "unsigned.f32", 256);
    // lr 1e-2, betas (0.9, 0.999), eps 1e-8, weight decay 0.1: the scalars as the op body computes them
    const double lr = 1e-2, beta1 = 0.9, beta2 = 0.999, wd = 0.1;
    for (int step = 1; step <= steps; ++step) {
      const sparse::AdamWScalars h{float(1.0 - lr * wd), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                                   float(std::sqrt(1.0 - std::pow(beta2, double(step)))), 1e-8f,
                                   float(-(lr / (1.0 - std::pow(beta1, double(step)))))};
      const void* grad = static_cast<const char*>(grads) + size_t(step - 1) * n * (io.b16 ? 2 : 4);
      check(cuda::adamw8bit({param, grad, m, m_absmax, v, v_absmax, signed_map, unsigned_map, n, io.dtype(), h}, nullptr),
            "adamw8bit");
    }
    io.save_out("param.f32", param, n);
    save(dir, "m.u8", m, n);
    save(dir, "v.u8", v, n);
    save(dir, "m_absmax.f32", m_absmax, blocks);
    save(dir, "v_absmax.f32", v_absmax, blocks);
  } else {
    die("unknown kernel " + kernel);
  }
  return 0;
}
