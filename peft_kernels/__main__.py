"""`python -m peft_kernels` (and `peft-kernels info`): what was built, and an NF4 round trip on a LLaMA-7B-sized
weight checked against bitsandbytes when it is installed."""

import time

import torch

import peft_kernels as pk


def main() -> None:
    info = pk.build_info()
    print("peft_kernels", pk.__version__)
    for key, value in info.items():
        print(f"  {key:14s} {value}")
    torch.manual_seed(0)
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    start = time.perf_counter()
    q = pk.nf4_quantize(w, blocksize=64, double_quant=True)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    d = q.dequantize()
    dequantize_s = time.perf_counter() - start
    err = (d.float() - w.float()).abs().mean().item()
    print(f"NF4 4096x4096 bf16: {w.numel() * 2:,} -> {q.nbytes:,} bytes ({8 * q.nbytes / w.numel():.3f} bits/weight), "
          f"mean |error| {err:.4f}, quantize {quantize_s * 1e3:.0f} ms, dequantize {dequantize_s * 1e3:.0f} ms (CPU)")
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except ImportError:
        print("bitsandbytes not installed: byte comparison skipped")
        return
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    same = torch.equal(packed.reshape(-1), q.codes) and torch.equal(state.absmax, q.absmax)
    same = same and torch.equal(bnbf.dequantize_4bit(packed, state), d)
    print(f"bitsandbytes {bitsandbytes.__version__}: codes, scales and dequantized weight identical: {same}")
    if not same:
        raise SystemExit("NF4 output differs from bitsandbytes")


if __name__ == "__main__":
    main()
