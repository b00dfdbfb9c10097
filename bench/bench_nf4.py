"""NF4 quantize and dequantize (blocksize 64, double-quantized absmax): ours vs the pure-PyTorch reference
(baseline) vs bitsandbytes, on LLaMA-7B layer shapes.

    python bench/bench_nf4.py [--quick] [--device cpu|cuda] [--dtype bf16,fp32] [--repeats N] [--out DIR]

On the CPU, ``ours-blas`` is ours capped below AVX-512 (harness.on_blas_path): for dequantize, the portable
decode loop. Absolute times on a shared 2-core machine are noise (other tenants, frequency scaling); the claims are the
ratios to ``ref``, measured side by side in one process.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

# `python -P` leaves the script's directory off sys.path; add bench/ alone (not the repository root), so the
# source tree's peft_kernels/ never shadows the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import peft_kernels as pk  # noqa: E402
from peft_kernels import reference  # noqa: E402

try:
    import bitsandbytes.functional as bnbf
except Exception as exc:  # not only ImportError: bitsandbytes raises others when its native library is unusable
    bnbf = None
    print(f"note: bitsandbytes unavailable ({type(exc).__name__}: {exc}); skipping the bnb provider")

BLOCKSIZE = 64
SHAPES = [(4096, 4096), (11008, 4096)]  # LLaMA-7B attention projection, MLP gate/up projection
QUICK_SHAPES = [(1024, 1024), (2048, 4096)]
DTYPE_NAMES = {dtype: name for name, dtype in harness.DTYPES.items()}


def cases(args) -> list[harness.Case]:
    shapes = QUICK_SHAPES if args.quick else SHAPES
    return [
        harness.Case(f"{rows}x{cols} {DTYPE_NAMES[dtype]}", dict(shape=(rows, cols), dtype=dtype, device=args.device))
        for rows, cols in shapes
        for dtype in args.dtypes
    ]


def providers(case: harness.Case, mode: str) -> dict:
    """Zero-argument callables for ``mode`` ("quantize" or "dequantize"); inputs are made here, untimed."""
    dtype = case.params["dtype"]
    w = torch.randn(case.params["shape"], dtype=dtype, device=case.params["device"])
    if mode == "quantize":
        fns = {
            "ours": lambda: pk.nf4_quantize(w, blocksize=BLOCKSIZE, double_quant=True),
            # dynamic_map inside the call, as ours does, so both pay for it.
            "ref": lambda: reference.nf4_quantize(w, BLOCKSIZE, pk.dynamic_map(w.device)),
        }
        if bnbf is not None:
            fns["bnb"] = lambda: bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        return fns
    q = pk.nf4_quantize(w, blocksize=BLOCKSIZE, double_quant=True)
    nested_code = pk.dynamic_map(w.device)
    codes, absmax, nested_absmax, offset = reference.nf4_quantize(w, BLOCKSIZE, nested_code)
    fns = {
        "ours": lambda: pk.nf4_dequantize(q),
        "ref": lambda: reference.nf4_dequantize(codes, absmax, nested_absmax, nested_code, offset, BLOCKSIZE, dtype),
    }
    if bnbf is not None:
        packed, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        fns["bnb"] = lambda: bnbf.dequantize_4bit(packed, state)
    if case.params["device"] == "cpu":  # the portable decode loop beside the AVX-512 one
        fns["ours-blas"] = harness.on_blas_path(fns["ours"])
    check_same_output(case, fns)
    return fns


def check_same_output(case: harness.Case, fns: dict) -> None:
    """A speed ratio only means something between providers that compute the same thing, and all three are
    documented to be bit-identical: insist on it once per case (untimed). Each provider dequantizes what it
    quantized itself, so this covers quantize too."""
    outputs = {name: fn().reshape(-1) for name, fn in fns.items()}
    for name, out in outputs.items():
        if not torch.equal(out, outputs["ref"]):
            raise RuntimeError(f"{case.name}: dequantize of {name!r} differs from 'ref'")


def dequantize_traffic(case: harness.Case) -> int:
    """Bytes a dequantize must move: read the packed codes, uint8 absmax, fp32 nested absmax, the 256-entry
    nested code and the offset; write the weight."""
    numel = math.prod(case.params["shape"])
    nblocks = numel // BLOCKSIZE
    read = numel // 2 + nblocks + 4 * math.ceil(nblocks / reference.NESTED_BLOCKSIZE) + 4 * 256 + 4
    return read + numel * case.params["dtype"].itemsize


if __name__ == "__main__":
    args, rows = harness.main("nf4", cases, providers, modes=("quantize", "dequantize"), baseline="ref")
    # An absolute number, so on a shared 2-core machine it is noise like every absolute time here (the ratios
    # are the claim); it only tells how far the kernel is from the memory bandwidth.
    by_name = {case.name: case for case in cases(args)}
    print("\nours, dequantize effective bandwidth ((bytes read + written) / median):")
    for row in rows:
        if row.mode == "dequantize" and row.provider == "ours":
            print(f"  {row.case}: {dequantize_traffic(by_name[row.case]) / row.median_ms / 1e6:.1f} GB/s")
