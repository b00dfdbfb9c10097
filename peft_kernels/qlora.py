"""QLoRA on a transformers model: the targeted Linear layers become QLoRALinear (NF4 base + LoRA adapter),
optionally every other Linear but the output head becomes NF4Linear; adapters save and load exactly like
LoRA's (HF PEFT's format: a QLoRA adapter is a LoRA adapter)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import targeting
from .lora import LoRAConfig
from .nn import NF4Linear, QLoRALinear


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (packed NF4 weights count at their packed size)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@dataclasses.dataclass
class QLoRAConfig:
    """What :func:`peft_kernels.apply` does for QLoRA.

    ``target_modules`` get an adapter (None: the architecture's default, e.g. LLaMA q_proj, v_proj);
    ``quantize="targets"`` quantizes only those, ``"all_linear"`` also every other nn.Linear except the output
    head (``get_output_embeddings()``) and fresh task heads, as QLoRA's paper does. The base is NF4 with
    ``blocksize`` and ``double_quant`` (bitsandbytes-identical bytes); products run in ``compute_dtype``.
    After ``apply`` the model carries ``peft_kernels_qlora_report`` = {"weight_bytes_before",
    "weight_bytes_after", "quantized_modules", "adapted_modules"}.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    quantize: str = "targets"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    use_rslora: bool = False
    train_task_head: bool = True

    def apply_to(self, model: nn.Module) -> nn.Module:
        if self.quantize not in ("targets", "all_linear"):
            raise ValueError(f"QLoRAConfig: argument 'quantize' must be 'targets' or 'all_linear', got {self.quantize!r}")
        targets = targeting.resolve_targets(model, self.target_modules, config_name="QLoRAConfig")
        adapted = targeting.linear_names(model, targets)
        others = []
        if self.quantize == "all_linear":
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            others = [n for n, m in model.named_modules()
                      if type(m) is nn.Linear and m is not head and n not in adapted
                      and n.rpartition(".")[2] not in targeting.TASK_HEADS]
        before = weight_bytes(model)
        targeting.freeze(model)
        targeting.replace(model, adapted, lambda linear: QLoRALinear.from_linear(
            linear, self.r, self.alpha, self.dropout, self.blocksize, self.double_quant, self.compute_dtype,
            self.use_rslora))
        targeting.replace(model, others, lambda linear: NF4Linear.from_linear(
            linear, self.blocksize, self.double_quant, self.compute_dtype))
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        # save_adapter / load_adapter read this: on disk a QLoRA adapter is a plain LoRA adapter.
        model.peft_kernels_lora = LoRAConfig(self.r, self.alpha, self.dropout, targets, self.use_rslora,
                                             self.train_task_head)
        model.peft_kernels_qlora_report = {"weight_bytes_before": before, "weight_bytes_after": weight_bytes(model),
                                           "quantized_modules": len(adapted) + len(others),
                                           "adapted_modules": len(adapted)}
        return model
