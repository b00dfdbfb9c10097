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
    _check_q("nf4_dequantize", q, linear=False)
    out = torch.ops.peft_kernels.nf4_dequantize(
        q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, q.dtype
    )
    return out.reshape(q.shape)


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + b`` with W the 4-bit weight ``q`` (shape [out, in]), never dequantized as a whole:
    up to 16 rows of x stream the packed weight once (GEMV); more rows decode it tile by tile into a bounded
    workspace (32 MiB by default) feeding the BLAS. Differentiable in x and bias (W gets no gradient).

    Args:
        x: [..., in], fp32 / fp16 / bf16 (fp64 on the CPU), on q's device.
        q: an :class:`NF4Weight` of a 2-D weight [out, in].
        bias: [out] of x's dtype, or None.

    Returns:
        y [..., out] of x's dtype. Saved for backward: nothing but q's own tensors.
    """
    _check_q("nf4_linear", q, linear=True)
    return torch.ops.peft_kernels.nf4_linear(x, q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset,
                                             q.blocksize, q.shape[0], bias)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` in one op, differentiable in x, lora_A, lora_B and
    bias (never in the frozen ``weight``, which must have ``requires_grad=False``).

    Args:
        x: [..., in], fp32 / fp16 / bf16 (all tensors share its dtype and device).
        weight: [out, in] frozen base weight; bias: [out] or None.
        lora_A: [r, in]; lora_B: [out, r].
        scaling: the LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1).
        seed: keys the Philox dropout mask (an int or an int64 CPU tensor); None draws one from torch's
            default generator. Backward regenerates the same mask from it: no mask is stored.

    Returns:
        y [..., out]. Saved for backward: x (only when lora_A requires grad) and x A^T [..., r].
    """
    return torch.ops.peft_kernels.lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p,
                                                  _seed("lora_linear", seed, dropout_p))[0]


def _seed(op: str, seed: int | torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    if seed is None:
        if dropout_p > 0:
            return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)
        return torch.zeros((), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        return seed
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"{op}: argument 'seed' must be an int64 (in [-2**63, 2**63)), got {seed}")
    return torch.tensor(seed, dtype=torch.int64)


def _check_q(op: str, q: NF4Weight, linear: bool) -> None:
    """``q`` is an NF4Weight whose shape agrees with its codes (a hand-built one may not), 2-D for a linear op."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"{op}: argument 'q' must be an NF4Weight, got {type(q).__name__}")
    if linear and len(q.shape) != 2:
        raise ValueError(f"{op}: argument 'q' must hold a 2-D weight [out, in], got shape {list(q.shape)}")
    if isinstance(q.codes, torch.Tensor) and 2 * q.codes.numel() != q.numel():
        raise ValueError(f"{op}: argument 'q' has shape {list(q.shape)} ({q.numel()} elements) but holds "
                         f"{q.codes.numel()} bytes of codes ({2 * q.codes.numel()} elements)")


def qlora_linear(
    x: torch.Tensor,
    q: NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """QLoRA in one op: ``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with W the frozen 4-bit weight ``q``
    [out, in] (read as :func:`nf4_linear` reads it: no full-precision copy kept). Differentiable in x, lora_A,
    lora_B and bias.

    Args:
        x: [..., in], fp32 / fp16 / bf16; lora_A [r, in], lora_B [out, r] and bias [out] (or None) of x's dtype.
        q: an :class:`NF4Weight` of a 2-D weight [out, in], on x's device.
        scaling, dropout_p, seed: as :func:`lora_linear` (the same Philox mask, regenerated in backward).

    Returns:
        y [..., out]. Saved for backward: x (only when lora_A requires grad) and x A^T [..., r].
    """
    _check_q("qlora_linear", q, linear=True)
    return torch.ops.peft_kernels.qlora_linear_fwd(
        x, q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, q.shape[0], bias, lora_A, lora_B,
        scaling, dropout_p, _seed("qlora_linear", seed, dropout_p))[0]


def kron_linear(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float = 1.0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x W^T + b + scaling * dropout(x) (A ⊗ B)^T`` in one op, without forming ``A ⊗ B``; differentiable
    in x, A, B and bias (never in the frozen ``weight``, which must have ``requires_grad=False``). With
    ``weight`` and ``bias`` None it is the bare Kronecker product ``scaling * x (A ⊗ B)^T``.

    Args:
        x: [..., in] with in = a_in * b_in, fp32 / fp16 / bf16 (all tensors share its dtype and device).
        A: [a_out, a_in]; B: [b_out, b_in]. The output has out = a_out * b_out features.
        scaling: multiplies the Kronecker term.
        weight: [out, in] frozen base weight, or None; bias: [out] or None.
        dropout_p: dropout probability on the Kronecker branch's input, in [0, 1).
        seed: keys the Philox dropout mask (an int or an int64 CPU tensor); None draws one from torch's
            default generator. Backward regenerates the same mask from it: no mask is stored.

    Returns:
        y [..., out]. Saved for backward: x (only when A or B requires grad).
    """
    return torch.ops.peft_kernels.kron_linear_fwd(x, weight, bias, A, B, scaling, dropout_p, _seed("kron_linear", seed, dropout_p))


