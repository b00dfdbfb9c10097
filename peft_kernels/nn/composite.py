"""Modules of the hybrid methods: :class:`MaskedLinear` (SparseAdapter's pruned projections, He et al. 2022) and
:class:`AdapterFusion` / :class:`FusedAdapters` (AdapterFusion, Pfeiffer et al. 2021)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .adapter import BottleneckAdapter, _NotMergeable


class MaskedLinear(nn.Module):
    """A Linear whose weight is pruned by a fixed 0/1 ``mask``: ``y = x (W ⊙ M)ᵀ + b``.

    Shapes: x [..., in_features] -> y [..., out_features]; ``weight`` [out, in] (nn.Linear's init, or
    N(0, ``init_std``²) when given), ``bias`` [out] (zeros when ``init_std`` is given), ``mask`` [out, in] buffer
    in the weight's dtype (ones until :meth:`prune_`; floating point so that it is saved with the adapter).

    The forward multiplies by the mask, so the gradient of a pruned weight is exactly zero; :meth:`prune_` also
    zeroes the pruned weights, and an optimizer that moves a weight only by its gradient and by decay proportional
    to it (SGD, Adam, AdamW) leaves them exactly zero through training.
    """

    def __init__(self, in_features: int, out_features: int, init_std: float | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory))
        self.register_buffer("mask", torch.ones(out_features, in_features, **factory))
        if init_std is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            nn.init.normal_(self.weight, std=init_std)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    @torch.no_grad()
    def prune_(self, keep: torch.Tensor) -> None:
        """Set the mask to ``keep`` (bool [out, in]) and zero the pruned weights."""
        if keep.shape != self.weight.shape or keep.dtype != torch.bool:
            raise ValueError(f"MaskedLinear.prune_: argument 'keep' must be a bool tensor of shape "
                             f"{list(self.weight.shape)}, got {keep.dtype} {list(keep.shape)}")
        self.mask.copy_(keep)
        self.weight.mul_(self.mask)

    def extra_repr(self) -> str:
        kept = int(self.mask.count_nonzero()) if self.mask.device.type != "meta" else "?"
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={kept}/{self.mask.numel()}"


class AdapterFusion(nn.Module):
    """AdapterFusion's attention over N adapter outputs at one placement (Pfeiffer et al. 2021, eq. 1):
    ``q = h Q``, ``k_n = z_n K``, ``v_n = z_n V``, ``s = softmax_n(q · k_n)``, ``out = Σ_n s_n v_n``.

    Shapes: h [..., d] (the sublayer output, the adapters' input), z [..., N, d] (the adapters' outputs)
    -> [..., d]. ``query``, ``key``: nn.Linear(d, d) with nn.Linear's random init; ``value``: nn.Linear(d, d)
    initialised to the identity (weight I, bias 0), so with one adapter the output is exactly that adapter's.
    """

    def __init__(self, d: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d = d
        self.query = nn.Linear(d, d, **factory)
        self.key = nn.Linear(d, d, **factory)
        self.value = nn.Linear(d, d, **factory)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(d, **factory))
            self.value.bias.zero_()

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        scores = (self.key(z) @ self.query(h).unsqueeze(-1)).squeeze(-1)  # [..., N]
        weights = torch.softmax(scores, dim=-1)
        return (weights.unsqueeze(-2) @ self.value(z)).squeeze(-2)  # [..., 1, N] @ [..., N, d]


class FusedAdapters(_NotMergeable, nn.Module):
    """Sequential placement of several frozen task adapters fused by :class:`AdapterFusion`:
    ``h = base(x)``, ``z_n = h + f_n(h)`` (each adapter's output, as :class:`SequentialAdapter` computes it),
    ``y = fusion(h, [z_1 … z_N])``. x [..., *] -> y [..., d]."""

    def __init__(self, base: nn.Module, adapters: list[BottleneckAdapter], fusion: AdapterFusion):
        super().__init__()
        if not adapters:
            raise ValueError("FusedAdapters: argument 'adapters' must be a non-empty list of BottleneckAdapter")
        self.base, self.adapters, self.fusion = base, nn.ModuleList(adapters), fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        z = torch.stack([h + adapter(h) for adapter in self.adapters], dim=-2)
        return self.fusion(h, z)
