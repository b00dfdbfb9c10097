"""UniPELT's gated modules (Mao et al. 2022): a learned gate ``g = sigmoid(x w + c)`` in (0, 1), computed from a
module's input by a Linear(d, 1), scales each submodule's contribution:

* :class:`GatedLoRALinear`: ``y = x Wᵀ + b + g(x) · s · (x Aᵀ) Bᵀ`` with one gate per token;
* :class:`GatedSequentialAdapter`: ``h + g(h) · adapter(h)`` after a projection, one gate per token;
* :class:`PrefixGate`: one gate per sequence that scales an attention layer's prefix values, set by
  :func:`gate_prefix_values`, a forward pre-hook on the attention module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .adapter import SequentialAdapter
from .lora import LoRALinear


class Gate(nn.Module):
    """``g = sigmoid(x w + c)``: x [..., d] -> g [..., 1] in (0, 1). ``weight`` [1, d] ~ N(0, 0.02²) and ``bias``
    [1] = 0, so a fresh gate is 0.5 ± (0.02 · |x|) (AdapterHub's UniPELT initialisation). Computed in x's dtype."""

    def __init__(self, d: int, device=None, dtype=None):
        super().__init__()
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ValueError(f"Gate: argument 'd' must be an int >= 1, got {d!r}")
        self.d = d
        self.weight = nn.Parameter(torch.empty(1, d, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype)))

    def extra_repr(self) -> str:
        return f"d={self.d}"


class GatedLoRALinear(LoRALinear):
    """LoRA with a per-token gate: ``y = x Wᵀ + b + g(x) · s · (dropout(x) Aᵀ) Bᵀ``, g = ``lora_gate(x)``.

    Shapes: x [..., in] -> y [..., out]; ``weight`` [out, in] and ``bias`` [out] (frozen, shared with the wrapped
    Linear), ``lora_A`` [r, in], ``lora_B`` [out, r] (zeros), ``lora_gate`` a :class:`Gate` over in features.

    Design. g is a scalar per row of x, and our fused op computes ``x Wᵀ + b + s (x Aᵀ) Bᵀ`` from one x, so the gate
    cannot enter the op (``op(g ⊙ x)`` would scale the base too). Forward computes ``y₁ = ops.lora_linear(x, W, b,
    A, B, s)`` (LoRALinear's forward, with its dtype/autocast rule and dropout) and ``y₀ = F.linear(x, W, b)``, and
    returns ``y₀ + g ⊙ (y₁ − y₀)``: exact up to rounding, the LoRA products still in our op. Cost: one extra
    [rows, in] x [in, out] GEMM forward and one backward (dx through y₀), i.e. the frozen Linear's work doubled, and
    y₁ − y₀ [..., out] saved for the gate's gradient. Rounding: y₁ − y₀ carries the rounding of y₁ and y₀ in the
    working dtype, about eps · |x Wᵀ + b| per entry (fp32: 6e-8 relative, bf16: 4e-3 relative: small LoRA updates
    lose relative precision in bf16). The alternatives cost the same GEMM: a second op call on a zero weight
    (exact, but an [out, in] zero tensor to hold) or the op on [x, g ⊙ x] against [W, 0] and [0, A].

    Not mergeable: the gate depends on the input.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, r, alpha, dropout, bias, use_rslora, device=device, dtype=dtype)
        self.lora_gate = Gate(in_features, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False) -> GatedLoRALinear:
        """Wrap ``linear`` (weights shared, frozen) with fresh LoRA factors and a fresh gate in its dtype/device."""
        module = super().from_linear(linear, r, alpha, dropout, use_rslora)
        module.lora_gate = Gate(linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapted = super().forward(x)
        # Under autocast F.linear casts x, W and b like the op did, so y₀ and y₁ share a dtype.
        base = F.linear(x, self.weight, self.bias)
        return base + self.lora_gate(x).to(adapted.dtype) * (adapted - base)

    def merge(self) -> None:
        raise NotImplementedError("GatedLoRALinear.merge: the LoRA branch is scaled by a gate computed from each "
                                  "input token, so it cannot be folded into the frozen weight")

    unmerge = merge


class GatedSequentialAdapter(SequentialAdapter):
    """``y = base(x); y + g(y) · adapter(y)`` with g = ``gate(y)`` [..., 1] per token (UniPELT's adapter gate on the
    adapter's input). ``base`` maps [..., *] -> [..., d]; ``adapter`` a :class:`BottleneckAdapter` of width d."""

    def __init__(self, base: nn.Module, adapter: nn.Module, gate: Gate):
        super().__init__(base, adapter)
        self.gate = gate

    @classmethod
    def from_adapter(cls, wrapper: SequentialAdapter) -> GatedSequentialAdapter:
        """The same base and adapter modules, plus a fresh gate of the adapter's width, dtype and device."""
        p = next(wrapper.adapter.parameters())
        return cls(wrapper.base, wrapper.adapter, Gate(wrapper.adapter.d, device=p.device, dtype=p.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.gate(y) * self.adapter(y)


class PrefixGate(Gate):
    """UniPELT's prefix gate for one attention layer: ``forward(h) -> [batch]``, the mean over the sequence of
    ``sigmoid(h w + c)`` for the attention input h [batch, n, d].

    One value per sequence because the prefix enters through the KV cache: its values are shared by every query,
    so scaling them by g scales the prefix's attention contribution ``Σ_{j∈prefix} a_ij v_j`` by g exactly (the
    softmax weights a_ij are unchanged), but a per-query gate has no such form. The mean counts padded positions
    too (as UniPELT's and AdapterHub's code). ``num_virtual_tokens`` (l) and ``cache_kwarg`` (the attention's
    cache argument) tell :func:`gate_prefix_values` where the prefixes are.
    """

    def __init__(self, d: int, num_virtual_tokens: int, cache_kwarg: str, device=None, dtype=None):
        super().__init__(d, device=device, dtype=dtype)
        self.num_virtual_tokens, self.cache_kwarg = num_virtual_tokens, cache_kwarg

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h).mean(dim=(-2, -1))

    def extra_repr(self) -> str:
        return f"d={self.d}, num_virtual_tokens={self.num_virtual_tokens}"


GATE_NAME = "peft_kernels_prefix_gate"


def gate_prefix_values(attention: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an attention module carrying a :class:`PrefixGate` as ``peft_kernels_prefix_gate``: when
    its layer of the cache holds only the l prefixes (the first forward over a sequence), multiply their values
    [batch, kv_heads, l, head_dim] by the gate of this call's hidden states. Later generation steps find the gated
    prefixes already in the cache (the gate of the prompt is kept)."""
    gate = getattr(attention, GATE_NAME)
    cache = kwargs.get(gate.cache_kwarg)
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    layer = layers[attention.layer_idx] if isinstance(layers, list) and attention.layer_idx < len(layers) else None
    if not isinstance(getattr(layer, "values", None), torch.Tensor) or not hasattr(layer, "get_seq_length"):
        raise TypeError(f"UniPELT prefix gate: the cache passed to layer {attention.layer_idx} must keep per-layer "
                        f"key/value tensors (a transformers DynamicCache), got {type(cache).__name__}")
    if layer.get_seq_length() != gate.num_virtual_tokens:
        return
    hidden = args[0] if args else kwargs["hidden_states"]
    g = gate(hidden).to(layer.values.dtype)
    layer.values = layer.values * g.view(-1, 1, 1, 1)
