"""NF4 linear forward at decode batch sizes (M = 1, 4, 16 rows; CUDA: 1, 4, 8): ours (the GEMV kernel streaming
the packed weight once) vs dense ``F.linear`` on the unquantized weight (baseline) vs bitsandbytes' 4-bit
matmul, on LLaMA-7B layer shapes, plus training sizes (CPU: M = 2048 on the tiled path; CUDA: M = 2048 and
8192 on the tensor-core GEMM). ``copy`` is a device-to-device copy of as many bytes as ours must read: the
memory bandwidth actually available, measured beside it.

    python -P bench/bench_nf4_linear.py [--quick] [--device cpu|cuda] [--dtype bf16] [--repeats N]

The claims are the ratios to ``dense`` measured side by side in one process; the summary gives, per decode
case, ours' effective read bandwidth (0.516 B per weight plus x and y, over its median) as a fraction of the
copy's (bytes read and written over its median), and speedups over dense and bnb. CUDA goals: >= 85% of the
copy's bandwidth and >= 3.3x dense at M = 1; <= 1.15x dense at M = 2048.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import peft_kernels as pk  # noqa: E402

try:
    import bitsandbytes as bnb
except Exception as exc:  # bitsandbytes raises more than ImportError when its native library is unusable
    bnb = None
    print(f"note: bitsandbytes unavailable ({type(exc).__name__}: {exc}); skipping the bnb provider")

SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in): LLaMA-7B attention projection, MLP gate/up projection
QUICK_SHAPES = [(1024, 1024), (4096, 4096)]
ROWS = [1, 4, 16, 2048]
GPU_ROWS = [1, 4, 8, 2048, 8192]  # decode (the GEMV) and training (the tensor-core GEMM) batch sizes
QUICK_ROWS = [1, 16, 512]
DTYPE_NAMES = {dtype: name for name, dtype in harness.DTYPES.items()}


def cases(args) -> list[harness.Case]:
    shapes, rows = (QUICK_SHAPES, QUICK_ROWS) if args.quick else (SHAPES, GPU_ROWS if args.device == "cuda" else ROWS)
    return [harness.Case(f"{out}x{inp} M={m} {DTYPE_NAMES[dtype]}", dict(shape=(out, inp), m=m, dtype=dtype,
                                                                         device=args.device))
            for out, inp in shapes for m in rows for dtype in args.dtypes]


def providers(case: harness.Case, mode: str) -> dict:
    (out, inp), m, dtype, device = case.params["shape"], case.params["m"], case.params["dtype"], case.params["device"]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(out, inp, generator=g) * inp**-0.5).to(dtype).to(device)
    x = torch.randn(m, inp, generator=g).to(dtype).to(device)
    q = pk.nf4_quantize(w, 64, True)
    fns = {"ours": lambda: pk.nf4_linear(x, q), "dense": lambda: torch.nn.functional.linear(x, w)}
    if m <= 16:
        src = torch.empty(bytes_read(case), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        fns["copy"] = lambda: dst.copy_(src)
    if bnb is not None:
        packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        fns["bnb"] = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)
    with torch.no_grad():
        want = torch.nn.functional.linear(x.float(), pk.nf4_dequantize(q).float())
        for name, fn in fns.items():
            if name not in ("dense", "copy"):
                err = (fn().float() - want).abs().max().item()
                if err > 0.05 * want.abs().max().item():
                    raise RuntimeError(f"{case.name}: {name} differs from the dequantized product by {err:.3g}")
    return fns


def bytes_read(case: harness.Case) -> int:
    (out, inp), m, dtype = case.params["shape"], case.params["m"], case.params["dtype"]
    nblocks = out * inp // 64
    return out * inp // 2 + nblocks + 4 * (nblocks // 256 + 1) + (m * inp + m * out) * dtype.itemsize


if __name__ == "__main__":
    with torch.no_grad():
        args, rows = harness.main("nf4_linear", cases, providers, modes=("forward",), baseline="dense",
                                  default_dtypes="bf16")
    by_name = {case.name: case for case in cases(args)}
    ms: dict[str, dict[str, float]] = {}
    for row in rows:
        ms.setdefault(row.case, {})[row.provider] = row.median_ms
    print("\nsummary: ours' read bandwidth (packed weight + x + y) vs a copy of as many bytes (read + written);")
    print("speedups = the other's median / ours:")
    for name, t in ms.items():
        case = by_name[name]
        line = f"  {name}: dense/ours {t['dense'] / t['ours']:.2f}"
        if "bnb" in t:
            line += f", bnb/ours {t['bnb'] / t['ours']:.2f}"
        if "copy" in t:
            ours_bw = bytes_read(case) / t["ours"] / 1e6
            copy_bw = 2 * bytes_read(case) / t["copy"] / 1e6
            line += f", ours {ours_bw:.0f} GB/s = {ours_bw / copy_bw:.0%} of the copy's {copy_bw:.0f} GB/s"
        print(line)
