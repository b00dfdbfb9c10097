"""One layer's training step with our CPU kernels on two instruction sets, alternated in one process: what a path
(AMX tiles, AVX512-BF16 pair products, AVX-512 fp32 tiles, BLAS) gains over another on the same machine, load and
allocator state. PEFT_KERNELS_CPU_ISA is read on every kernel call (csrc/cpu/isa.h), so one process can switch.

    python -P bench/isa_pairs.py [--layer qlora|lora|kron] [--dtype bf16|fp32] [--a avx512_bf16] [--b amx]
                                 [--pairs 60] [--glibc-malloc]

Shapes as bench_qlora.py / bench_kron_linear.py: 1024 -> 1024, M = 2048 tokens; LoRA and QLoRA r = 16, dropout 0.1;
KronA A 32x32 (x) B 32x32, dropout 0. A step: grads reset to None, forward, backward of dy. Reported: both medians
and the median of the per-pair differences a - b (which drifts less with this shared machine's load).

Freed memory is held in the process (harness.hold_freed_memory) unless --glibc-malloc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from peft_kernels.nn import KronALinear, LoRALinear, QLoRALinear  # noqa: E402

IN, OUT, M = 1024, 1024, 2048
ISAS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")


def layer(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    linear = torch.nn.Linear(IN, OUT, dtype=dtype).requires_grad_(False)
    if kind == "lora":
        m = LoRALinear.from_linear(linear, r=16, alpha=32, dropout=0.1)
    elif kind == "qlora":
        m = QLoRALinear.from_linear(linear, r=16, alpha=32, dropout=0.1, compute_dtype=dtype)
    else:
        m = KronALinear.from_linear(linear, (32, 32), (32, 32))
    for p in m.parameters():
        if p.requires_grad:  # non-zero factors: no product is skipped or trivially zero
            torch.nn.init.normal_(p, std=0.02)
    return m.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=("qlora", "lora", "kron"), default="qlora")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--a", choices=ISAS, default="avx512_bf16")
    parser.add_argument("--b", choices=ISAS, default="amx")
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--glibc-malloc", action="store_true")
    args = parser.parse_args()
    if not args.glibc_malloc:
        harness.hold_freed_memory()
    dtype = harness.DTYPES[args.dtype]
    torch.manual_seed(0)
    m = layer(args.layer, dtype)
    x = torch.randn(M, IN, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, OUT, dtype=dtype)
    leaves = [x] + [p for p in m.parameters() if p.requires_grad]

    def step(isa: str) -> float:
        os.environ["PEFT_KERNELS_CPU_ISA"] = isa
        start = time.perf_counter()
        for t in leaves:
            t.grad = None
        m(x).backward(dy)
        return (time.perf_counter() - start) * 1e3

    for _ in range(5):
        step(args.a)
        step(args.b)
    ta, tb = [], []
    for _ in range(args.pairs):
        ta.append(step(args.a))
        tb.append(step(args.b))
    diff = statistics.median(a - b for a, b in zip(ta, tb))
    print(f"# isa pairs: torch {torch.__version__} | torch threads {torch.get_num_threads()} | {args.layer} "
          f"{IN}->{OUT} M={M} {args.dtype} | {args.pairs} pairs | load {os.getloadavg()[0]:.2f}")
    print(f"{args.a}: median {statistics.median(ta):.3f} ms   {args.b}: median {statistics.median(tb):.3f} ms   "
          f"median({args.a} - {args.b}) {diff:+.3f} ms")


if __name__ == "__main__":
    main()
