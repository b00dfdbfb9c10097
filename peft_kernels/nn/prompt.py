"""Soft-prompt modules: trainable virtual-token embeddings (prompt tuning), the same passed through a prompt encoder
(P-tuning) and per-layer key/value prefixes (prefix tuning). Each produces its tensors from its parameters alone;
``peft_kernels.prompts`` wires them into a model's input embeddings or KV cache.

There is no op of ours to call here: the prompt encoders are small MLP/LSTM stacks run once per forward on l rows
(l = num_virtual_tokens), independent of the batch, and prompts enter the model by concatenation.
"""

from __future__ import annotations

import torch
from torch import nn

ENCODERS = ("mlp", "lstm")


class PromptEmbedding(nn.Module):
    """``l`` virtual-token embeddings of width ``d`` (Lester et al. 2021).

    ``init`` (l, d): the starting embeddings; None draws them from N(0, 1), as ``torch.nn.Embedding`` and HF PEFT.
    ``forward() -> (l, d)``.
    """

    def __init__(self, num_virtual_tokens: int, dim: int, init: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__()
        self.num_virtual_tokens, self.dim = num_virtual_tokens, dim
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, dim, device=device, dtype=dtype))
        with torch.no_grad():
            if init is None:
                self.embedding.normal_()
            else:
                if tuple(init.shape) != (num_virtual_tokens, dim):
                    raise ValueError(f"PromptEmbedding: argument 'init' must have shape [{num_virtual_tokens}, {dim}], "
                                     f"got {list(init.shape)}")
                self.embedding.copy_(init)

    def forward(self) -> torch.Tensor:
        return self.embedding

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.dim}"


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder (Liu et al. 2021): ``l`` virtual-token embeddings E (l, d) reparameterised by

    * ``encoder="mlp"``: Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d), applied to each row of E;
    * ``encoder="lstm"``: a bidirectional ``num_layers``-layer LSTM of hidden size h over E as one sequence, then
      Linear(2h, 2h) -> ReLU -> Linear(2h, d),

    the layer shapes of HF PEFT's ``PromptEncoder``. ``forward() -> (l, d)``; :meth:`fold` returns the
    :class:`PromptEmbedding` holding that output, which computes the same prompts without the encoder.
    """

    def __init__(self, num_virtual_tokens: int, dim: int, hidden: int, encoder: str = "mlp", num_layers: int = 2,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"PromptEncoder: argument 'encoder' must be one of {list(ENCODERS)}, got {encoder!r}")
        self.num_virtual_tokens, self.dim, self.hidden, self.encoder = num_virtual_tokens, dim, hidden, encoder
        factory = dict(device=device, dtype=dtype)
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, dim, **factory))
        with torch.no_grad():
            self.embedding.normal_()
        if encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, **factory), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                                          nn.Linear(hidden, dim, **factory))
        else:
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim, **factory))

    def forward(self) -> torch.Tensor:
        if self.encoder == "mlp":
            return self.mlp_head(self.embedding)
        # The LSTM reads the l embeddings as one sequence of a batch of 1: (1, l, d) -> (1, l, 2h).
        return self.mlp_head(self.lstm_head(self.embedding.unsqueeze(0))[0][0])

    def fold(self) -> PromptEmbedding:
        """A :class:`PromptEmbedding` holding this encoder's current output (l, d)."""
        weight = self.embedding
        with torch.no_grad():
            return PromptEmbedding(self.num_virtual_tokens, self.dim, init=self(), device=weight.device,
                                   dtype=weight.dtype)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.dim}, hidden={self.hidden}"


class PrefixEncoder(nn.Module):
    """Per-layer key and value prefixes P_k, P_v (Li & Liang 2021) for ``num_layers`` attention layers with
    ``num_kv_heads`` key/value heads of ``head_dim`` each; ``w = num_kv_heads * head_dim``.

    * ``projection=False``: the prefixes are the parameter ``prefixes`` (l, num_layers * 2 * w);
    * ``projection=True``: embeddings ``embedding`` (l, w) through Linear(w, hidden) -> Tanh ->
      Linear(hidden, num_layers * 2 * w), the reparameterisation of the paper (and HF PEFT's shapes);
      :meth:`fold` replaces them in place by the prefixes they compute.

    A row's layout is HF PEFT's ``prompt_embeddings``: [layer 0 keys, layer 0 values, layer 1 keys, ...], each
    ``num_kv_heads`` heads of ``head_dim``. ``forward() -> (l, num_layers * 2 * w)``; :meth:`key_values` gives the
    per-layer (batch, num_kv_heads, l, head_dim) pairs a KV cache holds.

    ``cache_kwarg`` is the name under which the model's forward takes its cache (``peft_kernels.prompts`` sets it).
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 projection: bool = False, hidden: int | None = None, device=None, dtype=None):
        super().__init__()
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.projection = projection
        self.cache_kwarg = "cache"
        width = num_kv_heads * head_dim
        factory = dict(device=device, dtype=dtype)
        if projection:
            if hidden is None:
                raise ValueError("PrefixEncoder: projection=True needs argument 'hidden' (the MLP's width)")
            self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, width, **factory))
            self.transform = nn.Sequential(nn.Linear(width, hidden, **factory), nn.Tanh(),
                                           nn.Linear(hidden, num_layers * 2 * width, **factory))
            init = self.embedding
        else:
            self.prefixes = nn.Parameter(torch.empty(num_virtual_tokens, num_layers * 2 * width, **factory))
            init = self.prefixes
        with torch.no_grad():
            init.normal_()

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding) if self.projection else self.prefixes

    def key_values(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``num_layers`` pairs (keys, values), each (batch, num_kv_heads, l, head_dim), the batch dimension an
        expanded view."""
        l = self.num_virtual_tokens
        # (l, L * 2 * w) -> (L, 2, heads, l, head_dim)
        kv = self().view(l, self.num_layers, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]

    def fold(self) -> None:
        """Replace the reparameterising MLP by the prefixes it computes now (l, num_layers * 2 * w): the same
        key/value prefixes with no MLP; the prefixes stay trainable. No-op without projection."""
        if not self.projection:
            return
        with torch.no_grad():
            prefixes = self().detach().clone()
        del self.embedding, self.transform
        self.prefixes = nn.Parameter(prefixes)
        self.projection = False

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, projection={self.projection}")
