"""Soft prompts for transformers models: prompt tuning (:class:`PromptTuningConfig`), P-tuning
(:class:`PTuningConfig`) and prefix tuning (:class:`PrefixTuningConfig`), applied in place by ``peft_kernels.apply``.

Wiring. The model object stays the same and is called as before (``model(input_ids=..., attention_mask=...,
labels=...)``, ``model.generate(...)``); forward pre-hooks on the top-level model rewrite the call's arguments:

* prompts (prompt tuning, P-tuning; module ``model.peft_kernels_prompt``): ``input_ids`` (b, n) become
  ``inputs_embeds`` (b, l + n, d) with the l virtual tokens first; ``attention_mask`` gets l leading ones,
  ``token_type_ids`` l leading zeros, ``position_ids`` positions 0..l-1 first and l added to the given ones, and
  labels shaped like the tokens (every model but ``...ForSequenceClassification``) l leading -100. Outputs keep the
  virtual positions, as HF PEFT's ``PeftModelForCausalLM``: a causal LM returns logits (b, l + n, vocab), the real
  tokens' at ``logits[:, l:]``; a sequence classifier returns (b, num_labels). The prompts are built in the input
  embeddings' dtype and cast to that of the embeddings they join (as PEFT).
* prefixes (prefix tuning; module ``model.peft_kernels_prefix``): every attention layer's KV cache starts with its
  l key and value prefixes (a ``DynamicCache`` filled before the model runs), ``attention_mask`` gets l leading
  ones and ``position_ids`` are shifted by l (without them the model counts positions from the cache length, l).
  Outputs have the shape of the unprompted model's: logits (b, n, vocab) or (b, num_labels).

When the call brings a non-empty cache (a generation step after the first), the prompts or prefixes are already in
it: only the mask and positions are extended. The prompt hook runs before the prefix hook, so a model may carry
both (:func:`install_prompt` and :func:`install_prefix` add them without claiming ``model.peft_kernels_config``,
for methods that combine a prefix with other modules).

Saving. ``peft_kernels.save_adapter`` writes our format (the config and every trainable tensor: the encoder too, so
training can resume); :func:`save_peft` writes HF PEFT's (the computed prompts as ``prompt_embeddings``, a trained
classifier as ``modules_to_save``), which ``peft.PeftModel.from_pretrained`` loads, and ``load_adapter`` reads
PEFT's files back (P-tuning as the prompt tuning of the encoder's output, prefixes without the projection: PEFT's
inference form).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import pathlib
from collections.abc import Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from . import adapter_io, targeting
from ._validate import count
from .nn.prompt import ENCODERS, PrefixEncoder, PromptEmbedding, PromptEncoder

PROMPT, PREFIX = "peft_kernels_prompt", "peft_kernels_prefix"
INITS = ("random", "vocab", "text")
# Names under which transformers models take their KV cache: "cache" since transformers 5.24 (which still maps the
# deprecated "past_key_values" onto it), "past_key_values" before.
CACHE_KWARGS = ("cache", "past_key_values")
# PEFT's task_type per model class suffix: it picks the PeftModel subclass that wires prompts into that model.
PEFT_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS"}


# ----------------------------------------------------------------------------------------------------- checks


def input_embeddings(model: nn.Module, what: str) -> nn.Embedding:
    """``model.get_input_embeddings()``, checked to be an nn.Embedding (the table prompts are made to match)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except NotImplementedError:
        embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"{what}: {type(model).__name__} has no input embeddings (get_input_embeddings() must return "
                         f"an nn.Embedding, got {type(embeddings).__name__}); soft prompts need a model that takes "
                         "token embeddings")
    return embeddings


