"""Hybrid methods for ``peft_kernels.apply``: several method configs on one model (:class:`CompositeConfig`), S⁴'s
layer-group design (:class:`S4Config`, Chen et al. 2023), SparseAdapter (:class:`SparseAdapterConfig`, He et al.
2022) and AdapterFusion (:class:`AdapterFusionConfig`, Pfeiffer et al. 2021).

A composite applies its parts' ``apply_to`` in order. Each part records its resolved config on the composite (see
``adapter_io.collecting``), not on the model; the model carries the composite, which saves every part's tensors in
peft_kernels' format (``peft_type`` ``PEFT_KERNELS_COMPOSITE`` / ``PEFT_KERNELS_S4``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch
from torch import nn

from . import adapter_io, targeting
from .adapter_io import CONFIG_NAME, PREFIX
from ._validate import is_int, is_number, require
from .adapters import (AdapterConfig, BitFitConfig, HadamardAdapterConfig, IA3Config, _Bottleneck, _module_names,
                       _pattern)
from .lora import LoRAConfig
from .nn import HadamardLinear, IA3Linear, LoRALinear
from .nn.adapter import BottleneckAdapter
from .nn.composite import AdapterFusion, FusedAdapters, MaskedLinear

# Parts whose modules fold into the frozen weights, and the module kinds that do the folding.
_MERGEABLE_PARTS = (LoRAConfig, IA3Config, HadamardAdapterConfig)
_MERGEABLE_MODULES = (LoRALinear, IA3Linear, HadamardLinear)


def _peft_type(part) -> str | None:
    return "LORA" if isinstance(part, LoRAConfig) else getattr(part, "peft_type", None)


def _part_classes() -> dict[str, type]:
    """peft_type -> config class of every method that can be a part (not the composites themselves)."""
    return {"LORA": LoRAConfig} | {t: c for t, c in adapter_io.METHODS.items() if not issubclass(c, _Composed)}


def _part(value, where: str):
    """A part config, from a config object or from its saved form ``{"peft_type": ..., "config": {...}}``."""
    classes = _part_classes()
    if isinstance(value, dict):
        cls = classes.get(value.get("peft_type"))
        if cls is None or not isinstance(value.get("config"), dict):
            raise ValueError(f"{where} must be {{'peft_type': one of {sorted(classes)}, 'config': {{...}}}}, "
                             f"got {value!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(value["config"].keys() - names)
        if unknown:
            raise ValueError(f"{where}: {cls.__name__} has no fields {unknown} (its fields: {sorted(names)})")
        return cls(**value["config"])
    if _peft_type(value) not in classes or not isinstance(value, classes[_peft_type(value)]):
        raise ValueError(f"{where} must be a method config ({', '.join(sorted(c.__name__ for c in classes.values()))}"
                         f"), got {type(value).__name__}")
    return value


def _saved_part(part) -> dict:
    return {"peft_type": _peft_type(part), "config": adapter_io.config_dict(part)}


def _without_head(part):
    """The part with ``train_task_head=False``: the composite, not each part, decides about the task head."""
    names = {f.name for f in dataclasses.fields(part)}
    return dataclasses.replace(part, train_task_head=False) if "train_task_head" in names else part


def _apply_part(part, model: nn.Module, structure_only: bool):
    """Apply one part to ``model``; return its resolved config (what it would have attached to the model)."""
    apply = getattr(part, "apply_for_load", part.apply_to) if structure_only else part.apply_to
    with adapter_io.collecting(model) as sink:
        apply(model)
    if isinstance(part, LoRAConfig):
        # LoRAConfig records itself as model.peft_kernels_lora (HF PEFT's format, not adapter_io's).
        return model.__dict__.pop("peft_kernels_lora")
    if len(sink) != 1:
        raise RuntimeError(f"CompositeConfig: {type(part).__name__}.apply_to attached {len(sink)} configs, expected "
                           "one (adapter_io.attach)")
    return sink[0]


def _footprint(part, model: nn.Module) -> tuple[set[str], set[str]]:
    """(outermost modules ``part`` replaces, parameters of ``model`` it trains), by their names in ``model``,
    from applying the part alone to a meta skeleton."""
    skeleton = adapter_io.skeleton(model)
    modules, params = dict(skeleton.named_modules()), dict(skeleton.named_parameters())
    _apply_part(part, skeleton, structure_only=True)
    after = dict(skeleton.named_modules())
    present = {id(p) for p in skeleton.parameters()}
    replaced = {n for n, m in modules.items() if n and after.get(n) is not m}
    outermost = {n for n in replaced if n.rpartition(".")[0] not in replaced}
    trained = {n for n, p in params.items() if p.requires_grad and id(p) in present}
    return outermost, trained


class _Composed:
    """What CompositeConfig and S4Config share: applying parts, the overlap checks, save/load state and merge.
    The resolved config attached to the model keeps ``_parts`` (each part's resolved config) and ``_layout``
    (per part: the names of its trainable parameters, new buffers and mergeable modules; and the task head's)."""

    def _parts_for(self, model: nn.Module) -> list:
        raise NotImplementedError

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Apply every part in order to ``model`` in place (after checking them all on a meta skeleton: overlapping
        parts or a part that fails raise a ValueError and leave the model untouched); return ``model``."""
        return self._apply(model, structure_only=False)

    def apply_for_load(self, model: nn.Module) -> nn.Module:
        """As :meth:`apply_to`, with each part's ``apply_for_load`` where it has one (the modules, not data-driven
        initialisation such as SNIP scores: ``load_adapter`` then restores the saved tensors)."""
        return self._apply(model, structure_only=True)

    def _apply(self, model: nn.Module, structure_only: bool) -> nn.Module:
        name = type(self).__name__
        present = adapter_io.attached(model) or getattr(model, "peft_kernels_lora", None)
        if present is not None:
            raise ValueError(f"{name}: the model already carries a {type(present).__name__}; apply a {name} to a "
                             "model without adapters (put the other method among its parts)")
        parts = [_without_head(p) for p in self._parts_for(model)]
        self._check_disjoint(parts, model)
        self._run(parts, adapter_io.skeleton(model), structure_only=True)
        resolved, layout = self._run(parts, model, structure_only)
        config = self._resolved(resolved)
        config._parts, config._layout = resolved, layout
        adapter_io.attach(model, config)
        return model

    def _resolved(self, parts: list):
        return dataclasses.replace(self)

    @staticmethod
    def _label(i: int, part) -> str:
        return f"part {i} ({type(part).__name__})"

    def _check_disjoint(self, parts: list, model: nn.Module) -> None:
        owner: dict[tuple[str, str], int] = {}
        for j, part in enumerate(parts):
            try:
                replaced, trained = _footprint(part, model)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{type(self).__name__}: {self._label(j, part)}: {exc}") from exc
            for key in [("module", n) for n in sorted(replaced)] + [("parameter", n) for n in sorted(trained)]:
                i = owner.setdefault(key, j)
                if i != j:
                    raise ValueError(f"{type(self).__name__}: {self._label(i, parts[i])} and {self._label(j, part)} "
                                     f"both target the {key[0]} {key[1]}; the parts must act on disjoint modules")

    def _run(self, parts: list, model: nn.Module, structure_only: bool) -> tuple[list, list[dict]]:
        claims: list[list[tuple[str, nn.Parameter]]] = []
        buffers, modules, resolved, claimed = [], [], [], set()
        for j, part in enumerate(parts):
            # The lists keep the part's replaced modules alive until the comparison below: a freed module's
            # address (its id) can be reused by the module that replaces it, which would then look old.
            before_modules, before_buffers = list(model.modules()), list(model.buffers())
            old_modules, old_buffers = {id(m) for m in before_modules}, {id(b) for b in before_buffers}
            try:
                resolved.append(_apply_part(part, model, structure_only))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{type(self).__name__}: {self._label(j, part)}: {exc}") from exc
            present = {id(p) for p in model.parameters()}
            for i, owned in enumerate(claims):
                lost = [n for n, p in owned if id(p) not in present]
                if lost:
                    raise ValueError(f"{type(self).__name__}: {self._label(j, part)} replaces module "
                                     f"{lost[0].rpartition('.')[0]}, whose parameter {lost[0]} {self._label(i, parts[i])}"
                                     f" trains; put {type(parts[i]).__name__} after {type(part).__name__} in the parts")
            # Each part freezes the whole model first; the earlier parts' parameters become trainable again, and
            # a parameter an earlier part created stays that part's (BitFit re-marking an adapter's biases).
            mine = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in claimed]
            for owned in claims:
                for _, p in owned:
                    p.requires_grad_(True)
            claims.append(mine)
            claimed |= {id(p) for _, p in mine}
            buffers.append([b for b in model.buffers() if id(b) not in old_buffers])
            modules.append([m for m in model.modules() if id(m) not in old_modules and isinstance(m, _MERGEABLE_MODULES)])
        heads = set()
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
            heads = {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in claimed}
        param_names = {id(p): n for n, p in model.named_parameters()}
        buffer_names = {id(b): n for n, b in model.named_buffers()}
        module_names = {id(m): n for n, m in model.named_modules()}
        layout = [{"parameters": [param_names[id(p)] for _, p in owned], "buffers": [buffer_names[id(b)] for b in bs],
                   "modules": [module_names[id(m)] for m in ms]} for owned, bs, ms in zip(claims, buffers, modules)]
        layout.append({"parameters": sorted(heads), "buffers": [], "modules": []})
        return resolved, layout

    @staticmethod
    def _applied(model: nn.Module, what: str):
        config = adapter_io.attached(model)
        if not isinstance(config, _Composed) or not hasattr(config, "_layout"):
            raise ValueError(f"{what}: the model carries no CompositeConfig / S4Config (apply one first)")
        return config

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every part's trainable parameters and new buffers (e.g. SparseAdapter masks), and a trained task head."""
        layout = self._applied(model, "save_adapter")._layout
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        return {n: tensors[n] for group in layout for n in group["parameters"] + group["buffers"]}

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        config = self._applied(model, "load_adapter")
        if any(model.get_submodule(n).merged for group in config._layout for n in group["modules"]):
            raise ValueError("load_adapter: some parts are merged; unmerge them before loading new tensors (the merged "
                             "weights hold the old ones)")
        targets = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, value in tensors.items():
            targets[name].copy_(value)

    def merge(self, model: nn.Module, skip_unmergeable: bool = False) -> nn.Module:
        """Fold the mergeable parts (LoRA, IA3, Hadamard) into the frozen weights; BitFit has nothing to fold (it
        trains the model's own biases). Other parts (bottleneck adapters, ...) cannot be folded: a
        NotImplementedError names them before anything is merged, unless ``skip_unmergeable`` (they then stay in
        the forward)."""
        return self._merge(model, skip_unmergeable, undo=False)

    def unmerge(self, model: nn.Module, skip_unmergeable: bool = False) -> nn.Module:
        """Undo :meth:`merge` (weights restored to within one rounding)."""
        return self._merge(model, skip_unmergeable, undo=True)

    def _merge(self, model: nn.Module, skip_unmergeable: bool, undo: bool) -> nn.Module:
        what = f"{type(self).__name__}.{'unmerge' if undo else 'merge'}"
        config = self._applied(model, what)
        blocked = [self._label(i, p) for i, p in enumerate(config._parts)
                   if not isinstance(p, _MERGEABLE_PARTS + (BitFitConfig,))]
        if blocked and not skip_unmergeable:
            raise NotImplementedError(f"{what}: {', '.join(blocked)} cannot be folded into the frozen weights; pass "
                                      "skip_unmergeable=True to merge the others and keep these in the forward")
        modules = [model.get_submodule(n) for group in config._layout for n in group["modules"]]
        wrong = [n for group in config._layout for n in group["modules"] if model.get_submodule(n).merged != undo]
        if wrong:
            raise RuntimeError(f"{what}: {wrong[0]} is {'not ' if undo else 'already '}merged")
        for module in modules:
            module.unmerge() if undo else module.merge()
        return model


@adapter_io.method("PEFT_KERNELS_COMPOSITE")
@dataclasses.dataclass
class CompositeConfig(_Composed):
    """Several methods on one model: ``parts`` (method configs: AdapterConfig, CompacterConfig, IA3Config,
    HadamardAdapterConfig, BitFitConfig, SparseAdapterConfig, AdapterFusionConfig, LoRAConfig) are applied in order.

    The parts must act on disjoint modules: two parts replacing the same module (e.g. LoRA and IA3 both on
    ``v_proj``) or training the same parameter of the model raise a ValueError naming the module and both parts,
    found by applying each part alone to a meta skeleton before the model is touched. A part may wrap a module
    inside one another part wraps (LoRA on ``down_proj`` inside a parallel adapter on ``mlp``), and BitFit may
    train the biases of modules other parts wrap; a part that *replaces* a module whose parameters an earlier part
    trains (LoRA after BitFit on the same Linear) raises, saying to reorder (LoRALinear keeps a bias, so BitFit
    after LoRA trains it). A parameter a part creates (an adapter's bias) belongs to that part even when a later
    BitFit marks it trainable again.

    The parts' ``train_task_head`` is ignored: the composite's decides whether a fresh classification head trains.
    Saved by ``save_adapter`` in peft_kernels' format: the config lists each part's peft_type and fields, the
    weights file every part's trainable tensors (and buffers, e.g. SparseAdapter masks). :meth:`merge` folds the
    mergeable parts (LoRA, IA3, Hadamard; BitFit has nothing to fold) and raises for the others.

    Every check runs on meta skeletons first, but a part whose initialisation reads data (SparseAdapter's SNIP
    ``loss_fn``) can only fail on the real model: the parts before it then stay applied.
    """

    parts: list = dataclasses.field(default_factory=list)
    train_task_head: bool = True

    def __post_init__(self):
        require("CompositeConfig", "parts", isinstance(self.parts, list) and len(self.parts) > 0,
                "a non-empty list of method configs", self.parts)
        self.parts = [_part(p, f"CompositeConfig: argument 'parts'[{i}]") for i, p in enumerate(self.parts)]
        require("CompositeConfig", "train_task_head", isinstance(self.train_task_head, bool), "a bool",
                self.train_task_head)

    def _parts_for(self, model: nn.Module) -> list:
        return list(self.parts)

    def _resolved(self, parts: list):
        return dataclasses.replace(self, parts=parts)

    def config_dict(self) -> dict:
        return {"parts": [_saved_part(p) for p in self.parts], "train_task_head": self.train_task_head}


# ---------------------------------------------------------------- S4


def spindle_split(num_layers: int, groups: int) -> list[int]:
    """Layer counts of ``groups`` consecutive groups in S⁴'s spindle pattern: the first and last groups get half the
    share of the middle ones (weights 1, 2, …, 2, 1; two groups: 1, 1), counts rounded by largest remainder with
    ties going to the groups nearer the middle, then every empty group takes one layer from the largest (nearest
    the middle). 12 layers, 4 groups: 2-4-4-2 (the paper's); 8: 1-3-3-1; 24: 4-8-8-4; 6: 1-2-2-1; 4: 1-1-1-1."""
    if not is_int(groups) or groups < 1:
        raise ValueError(f"spindle_split: argument 'groups' must be an int >= 1, got {groups!r}")
    if not is_int(num_layers) or num_layers < groups:
        raise ValueError(f"spindle_split: argument 'num_layers' must be an int >= groups ({groups}), got {num_layers!r}")
    weights = [1] * groups if groups <= 2 else [1] + [2] * (groups - 2) + [1]
    shares = [num_layers * w / sum(weights) for w in weights]
    sizes = [int(s) for s in shares]
    middle = (groups - 1) / 2
    order = sorted(range(groups), key=lambda g: (-(shares[g] - sizes[g]), abs(g - middle), g))
    for g in order[:num_layers - sum(sizes)]:
        sizes[g] += 1
    for g in range(groups):
        if sizes[g] == 0:
            donor = min(range(groups), key=lambda k: (-sizes[k], abs(k - middle), k))
            sizes[donor] -= 1
            sizes[g] += 1
    return sizes


def default_s4_assignment(groups: int = 4) -> list[list]:
    """The S⁴-model's methods per group (Chen et al. 2023, Table 6) with the methods on main: G1 adapter + LoRA,
    G2 adapter + LoRA (the paper adds prefix tuning), G3 adapter + LoRA + BitFit (+ prefix), G4 adapter + LoRA +
    BitFit (+ prefix). For other group counts: adapter + LoRA everywhere, BitFit in the second half of the groups.
    Hyperparameters are the configs' defaults (adapter: Houlsby, bottleneck 64; LoRA r 8 on q/v; BitFit all biases),
    not the paper's tuned ones."""
    return [[AdapterConfig(), LoRAConfig()] + ([BitFitConfig()] if 2 * g >= groups else []) for g in range(groups)]


def _layer_container(model: nn.Module) -> tuple[str, int]:
    """(name of the ModuleList holding the transformer layers, number of layers): the first ModuleList whose
    length is ``model.config.num_hidden_layers`` (LLaMA: model.layers; BERT: bert.encoder.layer)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and is_int(count) and len(module) == count:
            return name, count
    raise ValueError(f"S4Config: cannot find the layers of {type(model).__name__} (an nn.ModuleList of "
                     f"model.config.num_hidden_layers={count!r} modules)")


def _restrict(model: nn.Module, targets: list[str], layers: list[str]) -> list[str]:
    """Exact module names that ``targets`` (suffixes, ``*`` = one component) denote inside ``layers``: a match
    inside one of them is kept; a match containing them (BitFit's ``layers`` / ``encoder``) becomes the layers."""
    out = []
    for target in targets:
        pattern = _pattern(target)
        for name, _ in model.named_modules():
            if not name or not pattern.search(name):
                continue
            if any(name.startswith(layer + ".") or name == layer for layer in layers):
                out.append(name)
            elif any(layer.startswith(name + ".") for layer in layers):
                out.extend(layers)
    return list(dict.fromkeys(out))


@adapter_io.method("PEFT_KERNELS_S4")
@dataclasses.dataclass
class S4Config(_Composed):
    """S⁴ (Chen et al. 2023, "Parameter-Efficient Fine-Tuning Design Spaces"): the transformer layers split into
    ``groups`` consecutive groups in the spindle pattern (:func:`spindle_split`: 12 layers -> 2-4-4-2, 8 -> 1-3-3-1),
    each with its own list of method configs, ``assignment[g]``; None gives :func:`default_s4_assignment` (G1
    adapter + LoRA, G2 adapter + LoRA, G3 and G4 adapter + LoRA + BitFit). Prefix tuning, in the paper's G2–G4,
    joins these lists once it is a method config on main (any config with ``target_modules`` can be listed).

    Built on :class:`CompositeConfig`: each config's targets (its own or its architecture default) are rewritten as
    the exact names of the modules they match inside that group's layers (BitFit's ``layers`` / ``encoder`` become
    the group's layer modules; modules outside the layers, e.g. lm_head or the pooler, are not targeted), and the
    parts are applied group by group, in list order. Within a group BitFit goes after LoRA (see CompositeConfig):
    on BERT it then trains the LoRA-wrapped projections' biases; LLaMA's LoRA-wrapped q/v get no added bias.
    Needs at least ``groups`` layers. Saved with each group's configs as given (re-resolved on load).
    """

    groups: int = 4
    assignment: list | None = None
    train_task_head: bool = True

    def __post_init__(self):
        require("S4Config", "groups", is_int(self.groups) and self.groups >= 1, "an int >= 1", self.groups)
        if self.assignment is None:
            self.assignment = default_s4_assignment(self.groups)
        require("S4Config", "assignment", isinstance(self.assignment, list) and len(self.assignment) == self.groups
                and all(isinstance(g, list) and g for g in self.assignment),
                f"None or a list of {self.groups} non-empty lists of method configs", self.assignment)
        self.assignment = [[_part(c, f"S4Config: argument 'assignment'[{g}][{i}]") for i, c in enumerate(group)]
                           for g, group in enumerate(self.assignment)]
        for g, group in enumerate(self.assignment):
            for i, c in enumerate(group):
                if "target_modules" not in {f.name for f in dataclasses.fields(c)}:
                    raise ValueError(f"S4Config: argument 'assignment'[{g}][{i}] ({type(c).__name__}) has no "
                                     "target_modules to restrict to the group's layers")
        require("S4Config", "train_task_head", isinstance(self.train_task_head, bool), "a bool", self.train_task_head)

    def group_layers(self, model: nn.Module) -> list[list[str]]:
        """The module names of each group's layers (e.g. [['model.layers.0'], ['model.layers.1', ...], ...])."""
        container, count = _layer_container(model)
        if count < self.groups:
            raise ValueError(f"S4Config: {type(model).__name__} has {count} layers, fewer than groups={self.groups}")
        out, start = [], 0
        for size in spindle_split(count, self.groups):
            out.append([f"{container}.{i}" for i in range(start, start + size)])
            start += size
        return out

    def _parts_for(self, model: nn.Module) -> list:
        parts, resolved = [], []  # (config, its resolved form on the whole model); equal configs resolve once
        for g, (group, layers) in enumerate(zip(self.assignment, self.group_layers(model))):
            for config in group:
                full = next((r for c, r in resolved if c == config), None)
                if full is None:
                    try:
                        full = _apply_part(_without_head(config), adapter_io.skeleton(model), True)
                    except (ValueError, TypeError) as exc:
                        raise type(exc)(f"S4Config: group {g}: {type(config).__name__}: {exc}") from exc
                    resolved.append((config, full))
                names = _restrict(model, full.target_modules, layers)
                if not names:
                    raise ValueError(f"S4Config: group {g} ({layers[0]}..{layers[-1]}): {type(config).__name__}'s "
                                     f"target_modules {full.target_modules} match nothing inside these layers")
                fields = {"target_modules": names}
                if isinstance(config, IA3Config):
                    fields["feedforward_modules"] = [n for n in names if targeting.matches(n, full.feedforward_modules)]
                parts.append(dataclasses.replace(config, **fields))
        return parts

    def config_dict(self) -> dict:
        return {"groups": self.groups, "assignment": [[_saved_part(c) for c in group] for group in self.assignment],
                "train_task_head": self.train_task_head}


# ---------------------------------------------------------------- SparseAdapter


@adapter_io.method("PEFT_KERNELS_SPARSE_ADAPTER")
@dataclasses.dataclass
class SparseAdapterConfig(_Bottleneck):
    """SparseAdapter (He et al. 2022): the bottleneck adapters of :class:`AdapterConfig` (same ``placement``,
    ``target_modules``, ``scaling``, ``non_linearity``), with down and up projections as
    :class:`peft_kernels.nn.MaskedLinear`, pruned once at initialisation to ``sparsity`` (the fraction of weight
    entries set to zero; biases are not pruned) and kept at that mask through training.

    ``score``: ``"magnitude"`` (|w|) or ``"snip"`` (|w · ∂L/∂w|, the gradient summed over ``batches``, computed
    with the adapters in place before the model is modified; ``loss_fn(model, batch) -> scalar``, default
    ``model(**batch).loss`` for dict batches). ``scope="global"`` (default, as the paper): one threshold over all the
    adapters' weight matrices, so layers keep different fractions; ``"layer"``: each matrix keeps exactly
    1 - sparsity of its entries. Scoring runs in the model's current train/eval mode.

    The up projection is initialised N(0, ``init_std``²) (Houlsby et al.'s near-identity init, 1e-2), not zeros:
    with a zero up projection every magnitude score of up, and every SNIP score (down's gradient passes through
    up), would be zero. A fresh model therefore differs from the base by about init_std.

    Large-Sparse: a larger ``bottleneck`` with a higher ``sparsity`` (e.g. 4x the width at 75%) keeps the number
    of non-zero weights. Saved with its masks; not mergeable. Trainable count includes pruned entries (their
    gradients are zero): ``kept_weights`` gives the non-zero count.
    """

    bottleneck: int = 64
    sparsity: float = 0.5
    score: str = "magnitude"
    scope: str = "global"
    batches: list | None = None
    loss_fn: object = None
    init_std: float = 1e-2
    placement: str = "houlsby"
    scaling: float = 1.0
    non_linearity: str = "relu"
    target_modules: list[str] | None = None
    train_task_head: bool = True

    def __post_init__(self):
        self._validate("SparseAdapterConfig")
        require("SparseAdapterConfig", "sparsity", is_number(self.sparsity) and 0 <= self.sparsity < 1,
                "a number in [0, 1)", self.sparsity)
        require("SparseAdapterConfig", "score", self.score in ("magnitude", "snip"), "'magnitude' or 'snip'", self.score)
        require("SparseAdapterConfig", "scope", self.scope in ("global", "layer"), "'global' or 'layer'", self.scope)
        require("SparseAdapterConfig", "batches", self.batches is None or (isinstance(self.batches, list) and
                len(self.batches) > 0), "None or a non-empty list of batches", self.batches)
        require("SparseAdapterConfig", "loss_fn", self.loss_fn is None or callable(self.loss_fn),
                "None or a callable (model, batch) -> loss", self.loss_fn)
        require("SparseAdapterConfig", "init_std", is_number(self.init_std) and self.init_std > 0,
                "a number > 0", self.init_std)

    def _projections(self, name, d, factory):
        down = MaskedLinear(d, self.bottleneck, **factory)
        up = MaskedLinear(self.bottleneck, d, init_std=self.init_std, **factory)
        return down, up

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Wrap the targeted modules in adapters with MaskedLinear projections, prune them by ``score`` (SNIP: the
        adapters are swapped in for the scoring and swapped out again, even if it fails), then install them as
        :meth:`AdapterConfig.apply_to` does; return ``model``."""
        if self.score == "snip" and self.batches is None:
            raise ValueError("SparseAdapterConfig: score='snip' needs argument 'batches' (a list of batches for "
                             "loss_fn), got None")
        names, made, targets = self._build(model, self._projections)
        layers = [m for name in names for m in (made[name].adapter.down, made[name].adapter.up)]
        scores = self._snip(model, names, made, layers) if self.score == "snip" else [
            layer.weight.detach().abs() for layer in layers]
        for layer, keep in zip(layers, self._keep(scores)):
            layer.prune_(keep)
        return self._install(model, names, made, targets)

    def apply_for_load(self, model: nn.Module) -> nn.Module:
        """The same modules with all-ones masks (``load_adapter`` then restores the saved weights and masks)."""
        return self._install(model, *self._build(model, self._projections))

    def _snip(self, model, names, made, layers) -> list[torch.Tensor]:
        weights = [layer.weight for layer in layers]
        grads = [torch.zeros_like(w) for w in weights]
        for name in names:
            targeting.replace(model, [name], lambda _: made[name])
        try:
            for i, batch in enumerate(self.batches):
                if self.loss_fn is not None:
                    loss = self.loss_fn(model, batch)
                elif isinstance(batch, dict):
                    loss = model(**batch).loss
                else:
                    raise ValueError(f"SparseAdapterConfig: batches[{i}] must be a dict of model inputs with labels "
                                     f"(or pass loss_fn), got {type(batch).__name__}")
                for g, dw in zip(grads, torch.autograd.grad(loss, weights)):
                    g.add_(dw)
        finally:
            for name in names:
                targeting.replace(model, [name], lambda wrapper: wrapper.base)
        return [(w.detach() * g).abs() for w, g in zip(weights, grads)]

    def _keep(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Bool masks keeping the round((1 - sparsity) · n) highest scores (over all matrices, or per matrix)."""
        def top(flat: torch.Tensor) -> torch.Tensor:
            keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            keep[flat.float().topk(round((1 - self.sparsity) * flat.numel())).indices] = True
            return keep

        if self.scope == "layer":
            return [top(s.flatten()).view_as(s) for s in scores]
        keep = top(torch.cat([s.flatten() for s in scores]))
        return [k.view_as(s) for k, s in zip(keep.split([s.numel() for s in scores]), scores)]

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable parameters and every MaskedLinear's mask."""
        masks = {n: b for n, b in model.named_buffers() if n.endswith(".mask") and
                 isinstance(model.get_submodule(n.rpartition(".")[0]), MaskedLinear)}
        return adapter_io.default_state(model) | masks


def kept_weights(model: nn.Module) -> tuple[int, int]:
    """(non-zero mask entries, all mask entries) over the MaskedLinear modules of ``model``."""
    masks = [m.mask for m in model.modules() if isinstance(m, MaskedLinear)]
    return sum(int(m.count_nonzero()) for m in masks), sum(m.numel() for m in masks)


# ---------------------------------------------------------------- AdapterFusion


@adapter_io.method("PEFT_KERNELS_ADAPTER_FUSION")
@dataclasses.dataclass
class AdapterFusionConfig:
    """AdapterFusion (Pfeiffer et al. 2021), stage two: ``adapters`` are directories of task adapters saved by
    ``peft_kernels.save_adapter`` from an :class:`AdapterConfig` with a sequential placement (houlsby or pfeiffer;
    all with the same placement and targets). They are loaded frozen (their task heads are not), and at every
    placement a trainable :class:`peft_kernels.nn.AdapterFusion` attends over their outputs
    (:class:`peft_kernels.nn.FusedAdapters`: query from the sublayer output, keys/values from each adapter's output,
    softmax over the adapters; value initialised to the identity, query/key random). Trainable per placement:
    3·(d² + d). Saving writes the fusion layers (and a task head); loading needs the adapter directories again.
    Not mergeable.
    """

    adapters: list[str] = dataclasses.field(default_factory=list)
    train_task_head: bool = True

    def __post_init__(self):
        require("AdapterFusionConfig", "adapters", isinstance(self.adapters, list) and len(self.adapters) > 0 and all(
            isinstance(a, (str, pathlib.Path)) for a in self.adapters), "a non-empty list of directories", self.adapters)
        self.adapters = [str(a) for a in self.adapters]

    def _task(self, directory: str) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        path = pathlib.Path(directory)
        try:
            raw = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"AdapterFusionConfig: cannot read {path / CONFIG_NAME}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("peft_type") != AdapterConfig.peft_type:
            got = raw.get("peft_type") if isinstance(raw, dict) else raw
            raise ValueError(f"AdapterFusionConfig: {path} must hold an AdapterConfig adapter (peft_type "
                             f"{AdapterConfig.peft_type!r}), got peft_type {got!r}")
        config = adapter_io.config_from_dict(raw, path / CONFIG_NAME)
        if config.placement == "parallel":
            raise ValueError(f"AdapterFusionConfig: {path} holds parallel adapters; fusion supports the sequential "
                             "placements (houlsby, pfeiffer)")
        tensors = {k.removeprefix(PREFIX): v for k, v in adapter_io.read_tensors(path, "AdapterFusionConfig").items()}
        return config, tensors

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Wrap each placement of the saved adapters in :class:`FusedAdapters` (the adapters loaded and frozen, a
        fresh fusion layer trainable), freeze everything else but fresh task heads; return ``model``."""
        tasks = [self._task(a) for a in self.adapters]
        first = tasks[0][0]
        for directory, (config, _) in zip(self.adapters[1:], tasks[1:]):
            if (config.placement, config.target_modules) != (first.placement, first.target_modules):
                raise ValueError(f"AdapterFusionConfig: {directory} places adapters at {config.placement} "
                                 f"{config.target_modules}, {self.adapters[0]} at {first.placement} "
                                 f"{first.target_modules}; fused adapters must share their placement")
        names = _module_names(model, first.target_modules)
        made = {}
        for name in names:
            module = model.get_submodule(name)
            d = first._width(model, name, module)
            p = next(module.parameters())
            factory = {"device": p.device, "dtype": p.dtype}
            adapters = []
            for directory, (config, tensors) in zip(self.adapters, tasks):
                adapter = BottleneckAdapter(d, config.bottleneck, config.non_linearity, config.scaling, **factory)
                state = {k.removeprefix(f"{name}.adapter."): v for k, v in tensors.items()
                         if k.startswith(f"{name}.adapter.")}
                expected = {k: list(v.shape) for k, v in adapter.state_dict().items()}
                found = {k: list(v.shape) for k, v in state.items()}
                if found != expected:
                    raise ValueError(f"AdapterFusionConfig: {directory} does not fit {name} of {type(model).__name__}:"
                                     f" it holds {found}, the adapter needs {expected}")
                if factory["device"].type != "meta":  # a meta skeleton (load_adapter's probe) only needs the shapes
                    adapter.load_state_dict(state)
                adapter.requires_grad_(False)
                adapters.append(adapter)
            made[name] = FusedAdapters(module, adapters, AdapterFusion(d, **factory))
        targeting.freeze(model)
        for name in names:
            targeting.replace(model, [name], lambda _: made[name])
            made[name].fusion.requires_grad_(True)
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        adapter_io.attach(model, dataclasses.replace(self))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("AdapterFusionConfig.merge: the fusion attention is input-dependent; it cannot be "
                                  "folded into the frozen weights")

    unmerge = merge
