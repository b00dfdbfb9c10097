"""Model-level KronA: target nn.Linear modules of a transformers model by name (:class:`KronAConfig`, applied by
``peft_kernels.apply``), and save/load adapters in HF PEFT's LoKr format, so PEFT loads ours and we load theirs.

LoKr's update of a Linear is ``alpha / r * kron(w1, w2)``; ``w1`` and ``w2`` are stored whole (``lokr_w1``,
``lokr_w2``) or as low-rank pairs (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``), the choice made per
layer from ``r`` (``lokr_w2`` whole when r >= max(w2's dims) / 2). KronA's A is ``w1`` and B is ``w2``, with
``scaling = alpha / r``. Saving writes whole factors with one ``r`` large enough for every layer and
``alpha = scaling * r``; loading multiplies low-rank pairs out into whole factors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import torch
from safetensors.torch import save_file
from torch import nn

from . import targeting
from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_tensors
from .adapter_io import PREFIX as _PREFIX
from .nn.krona import KronALinear, factor_shapes

_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclasses.dataclass
class KronAConfig:
    """What ``peft_kernels.apply`` does with KronA: each targeted nn.Linear becomes a :class:`KronALinear` whose
    factor shapes follow PEFT LoKr's ``decompose_factor`` rule (-1: balanced). ``target_modules``: names (or name
    suffixes after a dot) of nn.Linear modules; None picks the architecture's default (LLaMA: q_proj, v_proj)."""

    scaling: float = 1.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    decompose_factor: int = -1
    residual: bool = False
    train_task_head: bool = True

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Replace the targeted nn.Linear modules of ``model`` in place by :class:`KronALinear` (sharing their
        weights), freeze every other parameter except fresh task heads, and return ``model``."""
        targets = targeting.resolve_targets(model, self.target_modules, config_name="KronAConfig")
        names = targeting.linear_names(model, targets)
        # Every layer is built before the model is touched: a layer that cannot take the adapter (a prime width,
        # residual on a non-square layer) raises with the model unchanged.
        made = {}
        for name in names:
            linear = model.get_submodule(name)
            try:
                made[id(linear)] = KronALinear.from_linear(linear, scaling=self.scaling, dropout=self.dropout,
                                                           residual=self.residual, decompose_factor=self.decompose_factor)
            except ValueError as exc:
                raise ValueError(f"apply: {name}: {exc}") from exc
        targeting.freeze(model)
        targeting.replace(model, names, lambda linear: made[id(linear)])
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        model.peft_kernels_krona = dataclasses.replace(self, target_modules=targets)
        return model

    def to_peft_dict(self, r: int) -> dict:
        return {
            "peft_type": "LOKR",
            "r": r,
            "alpha": self.scaling * r,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            "rank_dropout_scale": False,
            "decompose_both": False,
            "decompose_factor": self.decompose_factor,
            "use_effective_conv2d": False,
            "target_modules": sorted(self.target_modules),
            "init_weights": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
            "task_type": None,
            "base_model_name_or_path": None,
        }


def _krona_modules(model: nn.Module) -> dict[str, KronALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KronALinear)}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the KronA adapter in HF PEFT's LoKr format (loadable by ``peft.PeftModel.from_pretrained``); each file
    is written to a temporary name and renamed, so a failure leaves any previous adapter there intact."""
    config = getattr(model, "peft_kernels_krona", None)
    modules = _krona_modules(model)
    if config is None or not modules:
        raise ValueError("save_adapter: the model carries no KronA adapter (call peft_kernels.apply first)")
    if any(m.merged for m in modules.values()):
        raise ValueError("save_adapter: some KronALinear modules are merged; unmerge() them before saving the adapter")
    if any(m.residual for m in modules.values()):
        raise NotImplementedError("save_adapter: PEFT's LoKr format has no residual scale (KronA^B_res); save "
                                  "model.state_dict() instead")
    others = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters()
                     if p.requires_grad and n.rsplit(".", 1)[-1] not in ("A", "B")})
    if others:
        raise NotImplementedError(
            f"save_adapter: trainable modules outside the adapter ({others[:4]}) are not saved in the adapter "
            "format yet; save their state_dict() separately and freeze them first, or apply with "
            "KronAConfig(train_task_head=False)"
        )
    for name, m in modules.items():
        # PEFT recomputes each layer's factor shapes from decompose_factor when it loads.
        expected = factor_shapes(m.in_features, m.out_features, decompose_factor=config.decompose_factor)
        if (m.a_shape, m.b_shape) != expected:
            raise ValueError(f"save_adapter: {name} has factors A {list(m.a_shape)}, B {list(m.b_shape)}, but PEFT's "
                             f"LoKr with decompose_factor={config.decompose_factor} makes {[list(s) for s in expected]}")
    # One r for every layer, large enough that PEFT stores each w2 whole (r >= max(w2 dims) / 2).
    r = max(max(m.b_shape) for m in modules.values())
    tensors = {}
    for name, m in modules.items():
        tensors[f"{_PREFIX}{name}.lokr_w1"] = m.A.detach().contiguous()
        tensors[f"{_PREFIX}{name}.lokr_w2"] = m.B.detach().contiguous()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.to_peft_dict(r), indent=2)
    atomic_write({directory / WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
                   directory / CONFIG_NAME: lambda path: pathlib.Path(path).write_text(text)})


