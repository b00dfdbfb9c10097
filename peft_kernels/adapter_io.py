"""Saving and loading the adapters of methods whose state HF PEFT's LoRA/LoKr files cannot carry, in one format
of our own, and the registry through which ``peft_kernels.save_adapter`` / ``load_adapter`` find them.

On disk (the same two files as HF PEFT, so tools that list adapters see one):

* ``adapter_config.json``: ``{"peft_type": "<TYPE>", "format": "peft_kernels", "config": {<the config's
  dataclass fields>}}``; ``<TYPE>`` is the name the config class registered with :func:`method` (HF PEFT's
  ``peft_type`` where PEFT has the method, else ``PEFT_KERNELS_<NAME>``).
* ``adapter_model.safetensors``: the config's :meth:`state` tensors under ``base_model.model.<parameter name>``
  (by default every trainable parameter of the model).

A config class plugs in by being a dataclass decorated with ``@adapter_io.method("TYPE")`` whose ``apply_to``
calls :func:`attach`. It may override ``state(model) -> dict[str, Tensor]`` (what to save, keyed by names as
``model.named_parameters()`` / ``named_buffers()`` spell them), ``load_state(model, tensors)`` (how to put
them back; default: copy into the parameters and buffers of those names) and ``check_state(tensors)`` (checks
of the file's values beyond keys and shapes, run before the model is touched; raises ValueError). A method whose
adapters HF PEFT's own format can express (IA3) defines ``save_foreign(model, directory)`` writing that format,
and ``load_foreign`` (see ``peft_kernels.load_adapter``) reading it: :func:`save` then hands over to it. A config
whose fields are not plain JSON values (a composite's list of part configs) defines ``config_dict()``; one whose
``apply_to`` needs data the file does not hold (SNIP batches) defines ``apply_for_load(model)``, building the same
modules for :func:`load`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import pathlib
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT = "peft_kernels"

# peft_type -> config class, filled by @method.
METHODS: dict[str, type] = {}


def method(peft_type: str):
    """Class decorator: register a dataclass config under ``peft_type`` for save/load."""

    def register(cls):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"adapter_io.method: {cls.__name__} must be a dataclass")
        if peft_type in METHODS and METHODS[peft_type] is not cls:
            raise ValueError(f"adapter_io.method: peft_type {peft_type!r} already registered by "
                             f"{METHODS[peft_type].__name__}")
        cls.peft_type = peft_type
        METHODS[peft_type] = cls
        return cls

    return register


def attach(model: nn.Module, config) -> None:
    """Record on ``model`` the config that was applied (what :func:`save` writes and ``apply`` refuses to stack);
    inside :func:`collecting`, hand it to the collector instead (a composite's part attaches to the composite)."""
    sink = model.__dict__.get("_peft_kernels_sink")
    if sink is not None:
        sink.append(config)
        return
    model.peft_kernels_config = config


@contextlib.contextmanager
def collecting(model: nn.Module):
    """While active, :func:`attach` on ``model`` appends to the yielded list instead of recording on the model: how
    ``peft_kernels.CompositeConfig`` applies its parts and keeps their resolved configs."""
    if "_peft_kernels_sink" in model.__dict__:
        raise RuntimeError("adapter_io.collecting: already collecting on this model")
    sink = model.__dict__["_peft_kernels_sink"] = []
    try:
        yield sink
    finally:
        del model.__dict__["_peft_kernels_sink"]


def attached(model: nn.Module):
    return getattr(model, "peft_kernels_config", None)


def default_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``model``."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _state(model: nn.Module, config) -> dict[str, torch.Tensor]:
    state = config.state(model) if hasattr(config, "state") else default_state(model)
    if not state:
        raise ValueError(f"save_adapter: {type(config).__name__} left nothing to save on {type(model).__name__}")
    return state


def config_dict(config) -> dict:
    """The config's fields as JSON values; fields that are not (callables, data batches) are runtime-only. A config
    with a ``config_dict()`` method gives its own (a composite: its parts' types and fields)."""
    if hasattr(config, "config_dict"):
        return config.config_dict()
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[field.name] = value
    return out


def save(model: nn.Module, directory: str | os.PathLike, config) -> None:
    """Write ``config``'s adapter of ``model`` to ``directory`` (both files atomically, see :func:`atomic_write`)."""
    if hasattr(config, "save_foreign"):
        return config.save_foreign(model, directory)
    tensors = {PREFIX + n: t.detach().contiguous() for n, t in _state(model, config).items()}
    text = json.dumps({"peft_type": config.peft_type, "format": FORMAT, "config": config_dict(config)}, indent=2)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write({directory / WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
                  directory / CONFIG_NAME: lambda path: pathlib.Path(path).write_text(text)})


def read_tensors(directory: pathlib.Path, what: str = "load_adapter") -> dict[str, torch.Tensor]:
    """The tensors of ``directory/adapter_model.safetensors``, each checked to be finite floating point."""
    try:
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{what}: cannot read {directory / WEIGHTS_NAME}: {exc}") from exc
    for key, value in tensors.items():
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"{what}: {key} in {directory / WEIGHTS_NAME} must hold finite floating-point values, "
                             f"got a {value.dtype} tensor" + (" with NaN or Inf" if value.is_floating_point() else ""))
    return tensors


