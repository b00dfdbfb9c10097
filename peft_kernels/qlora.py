"""QLoRA on a transformers model: the targeted Linear layers become QLoRALinear (NF4 base + LoRA adapter),
optionally every other Linear but the output head becomes NF4Linear; adapters save and load exactly like
LoRA's (HF PEFT's format: a QLoRA adapter is a LoRA adapter)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import targeting
from .lora import LoRAConfig
from .lora_variants import loftq_init
from .nn import NF4Linear, QLoRALinear
from .nn.nf4 import _PARTS


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
    ``quant_storage``: a float dtype stores the packed codes as frozen parameters of that dtype so FSDP2 shards
    them (see :class:`peft_kernels.nn.NF4Linear`). ``init="loftq"`` initialises
    each adapted layer's NF4 base and adapter with LoftQ (:func:`peft_kernels.loftq_init`, ``loftq_iter``
    alternations) instead of NF4(W) and B = 0; its base then differs from NF4(W), so keep it with the adapter
    (``bnb_nf4_state_dict(model)``): the adapter alone does not reproduce the model on a freshly quantized one.
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
    quant_storage: torch.dtype = torch.uint8
    init: str = "default"
    loftq_iter: int = 1

    def apply_to(self, model: nn.Module) -> nn.Module:
        if self.quantize not in ("targets", "all_linear"):
            raise ValueError(f"QLoRAConfig: argument 'quantize' must be 'targets' or 'all_linear', got {self.quantize!r}")
        if self.init not in ("default", "loftq"):
            raise ValueError(f"QLoRAConfig: argument 'init' must be 'default' or 'loftq', got {self.init!r}")
        if not isinstance(self.loftq_iter, int) or isinstance(self.loftq_iter, bool) or self.loftq_iter < 1:
            raise ValueError(f"QLoRAConfig: argument 'loftq_iter' must be an int >= 1, got {self.loftq_iter!r}")
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

        def make(linear):
            module = QLoRALinear.from_linear(linear, self.r, self.alpha, self.dropout, self.blocksize,
                                             self.double_quant, self.compute_dtype, self.use_rslora,
                                             quant_storage=self.quant_storage)
            if self.init == "loftq":
                loftq_init(module, linear.weight, self.loftq_iter)
            return module

        targeting.replace(model, adapted, make)
        targeting.replace(model, others, lambda linear: NF4Linear.from_linear(
            linear, self.blocksize, self.double_quant, self.compute_dtype, quant_storage=self.quant_storage))
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        # save_adapter / load_adapter read this: on disk a QLoRA adapter is a plain LoRA adapter.
        model.peft_kernels_lora = LoRAConfig(self.r, self.alpha, self.dropout, targets, self.use_rslora,
                                             self.train_task_head)
        model.peft_kernels_qlora_report = {"weight_bytes_before": before, "weight_bytes_after": weight_bytes(model),
                                           "quantized_modules": len(adapted) + len(others),
                                           "adapted_modules": len(adapted)}
        return model


_BNB_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"


def load_bnb_nf4(model: nn.Module, state_dict: dict[str, torch.Tensor],
                 compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Load a state dict whose Linear weights are bitsandbytes NF4 (``Linear4bit``: ``<name>.weight`` packed
    uint8 plus ``<name>.weight.absmax``, ``.quant_map``, ``.nested_*`` and ``.quant_state.bitsandbytes__nf4``)
    into ``model`` without re-quantizing: each such nn.Linear becomes an :class:`NF4Linear` holding those exact
    bytes; every other entry loads as usual (strictly: a missing or unexpected key is an error). Everything is
    checked before the model is touched."""
    quantized = sorted(k[: -len(_BNB_SUFFIX)] for k in state_dict if k.endswith(_BNB_SUFFIX))
    replacements, consumed = {}, set()
    for name in quantized:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"load_bnb_nf4: the state dict quantizes {name!r}, which is not an nn.Linear of "
                             f"{type(model).__name__}")
        prefix = f"{name}.weight."
        state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        module = NF4Linear.from_bnb(state_dict[f"{name}.weight"], state, state_dict.get(f"{name}.bias"), compute_dtype)
        if (module.out_features, module.in_features) != (linear.out_features, linear.in_features):
            raise ValueError(f"load_bnb_nf4: {name} is [{module.out_features}, {module.in_features}] in the state dict "
                             f"but [{linear.out_features}, {linear.in_features}] in the model")
        replacements[name] = module
        consumed |= {f"{name}.weight", f"{name}.bias", *(prefix + k for k in state)}
    rest = {k: v for k, v in state_dict.items() if k not in consumed}
    expected = {k for k in model.state_dict()
                if not any(k == f"{n}.weight" or k == f"{n}.bias" for n in replacements)}
    missing, unexpected = sorted(expected - rest.keys()), sorted(rest.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"load_bnb_nf4: state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(rest, strict=False)
    for name, module in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return model


def bnb_nf4_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every :class:`NF4Linear` in bitsandbytes' Linear4bit form (the inverse of
    :func:`load_bnb_nf4`; loadable by transformers/bitsandbytes as a 4-bit checkpoint's tensors)."""
    nf4_names = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    replaced = {f"{n}.{part}" for n in nf4_names for part in (*_PARTS, "bias")}
    out = {k: v for k, v in model.state_dict().items() if k not in replaced}
    for name in nf4_names:
        module = model.get_submodule(name)
        packed, state = module.to_bnb()
        out[f"{name}.weight"] = packed
        out.update({f"{name}.weight.{k}": v for k, v in state.items()})
        if module.bias is not None:
            out[f"{name}.bias"] = module.bias.detach()
    return out
