"""Model-level LoRA: target nn.Linear modules of a transformers model by name, and save/load adapters in HF
PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import targeting
from .nn import LoRALinear, QLoRALinear

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclasses.dataclass
class LoRAConfig:
    """What :func:`apply` does. ``target_modules``: names (or name suffixes after a dot) of nn.Linear modules;
    None picks the architecture's default (LLaMA: q_proj, v_proj; BERT/RoBERTa: query, value)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    use_rslora: bool = False
    train_task_head: bool = True

    def to_peft_dict(self, target_modules: list[str]) -> dict:
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(target_modules),
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "task_type": None,
            "base_model_name_or_path": None,
        }

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Replace the targeted nn.Linear modules of ``model`` in place by :class:`LoRALinear` (sharing their
        weights), freeze every other parameter except fresh task heads, and return ``model``."""
        targets = targeting.resolve_targets(model, self.target_modules, config_name="LoRAConfig")
        names = targeting.linear_names(model, targets)
        targeting.freeze(model)
        targeting.replace(model, names, lambda linear: LoRALinear.from_linear(
            linear, self.r, self.alpha, self.dropout, self.use_rslora))
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        model.peft_kernels_lora = dataclasses.replace(self, target_modules=targets)
        return model


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear | QLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear))}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter in HF PEFT's format (loadable by ``peft.PeftModel.from_pretrained``): LoRA, or LoKr for a
    model with a KronA adapter (peft_kernels.krona). Each file is written to a temporary name and renamed, so a
    failure leaves any previous adapter there intact."""
    if getattr(model, "peft_kernels_krona", None) is not None:
        from . import krona  # krona imports this module

        return krona.save_adapter(model, directory)
    config = getattr(model, "peft_kernels_lora", None)
    modules = _lora_modules(model)
    if config is None or not modules:
        raise ValueError("save_adapter: the model carries no LoRA adapter (call peft_kernels.apply first)")
    if any(m.merged for m in modules.values()):
        raise ValueError("save_adapter: some LoRALinear modules are merged; unmerge() them before saving the adapter")
    tensors = {}
    for name, m in modules.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    # Trainable modules outside the adapter (a fresh classification head) are saved whole, as HF PEFT's
    # modules_to_save: under their plain parameter names, listed by module name in the config.
    saved_modules = set()
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name:
            module_name = name.rpartition(".")[0]
            module = model.get_submodule(module_name)
            if not all(q.requires_grad for q in module.parameters()):
                # PEFT's modules_to_save restores whole modules; a partly trainable one has no such form.
                raise NotImplementedError(
                    f"save_adapter: {name} is trainable but other parameters of {module_name} are frozen; only "
                    "whole trainable modules outside the adapter can be saved (HF PEFT's modules_to_save)")
            saved_modules.add(module_name)
            tensors[f"{_PREFIX}{name}"] = p.detach().contiguous()
    peft_dict = config.to_peft_dict(config.target_modules)
    if saved_modules:
        peft_dict["modules_to_save"] = sorted({n.rpartition(".")[2] for n in saved_modules})
        if type(model).__name__.endswith("ForSequenceClassification"):
            peft_dict["task_type"] = "SEQ_CLS"
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(peft_dict, indent=2)
    _atomic_write(directory / CONFIG_NAME, lambda path: pathlib.Path(path).write_text(text))


def _atomic_write(target: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a LoRA (or LoKr, as KronA) adapter saved by :func:`save_adapter` or by HF PEFT into ``model`` (applying
    the method first if the model has none). Every key, shape and rank is checked before anything is copied: on
    error the model is left as it was."""
    directory = pathlib.Path(directory)
    try:
        raw = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"load_adapter: cannot read {directory / CONFIG_NAME}: {exc}") from exc
    if raw.get("peft_type") == "LOKR":
        from . import krona  # krona imports this module

        return krona.load_adapter(model, directory, raw)
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {directory / CONFIG_NAME} has peft_type {raw.get('peft_type')!r}, "
                         "expected 'LORA' or 'LOKR'")
    for key in ("use_dora", "fan_in_fan_out"):
        if raw.get(key):
            raise ValueError(f"load_adapter: {key}=True adapters are not supported")
    config = LoRAConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0),
                        target_modules=list(raw["target_modules"]), use_rslora=raw.get("use_rslora", False))
    try:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"load_adapter: cannot read {directory / WEIGHTS_NAME}: {exc}") from exc
    extra = _modules_to_save(model, tensors, raw.get("modules_to_save") or [])
    tensors = {k: v for k, v in tensors.items() if k not in extra}
    modules = _lora_modules(model)
    if not modules:
        _check_keys(model, tensors)
        config.apply_to(model)
        modules = _lora_modules(model)
    plan = []
    for key, value in tensors.items():
        name, part = _split_key(key)
        module = modules.get(name)
        if module is None:
            raise ValueError(f"load_adapter: {key} names no LoRA module of {type(model).__name__} "
                             f"(its LoRA modules include {list(modules)[:4]})")
        target = getattr(module, part)
        if value.shape != target.shape:
            raise ValueError(f"load_adapter: {name}.{part} has shape {list(value.shape)} in the file but "
                             f"{list(target.shape)} in the model (rank {module.r}, in {module.in_features}, "
                             f"out {module.out_features})")
        plan.append((target, value))
    plan += list(extra.values())
    missing = {f"{n}.{p}" for n in modules for p in ("lora_A", "lora_B")} - {".".join(_split_key(k)) for k in tensors}
    if missing:
        raise ValueError(f"load_adapter: the file lacks {sorted(missing)[:4]}")
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)
    for module in modules.values():
        module.scaling = config.alpha / (module.r**0.5 if config.use_rslora else module.r)
    return model


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.layers.0.q_proj.lora_A.weight' -> ('layers.0.q_proj', 'lora_A')."""
    body = key.removeprefix(_PREFIX)
    parts = body.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        raise ValueError(f"load_adapter: unexpected key {key!r} (expected '<module>.lora_A.weight' / '.lora_B.weight')")
    return ".".join(parts[:-2]), parts[-2]


def _modules_to_save(model: nn.Module, tensors: dict, names: list[str]) -> dict:
    """The file's whole-module tensors (HF PEFT's modules_to_save, e.g. a classification head): key ->
    (model parameter, value), shapes checked."""
    params = dict(model.named_parameters())
    extra = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        module_name = name.rpartition(".")[0]
        if ".lora_" in key or not targeting.matches(module_name, names):
            continue
        if name not in params:
            raise ValueError(f"load_adapter: {key} (modules_to_save {names}) names no parameter of "
                             f"{type(model).__name__}")
        if value.shape != params[name].shape:
            raise ValueError(f"load_adapter: {name} has shape {list(value.shape)} in the file but "
                             f"{list(params[name].shape)} in the model")
        extra[key] = (params[name], value)
    return extra


def _check_keys(model: nn.Module, tensors: dict) -> None:
    """Before applying LoRA for a load: every module the file names must be a Linear of this model."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for key in tensors:
        name, _ = _split_key(key)
        if name not in linears:
            raise ValueError(f"load_adapter: {key} names no nn.Linear of {type(model).__name__}: the adapter was "
                             "made for another architecture")
