"""Module-name targeting shared by every method's config: which nn.Linear modules of a model a config names,
replacing them in place, freezing the rest, and :func:`apply`, the one entry point users call.

A config class plugs in by defining ``apply_to(self, model) -> model``; :func:`apply` calls it.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

# Default targets per transformers model_type: the attention query and value projections, as HF PEFT.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}
# Freshly created task heads stay trainable (HF PEFT does the same for sequence classification).
TASK_HEADS = ("score", "classifier")


def apply(model: nn.Module, config) -> nn.Module:
    """Apply a method's config (``LoRAConfig``, ...) to ``model`` in place and return ``model``."""
    apply_to = getattr(config, "apply_to", None)
    if not callable(apply_to):
        raise TypeError(f"apply: argument 'config' must be one of peft_kernels' method configs (with an apply_to "
                        f"method), got {type(config).__name__}")
    return apply_to(model)


def matches(name: str, targets: list[str]) -> bool:
    """``name`` is a target or ends with ``.<target>``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(model: nn.Module, target_modules: list[str] | None, table: dict = DEFAULT_TARGETS,
                    config_name: str = "config") -> list[str]:
    """``target_modules`` or, when None, the default of the model's ``config.model_type`` in ``table``."""
    if target_modules is not None:
        return list(target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise ValueError(
            f"apply: no default target_modules for model_type {model_type!r} (known: {sorted(table)}); "
            f"pass {config_name}(target_modules=[...])"
        )
    return list(table[model_type])


def linear_names(model: nn.Module, targets: list[str], kind: type = nn.Linear) -> list[str]:
    """Names of the ``kind`` modules matching ``targets``; raises listing the model's Linear modules if none."""
    names = [n for n, m in model.named_modules() if isinstance(m, kind) and matches(n, targets)]
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        kind_name = "nn.Linear" if kind is nn.Linear else kind.__name__
        raise ValueError(f"apply: target_modules {targets} match no {kind_name} of {type(model).__name__}; "
                         f"its Linear modules include {linears[:8]}")
    return names


def replace(model: nn.Module, names: list[str], make: Callable[[nn.Module], nn.Module]) -> None:
    """Swap each named submodule for ``make(old)``, which takes ``old``'s train/eval mode (a new module starts in
    training mode: in a model in eval mode its dropout would otherwise be live)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, make(old).train(old.training))


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_task_head(model: nn.Module) -> None:
    """Keep a fresh classification head of a ``...ForSequenceClassification`` model trainable."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        for name, module in model.named_children():
            if name in TASK_HEADS:
                module.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameters, total number of parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
