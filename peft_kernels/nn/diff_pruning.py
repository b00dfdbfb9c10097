"""DiffPruningLinear: a frozen nn.Linear plus a learnable dense diff behind a hard-concrete L0 gate (Guo, Rush and
Kim, 2021, "Parameter-Efficient Transfer Learning with Diff Pruning")."""

from __future__ import annotations

import math

import torch
from torch import nn


class DiffPruningLinear(nn.Module):
    """``y = x (W + z * delta)^T + b`` with W (and b) frozen; ``delta`` [out, in] and the gate logits
    ``log_alpha`` [out, in] train.

    The gate z in [0, 1] is a hard-concrete sample (Louizos et al., 2018) stretched to (``lower``, ``upper``)
    and clipped: in training ``s = sigmoid((log u - log(1 - u) + log_alpha) / temperature)`` for u ~ U(0, 1),
    in eval the deterministic ``s = sigmoid(log_alpha)``; then ``z = clamp(s * (upper - lower) + lower, 0, 1)``.
    Defaults are the authors' (lower -1.5, upper 1.5, temperature 1, ``log_alpha`` initialised to 5 so every
    gate starts open at z = 1 in eval). ``delta`` starts at zero, so a fresh layer computes the base Linear.

    :meth:`expected_l0` is the differentiable expected number of non-zero gates, the penalty users add to the
    loss (scaled by a small lambda: the authors use 1.25e-7 per entry on BERT-large). Training keeps two dense
    [out, in] tensors (and their optimizer state): the method's cost; the saving is in what is exported, the
    top entries of ``z * delta`` (peft_kernels.sparse.finalize_diff_pruning).

    The forward builds the effective weight W + z * delta once per call ([out, in]) and runs one ``F.linear``:
    no op of ours fits a dense per-entry gate (the product's cost is the base GEMM's).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, lower: float = -1.5,
                 upper: float = 1.5, temperature: float = 1.0, log_alpha_init: float = 5.0, device=None, dtype=None):
        super().__init__()
        if not lower < 0 < 1 < upper:
            raise ValueError(f"DiffPruningLinear: arguments 'lower' and 'upper' must satisfy lower < 0 and upper > 1 "
                             f"(the stretch that lets gates reach exactly 0 and 1), got lower={lower}, upper={upper}")
        if not temperature > 0:
            raise ValueError(f"DiffPruningLinear: argument 'temperature' must be > 0, got {temperature}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.lower, self.upper, self.temperature = lower, upper, temperature
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.delta = nn.Parameter(torch.zeros(out_features, in_features, **factory))
        self.log_alpha = nn.Parameter(torch.full((out_features, in_features), float(log_alpha_init), **factory))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> DiffPruningLinear:
        """Wrap ``linear`` without copying its weight (frozen, shared); ``kwargs`` as the constructor's."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"DiffPruningLinear.from_linear: argument 'linear' must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        module.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        module.delta = nn.Parameter(torch.zeros(linear.out_features, linear.in_features, **factory))
        init = kwargs.get("log_alpha_init", 5.0)
        module.log_alpha = nn.Parameter(torch.full((linear.out_features, linear.in_features), float(init), **factory))
        return module

    def gate(self) -> torch.Tensor:
        """z [out, in]: a fresh hard-concrete sample in training, the deterministic gate in eval."""
        if self.training:
            # u kept away from 0 and 1 by the dtype's resolution so the logit stays finite.
            eps = torch.finfo(self.log_alpha.dtype).eps
            u = torch.rand_like(self.log_alpha).clamp_(eps, 1 - eps)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.temperature)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.upper - self.lower) + self.lower).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight + self.gate() * self.delta, self.bias)

    def expected_l0(self) -> torch.Tensor:
        """Sum over entries of P(z > 0) = sigmoid(log_alpha - temperature * log(-lower / upper)); differentiable."""
        shift = self.temperature * math.log(-self.lower / self.upper)
        return torch.sigmoid(self.log_alpha - shift).sum()

    @torch.no_grad()
    def final_diff(self) -> torch.Tensor:
        """The eval-mode diff z * delta [out, in] (fp32)."""
        s = torch.sigmoid(self.log_alpha.float())
        return (s * (self.upper - self.lower) + self.lower).clamp(0.0, 1.0) * self.delta.float()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"lower={self.lower}, upper={self.upper}, temperature={self.temperature}")
