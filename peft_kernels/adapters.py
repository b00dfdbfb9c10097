"""Adapter methods for ``peft_kernels.apply``: bottleneck adapters (:class:`AdapterConfig`: Houlsby, Pfeiffer,
scaled parallel), Compacter / Compacter++ (:class:`CompacterConfig`), (IA)³ (:class:`IA3Config`, saved in HF PEFT's
IA3 format), the Hadamard adapter (:class:`HadamardAdapterConfig`) and BitFit (:class:`BitFitConfig`).

Every config swaps or edits modules of a transformers model in place, freezes the rest (a fresh classification
head stays trainable with ``train_task_head``) and records itself for ``peft_kernels.save_adapter`` /
``load_adapter``. ``config.merge(model)`` / ``config.unmerge(model)`` fold a mergeable method into the frozen
weights and back; the others raise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import torch
from safetensors.torch import save_file
from torch import nn

from . import adapter_io, targeting
from .adapter_io import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .nn.adapter import (NON_LINEARITIES, BottleneckAdapter, HadamardLinear, IA3Linear, ParallelAdapter,
                         SequentialAdapter, zero_)
from .nn.compacter import PHMLinear
from ._validate import check_targets, is_int, is_number, require

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma")
_BERT_LIKE = ("bert", "roberta")


def _table(llama: list[str], bert: list[str]) -> dict[str, list[str]]:
    return {t: llama for t in _LLAMA_LIKE} | {t: bert for t in _BERT_LIKE}


# Where each placement puts its adapters. Sequential placements wrap the projection whose output feeds the residual
# add (BERT's adds and LayerNorms sit in BertSelfOutput / BertOutput *after* their `dense`, so wrapping `dense` puts
# the adapter before the residual, as in Houlsby et al.). "layer.*" spares BERT's attention.output.dense, which a
# bare "output.dense" suffix would also match. The parallel adapter wraps the whole FFN sublayer (it reads the
# sublayer's input): LLaMA's `mlp`, BERT's `output` (whose forward receives the FFN input as `input_tensor`).
ADAPTER_TARGETS = {
    "houlsby": _table(["o_proj", "down_proj"], ["attention.output.dense", "layer.*.output.dense"]),
    "pfeiffer": _table(["down_proj"], ["layer.*.output.dense"]),
    "parallel": _table(["mlp"], ["layer.*.output"]),
}
# HF PEFT's IA3 defaults (peft.utils.constants, 0.21): keys and values, and the FFN's down projection, whose input is
# scaled. PEFT matches "output.dense" as a suffix, so BERT's attention.output.dense is a feed-forward target too.
IA3_TARGETS = _table(["k_proj", "v_proj", "down_proj"], ["key", "value", "output.dense"])
IA3_FEEDFORWARD = _table(["down_proj"], ["output.dense"])
HADAMARD_TARGETS = _table(["o_proj"], ["attention.output.dense"])
# BitFit: the biases of every module under these (LLaMA: the decoder layers, i.e. every Linear but lm_head).
BITFIT_TARGETS = _table(["layers"], ["encoder"])


def _pattern(target: str) -> re.Pattern:
    """``target`` as a dotted-name suffix; a ``*`` component matches any one component (a layer index)."""
    parts = [r"[^.]+" if p == "*" else re.escape(p) for p in target.split(".")]
    return re.compile(r"(?:^|\.)" + r"\.".join(parts) + "$")


def _module_names(model: nn.Module, targets: list[str]) -> list[str]:
    patterns = [_pattern(t) for t in targets]
    names = [n for n, _ in model.named_modules() if n and any(p.search(n) for p in patterns)]
    if not names:
        raise ValueError(f"apply: target_modules {targets} match no module of {type(model).__name__}")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"apply: target_modules {targets} match both {nested[0][0]} and {nested[0][1]} inside it; "
                         "an adapter cannot wrap a module and one of its submodules")
    return names


def _factory(module: nn.Module) -> dict:
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


def _merge_all(model: nn.Module, kind: type, config: str, undo: bool) -> nn.Module:
    modules = [m for m in model.modules() if isinstance(m, kind)]
    if not modules:
        raise ValueError(f"{config}.{'unmerge' if undo else 'merge'}: the model has no {kind.__name__} modules "
                         "(apply the config first)")
    for m in modules:
        m.unmerge() if undo else m.merge()
    return model


def _check_unmerged(model: nn.Module, kind: type, what: str) -> None:
    if any(m.merged for m in model.modules() if isinstance(m, kind)):
        raise ValueError(f"{what}: the model's {kind.__name__} modules are merged; unmerge them before loading new "
                         "vectors (the merged weights hold the old ones)")


class _Bottleneck:
    """What AdapterConfig and CompacterConfig share: placement, target resolution and module surgery."""

    def _validate(self, name: str) -> None:
        require(name, "bottleneck", is_int(self.bottleneck) and self.bottleneck >= 1, "an int >= 1", self.bottleneck)
        require(name, "placement", self.placement in ADAPTER_TARGETS, f"one of {sorted(ADAPTER_TARGETS)}",
                self.placement)
        require(name, "non_linearity", self.non_linearity in NON_LINEARITIES, f"one of {sorted(NON_LINEARITIES)}",
                self.non_linearity)
        require(name, "scaling", is_number(self.scaling), "a number", self.scaling)
        check_targets(name, "target_modules", self.target_modules)

    def _width(self, model: nn.Module, name: str, module: nn.Module) -> int:
        """d: the adapter's input and output width at ``module``."""
        parallel = self.placement == "parallel"
        if isinstance(module, nn.Linear):
            if parallel and module.in_features != module.out_features:
                raise ValueError(f"apply: {name}: a parallel adapter adds f(input) to the output, so the Linear must "
                                 f"map d -> d; it maps {module.in_features} -> {module.out_features}")
            return module.out_features
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not is_int(hidden):
            raise ValueError(f"apply: {name} is a {type(module).__name__}, not an nn.Linear; its width is taken from "
                             f"model.config.hidden_size, which {type(model).__name__} lacks")
        return hidden

    def _apply(self, model: nn.Module, projections) -> nn.Module:
        """``projections(name, d, factory) -> (down, up)`` builds each adapter's projections (None: nn.Linear)."""
        return self._install(model, *self._build(model, projections))

    def _build(self, model: nn.Module, projections) -> tuple[list[str], dict[str, nn.Module], list[str]]:
        """(target names, name -> wrapper holding its fresh adapter, resolved targets); ``model`` is not touched."""
        config_name = type(self).__name__
        targets = targeting.resolve_targets(model, self.target_modules, table=ADAPTER_TARGETS[self.placement],
                                            config_name=config_name)
        names = _module_names(model, targets)
        wrapper = ParallelAdapter if self.placement == "parallel" else SequentialAdapter
        made = {}
        for name in names:
            module = model.get_submodule(name)
            d, factory = self._width(model, name, module), _factory(module)
            try:
                down, up = projections(name, d, factory)
                adapter = BottleneckAdapter(d, self.bottleneck, self.non_linearity, self.scaling, down, up, **factory)
            except ValueError as exc:
                raise ValueError(f"apply: {name}: {exc}") from exc
            made[name] = wrapper(module, adapter)
        return names, made, targets

    def _install(self, model: nn.Module, names: list[str], made: dict[str, nn.Module], targets: list[str]) -> nn.Module:
        targeting.freeze(model)
        for name in names:
            targeting.replace(model, [name], lambda _: made[name])
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__}.merge: bottleneck adapters apply a non-linearity between "
                                  "their down and up projections, so they cannot be folded into the frozen weights")

    unmerge = merge