def load_adapter(model: nn.Module, directory: str | os.PathLike, raw: dict) -> nn.Module:
    """Load a LoKr adapter (ours or HF PEFT's; ``raw`` is its parsed adapter_config.json) into ``model``, applying
    KronA first if the model has none. Every key and shape is checked before anything is copied: on error the
    model is left as it was."""
    directory = pathlib.Path(directory)
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise NotImplementedError(f"load_adapter: LoKr adapters with a per-layer {key} are not supported")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(f"load_adapter: target_modules must be a list of module names, got {targets!r}")
    r, alpha = raw.get("r"), raw.get("alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"load_adapter: a LoKr config needs an int 'r' >= 1 and a number 'alpha', got r={r!r}, "
                         f"alpha={alpha!r}")
    scaling = alpha / r
    config = KronAConfig(scaling=scaling, target_modules=list(targets), decompose_factor=raw.get("decompose_factor", -1))
    tensors = read_tensors(directory)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, part = _split_key(key)
        parts.setdefault(name, {})[part] = value
    factors = {name: (_whole(name, p, "lokr_w1"), _whole(name, p, "lokr_w2")) for name, p in parts.items()}
    modules = _krona_modules(model)
    if not modules:
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        stray = sorted(set(factors) - linears)
        if stray:
            raise ValueError(f"load_adapter: {stray[0]} names no nn.Linear of {type(model).__name__}: the adapter was "
                             "made for another architecture")
        _check(factors, {n: _shapes(m, config) for n, m in model.named_modules() if n in factors})
        config.apply_to(model)
        modules = _krona_modules(model)
    missing = sorted(set(modules) - set(factors))
    if missing:
        raise ValueError(f"load_adapter: the file lacks the factors of {missing[:4]}")
    _check(factors, {n: (m.a_shape, m.b_shape) for n, m in modules.items()})
    with torch.no_grad():
        for name, (a, b) in factors.items():
            modules[name].A.copy_(a)
            modules[name].B.copy_(b)
            modules[name].scaling = scaling
    return model


def _shapes(linear: nn.Linear, config: KronAConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    return factor_shapes(linear.in_features, linear.out_features, decompose_factor=config.decompose_factor)


def _check(factors: dict, shapes: dict) -> None:
    for name, (a, b) in factors.items():
        if name not in shapes:
            raise ValueError(f"load_adapter: {name} names no KronA module of the model (its KronA modules include "
                             f"{list(shapes)[:4]})")
        want = shapes[name]
        if (tuple(a.shape), tuple(b.shape)) != want:
            raise ValueError(f"load_adapter: {name} has factors w1 {list(a.shape)}, w2 {list(b.shape)} in the file but "
                             f"A {list(want[0])}, B {list(want[1])} in the model")


def _whole(name: str, parts: dict, base: str) -> torch.Tensor:
    """``base`` (lokr_w1 or lokr_w2) stored whole, or multiplied out from its ``_a``/``_b`` pair in fp32."""
    if base in parts:
        return parts[base]
    if f"{base}_a" in parts and f"{base}_b" in parts:
        a, b = parts[f"{base}_a"], parts[f"{base}_b"]
        return (a.float() @ b.float()).to(a.dtype)
    raise ValueError(f"load_adapter: {name} has neither {base} nor {base}_a and {base}_b in the file")


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.layers.0.q_proj.lokr_w1' -> ('layers.0.q_proj', 'lokr_w1')."""
    name, _, part = key.removeprefix(_PREFIX).rpartition(".")
    if part not in _PARTS or not name:
        raise ValueError(f"load_adapter: unexpected key {key!r} (expected '<module>.' followed by one of {list(_PARTS)}; "
                         "lokr_t2 belongs to convolutions)")
    return name, part
