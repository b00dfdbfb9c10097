"""Pure-PyTorch references of every op, written for clarity, not speed. Tests compare the kernels (CPU,
CUDA and the CUDA sources run by the CPU executor) with these; benchmarks use them as the baseline.

NF4 semantics follow bitsandbytes 0.50 exactly (python_tests/test_nf4.py checks bytes against it):

* Quantize a block: ``absmax = max|w|``; ``s = clamp(w * (1 / max(absmax, 1e-38)), -1, 1)`` in fp32; the
  code is the number of NF4 midpoints strictly below ``s`` — a value exactly on a midpoint takes the lower
  code (``torch.bucketize(right=False)``).
* Double quantization: ``offset = absmax.mean()``; ``absmax - offset`` in blocks of 256 is scaled by the
  reciprocal of the block's max magnitude, snapped to a 65536-step grid over [-1, 1], and mapped to the
  entry of the 256-entry dynamic map nearest to the grid point (ties to the lower entry) — what
  bitsandbytes' CPU kernel computes through its lookup table.
* Dequantize: ``NF4[q] * absmax`` in fp32, then one round-to-nearest-even cast; a double-quantized absmax is
  ``dynamic[q8] * nested_absmax + offset``, each operation rounded to fp32.
"""

from __future__ import annotations

import math

import torch