def config_from_dict(raw: dict, path: pathlib.Path):
    """The registered config class of ``raw['peft_type']`` built from ``raw['config']``; unknown fields raise."""
    cls = METHODS[raw["peft_type"]]
    fields = raw.get("config")
    if raw.get("format") != FORMAT or not isinstance(fields, dict):
        raise ValueError(f"load_adapter: {path} has peft_type {raw['peft_type']!r} but not peft_kernels' format "
                         f"(expected keys 'format': {FORMAT!r} and 'config': {{...}})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(fields.keys() - names)
    if unknown:
        raise ValueError(f"load_adapter: {path} sets {unknown}, which {cls.__name__} does not have "
                         f"(its fields: {sorted(names)})")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load_adapter: {path}: {exc}") from exc


def skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device: applying a config to it shows
    which tensors the method would create, with no memory and without touching ``model``."""
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _a(name: str) -> str:
    return ("an " if name[0] in "AEIOU" else "a ") + name


def check_match(expected: dict[str, tuple], tensors: dict[str, torch.Tensor], source, config, model: nn.Module) -> None:
    """Raise a ValueError unless ``tensors`` (read from ``source``) has exactly the keys of ``expected`` (name ->
    shape, what ``config`` creates on ``model``), each with that shape."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"load_adapter: {source} does not match {_a(type(config).__name__)} of "
                         f"{type(model).__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, value in tensors.items():
        if tuple(value.shape) != expected[name]:
            raise ValueError(f"load_adapter: {name} has shape {list(value.shape)} in the file but "
                             f"{list(expected[name])} in the model")


def load_into(model: nn.Module, config, tensors: dict[str, torch.Tensor], source) -> nn.Module:
    """Put ``tensors`` (keyed by the model's parameter names, read from ``source``) into ``model`` as ``config``'s
    adapter, applying ``config`` first if the model has none. Every key and shape is checked against what the
    config creates (on a meta skeleton) before ``model`` is touched: on error a ValueError says what, and the
    model is left as it was. Our format (:func:`load`) and the PEFT-format loaders of IA3 and soft prompts end
    here."""
    present = attached(model)
    if present is not None and type(present) is not type(config):
        raise ValueError(f"load_adapter: the model carries {_a(type(present).__name__)}; the adapter in {source} "
                         f"is {_a(type(config).__name__)}")
    apply = getattr(config, "apply_for_load", config.apply_to)
    probe = model if present is not None else apply(skeleton(model))
    check_match({n: tuple(t.shape) for n, t in _state(probe, config).items()}, tensors, source, config, model)
    if hasattr(config, "check_state"):
        config.check_state(tensors)
    if present is None:
        apply(model)
    with torch.no_grad():
        if hasattr(config, "load_state"):
            config.load_state(model, tensors)
        else:
            targets = dict(model.named_parameters()) | dict(model.named_buffers())
            for name, value in tensors.items():
                targets[name].copy_(value)
    return model


def load(model: nn.Module, directory: pathlib.Path, raw: dict) -> nn.Module:
    """Load an adapter written by :func:`save` into ``model`` (see :func:`load_into`)."""
    config = config_from_dict(raw, directory / CONFIG_NAME)
    tensors = {k.removeprefix(PREFIX): v for k, v in read_tensors(directory).items()}
    return load_into(model, config, tensors, directory / WEIGHTS_NAME)


def atomic_write(writers: dict) -> None:
    """Write each target through a temporary file in its directory, and rename them into place only once all
    are written: a failure while writing any of them (disk full, an exception, a kill) leaves every previous
    file, so new weights are never paired with an old config. Only a crash between the renames, which follow
    each other and allocate nothing, could split the pair."""
    temporaries = {}
    try:
        for target, write in writers.items():
            fd, temporaries[target] = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            write(temporaries[target])
        for target, tmp in temporaries.items():
            os.replace(tmp, target)
    finally:
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
