"""NF4Linear and QLoRALinear: a frozen 4-bit (NF4, bitsandbytes layout) base weight, alone or with a LoRA
adapter, each computed by one op call (``nf4_linear`` / ``qlora_linear``)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..nf4 import NF4Weight

# The buffers of a packed weight, named as NF4Weight's fields.
_PARTS = ("codes", "absmax", "nested_absmax", "nested_code", "offset")


class NF4Linear(nn.Module):
    """``y = x W^T + b`` with W stored as NF4 (4.127 bits per weight at blocksize 64 with double quantization).

    Shapes: x [..., in_features] -> y [..., out_features]. x (any floating dtype; an integer one is a
    TypeError) is cast to ``compute_dtype`` for the product and y is returned in x's dtype (as bitsandbytes'
    Linear4bit). ``torch.autocast`` does not change this: ``compute_dtype`` is the layer's own precision, so
    under bf16 autocast an fp32 x still gives an fp32 y. The packed weight lives in buffers (``codes``
    uint8 [out*in/2], ``absmax``, ``nested_absmax``, ``nested_code``, ``offset``), so ``state_dict()`` and
    ``.to(device)`` carry it; ``bias`` is a frozen parameter in ``compute_dtype``. No full-precision copy of W
    is kept: up to 16 rows per call stream the packed weight (GEMV), more decode it tile by tile into a
    workspace of at most 32 MiB.

    ``quant_storage`` (as bitsandbytes' option of that name), for FSDP: with a float dtype (bf16, fp16, fp32)
    the packed ``codes`` (97 % of the bytes at blocksize 64) become a frozen *parameter* of that dtype, a view of
    the same bytes (always whole elements: out*in is a multiple of the blocksize, >= 32), so ``fully_shard`` shards them like every other weight
    (each of N ranks holds 1/N of the 4-bit base) and all-gathers them for the forward, where they are viewed
    back as uint8. The scales stay (small, replicated) buffers. Under an FSDP ``MixedPrecisionPolicy`` whose
    ``param_dtype`` differs from ``quant_storage``, FSDP would *cast* the codes and destroy them: use the
    policy's dtype (as bitsandbytes requires). The default, uint8, keeps ``codes`` a buffer (replicated by
    FSDP, skipped by DDP's gradient sync).
    """

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16,
                 quant_storage: torch.dtype = torch.uint8):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"{type(self).__name__}: the NF4 weight must be 2-D [out, in], got shape {list(q.shape)}")
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{type(self).__name__}: argument 'compute_dtype' must be torch.float32, torch.float16 or "
                            f"torch.bfloat16, got {compute_dtype}")
        self.out_features, self.in_features = q.shape
        if quant_storage not in (torch.uint8, torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"{type(self).__name__}: argument 'quant_storage' must be torch.uint8, torch.bfloat16, "
                            f"torch.float16 or torch.float32, got {quant_storage}")
        self.blocksize, self.weight_dtype, self.compute_dtype = q.blocksize, q.dtype, compute_dtype
        for name in _PARTS[1:]:
            self.register_buffer(name, getattr(q, name))
        if quant_storage == torch.uint8:
            self.register_buffer("codes", q.codes)
        else:
            self.codes = nn.Parameter(q.codes.view(quant_storage), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, **kwargs):
        """Quantize ``linear``'s weight (bit-identical to bitsandbytes' quantize_4bit) on its device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        q = ops.nf4_quantize(linear.weight.detach(), blocksize, double_quant)
        return cls(q, linear.bias, compute_dtype, **kwargs)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16, **kwargs):
        """Wrap a bitsandbytes NF4 weight (a ``Linear4bit``'s ``weight`` data and its ``QuantState`` or state-dict
        form) without re-quantizing."""
        return cls(NF4Weight.from_bnb(packed, quant_state), bias, compute_dtype, **kwargs)

    @property
    def quantized(self) -> NF4Weight:
        """The packed weight as an :class:`NF4Weight` (views of this module's buffers)."""
        parts = {name: getattr(self, name) for name in _PARTS}
        parts["codes"] = parts["codes"].view(torch.uint8)  # a no-op unless quant_storage is a float dtype
        return NF4Weight(**parts, shape=torch.Size([self.out_features, self.in_features]),
                         dtype=self.weight_dtype, blocksize=self.blocksize)

    def to_bnb(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(packed uint8 [numel/2, 1], QuantState dict) in bitsandbytes' format."""
        return self.quantized.to_bnb()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] in ``dtype`` (default: the original weight's dtype)."""
        w = ops.nf4_dequantize(self.quantized)
        return w if dtype is None else w.to(dtype)

    @property
    def weight_nbytes(self) -> int:
        return self.quantized.nbytes

    def _base_input(self, x: torch.Tensor) -> torch.Tensor:
        # Any float input is cast to compute_dtype (as Linear4bit does); an integer one (token ids passed by
        # mistake) would be cast too and give a meaningless result, so it is refused as nn.Linear refuses it.
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: input 'x' must be a floating-point tensor, got {x.dtype}")
        return x if x.dtype == self.compute_dtype else x.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.nf4_linear(self._base_input(x), self.quantized, self.bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.nested_absmax is not None}, compute_dtype={self.compute_dtype}, "
                f"bias={self.bias is not None}")