def _refuse_encoder_decoder(model: nn.Module, what: str) -> None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"{what}: {type(model).__name__} is an encoder-decoder model; soft prompts are wired for "
                         "decoder-only and encoder-only models")


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> tuple[tuple[str, ...], bool]:
    """(names of ``cls.forward``'s parameters that may come by position, whether it takes **kwargs)."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    return positional, any(p.kind is p.VAR_KEYWORD for p in params)


def _takes(model: nn.Module, name: str) -> bool:
    names, var_keyword = _signature(type(model))
    return name in names or var_keyword


def kv_layout(model: nn.Module, what: str = "PrefixTuningConfig") -> tuple[int, int, int, str]:
    """(num_layers, num_kv_heads, head_dim, cache keyword) of a model whose every attention layer reads a KV cache:
    a module with an int ``layer_idx`` whose forward takes ``cache`` (or ``past_key_values``) for each of the
    config's ``num_hidden_layers``. Raises a ValueError saying what is missing otherwise."""
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not all(isinstance(v, int) for v in (num_layers, heads, hidden)):
        raise ValueError(f"{what}: {type(model).__name__} has no KV-cache path for prefixes: its config must give "
                         f"num_hidden_layers, num_attention_heads and hidden_size, got {num_layers!r}, {heads!r}, "
                         f"{hidden!r}")
    layers: dict[int, str] = {}
    for _, module in model.named_modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and not isinstance(index, bool) and index not in layers:
            params = inspect.signature(module.forward).parameters
            keyword = next((k for k in CACHE_KWARGS if k in params), None)
            if keyword is not None:
                layers[index] = keyword
    if sorted(layers) != list(range(num_layers)):
        raise ValueError(f"{what}: {type(model).__name__} has no KV-cache path for prefixes: it needs, for each of its "
                         f"{num_layers} layers, an attention module with a layer_idx whose forward takes "
                         f"'cache' or 'past_key_values'; found one for layers {sorted(layers)}")
    keyword = layers[0]
    if not _takes(model, keyword):
        raise ValueError(f"{what}: {type(model).__name__}.forward takes no '{keyword}' argument (nor **kwargs), so "
                         "a prefix cache cannot reach its attention layers")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return num_layers, kv_heads, head_dim, keyword


# ------------------------------------------------------------------------------------------------------ hooks


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments as keywords (HF models accept every forward argument by name)."""
    if not args:  # the usual call; also keeps the cached signature lookup out of torch.compile's trace
        return kwargs
    names, _ = _signature(type(model))
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    return dict(zip(names, args)) | kwargs


def _cache(kwargs: dict):
    return next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)


def _extend(kwargs: dict, l: int, lead_positions: bool) -> None:
    """l leading ones in attention_mask; position_ids shifted by l, after positions 0..l-1 if ``lead_positions``
    (the l prompt embeddings were prepended to the input)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], l), mask], dim=1)
    elif mask is not None:
        raise ValueError(f"soft prompts: attention_mask must be a 2-D (batch, sequence) tensor, got "
                         f"{type(mask).__name__}{list(mask.shape) if isinstance(mask, torch.Tensor) else ''}")
    positions = kwargs.get("position_ids")
    if positions is not None:
        shifted = positions + l
        if lead_positions:
            lead = torch.arange(l, dtype=positions.dtype, device=positions.device).expand(*positions.shape[:-1], l)
            shifted = torch.cat([lead, shifted], dim=-1)
        kwargs["position_ids"] = shifted


def _prompt_hook(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: prepend ``model.peft_kernels_prompt``'s l embeddings to the input (see the module doc)."""
    kwargs = _bind(model, args, kwargs)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    tokens = ids if ids is not None else embeds
    if tokens is None:
        return (), kwargs
    prompt = getattr(model, PROMPT)
    l, (b, n) = prompt.num_virtual_tokens, tokens.shape[:2]
    cache = _cache(kwargs)
    decoding = cache is not None and cache.get_seq_length() > 0
    if not decoding:
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        prompts = prompt().to(embeds.dtype).expand(b, -1, -1)
        kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([prompts, embeds], dim=1), None
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(b, l), types], dim=1)
        labels = kwargs.get("labels")
        if (labels is not None and not type(model).__name__.endswith("ForSequenceClassification")
                and tuple(labels.shape[:2]) == (b, n)):
            kwargs["labels"] = torch.cat([labels.new_full((b, l), -100), labels], dim=1)
    _extend(kwargs, l, lead_positions=not decoding)
    return (), kwargs


