"""Adapter modules: the bottleneck adapter (Houlsby et al. 2019; parallel form He et al. 2022; Compacter's PHM
projections plug in as its down/up modules), the wrappers that put one after or beside a sublayer, (IA)³
(Liu et al. 2022) and the Hadamard adapter (Chen et al. 2023) as Linear wrappers that fold into the weight."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

from .compacter import PHMLinear

NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


class BottleneckAdapter(nn.Module):
    """``f(h) = scaling * up(act(down(h)))``: h [..., d] -> [..., d] through a bottleneck of width m.

    ``down`` (d -> m) and ``up`` (m -> d) are any modules mapping the last dimension (nn.Linear by default,
    :class:`PHMLinear` for Compacter); a default ``up`` is zero-initialised (weight and bias), so a fresh
    adapter outputs zeros and the wrappers below start as the identity on the model. A passed ``up`` must
    already be zero-initialised by the caller (see :func:`zero_`).
    """

    def __init__(self, d: int, m: int, non_linearity: str = "relu", scaling: float = 1.0,
                 down: nn.Module | None = None, up: nn.Module | None = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("d", d), ("m", m)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BottleneckAdapter: argument '{name}' must be an int >= 1, got {value!r}")
        if non_linearity not in NON_LINEARITIES:
            raise ValueError(f"BottleneckAdapter: argument 'non_linearity' must be one of {sorted(NON_LINEARITIES)}, "
                             f"got {non_linearity!r}")
        if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
            raise ValueError(f"BottleneckAdapter: argument 'scaling' must be a number, got {scaling!r}")
        factory = {"device": device, "dtype": dtype}
        self.d, self.m, self.non_linearity, self.scaling = d, m, non_linearity, float(scaling)
        self.down = nn.Linear(d, m, **factory) if down is None else down
        if up is None:
            up = zero_(nn.Linear(m, d, **factory))
        self.up = up

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.up(NON_LINEARITIES[self.non_linearity](self.down(h)))

    def extra_repr(self) -> str:
        return f"d={self.d}, m={self.m}, non_linearity={self.non_linearity}, scaling={self.scaling}"


@torch.no_grad()
def zero_(module: nn.Module) -> nn.Module:
    """Make an up projection output zeros: nn.Linear's weight and bias; PHMLinear's B (or, low-rank, its left
    factor s, so t keeps its random init and s gets a non-zero gradient at the first step) and bias."""
    if isinstance(module, PHMLinear):
        (module.B if module.rank is None else module.s).zero_()
    elif isinstance(module, nn.Linear):
        module.weight.zero_()
    else:
        raise TypeError(f"zero_: argument 'module' must be an nn.Linear or a PHMLinear, got {type(module).__name__}")
    if module.bias is not None:
        module.bias.zero_()
    return module


class _NotMergeable:
    def merge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__}.merge: a bottleneck adapter applies a non-linearity between "
                                  "its down and up projections, so it cannot be folded into the frozen weights; keep "
                                  "the adapter in the forward")

    unmerge = merge


class SequentialAdapter(_NotMergeable, nn.Module):
    """Houlsby-style: ``y = base(x); y + adapter(y)``. ``base`` maps [..., *] -> [..., d] (a projection whose
    output goes to a residual add, e.g. LLaMA's o_proj or BERT's attention.output.dense: the adapter acts
    before the residual and any LayerNorm, as in Houlsby et al.)."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter(y)


