"""PHMLinear: a parameterized-hypercomplex-multiplication layer, W = Σᵢ Aᵢ ⊗ Bᵢ (PHM, Zhang et al. 2021), and its
Compacter form (Mahabadi et al. 2021: the Aᵢ shared across layers, each Bᵢ = sᵢ tᵢ of low rank), on the kron_linear
op: one op call per term, A ⊗ B never formed. These are the down/up projections of bottleneck adapters; the
adapters themselves belong to the methods issue."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops


class PHMLinear(nn.Module):
    """``y = x Wᵀ + bias`` with ``W = Σ_{i<n} A[i] ⊗ B[i]`` [out_features, in_features].

    Shapes: ``A`` [n, n, n] (A[i] is n x n; pass ``shared_A`` from :meth:`shared_factors` to share it between
    layers, as Compacter does); ``B`` [n, out/n, in/n] when ``rank`` is None (PHM), else ``s`` [n, out/n, rank] and
    ``t`` [n, rank, in/n] with B[i] = s[i] t[i] (Compacter's low-rank PHM). n must divide in and out. Parameters:
    n³ + n·(out·in)/n² for PHM, n³ + rank·(out + in) for the low-rank form (A counted once per sharing group).
    Saved for backward: x (the same tensor for every term).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int = 4,
        rank: int | None = None,
        shared_A: nn.Parameter | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not isinstance(n, int) or n < 1 or in_features % n or out_features % n:
            divisors = [d for d in range(1, math.gcd(in_features, out_features) + 1)
                        if in_features % d == 0 and out_features % d == 0]
            raise ValueError(f"PHMLinear: argument 'n' must divide in_features={in_features} and "
                             f"out_features={out_features} (one of {divisors}), got {n!r}")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"PHMLinear: argument 'rank' must be None (full B[i]) or an int >= 1, got {rank!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.n, self.rank = in_features, out_features, n, rank
        if shared_A is None:
            self.A = self.shared_factors(n, **factory)
        elif tuple(shared_A.shape) != (n, n, n):
            raise ValueError(f"PHMLinear: argument 'shared_A' must be [n, n, n] = [{n}, {n}, {n}], got "
                             f"{list(shared_A.shape)}")
        else:
            self.A = shared_A
        b_out, b_in = out_features // n, in_features // n
        if rank is None:
            self.B = nn.Parameter(torch.empty(n, b_out, b_in, **factory))
            for i in range(n):
                nn.init.xavier_uniform_(self.B[i])
        else:
            self.s = nn.Parameter(torch.empty(n, b_out, rank, **factory))
            self.t = nn.Parameter(torch.empty(n, rank, b_in, **factory))
            for i in range(n):
                nn.init.xavier_uniform_(self.s[i])
                nn.init.xavier_uniform_(self.t[i])
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    @staticmethod
    def shared_factors(n: int, device=None, dtype=None) -> nn.Parameter:
        """A fresh [n, n, n] parameter of the n matrices A[i] (normal, std 0.1), to pass as ``shared_A``."""
        return nn.Parameter(torch.randn(n, n, n, device=device, dtype=dtype) * 0.1)

    def factors_b(self) -> torch.Tensor:
        """B [n, out/n, in/n] (for the low-rank form the product s t, differentiable)."""
        return self.B if self.rank is None else torch.bmm(self.s, self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.factors_b()
        y = ops.kron_linear(x, self.A[0], b[0], bias=self.bias)
        for i in range(1, self.n):
            y = y + ops.kron_linear(x, self.A[i], b[i])
        return y

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """W = Σ A[i] ⊗ B[i] in fp32 [out, in] (formed for inspection only; forward never builds it)."""
        b = self.factors_b().float()
        return sum(torch.kron(self.A[i].float(), b[i]) for i in range(self.n))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n={self.n}, rank={self.rank}, "
                f"bias={self.bias is not None}")
