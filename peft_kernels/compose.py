"""Multi-task composition of LoRA adapters saved by ``peft_kernels.save_adapter`` (HF PEFT's LoRA format, ours or
PEFT's): :func:`merge_adapters` (task arithmetic, or AdapterSoup-style averaging) and :func:`lorahub_search`
(LoRAHub's gradient-free search of the composition weights). The composed model is an ordinary LoRA model
(``LoRALinear`` modules, ``peft_kernels.save_adapter`` writes it in PEFT's format; ``LoRALinear.merge`` folds it
into W). AdapterFusion is not here: it composes bottleneck adapters, which this package does not have yet.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Callable, Sequence

import torch
from torch import nn

from . import adapter_io, lora, targeting
from .lora import LoRAConfig
from .nn import LoRALinear

MODES = ("task_arithmetic", "average")


@dataclasses.dataclass
class _Adapter:
    """One adapter read from disk: its rank, its scale (alpha / r, or alpha / sqrt(r) with rsLoRA), its
    target_modules and its factors, module name -> (A [r, in], B [out, r])."""

    directory: pathlib.Path
    r: int
    scaling: float
    targets: list[str]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _read(directory: str | os.PathLike, what: str) -> _Adapter:
    directory = pathlib.Path(directory)
    try:
        config, modules_to_save = lora._read_config(directory / adapter_io.CONFIG_NAME)
        if modules_to_save:
            raise ValueError(f"it also carries whole modules {modules_to_save} (a task head, PEFT's modules_to_save); "
                             "only the LoRA factors compose: save the adapters with train_task_head=False")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in adapter_io.read_tensors(directory).items():
            name, part = lora._split_key(key)
            parts.setdefault(name, {})[part] = value
        for name, pair in parts.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(f"it has {sorted(pair)} but not both lora_A and lora_B for {name}")
    except ValueError as exc:
        # lora's and adapter_io's readers name load_adapter in their messages: the caller's name replaces it
        raise ValueError(f"{what}: adapter {directory}: {str(exc).removeprefix('load_adapter: ')}") from exc
    scaling = config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    return _Adapter(directory, config.r, scaling, config.target_modules,
                    {name: (pair["lora_A"], pair["lora_B"]) for name, pair in parts.items()})


def _check_weights(what: str, weights, n: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    if (not isinstance(weights, (list, tuple)) or len(weights) != n
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
        raise ValueError(f"{what}: argument 'weights' must be {n} finite numbers (one per directory), got {weights!r}")
    return [float(w) for w in weights]


class _Composition:
    """The adapters of ``directories`` read once and checked against ``model``; :meth:`install` writes a weighted
    composition into the model's LoRALinear modules (applying LoRA first if the model has none)."""

    def __init__(self, model: nn.Module, directories: Sequence[str | os.PathLike], mode: str, what: str):
        if mode not in MODES:
            raise ValueError(f"{what}: argument 'mode' must be one of {list(MODES)}, got {mode!r}")
        if isinstance(directories, (str, os.PathLike)) or not isinstance(directories, Sequence) or not directories:
            raise ValueError(f"{what}: argument 'directories' must be a non-empty list of adapter directories, got "
                             f"{directories!r}")
        present = adapter_io.attached(model)
        if present is not None:
            raise ValueError(f"{what}: the model carries a {type(present).__name__}; composition needs a base model "
                             "(or one composed by merge_adapters before)")
        self.model, self.mode, self.what = model, mode, what
        self.adapters = [_read(d, what) for d in directories]
        self.targets = sorted({t for a in self.adapters for t in a.targets})
        existing = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        kinds = (nn.Linear, LoRALinear)
        self.names = [n for n, m in model.named_modules() if isinstance(m, kinds) and targeting.matches(n, self.targets)]
        shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in self.names}
        for adapter in self.adapters:
            for name, (a, b) in adapter.factors.items():
                if name not in shapes:
                    raise ValueError(f"{what}: adapter {adapter.directory} names {name}, which is no targeted Linear "
                                     f"of {type(model).__name__} (the adapter was made for another architecture?)")
                n_in, n_out = shapes[name]
                if list(a.shape) != [adapter.r, n_in] or list(b.shape) != [n_out, adapter.r]:
                    raise ValueError(f"{what}: adapter {adapter.directory}: {name} has lora_A {list(a.shape)}, lora_B "
                                     f"{list(b.shape)}; the model needs [{adapter.r}, {n_in}] and [{n_out}, {adapter.r}]")
        if mode == "average":
            ranks = {a.r for a in self.adapters}
            modules = {frozenset(a.factors) for a in self.adapters}
            if len(ranks) > 1:
                raise ValueError(f"{what}: mode='average' needs adapters of one rank, got "
                                 + ", ".join(f"r={a.r} ({a.directory})" for a in self.adapters))
            if len(modules) > 1:
                raise ValueError(f"{what}: mode='average' needs adapters on the same modules; "
                                 + ", ".join(f"{a.directory} adapts {len(a.factors)}" for a in self.adapters))
            self.rank = self.adapters[0].r
        else:
            self.rank = sum(a.r for a in self.adapters)
        if existing:
            if sorted(existing) != sorted(self.names) or any(m.r != self.rank for m in existing.values()):
                raise ValueError(f"{what}: the model already carries LoRA modules {sorted(existing)[:4]} of rank "
                                 f"{sorted({m.r for m in existing.values()})}; this composition needs rank {self.rank} "
                                 f"on {self.names[:4]}")
            if any(m.merged for m in existing.values()):
                raise ValueError(f"{what}: some LoRALinear modules are merged; unmerge() them first")

    def factors(self, weights: list[float], name: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The composed (A [R, in], B [out, R]) of module ``name``, with scaling 1, in fp32."""
        n_in, n_out = self.model.get_submodule(name).in_features, self.model.get_submodule(name).out_features
        pairs = []
        for adapter in self.adapters:
            if name in adapter.factors:
                a, b = (t.to(device=device, dtype=torch.float32) for t in adapter.factors[name])
            else:  # an adapter that does not touch this module contributes a zero block: exact, and one rank everywhere
                a = torch.zeros(adapter.r, n_in, device=device)
                b = torch.zeros(n_out, adapter.r, device=device)
            pairs.append((a, b * adapter.scaling))
        if self.mode == "task_arithmetic":
            # B_cat A_cat = sum_i w_i s_i B_i A_i exactly: the weights and scales ride on the B blocks.
            return torch.cat([a for a, _ in pairs]), torch.cat([w * b for w, (_, b) in zip(weights, pairs)], dim=1)
        total = sum(weights)
        return (sum(w / total * a for w, (a, _) in zip(weights, pairs)),
                sum(w / total * b for w, (_, b) in zip(weights, pairs)))

    def install(self, weights: list[float]) -> None:
        if self.mode == "average" and sum(weights) == 0:
            raise ValueError(f"{self.what}: mode='average' divides by the weights' sum, which is 0 for {weights}")
        model = self.model
        if not any(isinstance(m, LoRALinear) for m in model.modules()):
            config = LoRAConfig(r=self.rank, alpha=self.rank, target_modules=self.targets, train_task_head=False)
            config.apply_to(model)
        with torch.no_grad():
            for name in self.names:
                module = model.get_submodule(name)
                a, b = self.factors(weights, name, module.lora_A.device, module.lora_A.dtype)
                module.lora_A.copy_(a)
                module.lora_B.copy_(b)
                module.scaling = 1.0


def merge_adapters(model: nn.Module, directories: Sequence[str | os.PathLike], weights: Sequence[float],
                   mode: str = "task_arithmetic") -> nn.Module:
    """Compose the LoRA adapters of ``directories`` (each written by ``peft_kernels.save_adapter`` or HF PEFT) into
    ``model``, in place, as one LoRA (scaling 1) on the union of their target modules. Returns ``model``.

    * ``task_arithmetic``: ``ΔW = Σ_i w_i s_i B_i A_i`` (s_i the adapter's alpha / r), exactly, as a LoRA of rank
      ``R = Σ_i r_i``: A = [A_1; ...; A_n] [R, in], B = [w_1 s_1 B_1, ..., w_n s_n B_n] [out, R] (no SVD). An
      adapter that does not adapt a module contributes a zero block there.
    * ``average`` (AdapterSoup): with w̄ = w / Σ w, ``A = Σ_i w̄_i A_i``, ``B = Σ_i w̄_i s_i B_i`` [out, r]; the
      adapters must have one rank and adapt the same modules.

    ``model`` is a base model (LoRA is applied with ``train_task_head=False``), or one that a previous call with
    the same adapters' shapes composed (its factors are overwritten). Adapters carrying whole modules (PEFT's
    modules_to_save, e.g. a trained classification head) are refused: only the LoRA factors compose. Every
    adapter is read and checked before the model is touched.

    Args:
        directories: n adapter directories.
        weights: n finite numbers (a list or a 1-D tensor).
        mode: "task_arithmetic" or "average".
    """
    composition = _Composition(model, directories, mode, "merge_adapters")
    composition.install(_check_weights("merge_adapters", weights, len(composition.adapters)))
    return model


def lorahub_search(model: nn.Module, directories: Sequence[str | os.PathLike], examples,
                   loss_fn: Callable[[nn.Module, object], torch.Tensor | float], steps: int = 40, seed: int = 0,
                   l1: float = 0.05, population: int | None = None, sigma: float = 0.5,
                   bound: float = 1.5) -> list[float]:
    """LoRAHub (Huang et al. 2023): search the task-arithmetic weights w of the adapters of ``directories``
    without gradients, minimising ``loss_fn(model, examples) + l1 * Σ |w_i|`` over the few-shot ``examples``;
    leave ``model`` composed with the best weights (:func:`merge_adapters`, ``task_arithmetic``) and return them.

    The search is a (1 + λ) evolution strategy: from w = 1/n each, every step draws λ candidates
    ``w + σ N(0, I)`` clipped to [-bound, bound] (LoRAHub's bounds: 1.5), keeps the best if it improves, and adapts
    σ by the 1/5th success rule (x1.5 on success, x1.5^-1/4 otherwise). ``steps * λ + 1`` evaluations of
    ``loss_fn``; λ defaults to CMA-ES's 4 + floor(3 ln n). The model is in eval mode and under ``torch.no_grad``
    while ``loss_fn`` runs; a non-finite loss ranks a candidate last. Deterministic for a given ``seed``.

    Args:
        examples: anything ``loss_fn`` takes (e.g. a dict of input_ids and labels).
        loss_fn: (model, examples) -> a number or a 0-d tensor, lower is better.
        steps: ES generations (LoRAHub's default budget: 40).
    """
    what = "lorahub_search"
    if not callable(loss_fn):
        raise TypeError(f"{what}: argument 'loss_fn' must be callable (model, examples) -> loss, got "
                        f"{type(loss_fn).__name__}")
    checks = [("steps", steps, isinstance(steps, int) and steps >= 1, "an int >= 1"),
              ("population", population, population is None or (isinstance(population, int) and population >= 1),
               "None or an int >= 1"),
              ("l1", l1, isinstance(l1, (int, float)) and l1 >= 0, "a number >= 0"),
              ("sigma", sigma, isinstance(sigma, (int, float)) and sigma > 0, "a number > 0"),
              ("bound", bound, isinstance(bound, (int, float)) and bound > 0, "a number > 0")]
    for name, value, ok, expected in checks:
        if not ok:
            raise ValueError(f"{what}: argument {name!r} must be {expected}, got {value!r}")
    composition = _Composition(model, directories, "task_arithmetic", what)
    n = len(composition.adapters)
    lam = population or 4 + int(3 * math.log(n))
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()

    def objective(w: torch.Tensor) -> float:
        composition.install(w.tolist())
        with torch.no_grad():
            loss = float(loss_fn(model, examples))
        return loss + l1 * float(w.abs().sum()) if math.isfinite(loss) else math.inf

    try:
        best = torch.full((n,), 1.0 / n, dtype=torch.float64)
        best_value = objective(best)
        for _ in range(steps):
            candidates = (best + sigma * torch.randn(lam, n, generator=generator, dtype=torch.float64)).clamp(-bound, bound)
            values = [objective(c) for c in candidates]
            k = min(range(lam), key=values.__getitem__)
            if values[k] < best_value:
                best, best_value, sigma = candidates[k], values[k], sigma * 1.5
            else:
                sigma *= 1.5 ** -0.25
        composition.install(best.tolist())
    finally:
        model.train(was_training)
    return best.tolist()