class QLoRALinear(NF4Linear):
    """QLoRA: ``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with W frozen in NF4 (see :class:`NF4Linear`)
    and the adapter ``lora_A`` [r, in] (Kaiming-uniform, a = sqrt(5)), ``lora_B`` [out, r] (zeros) trainable,
    kept in ``adapter_dtype`` (fp32 by default, as HF PEFT keeps QLoRA adapters) and cast to ``compute_dtype``
    inside the step, with or without autocast (their gradients arrive in ``adapter_dtype``). One ``qlora_linear`` op call per forward; dropout as :class:`LoRALinear` (Philox mask
    regenerated in backward). Saved for backward: x and x A^T [..., r] (x only while lora_A trains).
    """

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.bfloat16,
                 r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8):
        super().__init__(q, bias, compute_dtype, quant_storage)
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"QLoRALinear: argument 'r' must be an int >= 1, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"QLoRALinear: argument 'dropout' must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        factory = {"device": q.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16, use_rslora: bool = False,
                    adapter_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8) -> QLoRALinear:
        """Quantize ``linear``'s weight to NF4 and add a fresh adapter (a new layer computes the quantized base)."""
        return super().from_linear(linear, blocksize, double_quant, compute_dtype, r=r, alpha=alpha, dropout=dropout,
                                   use_rslora=use_rslora, adapter_dtype=adapter_dtype, quant_storage=quant_storage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        cast = lambda t: t if t.dtype == self.compute_dtype else t.to(self.compute_dtype)  # noqa: E731
        y = ops.qlora_linear(self._base_input(x), self.quantized, self.bias, cast(self.lora_A), cast(self.lora_B),
                             self.scaling, p)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32 [out, in]."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge_to(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """A new 16-bit (or fp32) ``nn.Linear`` with W = dequant(W_nf4) + scaling B A, computed in fp32 and rounded
        once to ``dtype``: the adapter merged into the dequantized base, with no 4-bit rounding of the sum."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.codes.device,
                           dtype=dtype)
        linear.weight.copy_(self.dequantize(torch.float32) + self.delta_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}"


def requantize(linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
               compute_dtype: torch.dtype = torch.bfloat16) -> tuple[NF4Linear, float]:
    """Quantize a (merged) ``linear`` to NF4 explicitly; returns the module and the relative Frobenius error
    ||W - dequant(Q(W))|| / ||W|| it introduced, which users should check before shipping a re-quantized merge."""
    module = NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype)
    w = linear.weight.detach().float()
    err = (module.dequantize(torch.float32) - w).norm() / w.norm().clamp_min(torch.finfo(torch.float32).tiny)
    return module, err.item()
