"""NF4 weights: the container our quantized layers hold, and interop with bitsandbytes' QuantState."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import torch

from . import reference

_BNB_PACKED_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values = [0.0, 1.0]
    # 7 decades (1e-6 .. 1), decade i holding evenly spaced magnitudes (midpoints of linspace(0.1, 1)): 2**i of
    # them with both signs (signed), or 2**(i + 1) positive ones (unsigned); 254 + 2 = 256 entries either way,
    # the maps bitsandbytes calls "dynamic" and "udynamic" (8 bits).
    for i in range(7):
        count = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist() + ((-scale * mids).tolist() if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu", signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map, fp32 [256] sorted: signed (the code of double-quantized absmax and of
    :class:`peft_kernels.optim.AdamW8bit`'s first moment) or unsigned (its second moment).

    A new tensor at each call: every NF4Weight owns its map (1 KiB). Handing out the cached one made all
    NF4Linear modules on the CPU share one buffer, which save_pretrained (HF Trainer checkpoints) refuses as
    "shared tensors", and which a load_state_dict into any of them would have overwritten for all."""
    return _dynamic_map_cpu(signed).to(device, copy=True)


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """A weight quantized to NF4 in bitsandbytes' layout.

    Attributes:
        codes: uint8 [numel / 2]; element 2i in the high nibble of byte i.
        absmax: per block of ``blocksize`` elements: fp32 [numel / blocksize], or uint8 codes of
            ``absmax - offset`` in ``nested_code`` when double-quantized.
        nested_absmax: fp32 [ceil(numel / blocksize / 256)] scales of the 8-bit absmax, or None.
        nested_code: fp32 [256] map of the 8-bit absmax (bitsandbytes' dynamic map), or None.
        offset: fp32 [] mean of the fp32 absmax, or None.
        shape: the original weight's shape; dtype: its dtype (what dequantization returns).
        blocksize: elements per absmax, a power of two in [32, 4096].
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus every scale and map."""
        parts = (self.codes, self.absmax, self.nested_absmax, self.nested_code, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The weight in its original shape and dtype."""
        from .ops import nf4_dequantize

        return nf4_dequantize(self)

    def to(self, device: torch.device | str) -> NF4Weight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            codes=move(self.codes),
            absmax=move(self.absmax),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    # ---- bitsandbytes interop ------------------------------------------------------------------------------
    def to_bnb(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(packed uint8 [numel / 2, 1], dict) in the layout of bitsandbytes' ``QuantState.as_dict(packed=True)``,
        loadable with ``QuantState.from_dict`` and the keys of a ``Linear4bit`` state dict."""
        meta = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        state = {"absmax": self.absmax, "quant_map": reference.nf4_code(self.device)}
        if self.double_quant:
            meta.update(nested_blocksize=reference.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
            state.update(nested_absmax=self.nested_absmax, nested_quant_map=self.nested_code)
        state[_BNB_PACKED_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return self.codes.reshape(-1, 1), state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """Wrap bitsandbytes NF4 data without re-quantizing.

        Args:
            packed: the uint8 [numel / 2, 1] weight of a ``Linear4bit`` / ``quantize_4bit``.
            quant_state: a bitsandbytes ``QuantState`` or its ``as_dict(packed=True)`` dict.
        """
        state = quant_state if isinstance(quant_state, dict) else quant_state.as_dict(packed=True)
        if _BNB_PACKED_KEY not in state:
            kinds = [k for k in state if k.startswith("quant_state.bitsandbytes__")]
            raise ValueError(
                f"NF4Weight.from_bnb: argument 'quant_state' must hold the key {_BNB_PACKED_KEY!r} (an NF4 "
                f"QuantState.as_dict(packed=True)), got keys {sorted(state)}"
                + (" — this is not NF4 data" if kinds else "")
            )
        meta = json.loads(bytes(state[_BNB_PACKED_KEY].tolist()).decode())
        if meta.get("dtype") not in _DTYPES:
            raise ValueError(f"NF4Weight.from_bnb: quant_state dtype must be one of {sorted(_DTYPES)}, got {meta.get('dtype')!r}")
        quant_map = state["quant_map"].to(torch.float32).cpu()
        if not torch.equal(quant_map, reference.nf4_code()):
            raise ValueError(f"NF4Weight.from_bnb: quant_state['quant_map'] is not the NF4 code, got {quant_map.tolist()}")
        nested = "nested_absmax" in state
        if nested and meta.get("nested_blocksize") != reference.NESTED_BLOCKSIZE:
            raise ValueError(
                f"NF4Weight.from_bnb: nested_blocksize must be {reference.NESTED_BLOCKSIZE}, got {meta.get('nested_blocksize')}"
            )
        device = packed.device
        q = cls(
            codes=packed.reshape(-1).view(torch.uint8).contiguous(),
            absmax=state["absmax"].to(device).contiguous(),
            nested_absmax=state["nested_absmax"].to(device, torch.float32).contiguous() if nested else None,
            nested_code=state["nested_quant_map"].to(device, torch.float32).contiguous() if nested else None,
            offset=torch.tensor(meta["nested_offset"], dtype=torch.float32, device=device) if nested else None,
            shape=torch.Size(meta["shape"]),
            dtype=_DTYPES[meta["dtype"]],
            blocksize=int(meta["blocksize"]),
        )
        if q.codes.numel() * 2 != q.numel():
            raise ValueError(
                f"NF4Weight.from_bnb: argument 'packed' must hold {q.numel() // 2} bytes for shape {list(q.shape)}, "
                f"got {q.codes.numel()}"
            )
        return q