@adapter_io.method("PEFT_KERNELS_ADAPTER")
@dataclasses.dataclass
class AdapterConfig(_Bottleneck):
    """Bottleneck adapters ``f(h) = scaling * up(act(down(h)))`` (d -> ``bottleneck`` -> d, up zero-initialised, so
    a fresh adapter leaves the model's outputs unchanged). Trainable per adapter: 2·d·m + m + d.

    ``placement``:

    * ``"houlsby"`` (Houlsby et al. 2019): sequential ``h + f(h)`` after the attention output projection and after
      the FFN, before each residual add. Defaults: LLaMA ``o_proj``, ``down_proj``; BERT/RoBERTa
      ``attention.output.dense``, ``layer.*.output.dense``.
    * ``"pfeiffer"``: the same after the FFN only (LLaMA ``down_proj``; BERT ``layer.*.output.dense``).
    * ``"parallel"`` (He et al. 2022): ``sublayer(x) + f(x)`` on the FFN sublayer (LLaMA ``mlp``; BERT ``layer.*.output``,
      where f is added before BertOutput's residual and LayerNorm); ``scaling=4`` gives their scaled parallel adapter.

    ``target_modules``: module-name suffixes (``*`` matches one name component, e.g. a layer index) replacing the
    placement's default; sequential targets are nn.Linear (d = out_features) or modules returning
    [..., hidden_size]. ``non_linearity``: relu, gelu, silu (swish) or tanh. Not mergeable.
    """

    bottleneck: int = 64
    placement: str = "houlsby"
    scaling: float = 1.0
    non_linearity: str = "relu"
    target_modules: list[str] | None = None
    train_task_head: bool = True

    def __post_init__(self):
        self._validate("AdapterConfig")

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Wrap the targeted modules of ``model`` in place in :class:`SequentialAdapter` / :class:`ParallelAdapter`
        (each with a fresh :class:`BottleneckAdapter`), freeze everything else but fresh task heads; return it."""
        return self._apply(model, lambda name, d, factory: (None, None))


@adapter_io.method("PEFT_KERNELS_COMPACTER")
@dataclasses.dataclass
class CompacterConfig(_Bottleneck):
    """Compacter (Mahabadi et al. 2021): the bottleneck adapters of :class:`AdapterConfig` with down (d -> m) and up
    (m -> d) projections as :class:`peft_kernels.nn.PHMLinear`, ``W = Σᵢ Aᵢ ⊗ Bᵢ`` over ``n`` terms (on the
    ``kron_linear`` op), each ``Bᵢ = sᵢ tᵢ`` of rank ``rank`` (None: full Bᵢ, the PHM adapter).

    ``shared=True``: one [n, n, n] Parameter of the Aᵢ serves every projection of every layer (counted, saved and
    loaded once; it is trainable); False gives each projection its own. ``placement``: ``"houlsby"`` (Compacter) or
    ``"pfeiffer"`` (FFN only: Compacter++); ``"parallel"`` also works. ``n`` must divide d and ``bottleneck``.
    Trainable: n³ (shared) + per adapter rank·(d + m)·2 + m + d (low rank) or 2·d·m/n + m + d (PHM). The up
    projection starts at zero (its sᵢ, or Bᵢ, and bias). Not mergeable.
    """

    n: int = 4
    rank: int | None = 1
    shared: bool = True
    bottleneck: int = 64
    placement: str = "houlsby"
    scaling: float = 1.0
    non_linearity: str = "relu"
    target_modules: list[str] | None = None
    train_task_head: bool = True

    def __post_init__(self):
        self._validate("CompacterConfig")
        require("CompacterConfig", "n", is_int(self.n) and self.n >= 1, "an int >= 1", self.n)
        require("CompacterConfig", "rank", self.rank is None or (is_int(self.rank) and self.rank >= 1),
                "None (full PHM factors) or an int >= 1", self.rank)
        require("CompacterConfig", "shared", isinstance(self.shared, bool), "a bool", self.shared)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """As :meth:`AdapterConfig.apply_to`, with PHMLinear projections (sharing one A when ``shared``)."""
        shared = {}

        def projections(name, d, factory):
            if self.shared and not shared:
                shared["A"] = PHMLinear.shared_factors(self.n, **factory)
            a = shared.get("A")
            down = PHMLinear(d, self.bottleneck, self.n, self.rank, a, **factory)
            up = zero_(PHMLinear(self.bottleneck, d, self.n, self.rank, a, **factory))
            return down, up

        return self._apply(model, projections)


class _Scaling:
    """Merge / unmerge for the configs whose modules fold into the frozen weights."""

    kind: type

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every adapter module of ``model`` into its Linear (forward becomes the plain Linear)."""
        return _merge_all(model, self.kind, type(self).__name__, undo=False)

    def unmerge(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`merge` (weights restored to within one rounding)."""
        return _merge_all(model, self.kind, type(self).__name__, undo=True)


@adapter_io.method("IA3")
@dataclasses.dataclass
class IA3Config(_Scaling):
    """(IA)³ (Liu et al. 2022): learned vectors, initialised to ones, that scale the outputs of the targeted Linear
    layers (l_k, l_v on the key/value projections; ``ia3_l`` [out, 1]) or, for those also in
    ``feedforward_modules``, their inputs (l_ff on the FFN's down projection; ``ia3_l`` [1, in]).

    Defaults (HF PEFT's): LLaMA ``k_proj``, ``v_proj``, ``down_proj`` with ``down_proj`` feed-forward; BERT/RoBERTa
    ``key``, ``value``, ``output.dense`` with ``output.dense`` feed-forward (the suffix also matches
    attention.output.dense, as in PEFT). ``feedforward_modules`` None takes the architecture's default; it must be a
    subset of ``target_modules``. Mergeable (:meth:`merge` folds l into W's rows, and bias, or columns).

    Saved in HF PEFT's IA3 format (``peft.PeftModel.from_pretrained`` loads it; ``peft_kernels.load_adapter`` loads
    PEFT's), a trainable classification head as PEFT's ``modules_to_save``.
    """

    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None
    train_task_head: bool = True

    kind = IA3Linear

    def __post_init__(self):
        check_targets("IA3Config", "target_modules", self.target_modules)
        check_targets("IA3Config", "feedforward_modules", self.feedforward_modules)

    def _resolved(self, model: nn.Module) -> tuple[list[str], list[str]]:
        targets = targeting.resolve_targets(model, self.target_modules, table=IA3_TARGETS, config_name="IA3Config")
        feedforward = self.feedforward_modules
        if feedforward is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in IA3_FEEDFORWARD:
                raise ValueError(f"apply: no default feedforward_modules for model_type {model_type!r} (known: "
                                 f"{sorted(IA3_FEEDFORWARD)}); pass IA3Config(feedforward_modules=[...]) ([] for none)")
            feedforward = IA3_FEEDFORWARD[model_type]
        stray = sorted(set(feedforward) - set(targets))
        if stray:
            raise ValueError(f"IA3Config: feedforward_modules must be a subset of target_modules {targets}; {stray} "
                             "are not in it")
        return targets, list(feedforward)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Wrap the targeted nn.Linear modules of ``model`` in place in :class:`IA3Linear` (sharing their weights),
        freeze everything else but fresh task heads, and return ``model``."""
        targets, feedforward = self._resolved(model)
        names = targeting.linear_names(model, targets)
        made = {n: IA3Linear(model.get_submodule(n), targeting.matches(n, feedforward)) for n in names}
        targeting.freeze(model)
        for name in names:
            targeting.replace(model, [name], lambda _: made[name])
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets, feedforward_modules=feedforward))
        return model

    def to_peft_dict(self, modules_to_save: list[str], seq_cls: bool) -> dict:
        return {
            "peft_type": "IA3",
            "target_modules": sorted(self.target_modules),
            "feedforward_modules": sorted(self.feedforward_modules),
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "modules_to_save": modules_to_save or None,
            "exclude_modules": None,
            "inference_mode": True,
            "task_type": "SEQ_CLS" if seq_cls else None,
            "base_model_name_or_path": None,
            "revision": None,
        }

    def save_foreign(self, model: nn.Module, directory: str | os.PathLike) -> None:
        """Write HF PEFT's IA3 files: ``<module>.ia3_l`` per layer (merged or not: l itself is saved) and whole
        trainable modules outside the adapter (a fresh task head) as ``modules_to_save``."""
        tensors, heads = {}, set()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            tensors[PREFIX + name] = p.detach().contiguous()
            if not name.endswith(".ia3_l"):
                module_name = name.rpartition(".")[0]
                if not all(q.requires_grad for q in model.get_submodule(module_name).parameters()):
                    raise NotImplementedError(f"save_adapter: {name} is trainable but other parameters of "
                                              f"{module_name} are frozen; PEFT's IA3 format saves only whole modules "
                                              "besides the vectors (modules_to_save)")
                heads.add(module_name)
        if not any(k.endswith(".ia3_l") for k in tensors):
            raise ValueError(f"save_adapter: {type(model).__name__} has no trainable IA3 vectors")
        seq_cls = bool(heads) and type(model).__name__.endswith("ForSequenceClassification")
        text = json.dumps(self.to_peft_dict(sorted({h.rpartition(".")[2] for h in heads}), seq_cls), indent=2)
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        adapter_io.atomic_write({
            directory / WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
            directory / CONFIG_NAME: lambda path: pathlib.Path(path).write_text(text)})

    @classmethod
    def load_foreign(cls, model: nn.Module, directory: str | os.PathLike, raw: dict) -> nn.Module:
        """Load an IA3 adapter in HF PEFT's format (written by PEFT or by :meth:`save_foreign`) into ``model``,
        applying the config first if the model has none. Keys and shapes are checked (on a meta skeleton) before
        the model is touched: on error a ValueError says what and the model is left as it was."""
        directory = pathlib.Path(directory)
        path = directory / CONFIG_NAME
        neutral = {"fan_in_fan_out": False, "exclude_modules": None, "layers_to_transform": None}
        for key, value in neutral.items():
            if raw.get(key, value) not in (value, [], {}):
                raise ValueError(f"load_adapter: {path} sets {key}={raw[key]!r}; only {key}={value!r} is supported")
        for key in ("target_modules", "feedforward_modules"):
            value = raw.get(key)
            if not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
                raise ValueError(f"load_adapter: {path} key {key!r} must be a list of module names (a regex string is "
                                 f"not supported), got {value!r}")
        modules_to_save = raw.get("modules_to_save") or []
        try:
            config = cls(target_modules=raw["target_modules"], feedforward_modules=raw["feedforward_modules"],
                         train_task_head=bool(modules_to_save))
        except ValueError as exc:
            raise ValueError(f"load_adapter: {path}: {exc}") from exc
        tensors = {k.removeprefix(PREFIX): v for k, v in adapter_io.read_tensors(directory).items()}
        return adapter_io.load_into(model, config, tensors, directory / WEIGHTS_NAME)

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        _check_unmerged(model, IA3Linear, "load_adapter")
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value)


@adapter_io.method("PEFT_KERNELS_HADAMARD")
@dataclasses.dataclass
class HadamardAdapterConfig(_Scaling):
    """The Hadamard adapter (Chen et al. 2023): an element-wise weight w (ones) and bias c (zeros) on the output of
    the self-attention output projection, ``y = w ⊙ h + c`` (:class:`peft_kernels.nn.HadamardLinear`), 2·d
    trainable per layer. Defaults: LLaMA ``o_proj``; BERT/RoBERTa ``attention.output.dense`` (before the residual
    add and LayerNorm). Mergeable into that projection (:meth:`merge`)."""

    target_modules: list[str] | None = None
    train_task_head: bool = True

    kind = HadamardLinear

    def __post_init__(self):
        check_targets("HadamardAdapterConfig", "target_modules", self.target_modules)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Wrap the targeted nn.Linear modules of ``model`` in place in :class:`HadamardLinear`, freeze everything
        else but fresh task heads, and return ``model``."""
        targets = targeting.resolve_targets(model, self.target_modules, table=HADAMARD_TARGETS,
                                            config_name="HadamardAdapterConfig")
        names = targeting.linear_names(model, targets)
        made = {n: HadamardLinear(model.get_submodule(n)) for n in names}
        targeting.freeze(model)
        for name in names:
            targeting.replace(model, [name], lambda _: made[name])
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets))
        return model

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        _check_unmerged(model, HadamardLinear, "load_adapter")
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value)


@adapter_io.method("PEFT_KERNELS_BITFIT")
@dataclasses.dataclass
class BitFitConfig:
    """BitFit (Ben Zaken et al. 2022): train only bias terms. Every bias of the modules under ``target_modules``
    (module-name suffixes; the modules and all their submodules) is trained, everything else frozen (a fresh task
    head stays trainable with ``train_task_head``). Defaults: BERT/RoBERTa ``encoder`` (all its Linear and
    LayerNorm biases; embeddings and pooler stay frozen); LLaMA ``layers`` (every Linear but lm_head).

    LLaMA's Linear layers and RMSNorms have no bias. With ``add_missing=True`` (default) each targeted nn.Linear
    without a bias gets a zero-initialised one [out_features] (the model's outputs are unchanged until training),
    and those are trained (and saved/loaded by ``save_adapter``/``load_adapter``); RMSNorms stay without. With
    ``add_missing=False`` such a model has nothing to train and ``apply`` raises a ValueError. Nothing to merge:
    the biases are the model's own.
    """

    target_modules: list[str] | None = None
    add_missing: bool = True
    train_task_head: bool = True

    def __post_init__(self):
        check_targets("BitFitConfig", "target_modules", self.target_modules)
        require("BitFitConfig", "add_missing", isinstance(self.add_missing, bool), "a bool", self.add_missing)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Freeze ``model`` but the biases of the targeted modules (adding zero biases to bias-less Linear layers
        with ``add_missing``) and fresh task heads; return ``model``."""
        targets = targeting.resolve_targets(model, self.target_modules, table=BITFIT_TARGETS,
                                            config_name="BitFitConfig")
        roots = [n for n, _ in model.named_modules() if n and targeting.matches(n, targets)]
        if not roots:
            raise ValueError(f"apply: target_modules {targets} match no module of {type(model).__name__}")
        modules = {f"{root}.{n}" if n else root: m for root in roots
                   for n, m in model.get_submodule(root).named_modules()}
        existing, added = [], {}
        for name, module in modules.items():
            bias = module._parameters.get("bias")
            if bias is not None:
                existing.append(bias)
            elif self.add_missing and isinstance(module, nn.Linear):
                weight = module.weight
                added[name] = nn.Parameter(torch.zeros(module.out_features, device=weight.device, dtype=weight.dtype))
        if not existing and not added:
            hint = ("; pass BitFitConfig(add_missing=True) to add zero biases to its Linear layers"
                    if not self.add_missing else "")
            raise ValueError(f"apply: the modules under target_modules {targets} of {type(model).__name__} have no "
                             f"bias: nothing to train{hint}")
        targeting.freeze(model)
        for bias in existing:
            bias.requires_grad_(True)
        for name, bias in added.items():
            modules[name].bias = bias
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("BitFitConfig.merge: BitFit trains the model's own biases in place; there is no "
                                  "separate adapter to merge (the model already computes the merged function)")

    unmerge = merge