def masked_adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    master: torch.Tensor | None = None,
    child_p: float = 1.0,
    seed: int = 0,
) -> None:
    """One ``torch.optim.AdamW`` step on the k entries of ``param`` at ``indices``, in place; every other entry
    is left untouched (no weight decay, no momentum).

    Args:
        param: fp32, bf16 or fp16, any shape, contiguous; indexed flat.
        grad: param's dtype; dense (param's shape: only the k selected entries are read) or compact [k].
        indices: int64 or int32 [k], strictly increasing, in [0, param.numel()).
        exp_avg, exp_avg_sq: fp32 [k] optimizer state, updated in place.
        step: this update's 1-based count (bias correction; the Child-Tuning_F mask's Philox stream).
        master: fp32 [k] copy of the selected entries, required for bf16/fp16 params (updated there, then
            rounded to nearest into ``param``), None for fp32.
        child_p: Child-Tuning_F: each element's gradient is kept with probability ``child_p`` (Philox keyed by
            ``seed``, ``step`` and the flat element index; never stored) and scaled by 1/child_p. 1 = no mask.
    """
    torch.ops.peft_kernels.masked_adamw_step_(param, grad, indices, exp_avg, exp_avg_sq, master, step, lr, beta1, beta2,
                                              eps, weight_decay, child_p, seed)


def masked_sgd_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    indices: torch.Tensor,
    step: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    momentum_buffer: torch.Tensor | None = None,
    master: torch.Tensor | None = None,
    child_p: float = 1.0,
    seed: int = 0,
) -> None:
    """One ``torch.optim.SGD`` step (no dampening, no Nesterov) on the entries of ``param`` at ``indices``, in
    place. ``momentum_buffer``: fp32 [k] when ``momentum != 0`` (overwritten at step 1), else None. Other
    arguments as :func:`masked_adamw_step_`."""
    torch.ops.peft_kernels.masked_sgd_step_(param, grad, indices, momentum_buffer, master, step, lr, momentum,
                                            weight_decay, child_p, seed)


def adamw8bit_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    signed_map: torch.Tensor | None = None,
    unsigned_map: torch.Tensor | None = None,
) -> None:
    """One ``torch.optim.AdamW`` step of ``param`` with both moments stored in 8 bits, in place.

    Args:
        param: fp32, bf16 or fp16, any shape, contiguous, n elements.
        grad: param's dtype and number of elements, contiguous.
        exp_avg, exp_avg_sq: uint8 [n] codes of the first / second moment into ``signed_map`` /
            ``unsigned_map``; all-zero moments are the codes of 0.0 (127 and 0) with absmax 0.
        exp_avg_absmax, exp_avg_sq_absmax: fp32 [ceil(n / 256)], each block of 256 elements' scale.
        step: this update's 1-based count (bias correction).
        signed_map, unsigned_map: fp32 [256] sorted maps on param's device; default bitsandbytes' dynamic maps
            (:func:`peft_kernels.dynamic_map`).
    """
    if signed_map is None:
        signed_map = dynamic_map(param.device, signed=True)
    if unsigned_map is None:
        unsigned_map = dynamic_map(param.device, signed=False)
    torch.ops.peft_kernels.adamw8bit_step_(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax,
                                           signed_map, unsigned_map, step, lr, beta1, beta2, eps, weight_decay)