class ParallelAdapter(_NotMergeable, nn.Module):
    """He et al.'s parallel adapter: the adapter reads the sublayer's input and its output is added to the
    sublayer's output, ``base(x) + adapter(x)`` (x, y [..., d]).

    A sublayer whose residual add sits inside it (BERT's ``BertOutput.forward(hidden_states, input_tensor)`` =
    LayerNorm(dense(hidden_states) + input_tensor), where input_tensor is the FFN's input) gets the adapter added
    to that residual instead: ``base(hidden_states, input_tensor + adapter(input_tensor))``, the same sum before
    the LayerNorm since the add is linear."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base, self.adapter = base, adapter
        self.residual_inside = "input_tensor" in inspect.signature(base.forward).parameters

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor | None = None) -> torch.Tensor:
        if not self.residual_inside:
            return self.base(hidden_states) + self.adapter(hidden_states)
        if input_tensor is None:
            raise TypeError(f"ParallelAdapter: {type(self.base).__name__} takes the sublayer input as 'input_tensor', "
                            "got None")
        return self.base(hidden_states, input_tensor + self.adapter(input_tensor))


class _ScaledLinear(nn.Module):
    """Shared frame of the Linear wrappers below: the wrapped Linear's ``weight`` [out, in] and ``bias`` [out]
    (or None) are kept, frozen, under the same names (so the model's other state_dict keys do not move)."""

    def _take(self, linear: nn.Linear, what: str) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{what}: argument 'linear' must be an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        self.merged = False

    def _check_merge(self, what: str, vector: torch.Tensor, merging: bool) -> None:
        if self.merged == merging:
            raise RuntimeError(f"{type(self).__name__}.{what}: " + ("already merged" if merging else "not merged"))
        if merging and not bool((vector != 0).all()):
            # Unmerging divides by the vector: a zero entry would erase its row/column of W for good.
            raise ValueError(f"{type(self).__name__}.merge: the scaling vector has zero entries; merging would not "
                             "be reversible")


class IA3Linear(_ScaledLinear):
    """(IA)³ on a frozen Linear, HF PEFT's layout: ``ia3_l`` [out, 1] scales the output (``(x Wᵀ + b) ⊙ l``,
    bias included) or, with ``feedforward``, ``ia3_l`` [1, in] scales the input (``(x ⊙ l) Wᵀ + b``).
    Initialised to ones (identity). x [..., in] -> y [..., out]; ``ia3_l`` is cast to x's dtype in forward."""

    def __init__(self, linear: nn.Linear, feedforward: bool = False):
        super().__init__()
        self._take(linear, "IA3Linear")
        self.feedforward = bool(feedforward)
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=linear.weight.device, dtype=linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        l = self.ia3_l.to(x.dtype)  # noqa: E741
        if self.feedforward:
            return F.linear(x * l, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * l.reshape(-1)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold l into W (columns for input scaling, rows and bias for output scaling), in fp32, rounded once."""
        self._check_merge("merge", self.ia3_l, merging=True)
        self._scale(self.ia3_l.float())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide l back out: restores W (and b) to within one rounding of their dtype."""
        self._check_merge("unmerge", self.ia3_l, merging=False)
        self._scale(1.0 / self.ia3_l.float())
        self.merged = False

    def _scale(self, l: torch.Tensor) -> None:  # noqa: E741
        self.weight.copy_(self.weight.float() * l)  # [out, in] * [1, in] or [out, 1]
        if not self.feedforward and self.bias is not None:
            self.bias.copy_(self.bias.float() * l.reshape(-1))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, feedforward={self.feedforward}, "
                f"merged={self.merged}")


class HadamardLinear(_ScaledLinear):
    """The Hadamard adapter on a frozen Linear: ``y = w ⊙ (x Wᵀ + b) + c`` with ``hadamard_weight`` w [out]
    (ones) and ``hadamard_bias`` c [out] (zeros). x [..., in] -> y [..., out]. Merging gives W' = diag(w) W and
    b' = w ⊙ b + c (a Linear without bias gets one while merged)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self._take(linear, "HadamardLinear")
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.hadamard_weight = nn.Parameter(torch.ones(self.out_features, **factory))
        self.hadamard_bias = nn.Parameter(torch.zeros(self.out_features, **factory))
        self.added_bias = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y * self.hadamard_weight.to(x.dtype) + self.hadamard_bias.to(x.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        self._check_merge("merge", self.hadamard_weight, merging=True)
        w, c = self.hadamard_weight.float(), self.hadamard_bias.float()
        self.weight.copy_(self.weight.float() * w[:, None])
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros_like(self.hadamard_bias), requires_grad=False)
            self.added_bias = True
        self.bias.copy_(self.bias.float() * w + c)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._check_merge("unmerge", self.hadamard_weight, merging=False)
        w, c = self.hadamard_weight.float(), self.hadamard_bias.float()
        self.weight.copy_(self.weight.float() / w[:, None])
        if self.added_bias:
            self.bias, self.added_bias = None, False
        else:
            self.bias.copy_((self.bias.float() - c) / w)
        self.merged = False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"
