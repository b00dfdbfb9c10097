"""Typed public wrappers of the library's ops. Each calls one ``torch.ops.peft_kernels`` op; argument checks
happen in C++ (one copy for every device) and raise ValueError/TypeError naming the argument."""

from __future__ import annotations

import torch

from .nf4 import NF4Weight, dynamic_map


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a weight to NF4, bit-identical to bitsandbytes' ``quantize_4bit(weight, blocksize,
    quant_type="nf4", compress_statistics=double_quant)``.

    Args:
        weight: fp32, fp16 or bf16, any shape, contiguous, finite, numel a multiple of ``blocksize``.
        blocksize: elements per absmax scale: 32, 64, ..., 4096.
        double_quant: also quantize the absmax scales to 8 bits in blocks of 256 (≈4.13 bits per weight
            at blocksize 64 instead of 4.5).

    Returns:
        An :class:`NF4Weight` on ``weight``'s device.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"nf4_quantize: argument 'weight' must be a torch.Tensor, got {type(weight).__name__}")
    nested_code = dynamic_map(weight.device) if double_quant else None
    codes, absmax, nested_absmax, offset = torch.ops.peft_kernels.nf4_quantize(weight, blocksize, nested_code)
    return NF4Weight(
        codes=codes,
        absmax=absmax,
        nested_absmax=nested_absmax if double_quant else None,
        nested_code=nested_code,
        offset=offset if double_quant else None,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
    )


def nf4_dequantize(q: NF4Weight) -> torch.Tensor:
    """The weight of ``q`` in its original shape and dtype (``NF4[code] * absmax`` in fp32, then one cast)."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"nf4_dequantize: argument 'q' must be an NF4Weight, got {type(q).__name__}")
    out = torch.ops.peft_kernels.nf4_dequantize(
        q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, q.dtype
    )
    return out.reshape(q.shape)
