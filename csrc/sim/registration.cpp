// Test-only op namespace of the cudasim build: the same schemas as peft_kernels, implemented by the CUDA
// kernel sources executed on the CPU (csrc/cuda/*_bind.cpp built with -DPEFT_KERNELS_CUDASIM).
#include "peft_kernels/schemas.h"

TORCH_LIBRARY(peft_kernels_sim, m) { peft_kernels::define_schemas(m); }
