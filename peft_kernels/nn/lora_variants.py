"""Modules of LoRA derivatives, each a :class:`LoRALinear` whose forward is still one ``ops.lora_linear`` call:
only the factors handed to the op differ (:meth:`LoRALinear.adapter_factors`).

* :class:`DyLoRALinear` (Valipour et al., 2023): the leading b rows of A and columns of B, b drawn per training
  forward or fixed for inference.
* :class:`AdaLoRALinear` (Zhang et al., 2023): an SVD-shaped update P diag(Lambda) Q with Lambda maskable.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import LoRALinear


class DyLoRALinear(LoRALinear):
    """DyLoRA: ``y = x W^T + b + (alpha / b) * (dropout(x) A[:b]^T) B[:, :b]^T``.

    Shapes as :class:`LoRALinear`: ``lora_A`` [r, in], ``lora_B`` [out, r]; the op sees A[:b] [b, in] and
    B[:, :b] [out, b]. ``rank`` None: in training mode every forward draws b uniformly from {1..r} with
    ``generator`` (None: torch's default generator), in eval mode b = r; an int fixes b in both modes
    (:func:`peft_kernels.lora_variants.set_rank`). Gradients reach only A[:b] and B[:, :b] (the rest get zeros).
    ``merge`` adds the update at the current fixed rank (r when ``rank`` is None).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None,
                 generator: torch.Generator | None = None):
        if use_rslora:
            raise ValueError("DyLoRALinear: argument 'use_rslora' must be False (DyLoRA scales by alpha / b), got True")
        super().__init__(in_features, out_features, r, alpha, dropout, bias, False, device, dtype)
        self.generator, self.rank = generator, None

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    generator: torch.Generator | None = None) -> DyLoRALinear:
        module = super().from_linear(linear, r, alpha, dropout)
        module.generator = generator
        return module

    def set_rank(self, rank: int | None) -> None:
        """Fix b (1 <= rank <= r), or None to sample it again in training. Refused while merged (the merged
        update was taken at the old rank)."""
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= self.r):
            raise ValueError(f"DyLoRALinear.set_rank: argument 'rank' must be None or an int in [1, {self.r}], "
                             f"got {rank!r}")
        if self.merged:
            raise RuntimeError("DyLoRALinear.set_rank: the layer is merged at rank "
                               f"{self.rank or self.r}; unmerge() it first")
        self.rank = rank

    def adapter_factors(self, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The factors at rank b: ``rank`` if fixed, else a fresh draw when ``sample`` and in training, else r."""
        if self.rank is not None:
            b = self.rank
        elif sample and self.training:
            b = int(torch.randint(1, self.r + 1, (), generator=self.generator))
        else:
            b = self.r
        return self.lora_A[:b], self.lora_B[:, :b], self.alpha / b

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(alpha / b) * B[:, :b] A[:b] in fp32 [out, in] at the fixed rank (r when none is fixed), never drawn."""
        lora_A, lora_B, scaling = self.adapter_factors(sample=False)
        return (lora_B.float() @ lora_A.float()) * scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


class AdaLoRALinear(LoRALinear):
    """AdaLoRA: ``y = x W^T + b + scaling * (dropout(x) (Q * Lambda)^T) P^T``, i.e. the update
    ``scaling * P diag(Lambda) Q``, with ``scaling = alpha / ranknum`` (ranknum = the initial rank, kept when
    ranks are pruned, as HF PEFT).

    Parameters (HF PEFT's names): ``lora_A`` = Q [r, in], ``lora_E`` = Lambda [r, 1] (zeros: a fresh layer is the
    base Linear), ``lora_B`` = P [out, r]; A and B start N(0, 0.02). The op gets A' = Q * Lambda [r, in] and
    B = P, so the gradients of P, Lambda and Q flow through autograd from the op's dA and dB.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 12, alpha: float = 8, dropout: float = 0.0,
                 bias: bool = True, use_rslora: bool = False, device=None, dtype=None, ranknum: float | None = None):
        if use_rslora:
            raise ValueError("AdaLoRALinear: argument 'use_rslora' must be False (AdaLoRA scales by alpha / ranknum)")
        super().__init__(in_features, out_features, r, alpha, dropout, bias, False, device, dtype)
        self.set_ranknum(r if ranknum is None else ranknum)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 12, alpha: float = 8, dropout: float = 0.0,
                    ranknum: float | None = None) -> AdaLoRALinear:
        module = super().from_linear(linear, r, alpha, dropout)
        module.set_ranknum(r if ranknum is None else ranknum)
        return module

    def set_ranknum(self, ranknum: float) -> None:
        if not isinstance(ranknum, (int, float)) or isinstance(ranknum, bool) or ranknum <= 0:
            raise ValueError(f"AdaLoRALinear: argument 'ranknum' must be a positive number, got {ranknum!r}")
        self.ranknum = float(ranknum)
        self.scaling = self.alpha / self.ranknum

    def reset_lora_parameters(self) -> None:
        # lora_E is (re)created here: LoRALinear.__init__ and from_linear call this right after making lora_A.
        self.lora_E = nn.Parameter(self.lora_A.new_zeros(self.lora_A.shape[0], 1))
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def adapter_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A * self.lora_E, self.lora_B, self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ranknum={self.ranknum}"
