"""KronALinear: a frozen nn.Linear plus a Kronecker-product update A ⊗ B (KronA), computed by one op call that
never forms A ⊗ B."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into (m, n) with m * n = dim, the rule of HF PEFT's LoKr (``decompose_factor``), so that our
    default shapes and PEFT's agree: ``factor`` > 0 dividing ``dim`` gives (factor, dim // factor); otherwise
    m is the largest divisor of ``dim`` that is <= sqrt(dim) (and <= ``factor`` when ``factor`` > 0)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = math.isqrt(dim) if factor <= 0 else min(math.isqrt(dim), factor)
    m = max(d for d in range(1, limit + 1) if dim % d == 0)
    return m, dim // m


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factor_shapes(
    in_features: int,
    out_features: int,
    a_shape: tuple[int, int] | None = None,
    b_shape: tuple[int, int] | None = None,
    decompose_factor: int = -1,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The factor shapes A (a_out, a_in), B (b_out, b_in) with a_out * b_out = out_features and
    a_in * b_in = in_features. Given neither, A takes the smaller factor of each side (:func:`factorize`, as PEFT's
    LoKr ``lokr_w1``); given one, the other follows; given both, they must multiply out. Raises ValueError listing
    the valid choices otherwise."""
    def valid() -> str:
        return (f"a_out * b_out must be out_features={out_features} (a_out in {_divisors(out_features)}) and "
                f"a_in * b_in must be in_features={in_features} (a_in in {_divisors(in_features)})")

    for name, shape in (("a_shape", a_shape), ("b_shape", b_shape)):
        if shape is not None and (len(tuple(shape)) != 2 or not all(isinstance(s, int) and s >= 1 for s in shape)):
            raise ValueError(f"KronALinear: argument '{name}' must be a pair of ints >= 1, got {shape!r}")
    if a_shape is None and b_shape is None:
        (a_out, b_out), (a_in, b_in) = factorize(out_features, decompose_factor), factorize(in_features, decompose_factor)
        if (1 in (a_in, b_in) and in_features > 1) or (1 in (a_out, b_out) and out_features > 1):
            raise ValueError(f"KronALinear: cannot factor in_features={in_features} x out_features={out_features} "
                             f"into two factors > 1 on each side (a prime dimension); pass a_shape or b_shape: {valid()}")
        return (a_out, a_in), (b_out, b_in)
    if a_shape is None:
        b_out, b_in = b_shape
        if out_features % b_out or in_features % b_in:
            raise ValueError(f"KronALinear: b_shape {tuple(b_shape)} does not divide the layer "
                             f"({out_features} x {in_features}): {valid()}")
        return (out_features // b_out, in_features // b_in), tuple(b_shape)
    a_out, a_in = a_shape
    if out_features % a_out or in_features % a_in:
        raise ValueError(f"KronALinear: a_shape {tuple(a_shape)} does not divide the layer "
                         f"({out_features} x {in_features}): {valid()}")
    derived = (out_features // a_out, in_features // a_in)
    if b_shape is not None and tuple(b_shape) != derived:
        raise ValueError(f"KronALinear: a_shape {tuple(a_shape)} and b_shape {tuple(b_shape)} do not multiply to the "
                         f"layer ({out_features} x {in_features}); with this a_shape, b_shape must be {derived}: {valid()}")
    return tuple(a_shape), derived


class KronALinear(nn.Module):
    """``y = x W^T + b + scaling * dropout(x) (A ⊗ B)^T`` with W (and b) frozen: KronA_B, in parallel with the
    frozen layer. With ``residual=True`` (KronA^B_res; needs in_features == out_features) a learnable scalar
    ``res_scale`` adds ``res_scale * x``, starting at 0.

    Shapes: x [..., in_features] -> y [..., out_features]; ``A`` [a_out, a_in] (zeros, so a fresh layer computes
    exactly the base Linear, as PEFT's LoKr ``lokr_w1``), ``B`` [b_out, b_in] (Kaiming-uniform, a = sqrt(5), as
    ``lokr_w2``), a_out * b_out = out_features, a_in * b_in = in_features (see :func:`factor_shapes`).

    Dropout (training mode only) draws one Philox seed per forward; backward regenerates the mask from it, so
    no mask is stored. Saved for backward: x only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        a_shape: tuple[int, int] | None = None,
        b_shape: tuple[int, int] | None = None,
        scaling: float = 1.0,
        dropout: float = 0.0,
        bias: bool = True,
        residual: bool = False,
        decompose_factor: int = -1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"KronALinear: argument 'dropout' must be in [0, 1), got {dropout!r}")
        if residual and in_features != out_features:
            raise ValueError(f"KronALinear: residual=True adds res_scale * x, so in_features must equal out_features, "
                             f"got {in_features} -> {out_features}")
        self.a_shape, self.b_shape = factor_shapes(in_features, out_features, a_shape, b_shape, decompose_factor)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.scaling, self.dropout, self.residual = scaling, dropout, residual
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.A = nn.Parameter(torch.empty(self.a_shape, **factory))
        self.B = nn.Parameter(torch.empty(self.b_shape, **factory))
        self.res_scale = nn.Parameter(torch.zeros((), **factory)) if residual else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.reset_kron_parameters()
        self.merged = False

    def reset_kron_parameters(self) -> None:
        nn.init.zeros_(self.A)
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        if self.res_scale is not None:
            nn.init.zeros_(self.res_scale)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        a_shape: tuple[int, int] | None = None,
        b_shape: tuple[int, int] | None = None,
        scaling: float = 1.0,
        dropout: float = 0.0,
        residual: bool = False,
        decompose_factor: int = -1,
    ) -> KronALinear:
        """Wrap ``linear`` without copying its weight: the new module's ``weight``/``bias`` are the same tensors,
        frozen. The factors get ``linear``'s dtype and device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"KronALinear.from_linear: argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, a_shape, b_shape, scaling, dropout,
                         linear.bias is not None, residual, decompose_factor)
        module.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        module.A = nn.Parameter(torch.empty(module.a_shape, **factory))
        module.B = nn.Parameter(torch.empty(module.b_shape, **factory))
        module.res_scale = nn.Parameter(torch.zeros((), **factory)) if residual else None
        module.reset_kron_parameters()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        p = self.dropout if self.training else 0.0
        y = ops.kron_linear(x, self.A, self.B, self.scaling, self.weight, self.bias, p)
        return y if self.res_scale is None else y + self.res_scale * x

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * (A ⊗ B) (+ res_scale * I) in fp32 [out, in]: merging is the one place the product is formed."""
        delta = torch.kron(self.A.float(), self.B.float()) * self.scaling
        if self.res_scale is not None:
            delta.diagonal().add_(self.res_scale.float())
        return delta

    @torch.no_grad()
    def merge(self) -> None:
        """W += delta_weight() in place (fp32, rounded once to W's dtype); forward becomes the plain Linear."""
        if self.merged:
            raise RuntimeError("KronALinear.merge: already merged")
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= delta_weight(): restores W to within one rounding of its dtype."""
        if not self.merged:
            raise RuntimeError("KronALinear.unmerge: not merged")
        self.weight.copy_(self.weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, A={list(self.a_shape)}, "
                f"B={list(self.b_shape)}, scaling={self.scaling}, dropout={self.dropout}, residual={self.residual}, "
                f"bias={self.bias is not None}, merged={self.merged}")
