"""Model-level LoRA: target nn.Linear modules of a transformers model by name, and save/load adapters in HF
PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import warnings

import torch
from safetensors.torch import save_file
from torch import nn

from . import adapter_io, targeting
from .adapter_io import CONFIG_NAME, WEIGHTS_NAME
from .adapter_io import PREFIX as _PREFIX
from .nn import LoRALinear, QLoRALinear


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
    failure leaves any previous adapter there intact. Methods registered with :mod:`peft_kernels.adapter_io` are
    written in its format."""
    config = adapter_io.attached(model)
    if config is not None:
        return adapter_io.save(model, directory, config)
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
    text = json.dumps(peft_dict, indent=2)
    adapter_io.atomic_write({directory / WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
                   directory / CONFIG_NAME: lambda path: pathlib.Path(path).write_text(text)})


# adapter_config.json keys (HF PEFT's LoraConfig fields) by what loading does with them.
# Read: peft_type, r, lora_alpha, lora_dropout, target_modules, use_rslora, modules_to_save.
# Features that change what a saved adapter computes or which modules carry it: loadable only at these neutral
# values, anything else is an error naming the key (the file's weights alone would give wrong outputs).
_NEUTRAL = {
    "fan_in_fan_out": False, "bias": "none", "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "exclude_modules": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "use_qalora": False, "layer_replication": None, "lora_bias": False,
    "target_parameters": None, "velora_config": None, "monteclora_config": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None,
}
# Metadata, and settings that only shape a fresh adapter's initialization or a runtime (the file's weights
# already carry their effect): ignored whatever their value.
_METADATA = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "init_lora_weights", "layers_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "runtime_config", "qalora_group_size", "ensure_weight_tying",
}
_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "modules_to_save"}


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a LoRA (or LoKr, as KronA: peft_kernels.krona) adapter saved by :func:`save_adapter` or by HF PEFT
    into ``model`` (applying the method first if the model has none). Only ``adapter_model.safetensors`` is read (never a pickle). Every key, shape, rank and
    value is checked before the model is touched: on error (unreadable, truncated or corrupt files, NaN/Inf
    weights, a shape or rank mismatch, an adapter for another architecture) a ``ValueError`` says what and the
    model is left exactly as it was, LoRA modules not added.

    The config may carry any of HF PEFT's keys. A feature this loader does not implement (DoRA, per-module
    ``rank_pattern`` / ``alpha_pattern``, ``layers_to_transform``, a regex ``target_modules``, trainable bias, ...)
    set to anything but its neutral value is an error naming it; keys neither PEFT 0.21 nor we know are ignored
    with a warning (as PEFT does for configs from a newer version).
    """
    directory = pathlib.Path(directory)
    try:
        peft_type = json.loads((directory / CONFIG_NAME).read_text()).get("peft_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        peft_type = None  # _read_config reports what is wrong with the file
    if peft_type in adapter_io.METHODS:
        raw = json.loads((directory / CONFIG_NAME).read_text())
        cls = adapter_io.METHODS[peft_type]
        if raw.get("format") != adapter_io.FORMAT and hasattr(cls, "load_foreign"):
            return cls.load_foreign(model, directory, raw)
        return adapter_io.load(model, directory, raw)
    if peft_type == "LOKR":
        from . import krona  # krona imports this module

        return krona.load_adapter(model, directory, json.loads((directory / CONFIG_NAME).read_text()))
    config, modules_to_save = _read_config(directory / CONFIG_NAME)
    tensors = adapter_io.read_tensors(directory)
    extra = _modules_to_save(model, tensors, modules_to_save)
    tensors = {k: v for k, v in tensors.items() if k not in extra}
    modules = _lora_modules(model)
    if modules:
        sizes = {name: (m.r, m.in_features, m.out_features) for name, m in modules.items()}
    else:
        # What apply_to would create, checked before it runs: a failed load must not leave LoRA modules behind.
        _check_keys(model, tensors)
        names = targeting.linear_names(model, config.target_modules)
        sizes = {name: (config.r, model.get_submodule(name).in_features, model.get_submodule(name).out_features)
                 for name in names}
    for key, value in tensors.items():
        name, part = _split_key(key)
        if name not in sizes:
            raise ValueError(f"load_adapter: {key} names no LoRA module of {type(model).__name__} "
                             f"(its LoRA modules include {list(sizes)[:4]})")
        r, n_in, n_out = sizes[name]
        expected = [r, n_in] if part == "lora_A" else [n_out, r]
        if list(value.shape) != expected:
            raise ValueError(f"load_adapter: {name}.{part} has shape {list(value.shape)} in the file but "
                             f"{expected} in the model (rank {r}, in {n_in}, out {n_out})")
    missing = {f"{n}.{p}" for n in sizes for p in ("lora_A", "lora_B")} - {".".join(_split_key(k)) for k in tensors}
    if missing:
        raise ValueError(f"load_adapter: the file lacks {sorted(missing)[:4]}")
    if not modules:
        config.apply_to(model)
        modules = _lora_modules(model)
    with torch.no_grad():
        for key, value in tensors.items():
            name, part = _split_key(key)
            getattr(modules[name], part).copy_(value)
        for target, value in extra.values():
            target.copy_(value)
    for module in modules.values():
        module.scaling = config.alpha / (module.r**0.5 if config.use_rslora else module.r)
    return model


def _read_config(path: pathlib.Path) -> tuple[LoRAConfig, list[str]]:
    """The adapter's LoRAConfig and modules_to_save, every key checked (see :func:`load_adapter`)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"load_adapter: cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"load_adapter: {path} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: {path} has peft_type {raw.get('peft_type')!r}, expected 'LORA' (or 'LOKR')")
    for key, neutral in _NEUTRAL.items():
        if key in raw and not _is_neutral(raw[key], neutral):
            raise ValueError(f"load_adapter: {path} sets {key}={raw[key]!r}; this loader supports only "
                             f"{key}={neutral!r}")
    unknown = sorted(raw.keys() - _READ - _NEUTRAL.keys() - _METADATA)
    if unknown:
        warnings.warn(f"load_adapter: {path} has keys this loader does not know, ignored: {unknown}", stacklevel=3)
    r, alpha, dropout = raw.get("r"), raw.get("lora_alpha"), raw.get("lora_dropout", 0.0)
    targets, use_rslora = raw.get("target_modules"), raw.get("use_rslora", False)
    checks = [
        ("r", isinstance(r, int) and not isinstance(r, bool) and r >= 1, "an int >= 1", r),
        ("lora_alpha", isinstance(alpha, (int, float)) and not isinstance(alpha, bool), "a number", alpha),
        ("lora_dropout", isinstance(dropout, (int, float)) and 0 <= dropout < 1, "a number in [0, 1)", dropout),
        ("target_modules", isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets),
         "a non-empty list of module names (a regex string is not supported)", targets),
        ("use_rslora", isinstance(use_rslora, bool), "a bool", use_rslora),
    ]
    for key, ok, expected, got in checks:
        if not ok:
            raise ValueError(f"load_adapter: {path} key {key!r} must be {expected}, got {got!r}")
    config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=list(targets), use_rslora=use_rslora)
    return config, list(raw.get("modules_to_save") or [])


def _is_neutral(value, neutral) -> bool:
    """``value`` means "feature off": equal to the neutral value, or, where that is an empty one (None, False,
    {}), any other empty value (PEFT versions write null, [] or {} for the same thing)."""
    empty = lambda v: v is None or v is False or v == {} or v == []  # noqa: E731
    return value == neutral or (empty(value) and empty(neutral))


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
