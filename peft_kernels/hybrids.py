"""Hybrid methods combining prefixes, adapters and LoRA, applied in place by ``peft_kernels.apply``:

* :class:`MAMConfig`: the MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
  Learning"): prefix tuning on every attention layer plus a scaled parallel adapter on every FFN.
* :class:`UniPELTConfig`: UniPELT (Mao et al. 2022): gated LoRA on the query/value projections, gated prefix
  tuning and a gated sequential adapter after the FFN (gated modules: :mod:`peft_kernels.nn.unipelt`).

Each config builds on the single methods' code: ``AdapterConfig.apply_to`` wraps the FFNs (and freezes the base),
``prompts.install_prefix`` installs the prefixes and their cache hook. The whole application is first run on a meta
skeleton of the model (:func:`peft_kernels.adapter_io.skeleton`): any bad input raises there, leaving the model
untouched. ``save_adapter`` writes our format (every trainable tensor: adapters, prefixes, LoRA factors, gates, a
fresh task head); neither method merges into the frozen weights.
"""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from . import adapter_io, targeting
from ._validate import check_lora_args, check_targets, count, is_int, is_number, require
from .adapters import ADAPTER_TARGETS, NON_LINEARITIES, AdapterConfig
from .nn.adapter import SequentialAdapter
from .nn.unipelt import GATE_NAME, GatedLoRALinear, GatedSequentialAdapter, PrefixGate, gate_prefix_values
from .prompts import PREFIX, PrefixTuningConfig, install_prefix, kv_layout

# UniPELT's LoRA targets (the paper's, and HF PEFT's LoRA defaults): the attention query and value projections.
LORA_TARGETS = {t: ["q_proj", "v_proj"] for t in ("llama", "mistral", "qwen2", "gemma")} | {
    t: ["query", "value"] for t in ("bert", "roberta")}


def _refuse_stacking(model: nn.Module, what: str) -> None:
    present = adapter_io.attached(model) or getattr(model, "peft_kernels_lora", None)
    if present is not None:
        raise ValueError(f"apply: {type(model).__name__} already carries a {type(present).__name__}; apply {what} to "
                         "a fresh model")
    if hasattr(model, PREFIX):
        raise ValueError(f"apply: {type(model).__name__} already carries prefixes ({PREFIX}); apply {what} to a "
                         "fresh model")


def _apply_checked(config, model: nn.Module, install) -> nn.Module:
    """``install(m) -> resolved config`` on a meta skeleton of ``model`` (where bad input raises), then on
    ``model``, which then carries the resolved config."""
    _refuse_stacking(model, type(config).__name__)
    install(adapter_io.skeleton(model))
    adapter_io.attach(model, install(model))
    return model


def _targets(model: nn.Module, value: list[str] | None, table: dict, what: str, field: str) -> list[str]:
    """``value`` or the model type's default in ``table``; the error names ``what``'s field ``field``."""
    try:
        return targeting.resolve_targets(model, value, table=table, config_name=what)
    except ValueError:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"apply: no default {field} for model_type {model_type!r} (known: {sorted(table)}); pass "
                         f"{what}({field}=[...])") from None


def _check_prefix(what: str, config) -> None:
    count(what, "num_virtual_tokens", config.num_virtual_tokens)
    count(what, "encoder_hidden_size", config.encoder_hidden_size, allow_none=True)
    require(what, "prefix_projection", isinstance(config.prefix_projection, bool), "a bool", config.prefix_projection)


def _check_adapter(what: str, config) -> None:
    require(what, "bottleneck", is_int(config.bottleneck) and config.bottleneck >= 1, "an int >= 1", config.bottleneck)
    require(what, "non_linearity", config.non_linearity in NON_LINEARITIES, f"one of {sorted(NON_LINEARITIES)}",
            config.non_linearity)
    require(what, "train_task_head", isinstance(config.train_task_head, bool), "a bool", config.train_task_head)


def _prefix_config(config) -> PrefixTuningConfig:
    return PrefixTuningConfig(config.num_virtual_tokens, config.prefix_projection, config.encoder_hidden_size,
                              config.train_task_head)


def _install_prefix(config, model: nn.Module) -> PrefixTuningConfig:
    """Install ``config``'s prefixes on ``model`` (trainable); return the resolved prefix config."""
    prefix = _prefix_config(config).resolve(model)
    install_prefix(model, prefix)
    return prefix