def _prefix_hook(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: start every layer's KV cache with ``model.peft_kernels_prefix``'s prefixes."""
    from transformers import DynamicCache  # an optional dependency: only its models reach this hook

    kwargs = _bind(model, args, kwargs)
    tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return (), kwargs
    encoder = getattr(model, PREFIX)
    cache = _cache(kwargs)
    for key in CACHE_KWARGS:
        kwargs.pop(key, None)
    if cache is None:
        cache = DynamicCache(config=model.config)
    decoding = cache.get_seq_length() > 0
    if not decoding:
        for layer, (keys, values) in enumerate(encoder.key_values(tokens.shape[0])):
            cache.update(keys, values, layer)
    kwargs[encoder.cache_kwarg] = cache
    _extend(kwargs, encoder.num_virtual_tokens, lead_positions=False)
    return (), kwargs


def install_prompt(model: nn.Module, config) -> nn.Module:
    """Build ``config``'s prompt module (:class:`PromptTuningConfig`: a PromptEmbedding, :class:`PTuningConfig`: a
    PromptEncoder), register it as ``model.peft_kernels_prompt`` with the input hook, and return it. Freezes nothing
    and leaves ``model.peft_kernels_config`` alone; on error the model is unchanged."""
    what = type(config).__name__
    if hasattr(model, PROMPT):
        raise ValueError(f"{what}: {type(model).__name__} already carries soft prompts ({PROMPT})")
    module = config.build(model)
    if not _takes(model, "inputs_embeds"):
        raise ValueError(f"{what}: {type(model).__name__}.forward takes no 'inputs_embeds', so prompts cannot be "
                         "prepended to its input")
    setattr(model, PROMPT, module)
    model.register_forward_pre_hook(_prompt_hook, prepend=True, with_kwargs=True)
    return module


def install_prefix(model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
    """Build the :class:`PrefixEncoder` of ``config`` for ``model`` (its layers, KV heads and head size), register it
    as ``model.peft_kernels_prefix`` with the cache hook, and return it. Freezes nothing and leaves
    ``model.peft_kernels_config`` alone (for methods combining prefixes with other modules); on error (a model
    without a KV-cache path, one that has prefixes already) the model is unchanged."""
    if hasattr(model, PREFIX):
        raise ValueError(f"PrefixTuningConfig: {type(model).__name__} already carries prefixes ({PREFIX})")
    encoder = config.build(model)
    setattr(model, PREFIX, encoder)
    model.register_forward_pre_hook(_prefix_hook, with_kwargs=True)
    return encoder


def _apply(config, model: nn.Module, install) -> nn.Module:
    present = adapter_io.attached(model)
    if present is not None:
        raise ValueError(f"apply: {type(model).__name__} already carries a {type(present).__name__}; apply "
                         f"{type(config).__name__} to a fresh model")
    resolved = config.resolve(model)
    module = install(model, resolved)
    targeting.freeze(model)
    module.requires_grad_(True)
    if config.train_task_head:
        targeting.unfreeze_task_head(model)
    adapter_io.attach(model, resolved)
    return model


def _carried(config, model: nn.Module) -> None:
    if type(adapter_io.attached(model)) is not type(config):
        raise ValueError(f"fold: {type(model).__name__} does not carry a {type(config).__name__} "
                         f"(it carries {type(adapter_io.attached(model)).__name__})")


# ---------------------------------------------------------------------------------------------------- configs


@adapter_io.method("PROMPT_TUNING")
@dataclasses.dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` (l) trainable embeddings prepended to the input
    embeddings; the base model is frozen (a fresh classification head stays trainable with ``train_task_head``).

    ``init``: "random" (N(0, 1), as HF PEFT), "vocab" (rows of the model's input embeddings at l token ids drawn
    uniformly) or "text" (the embeddings of ``init_text``'s tokens, cycled or cut to l, as PEFT's TEXT init).
    ``init_text``: a string, tokenized by ``tokenizer`` (a callable returning a list of ids or a mapping with
    "input_ids", e.g. a transformers tokenizer), or a list of token ids. The applied config records the ids and
    no tokenizer.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | list[int] | None = None
    tokenizer: object = None
    train_task_head: bool = True

    def __post_init__(self):
        count("PromptTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in INITS:
            raise ValueError(f"PromptTuningConfig: argument 'init' must be one of {list(INITS)}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("PromptTuningConfig: init='text' needs argument 'init_text' (a string or token ids), "
                             f"got {self.init_text!r}")

    def resolve(self, model: nn.Module) -> PromptTuningConfig:
        """This config with ``init_text`` as token ids (tokenized here) and no tokenizer."""
        if self.init != "text" or not isinstance(self.init_text, str):
            return dataclasses.replace(self, tokenizer=None)
        if not callable(self.tokenizer):
            raise ValueError("PromptTuningConfig: init='text' with a string init_text needs argument 'tokenizer' (a "
                             f"callable giving token ids), got {type(self.tokenizer).__name__}")
        out = self.tokenizer(self.init_text)
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return dataclasses.replace(self, init_text=ids, tokenizer=None)

    def build(self, model: nn.Module) -> PromptEmbedding:
        """The (l, d) prompt of ``model``'s embedding width, device and dtype, initialised per ``init``."""
        _refuse_encoder_decoder(model, "PromptTuningConfig")
        embeddings = input_embeddings(model, "PromptTuningConfig")
        weight, l = embeddings.weight, self.num_virtual_tokens
        init = None
        if self.init != "random":
            vocab = weight.shape[0]
            if self.init == "vocab":
                ids = torch.randint(0, vocab, (l,))
            else:
                text = self.resolve(model).init_text
                if not text or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in text):
                    raise ValueError(f"PromptTuningConfig: init_text must give token ids in [0, {vocab}), got {text!r}")
                ids = torch.tensor((text * -(-l // len(text)))[:l])
            init = weight.detach()[ids.to(weight.device)]
        return PromptEmbedding(l, weight.shape[1], init=init, device=weight.device, dtype=weight.dtype)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Install the prompt on ``model`` in place (:func:`install_prompt`), freeze everything else but a fresh
        task head, and return ``model``."""
        return _apply(self, model, install_prompt)

    def fold(self, model: nn.Module) -> nn.Module:
        """Nothing to fold: the prompt is its own parameter."""
        _carried(self, model)
        return model

    @classmethod
    def load_foreign(cls, model: nn.Module, directory: pathlib.Path, raw: dict) -> nn.Module:
        return _load_peft(model, directory, raw)


@adapter_io.method("P_TUNING")
@dataclasses.dataclass
class PTuningConfig:
    """P-tuning (Liu et al. 2021): l virtual-token embeddings passed through a prompt encoder (``encoder="mlp"``: a
    3-layer MLP; ``"lstm"``: a bidirectional LSTM of ``encoder_num_layers`` layers, dropout ``encoder_dropout``,
    then a 2-layer MLP; see :class:`peft_kernels.nn.PromptEncoder`) and prepended to the input embeddings.
    ``encoder_hidden_size``: the encoder's width; None takes the model's hidden size (as HF PEFT).
    ``encoder_num_layers`` and ``encoder_dropout`` only concern the LSTM. :meth:`fold` replaces the encoder by its
    output (the model then carries a :class:`PromptTuningConfig`)."""

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    train_task_head: bool = True

    def __post_init__(self):
        count("PTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        count("PTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, allow_none=True)
        count("PTuningConfig", "encoder_num_layers", self.encoder_num_layers)
        if self.encoder not in ENCODERS:
            raise ValueError(f"PTuningConfig: argument 'encoder' must be one of {list(ENCODERS)}, got {self.encoder!r}")
        if not isinstance(self.encoder_dropout, (int, float)) or not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"PTuningConfig: argument 'encoder_dropout' must be in [0, 1), got {self.encoder_dropout!r}")

    def resolve(self, model: nn.Module) -> PTuningConfig:
        hidden = self.encoder_hidden_size or input_embeddings(model, "PTuningConfig").embedding_dim
        return dataclasses.replace(self, encoder_hidden_size=hidden)

    def build(self, model: nn.Module) -> PromptEncoder:
        _refuse_encoder_decoder(model, "PTuningConfig")
        weight = input_embeddings(model, "PTuningConfig").weight
        return PromptEncoder(self.num_virtual_tokens, weight.shape[1], self.resolve(model).encoder_hidden_size,
                             encoder=self.encoder, num_layers=self.encoder_num_layers, dropout=self.encoder_dropout,
                             device=weight.device, dtype=weight.dtype)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Install the prompt encoder on ``model`` in place (:func:`install_prompt`), freeze everything else but a
        fresh task head, and return ``model``."""
        return _apply(self, model, install_prompt)

    def fold(self, model: nn.Module) -> nn.Module:
        """Replace the prompt encoder by the prompts it computes now: same logits, no encoder; the model then
        carries a :class:`PromptTuningConfig` (what saving writes)."""
        _carried(self, model)
        folded = getattr(model, PROMPT).fold()
        folded.requires_grad_(True)
        setattr(model, PROMPT, folded)
        adapter_io.attach(model, PromptTuningConfig(self.num_virtual_tokens, train_task_head=self.train_task_head))
        return model

    @classmethod
    def load_foreign(cls, model: nn.Module, directory: pathlib.Path, raw: dict) -> nn.Module:
        return _load_peft(model, directory, raw)


@adapter_io.method("PREFIX_TUNING")
@dataclasses.dataclass
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang 2021): l trainable key and value prefixes for every attention layer, of the
    layer's KV width (LLaMA: num_key_value_heads * head_dim), put in the model's KV cache. ``prefix_projection``:
    train them through an MLP (Linear(w, encoder_hidden_size) -> Tanh -> Linear(., layers * 2 * w) on l
    embeddings of width w); ``encoder_hidden_size`` None takes w (as HF PEFT). :meth:`fold` replaces the MLP by
    the prefixes it computes (the model then carries ``prefix_projection=False``). A model without a KV-cache path
    (see :func:`kv_layout`) raises a ValueError."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    train_task_head: bool = True

    def __post_init__(self):
        count("PrefixTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        count("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size, allow_none=True)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"PrefixTuningConfig: argument 'prefix_projection' must be a bool, got "
                             f"{self.prefix_projection!r}")

    def resolve(self, model: nn.Module) -> PrefixTuningConfig:
        if not self.prefix_projection:
            return dataclasses.replace(self, encoder_hidden_size=None)
        _, kv_heads, head_dim, _ = kv_layout(model)
        return dataclasses.replace(self, encoder_hidden_size=self.encoder_hidden_size or kv_heads * head_dim)

    def build(self, model: nn.Module) -> PrefixEncoder:
        _refuse_encoder_decoder(model, "PrefixTuningConfig")
        num_layers, kv_heads, head_dim, keyword = kv_layout(model)
        weight = input_embeddings(model, "PrefixTuningConfig").weight
        encoder = PrefixEncoder(self.num_virtual_tokens, num_layers, kv_heads, head_dim,
                                projection=self.prefix_projection, hidden=self.resolve(model).encoder_hidden_size,
                                device=weight.device, dtype=weight.dtype)
        encoder.cache_kwarg = keyword
        return encoder

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Install the prefixes on ``model`` in place (:func:`install_prefix`), freeze everything else but a fresh
        task head, and return ``model``."""
        return _apply(self, model, install_prefix)

    def fold(self, model: nn.Module) -> nn.Module:
        """Replace the reparameterising MLP by the prefixes it computes now (same logits); saving then keeps only
        the prefixes. The model then carries this config with ``prefix_projection=False``."""
        _carried(self, model)
        getattr(model, PREFIX).fold()
        adapter_io.attach(model, dataclasses.replace(self, prefix_projection=False, encoder_hidden_size=None))
        return model

    @classmethod
    def load_foreign(cls, model: nn.Module, directory: pathlib.Path, raw: dict) -> nn.Module:
        return _load_peft(model, directory, raw)


# ------------------------------------------------------------------------------------------- HF PEFT's format


def _prompt_module(model: nn.Module, config) -> nn.Module:
    return getattr(model, PREFIX if isinstance(config, PrefixTuningConfig) else PROMPT)


def save_peft(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the soft prompt of ``model`` in HF PEFT's format (``peft.PeftModel.from_pretrained`` loads it): the
    prompts the module computes now as ``prompt_embeddings`` (l, d) or, for prefixes, (l, layers * 2 * w), and
    trainable modules outside it (a fresh classifier) as PEFT's ``modules_to_save``. An encoder (P-tuning, prefix
    projection) is not kept, as in PEFT's own files. Both files are written atomically."""
    config = adapter_io.attached(model)
    if not isinstance(config, (PromptTuningConfig, PTuningConfig, PrefixTuningConfig)):
        raise ValueError(f"save_peft: {type(model).__name__} carries no soft prompt (got "
                         f"{type(config).__name__}); apply a PromptTuningConfig, PTuningConfig or PrefixTuningConfig")
    task_type = next((t for suffix, t in PEFT_TASK_TYPES.items() if type(model).__name__.endswith(suffix)), None)
    if task_type is None:
        raise ValueError(f"save_peft: HF PEFT wires prompts only through a task-specific PeftModel; "
                         f"{type(model).__name__} is none of {['...' + s for s in PEFT_TASK_TYPES]}")
    module = _prompt_module(model, config)
    with torch.no_grad():
        tensors = {"prompt_embeddings": module().detach().contiguous()}
    saved = set()
    own = (PROMPT + ".", PREFIX + ".")
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith(own):
            owner = name.rpartition(".")[0]
            if not all(q.requires_grad for q in model.get_submodule(owner).parameters()):
                raise NotImplementedError(f"save_peft: {name} is trainable but other parameters of {owner} are frozen; "
                                          "PEFT's modules_to_save restores whole modules")
            saved.add(owner)
            tensors["base_model." + name] = p.detach().contiguous()
    text = json.dumps(_peft_dict(model, config, task_type, sorted({n.rpartition(".")[2] for n in saved})), indent=2)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter_io.atomic_write({
        directory / adapter_io.WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
        directory / adapter_io.CONFIG_NAME: lambda path: pathlib.Path(path).write_text(text)})


def _peft_dict(model: nn.Module, config, task_type: str, modules_to_save: list[str]) -> dict:
    model_config = model.config
    out = {
        "peft_type": config.peft_type,
        "task_type": task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": model_config.num_hidden_layers,
        "token_dim": model.get_input_embeddings().embedding_dim,
        "num_attention_heads": model_config.num_attention_heads,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
    }
    if isinstance(config, PromptTuningConfig):
        out |= {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None}
    elif isinstance(config, PTuningConfig):
        out |= {"encoder_reparameterization_type": config.encoder.upper(),
                "encoder_hidden_size": config.encoder_hidden_size, "encoder_num_layers": config.encoder_num_layers,
                "encoder_dropout": config.encoder_dropout}
    else:
        encoder = getattr(model, PREFIX)
        # PEFT sizes prefixes by the KV width: token_dim = heads * head_dim of the key/value heads.
        out |= {"token_dim": encoder.num_kv_heads * encoder.head_dim, "num_attention_heads": encoder.num_kv_heads,
                "prefix_projection": config.prefix_projection, "encoder_hidden_size": config.encoder_hidden_size}
    return out


def _load_peft(model: nn.Module, directory: pathlib.Path, raw: dict) -> nn.Module:
    """Load HF PEFT's PROMPT_TUNING / P_TUNING / PREFIX_TUNING files into ``model``: prompts (P-tuning's are its
    encoder's output) as a :class:`PromptTuningConfig`, prefixes as a :class:`PrefixTuningConfig` without
    projection, ``modules_to_save`` into the model's modules of those names. Every key and shape is checked first:
    on error the model is left as it was."""
    path = directory / adapter_io.CONFIG_NAME
    peft_type, l = raw.get("peft_type"), raw.get("num_virtual_tokens")
    if isinstance(l, bool) or not isinstance(l, int) or l < 1:
        raise ValueError(f"load_adapter: {path}: num_virtual_tokens must be an int >= 1, got {l!r}")
    if raw.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"load_adapter: {path}: num_transformer_submodules={raw['num_transformer_submodules']} "
                         "(an encoder-decoder adapter); only 1 is supported")
    config = PrefixTuningConfig(l) if peft_type == "PREFIX_TUNING" else PromptTuningConfig(l)
    tensors = adapter_io.read_tensors(directory)
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"load_adapter: {directory / adapter_io.WEIGHTS_NAME} has no 'prompt_embeddings' "
                         f"(keys: {sorted(tensors)[:4]})")
    name = f"{PREFIX}.prefixes" if isinstance(config, PrefixTuningConfig) else f"{PROMPT}.embedding"
    state = {name: tensors.pop("prompt_embeddings")}
    for key, value in tensors.items():
        if not key.startswith("base_model."):
            raise ValueError(f"load_adapter: unexpected key {key!r} in {directory / adapter_io.WEIGHTS_NAME}")
        state[key.removeprefix("base_model.")] = value
    return adapter_io.load_into(model, config, state, directory)