# The 16 NF4 levels as fp32, in bitsandbytes' order (sorted).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NESTED_BLOCKSIZE = 256


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 levels, fp32 [16]."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def nf4_quantize(
    weight: torch.Tensor, blocksize: int, nested_code: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``torch.ops.peft_kernels.nf4_quantize`` (same outputs, bit for bit)."""
    code = nf4_code(weight.device)
    w = weight.reshape(-1, blocksize).float()
    absmax = w.abs().amax(dim=1)
    scaled = (w * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    q = torch.bucketize(scaled.reshape(-1), (code[:-1] + code[1:]) / 2).to(torch.uint8)
    codes = (q[0::2] << 4) | q[1::2]
    if nested_code is None:
        return codes, absmax, absmax.new_empty(0), absmax.new_zeros(())
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return codes, qabsmax, nested_absmax, offset


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of fp32 ``x`` [n] with a sorted 256-entry ``code``, as bitsandbytes'
    CPU kernel does it: scale by 1/absmax, snap to a 65536-step grid over [-1, 1], take the code entry
    nearest to the grid point (exact ties to the lower entry).

    Returns (q uint8 [n], absmax fp32 [ceil(n / blocksize)]); the last block may be partial.
    """
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, nblocks * blocksize - n))
    absmax = padded.reshape(nblocks, blocksize).abs().amax(dim=1)
    scaled = x * (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(blocksize)[:n]
    step = (((scaled.clamp(-1, 1) + 1) * 0.5) * 65535 + 0.5).floor()
    grid = step / 65535 * 2 - 1
    lo = (torch.searchsorted(code, grid, right=True) - 1).clamp(0, 255)
    hi = (lo + 1).clamp(max=255)
    closer_hi = (code[hi] - grid).abs() < (grid - code[lo]).abs()
    return torch.where(closer_hi & (lo < 255), hi, lo).to(torch.uint8), absmax


def nf4_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference of ``torch.ops.peft_kernels.nf4_dequantize``: [2 * codes.numel()] of ``dtype``."""
    if nested_absmax is not None:
        scale8 = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: absmax.numel()]
        absmax = nested_code[absmax.long()] * scale8 + offset
    q = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1).long()
    values = nf4_code(codes.device)[q].reshape(-1, blocksize) * absmax[:, None]
    return values.reshape(-1).to(dtype)


def nf4_linear(x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``peft_kernels.ops.nf4_linear``: ``x W^T + b`` with W the NF4Weight ``q`` dequantized
    exactly (fp32 values) and then cast to x's dtype. x [..., in], q of shape [out, in] -> [..., out]."""
    w = nf4_dequantize(q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, torch.float32)
    return torch.nn.functional.linear(x, w.reshape(q.shape).to(x.dtype), bias)


# ---- Philox4x32-10 and dropout (csrc/include/peft_kernels/philox.h) ------------------------------------------
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * m for int64 ``a`` < 2**32, by 16-bit limbs (int64 has no unsigned wrap)."""
    al, ah = a & 0xFFFF, a >> 16
    ml, mh = m & 0xFFFF, m >> 16
    ll, lh, hl, hh = al * ml, al * mh, ah * ml, ah * mh
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    return (hh + (lh >> 16) + (hl >> 16) + (mid >> 16)) & _U32, ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)


def _philox_words(seed: int, group: torch.Tensor, stream: int) -> list[torch.Tensor]:
    """The four 32-bit words (as int64) of Philox4x32-10 with counter ``(group, stream)`` and key ``seed`` (each
    split into 32-bit halves, low first)."""
    c0, c1 = group & _U32, group >> 32
    c2, c3 = torch.full_like(group, stream & _U32), torch.full_like(group, (stream >> 32) & _U32)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _PHILOX_MUL[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_WEYL[0]) & _U32, (k1 + _PHILOX_WEYL[1]) & _U32
    return [c0, c1, c2, c3]


def _pick(words: list[torch.Tensor], which: torch.Tensor) -> torch.Tensor:
    return torch.stack(words, dim=-1).gather(-1, which.unsqueeze(-1)).squeeze(-1)


def philox_draws(seed: int, index: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """The 32-bit draw (as int64) of each flat element index (Child-Tuning_F's mask): word ``index & 3`` of
    group ``index >> 2`` of ``stream``."""
    return _pick(_philox_words(seed, index >> 2, stream), index & 3)


def dropout_draws(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The 16-bit dropout draw (as int64) of each flat element index: half ``index & 1`` (low first) of word
    ``(index >> 1) & 3`` of group ``index >> 3`` of stream 0."""
    word = _pick(_philox_words(seed, index >> 3, 0), (index >> 1) & 3)
    return (word >> (16 * (index & 1))) & 0xFFFF


def dropout_keep(shape: torch.Size, p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask of the elements dropout keeps, for a tensor of ``shape`` indexed flat in row-major order: the
    draw is at least ``round(p * 2**16)`` (half up, at most 65535), so P(drop) is p to within 2**-17."""
    threshold = min(math.floor(p * 65536 + 0.5), 0xFFFF)
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device).reshape(shape)
    return dropout_draws(seed, index) >= threshold


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Reference of ``peft_kernels.ops.lora_linear`` (differentiable through autograd):
    ``x W^T + b + scaling * (dropout(x) A^T) B^T`` with the Philox mask of ``seed``.
    x [..., in], weight [out, in], bias [out] or None, lora_A [r, in], lora_B [out, r] -> [..., out]."""
    xd = x
    if dropout_p > 0:
        xd = x * dropout_keep(x.shape, dropout_p, seed, x.device) / (1 - dropout_p)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A), lora_B)
    return torch.nn.functional.linear(x, weight, bias) + scaling * lora


def qlora_linear(x, q, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0):
    """Reference of ``peft_kernels.ops.qlora_linear``: :func:`lora_linear` over the exactly dequantized
    NF4Weight ``q`` (fp32 values cast to x's dtype)."""
    w = nf4_dequantize(q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, torch.float32)
    return lora_linear(x, w.reshape(q.shape).to(x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)

def kron_linear(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float = 1.0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Reference of ``peft_kernels.ops.kron_linear`` (differentiable through autograd), by materializing
    ``torch.kron(A, B)`` [a_out * b_out, a_in * b_in]: ``x W^T + b + scaling * dropout(x) kron(A, B)^T`` with the
    Philox mask of ``seed``. x [..., in], A [a_out, a_in], B [b_out, b_in] -> [..., out]."""
    xd = x
    if dropout_p > 0:
        xd = x * dropout_keep(x.shape, dropout_p, seed, x.device) / (1 - dropout_p)
    # Fresh row-major copies: torch.kron (2.14) raises a view error on a transposed [n, 1] factor, which
    # .contiguous() returns as is (a size-1 dimension's stride does not count).
    a, b = (t.clone(memory_format=torch.contiguous_format) for t in (A, B))
    y = scaling * torch.nn.functional.linear(xd, torch.kron(a, b))
    if weight is not None:
        y = y + torch.nn.functional.linear(x, weight)
    return y if bias is None else y + bias


# ---- sparse optimizer steps (csrc/include/peft_kernels/masked_adamw.h) ---------------------------------------
def child_keep(seed: int, step: int, index: torch.Tensor, p: float) -> torch.Tensor:
    """Child-Tuning_F's Bernoulli(p) gradient mask at flat element ``index`` of step ``step``: the Philox draw
    of stream ``step`` is at least the drop threshold of 1 - p. All True for p = 1."""
    if p == 1.0:
        return torch.ones_like(index, dtype=torch.bool)
    return philox_draws(seed, index, step) >= min(int((1.0 - p) * 2**32), _U32)


def _masked_dense(param, grad, indices, master, child_p, seed, step):
    """Dense views of a masked step: (bool mask over param, fp32 working copy of param, fp32 masked grad)."""
    flat = param.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=param.device)
    mask[indices.long()] = True
    dense_grad = torch.zeros(flat.numel(), dtype=torch.float32, device=param.device)
    g = grad.reshape(-1)
    dense_grad[indices.long()] = (g[indices.long()] if g.numel() == flat.numel() else g).float()
    keep = child_keep(seed, step, torch.arange(flat.numel(), device=param.device), child_p)
    dense_grad *= torch.where(keep, torch.tensor(1.0 / child_p, dtype=torch.float32), torch.tensor(0.0))
    work = flat.float().clone()
    if master is not None:
        work[indices.long()] = master
    return mask, work, dense_grad


def _write_back(param, mask, work, indices, master):
    flat = param.view(-1)
    flat.copy_(torch.where(mask, work.to(param.dtype), flat))
    if master is not None:
        master.copy_(work[indices.long()])


def _adamw_(p, m, v, g, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """torch's single-tensor AdamW on fp32 tensors p, m, v with gradient g, in place."""
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # The root in fp64, rounded once: torch's fp32 CPU sqrt is not correctly rounded (it differs by an ulp for
    # ~20% of values on AVX-512), the kernels' sqrtf is, on every backend. The divisor is a tensor: torch's CUDA
    # division by a Python scalar multiplies by its reciprocal instead.
    bc2_sqrt = torch.tensor(math.sqrt(1 - beta2**step), dtype=torch.float32, device=v.device)
    denom = (v.double().sqrt().float() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / (1 - beta1**step)))


def masked_adamw_step_(param, grad, indices, exp_avg, exp_avg_sq, master, step, lr, beta1, beta2, eps, weight_decay,
                       child_p=1.0, seed=0) -> None:
    """Reference of ``torch.ops.peft_kernels.masked_adamw_step_``: torch's single-tensor AdamW over the whole
    parameter with the gradient multiplied by the mask (and Child-Tuning_F's Bernoulli mask), state scattered
    to dense tensors; then only the masked entries of param (and the state) are written back."""
    mask, p, g = _masked_dense(param, grad, indices, master, child_p, seed, step)
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    m[indices.long()], v[indices.long()] = exp_avg, exp_avg_sq
    _adamw_(p, m, v, g, step, lr, beta1, beta2, eps, weight_decay)
    _write_back(param, mask, p, indices, master)
    exp_avg.copy_(m[indices.long()])
    exp_avg_sq.copy_(v[indices.long()])


def masked_sgd_step_(param, grad, indices, momentum_buffer, master, step, lr, momentum, weight_decay, child_p=1.0,
                     seed=0) -> None:
    """Reference of ``torch.ops.peft_kernels.masked_sgd_step_``: torch's single-tensor SGD (no dampening, no
    Nesterov) over the whole parameter with the masked gradient; only the masked entries are written back."""
    mask, p, g = _masked_dense(param, grad, indices, master, child_p, seed, step)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if momentum != 0:
        buf = torch.zeros_like(p)
        buf[indices.long()] = momentum_buffer
        buf = g.clone() if step == 1 else buf.mul_(momentum).add_(g)
        momentum_buffer.copy_(buf[indices.long()])
        g = buf
    p.add_(g, alpha=-lr)
    _write_back(param, mask, p, indices, master)


# ---- 8-bit AdamW (csrc/include/peft_kernels/adamw8bit.h) -------------------------------------------------------
ADAMW8BIT_BLOCK = 256


def _nearest_entry(code: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Index of the entry of the sorted ``code`` nearest to each value of ``s`` (a tie keeps the lower entry)."""
    lo = (torch.searchsorted(code, s, right=True) - 1).clamp(0, code.numel() - 1)
    hi = (lo + 1).clamp(max=code.numel() - 1)
    closer_hi = (code[hi] - s).abs() < (s - code[lo]).abs()
    return torch.where(closer_hi & (lo < code.numel() - 1), hi, lo).to(torch.uint8)


def adamw8bit_step_(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_map, unsigned_map,
                    step, lr, beta1, beta2, eps, weight_decay, block: int = ADAMW8BIT_BLOCK) -> None:
    """Reference of ``torch.ops.peft_kernels.adamw8bit_step_``: decode both moments (``map[code] * absmax`` of
    their block of ``block`` elements), torch's single-tensor AdamW in fp32, then re-encode the new moments with
    their blocks' new absmax (entry nearest to ``moment * (1 / absmax)``, clamped to [-1, 1]). ``block`` other
    than 256 serves the block-size study only (the op's block is 256)."""
    n = param.numel()
    nblocks = -(-n // block)

    def per_element(absmax):
        return absmax.repeat_interleave(block)[:n]

    m = signed_map[exp_avg.long()] * per_element(exp_avg_absmax)
    v = unsigned_map[exp_avg_sq.long()] * per_element(exp_avg_sq_absmax)
    p = param.detach().reshape(-1).float().clone()
    _adamw_(p, m, v, grad.reshape(-1).float(), step, lr, beta1, beta2, eps, weight_decay)
    param.view(-1).copy_(p.to(param.dtype))
    for moment, codes, absmax, code in ((m, exp_avg, exp_avg_absmax, signed_map), (v, exp_avg_sq, exp_avg_sq_absmax,
                                                                                     unsigned_map)):
        padded = torch.nn.functional.pad(moment, (0, nblocks * block - n))
        absmax.copy_(padded.reshape(nblocks, block).abs().amax(dim=1))
        scaled = (moment * per_element(1.0 / absmax.clamp(min=1e-38))).clamp(-1, 1)
        codes.copy_(_nearest_entry(code, scaled))