def _fold(config, model: nn.Module) -> nn.Module:
    if type(adapter_io.attached(model)) is not type(config):
        raise ValueError(f"fold: {type(model).__name__} does not carry a {type(config).__name__} (it carries "
                         f"{type(adapter_io.attached(model)).__name__})")
    getattr(model, PREFIX).fold()
    adapter_io.attach(model, dataclasses.replace(adapter_io.attached(model), prefix_projection=False,
                                                 encoder_hidden_size=None))
    return model


@adapter_io.method("PEFT_KERNELS_MAM")
@dataclasses.dataclass
class MAMConfig:
    """The MAM adapter (He et al. 2022): ``num_virtual_tokens`` (l) key/value prefixes on every attention layer
    (as :class:`PrefixTuningConfig`: ``prefix_projection`` trains them through an MLP of width
    ``encoder_hidden_size``, None: the KV width) and a parallel bottleneck adapter on every FFN sublayer,
    ``FFN(x) + scaling · up(act(down(x)))`` (as ``AdapterConfig(placement="parallel")``: d -> ``bottleneck`` -> d,
    up zero-initialised; ``target_modules`` None: LLaMA ``mlp``, BERT/RoBERTa ``layer.*.output``). The paper's
    setting is the default: l = 30, bottleneck 512, scaling 4.

    Trainable: l · layers · 2 · w prefixes (w = KV heads x head_dim; with projection l · w + the MLP) + per FFN
    2·d·m + m + d, and a fresh classification head with ``train_task_head``. Needs a model with a KV-cache path
    (:func:`peft_kernels.prompts.kv_layout`; e.g. not DistilBERT). Not mergeable; :meth:`fold` folds the prefix MLP.
    """

    num_virtual_tokens: int = 30
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    bottleneck: int = 512
    scaling: float = 4.0
    non_linearity: str = "relu"
    target_modules: list[str] | None = None
    train_task_head: bool = True

    def __post_init__(self):
        _check_prefix("MAMConfig", self)
        _check_adapter("MAMConfig", self)
        require("MAMConfig", "scaling", is_number(self.scaling), "a number", self.scaling)
        check_targets("MAMConfig", "target_modules", self.target_modules)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Wrap the FFNs of ``model`` in place in :class:`peft_kernels.nn.ParallelAdapter`, install the prefixes,
        freeze everything else but a fresh task head, and return ``model``."""

        def install(m: nn.Module) -> MAMConfig:
            kv_layout(m, "MAMConfig")
            targets = _targets(m, self.target_modules, ADAPTER_TARGETS["parallel"], "MAMConfig", "target_modules")
            AdapterConfig(self.bottleneck, "parallel", self.scaling, self.non_linearity, targets,
                          self.train_task_head).apply_to(m)
            prefix = _install_prefix(self, m)
            return dataclasses.replace(self, target_modules=targets, encoder_hidden_size=prefix.encoder_hidden_size)

        return _apply_checked(self, model, install)

    def fold(self, model: nn.Module) -> nn.Module:
        """Replace the prefix MLP by the prefixes it computes now (same logits); the model then carries this config
        with ``prefix_projection=False``. No-op on the prefixes without projection."""
        return _fold(self, model)

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("MAMConfig.merge: the parallel adapters apply a non-linearity and the prefixes are "
                                  "extra attention positions; neither can be folded into the frozen weights")

    unmerge = merge


def _attention_modules(model: nn.Module, keyword: str) -> dict[int, nn.Module]:
    """Per layer index, the first module with that ``layer_idx`` whose forward takes the cache (``keyword``): the
    modules :func:`peft_kernels.prompts.kv_layout` found."""
    found: dict[int, nn.Module] = {}
    for _, module in model.named_modules():
        index = getattr(module, "layer_idx", None)
        if (isinstance(index, int) and index not in found
                and keyword in inspect.signature(module.forward).parameters):
            found[index] = module
    return found


@adapter_io.method("PEFT_KERNELS_UNIPELT")
@dataclasses.dataclass
class UniPELTConfig:
    """UniPELT (Mao et al. 2022): three submodules, each scaled by a learned gate in (0, 1) computed by a
    Linear(d, 1) + sigmoid from its input (:mod:`peft_kernels.nn.unipelt`):

    * LoRA (rank ``r``, ``alpha``, ``dropout``) on ``lora_target_modules`` (None: LLaMA ``q_proj``, ``v_proj``;
      BERT/RoBERTa ``query``, ``value``) as :class:`GatedLoRALinear`, ``x Wᵀ + b + g(x) · s (x Aᵀ) Bᵀ`` with one
      gate per token (the LoRA products on ``ops.lora_linear``; one extra base GEMM, see its docstring);
    * prefix tuning (``num_virtual_tokens`` l, ``prefix_projection``, ``encoder_hidden_size``, as
      :class:`PrefixTuningConfig`) whose values are scaled per layer by a :class:`PrefixGate` of the attention
      input (LLaMA: the layer input after its RMSNorm; BERT: the layer input), one gate per sequence, the mean over
      its tokens: the prefixes enter through the KV cache, where a per-query gate cannot be applied; scaling the
      values by a per-sequence gate scales the prefix's attention contribution exactly. In generation the gate of
      the prompt (first forward) stays on the cached prefixes. Not for gradient checkpointing: a recomputed layer
      finds its prefixes already gated;
    * a sequential bottleneck adapter after the FFN (Pfeiffer placement, ``h + g(h) · up(act(down(h)))``,
      ``bottleneck``, ``non_linearity``; ``adapter_target_modules`` None: LLaMA ``down_proj``, BERT/RoBERTa
      ``layer.*.output.dense``) as :class:`GatedSequentialAdapter`.

    Trainable: per LoRA target r·(in + out) + in + 1; l · layers · 2 · w prefixes (w = KV heads x head_dim) + per
    layer d + 1; per adapter 2·d·m + m + d + d + 1; a fresh task head. Needs a KV-cache path (not DistilBERT).
    Not mergeable (the gates depend on the input); :meth:`fold` folds the prefix MLP.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    num_virtual_tokens: int = 10
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    bottleneck: int = 64
    non_linearity: str = "relu"
    lora_target_modules: list[str] | None = None
    adapter_target_modules: list[str] | None = None
    train_task_head: bool = True

    def __post_init__(self):
        check_lora_args("UniPELTConfig", self.r, self.alpha, self.dropout)
        _check_prefix("UniPELTConfig", self)
        _check_adapter("UniPELTConfig", self)
        check_targets("UniPELTConfig", "lora_target_modules", self.lora_target_modules)
        check_targets("UniPELTConfig", "adapter_target_modules", self.adapter_target_modules)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Install the gated adapters, LoRA layers and prefixes on ``model`` in place, freeze everything else but a
        fresh task head, and return ``model``."""

        def install(m: nn.Module) -> UniPELTConfig:
            kv_layout(m, "UniPELTConfig")
            lora_targets = _targets(m, self.lora_target_modules, LORA_TARGETS, "UniPELTConfig", "lora_target_modules")
            adapter_targets = _targets(m, self.adapter_target_modules, ADAPTER_TARGETS["pfeiffer"], "UniPELTConfig",
                                       "adapter_target_modules")
            lora_names = targeting.linear_names(m, lora_targets)
            # Freezes the base model; every module made below is new, hence trainable.
            AdapterConfig(self.bottleneck, "pfeiffer", 1.0, self.non_linearity, adapter_targets,
                          self.train_task_head).apply_to(m)
            wrapped = [n for n, module in m.named_modules() if type(module) is SequentialAdapter]
            targeting.replace(m, wrapped, GatedSequentialAdapter.from_adapter)
            # A LoRA target that also got an adapter now sits inside it, as its `base`.
            paths = [f"{n}.base" if n in wrapped else n for n in lora_names]
            targeting.replace(m, paths, lambda linear: GatedLoRALinear.from_linear(linear, self.r, self.alpha,
                                                                                    self.dropout))
            prefix = _install_prefix(self, m)
            encoder = getattr(m, PREFIX)
            hidden = m.config.hidden_size
            for attention in _attention_modules(m, encoder.cache_kwarg).values():
                p = next(attention.parameters())
                setattr(attention, GATE_NAME, PrefixGate(hidden, encoder.num_virtual_tokens, encoder.cache_kwarg,
                                                         device=p.device, dtype=p.dtype))
                attention.register_forward_pre_hook(gate_prefix_values, with_kwargs=True)
            return dataclasses.replace(self, lora_target_modules=lora_targets, adapter_target_modules=adapter_targets,
                                       encoder_hidden_size=prefix.encoder_hidden_size)

        return _apply_checked(self, model, install)

    def fold(self, model: nn.Module) -> nn.Module:
        """Replace the prefix MLP by the prefixes it computes now (same logits); the model then carries this config
        with ``prefix_projection=False``. No-op on the prefixes without projection."""
        return _fold(self, model)

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError("UniPELTConfig.merge: the LoRA, prefix and adapter gates are computed from each "
                                  "input, so no submodule can be folded into the frozen weights")

    unmerge = merge
