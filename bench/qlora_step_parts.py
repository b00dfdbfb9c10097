"""Where a QLoRA layer step's time goes beyond the frozen layer's: each op of the step against the op it adds to,
timed in A/B pairs in one process (A, then B, ``--pairs`` times, after warm-up), reporting both medians and the
median of the per-pair differences B - A, which drifts less with this shared machine's load than either median.

    python -P bench/qlora_step_parts.py [--dtype bf16,fp32] [--pairs 60]

Shapes as bench_qlora.py: 1024->1024, M = 2048 tokens, r = 16, dropout 0.1, a bias. The ops are called directly
(torch.ops.peft_kernels, no autograd), so the differences are the kernels' and their ATen calls', not Python's:
  dense forward (addmm with bias) -> NF4 forward          the two decodes' cost, forward ...
  dense dx (mm)                   -> NF4 dx               ... and backward
  NF4 forward                     -> QLoRA forward        the LoRA forward: masked x A^T, the rank-r update of y
  NF4 dx                          -> QLoRA backward       the LoRA backward: dB, dxa, dx += ..., dA
  NF4 dx                          -> QLoRA backward, dx only
  nothing                         -> QLoRA backward, dA only (no base product)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from peft_kernels.nn import QLoRALinear  # noqa: E402

IN, OUT, M, R, P, SCALING = 1024, 1024, 2048, 16, 0.1, 2.0


def ab(fa, fb, pairs: int) -> tuple[float, float, float]:
    """Medians of A and of B and the median of B - A over `pairs` alternating calls, in ms."""
    for _ in range(3):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    diff = statistics.median(b - a for a, b in zip(ta, tb))
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, diff * 1e3


def rows(dtype: torch.dtype, pairs: int) -> list[tuple[str, str, float, float, float]]:
    ops = torch.ops.peft_kernels
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(IN, OUT, dtype=dtype).requires_grad_(False)
    layer = QLoRALinear.from_linear(linear, r=R, alpha=R * SCALING, dropout=P, compute_dtype=dtype, adapter_dtype=dtype)
    q = layer.quantized
    packed = (q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, q.shape[0])
    a = torch.randn(R, IN, generator=g).to(dtype) * IN**-0.5
    b = torch.randn(OUT, R, generator=g).to(dtype) * R**-0.5
    x = torch.randn(M, IN, generator=g).to(dtype)
    dy = torch.randn(M, OUT, generator=g).to(dtype)
    w, bias, seed = linear.weight, linear.bias, torch.tensor(5)
    _, xa = ops.qlora_linear_fwd(x, *packed, bias, a, b, SCALING, P, seed)

    def backward(need_dx, need_da, need_db):
        return lambda: ops.qlora_linear_bwd(dy, x, *packed, a, b, xa, SCALING, P, seed, need_dx, need_da, need_db, False)

    nf4_forward = lambda: ops.nf4_linear(x, *packed, bias)  # noqa: E731
    nf4_dx = lambda: ops.nf4_linear_dx(dy, *packed)  # noqa: E731
    pairs_ = [
        ("dense forward", "NF4 forward", lambda: torch.addmm(bias, x, w.t()), nf4_forward),
        ("dense dx", "NF4 dx", lambda: torch.mm(dy, w), nf4_dx),
        ("NF4 forward", "QLoRA forward", nf4_forward, lambda: ops.qlora_linear_fwd(x, *packed, bias, a, b, SCALING, P, seed)),
        ("NF4 dx", "QLoRA backward", nf4_dx, backward(True, True, True)),
        ("NF4 dx", "QLoRA backward, dx only", nf4_dx, backward(True, False, False)),
        ("nothing", "QLoRA backward, dA only", lambda: None, backward(False, True, False)),
    ]
    return [(name_a, name_b, *ab(fa, fb, pairs)) for name_a, name_b, fa, fb in pairs_]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", help="comma-separated: " + ", ".join(harness.DTYPES))
    parser.add_argument("--pairs", type=int, default=60, help="A/B pairs timed per row")
    args = parser.parse_args()
    names = args.dtype.split(",")
    unknown = [n for n in names if n not in harness.DTYPES]
    if unknown or args.pairs < 1:
        parser.error(f"--dtype must name {', '.join(harness.DTYPES)} and --pairs must be >= 1, got {args.dtype!r}, "
                     f"{args.pairs}")
    print(f"# qlora step parts: torch {torch.__version__} | torch threads {torch.get_num_threads()} | "
          f"{IN}->{OUT} M={M} r={R} p={P} | {args.pairs} A/B pairs")
    print("\n| dtype | A | B | A median ms | B median ms | median(B - A) ms |\n|---|---|---|--:|--:|--:|")
    for name in names:
        for name_a, name_b, ta, tb, diff in rows(harness.DTYPES[name], args.pairs):
            print(f"| {name} | {name_a} | {name_b} | {ta:.3f} | {tb:.3f} | {diff:+.3f} |")


if __name__ == "__main__":
    main()
