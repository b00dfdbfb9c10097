"""LoRALinear: a frozen nn.Linear plus a low-rank update, computed by one fused op call."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


class LoRALinear(nn.Module):
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with W (and b) frozen.

    Shapes: x [..., in_features] -> y [..., out_features]; ``weight`` [out, in], ``bias`` [out] or None,
    ``lora_A`` [r, in] (Kaiming-uniform, a = sqrt(5), as HF PEFT), ``lora_B`` [out, r] (zeros), so a fresh
    layer computes exactly the base Linear. ``scaling`` = alpha / r, or alpha / sqrt(r) with ``use_rslora``.

    Dropout (training mode only) draws one Philox seed per forward from torch's default generator; backward
    regenerates the mask from it, so no mask is stored. Saved for backward: x and x A^T [..., r] (x only while
    ``lora_A`` is trainable: with it frozen, LoRA-FA, only x A^T is kept).

    Dtypes. The product runs in one dtype (the op's rule): outside autocast, ``weight``'s; x must have it (else
    TypeError) and adapters of another dtype (e.g. fp32 ``lora_A``/``lora_B`` over a bf16 base) are cast to it
    inside the step. Under ``torch.autocast`` (x's device type), as nn.Linear does: x, W, b, A and B are cast to
    the autocast dtype, y comes out in it, and the gradients of A and B reach them in their own dtype (fp32
    adapters get fp32 gradients). A merged layer is a plain ``F.linear`` and follows autocast the same way.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear: argument 'r' must be an int >= 1, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: argument 'dropout' must be in [0, 1), got {dropout!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r, self.alpha = in_features, out_features, r, alpha
        self.dropout, self.use_rslora = dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.reset_lora_parameters()
        self.merged = False

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False
    ) -> LoRALinear:
        """Wrap ``linear`` without copying its weight: the new module's ``weight``/``bias`` are the same
        tensors, frozen. Adapter weights get ``linear``'s dtype and device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, r, alpha, dropout, linear.bias is not None, use_rslora)
        module.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        module.lora_A = nn.Parameter(torch.empty(r, linear.in_features, **factory))
        module.lora_B = nn.Parameter(torch.empty(linear.out_features, r, **factory))
        module.reset_lora_parameters()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        p = self.dropout if self.training else 0.0
        weight, bias = self.weight, self.bias
        # is_autocast_enabled raises for device types autocast does not know (meta): ask availability first.
        if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        elif x.dtype != weight.dtype:
            raise TypeError(f"LoRALinear: input 'x' must have the layer's dtype {weight.dtype} (or run under "
                            f"torch.autocast), got {x.dtype}")
        lora_A, lora_B, scaling = self.adapter_factors()
        return ops.lora_linear(x, weight, bias, lora_A.to(x.dtype), lora_B.to(x.dtype), scaling, p)

    def adapter_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r', in], B [out, r'], scaling) that forward hands to ``ops.lora_linear``: here ``lora_A``,
        ``lora_B`` and ``scaling``; LoRA derivatives (DyLoRA, AdaLoRA) derive them from their own parameters."""
        return self.lora_A, self.lora_B, self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32 [out, in] (of :meth:`adapter_factors`)."""
        lora_A, lora_B, scaling = self.adapter_factors()
        return (lora_B.float() @ lora_A.float()) * scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling * B A in place (computed in fp32, rounded once to W's dtype); forward becomes the plain
        Linear. Raises if already merged."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling * B A: restores W to within one rounding of its dtype. Raises if not merged."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self.weight.copy_(self.weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, merged={self.merged}")


def enable_delta_lora(optimizer: torch.optim.Optimizer, modules: list[LoRALinear], update_ratio: float = 1.0):
    """Delta-LoRA (Zi et al., 2023): after every optimizer step, add ``update_ratio`` times the change of
    scaling * B A to each module's frozen W (in place, fp32 delta rounded once to W's dtype), so the base
    weight follows the adapter. Returns the hook handles (call ``.remove()`` on them to stop).

    Costs one [out, in] fp32 product per module before and after each step; no extra state is kept between
    steps beyond the product computed before the step.
    """
    if not modules or not all(isinstance(m, LoRALinear) for m in modules):
        raise TypeError("enable_delta_lora: argument 'modules' must be a non-empty list of LoRALinear")
    before: list[torch.Tensor] = []

    def pre_step(opt, args, kwargs):
        before[:] = [m.delta_weight() for m in modules]

    @torch.no_grad()
    def post_step(opt, args, kwargs):
        for module, old in zip(modules, before):
            module.weight.copy_(module.weight.float() + update_ratio * (module.delta_weight() - old))
        before.clear()

    return optimizer.register_step_pre_hook(pre_step), optimizer.register_step_post_hook(post_step)
