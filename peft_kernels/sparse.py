"""Sparse fine-tuning: which entries of a model's weights to train (mask builders), :class:`SparseFTConfig` for
:func:`peft_kernels.apply`, and saving / applying the result as a sparse diff.

Every mask builder returns ``{parameter name: indices}``: sorted int64 flat indices into that parameter, the
form :class:`peft_kernels.optim.SparseAdamW` and the ``masked_adamw_step_`` op take. Builders that score
entries select the top ``density`` fraction of all scored entries together (global top-k, as FISH and LT-SFT
do), so a parameter whose entries matter more gets more of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import targeting
from .adapter_io import atomic_write
from .nn.diff_pruning import DiffPruningLinear
from .optim import SparseAdamW, check_indices, sparse_parameters

DIFF_NAME = "sparse_diff.safetensors"


def _check_density(density: float) -> None:
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def top_k(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """The ``round(density * total)`` highest-scoring entries over all tensors of ``scores`` (at least one),
    as sorted int64 flat indices per name. Ties at the cut are broken by torch.topk, deterministically."""
    _check_density(density)
    if not scores:
        raise ValueError("top_k: no scores (no parameter requires grad / matches)")
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    k = max(1, round(density * flat.numel()))
    chosen = torch.topk(flat, k, sorted=False).indices.sort().values
    out, start = {}, 0
    for name in names:
        end = start + scores[name].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, end]))
        out[name] = (chosen[lo:hi] - start).to(scores[name].device)
        start = end
    return out


def _loss(model: nn.Module, batch, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch).loss
    raise TypeError(f"batches of type {type(batch).__name__} need loss_fn(model, batch) -> scalar loss (dict batches "
                    "with labels use the model's own .loss)")


def _gradients(model: nn.Module, batches: Iterable, loss_fn: Callable | None, combine) -> dict[str, torch.Tensor]:
    """For every parameter that requires grad: ``combine(acc, grad)`` folded over the batches, in fp32."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"no parameter of {type(model).__name__} requires grad: nothing to score")
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        _loss(model, batch, loss_fn).backward()
        for n, p in params.items():
            if p.grad is not None:
                combine(acc[n], p.grad.float())
        count += 1
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise ValueError("batches is empty: the mask needs at least one batch of gradients")
    return acc


def fisher_scores(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """Empirical Fisher information per entry: the sum over batches of the squared gradient."""
    return _gradients(model, batches, loss_fn, lambda acc, g: acc.addcmul_(g, g))


def fisher_mask(model: nn.Module, batches: Iterable, density: float, loss_fn: Callable | None = None) -> dict:
    """FISH mask (Sung et al. 2021) / Child-Tuning_D (Xu et al. 2021): the top ``density`` of the trainable
    entries by accumulated squared gradient. Pass batches of one example for the per-example Fisher of the
    papers; larger batches square averaged gradients. Gradients are cleared afterwards.

    batches: dicts for the model (``model(**batch).loss``) or anything ``loss_fn(model, batch)`` understands."""
    _check_density(density)
    return top_k(fisher_scores(model, batches, loss_fn), density)


def grad_sq_mask(model: nn.Module, batches: Iterable, density: float, loss_fn: Callable | None = None) -> dict:
    """SAM-style mask: the top ``density`` of the trainable entries by the square of the gradient accumulated
    over all batches, (sum_b g_b)^2, i.e. the first-order loss change of each entry. Unlike :func:`fisher_mask`,
    gradients that disagree across batches cancel before squaring."""
    _check_density(density)
    summed = _gradients(model, batches, loss_fn, lambda acc, g: acc.add_(g))
    return top_k({n: g.square() for n, g in summed.items()}, density)


def magnitude_change_mask(w0: Mapping[str, torch.Tensor], w1: Mapping[str, torch.Tensor], density: float) -> dict:
    """LT-SFT's mask (Ansell et al. 2022): the top ``density`` of entries by |w1 - w0| over every name of
    ``w1`` (e.g. the weights after a first, dense fine-tuning phase against the pretrained ``w0``); both are
    state-dict-like mappings name -> tensor."""
    _check_density(density)
    scores = {}
    for name, after in w1.items():
        before = w0.get(name)
        if before is None or before.shape != after.shape:
            raise ValueError(f"magnitude_change_mask: {name!r} has shape {list(after.shape)} in w1 but "
                             f"{None if before is None else list(before.shape)} in w0")
        scores[name] = (after.detach().float() - before.detach().float()).abs()
    return top_k(scores, density)


def random_mask(params: Mapping[str, torch.Tensor] | nn.Module, density: float, seed: int = 0) -> dict:
    """A uniformly random ``density`` share of each tensor (``round(density * numel)`` entries, at least one),
    reproducible from ``seed``. ``params``: a mapping name -> tensor or a module (its parameters that require
    grad)."""
    _check_density(density)
    if isinstance(params, nn.Module):
        params = {n: p for n, p in params.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in params.items():
        k = max(1, round(density * t.numel()))
        out[name] = torch.randperm(t.numel(), generator=gen)[:k].sort().values.to(t.device)
    return out


def threshold_mask(scores: Mapping[str, torch.Tensor], threshold: float) -> dict:
    """Threshold-Mask (Zhao et al. 2020): the entries whose (learned) real-valued score exceeds ``threshold``."""
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return {name: (s.detach().reshape(-1) > threshold).nonzero().reshape(-1) for name, s in scores.items()}


METHODS = ("random", "child_f", "fisher", "child_d", "sam", "lt_sft", "threshold", "diff_pruning")


@dataclasses.dataclass
class SparseFTConfig:
    """What :func:`peft_kernels.apply` does for sparse fine-tuning: freeze the model, make the weights of the
    targeted nn.Linear modules trainable, and choose the entries each may change.

    method: "random" (``seed``), "child_f" (Child-Tuning_F: every entry selected, a fresh Bernoulli(density)
    gradient mask per step drawn in the kernel), "fisher" / "child_d" (:func:`fisher_mask` over ``batches``),
    "sam" (:func:`grad_sq_mask` over ``batches``), "lt_sft" (:func:`magnitude_change_mask` against
    ``finetuned``, a state dict of the same model after a dense phase), "threshold" (:func:`threshold_mask` of
    ``scores`` at ``threshold``; density unused), "diff_pruning" (Guo et al. 2021: each targeted Linear becomes
    a :class:`peft_kernels.nn.DiffPruningLinear`, a dense diff behind a hard-concrete L0 gate trained with any
    dense optimizer and :func:`l0_penalty` added to the loss; :func:`finalize_diff_pruning` then keeps the top
    ``density`` fraction of the gated diff, merges it and records the selection for :func:`save_sparse_diff`).
    target_modules: names (or dotted suffixes) of nn.Linear modules; None picks the architecture's default (see
    peft_kernels.targeting).
    """

    method: str = "random"
    density: float = 0.01
    target_modules: list[str] | None = None
    seed: int = 0
    batches: Iterable | None = None
    loss_fn: Callable | None = None
    finetuned: Mapping[str, torch.Tensor] | None = None
    scores: Mapping[str, torch.Tensor] | None = None
    threshold: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"SparseFTConfig: method must be one of {METHODS}, got {self.method!r}")
        _check_density(self.density)

    def apply_to(self, model: nn.Module) -> nn.Module:
        targets = targeting.resolve_targets(model, self.target_modules, config_name="SparseFTConfig")
        if self.method == "diff_pruning":
            linears = targeting.linear_names(model, targets)
            targeting.freeze(model)
            targeting.replace(model, linears, DiffPruningLinear.from_linear)
            model.peft_kernels_sparse = SparseSelection(dataclasses.replace(self, target_modules=targets), {})
            return model
        names = [f"{n}.weight" for n in targeting.linear_names(model, targets)]
        params = dict(model.named_parameters())
        targeting.freeze(model)
        for name in names:
            params[name].requires_grad_(True)
        weights = {n: params[n] for n in names}
        indices = self._indices(model, weights)
        model.peft_kernels_sparse = SparseSelection(dataclasses.replace(self, target_modules=targets, batches=None,
                                                                        loss_fn=None, finetuned=None, scores=None),
                                                    indices)
        return model

    def _indices(self, model: nn.Module, weights: dict) -> dict:
        m = self.method
        if m == "random":
            return random_mask(weights, self.density, self.seed)
        if m == "child_f":
            return {n: torch.arange(w.numel(), device=w.device) for n, w in weights.items()}
        if m in ("fisher", "child_d", "sam"):
            if self.batches is None:
                raise ValueError(f"SparseFTConfig(method={m!r}) needs batches=... to score entries by gradient")
            build = grad_sq_mask if m == "sam" else fisher_mask
            return build(model, self.batches, self.density, self.loss_fn)
        if m == "lt_sft":
            if self.finetuned is None:
                raise ValueError("SparseFTConfig(method='lt_sft') needs finetuned=<state dict after a dense phase>")
            return magnitude_change_mask(weights, {n: self.finetuned[n] for n in weights}, self.density)
        if self.scores is None or self.threshold is None:
            raise ValueError("SparseFTConfig(method='threshold') needs scores=... and threshold=...")
        return threshold_mask({n: self.scores[n] for n in weights}, self.threshold)


@dataclasses.dataclass
class SparseSelection:
    """What :meth:`SparseFTConfig.apply_to` leaves on the model (``model.peft_kernels_sparse``)."""

    config: SparseFTConfig
    indices: dict[str, torch.Tensor]

    @property
    def child_p(self) -> float:
        return self.config.density if self.config.method == "child_f" else 1.0


def _selection(model: nn.Module, what: str) -> SparseSelection:
    sel = getattr(model, "peft_kernels_sparse", None)
    if sel is None:
        raise ValueError(f"{what}: the model carries no sparse selection (call peft_kernels.apply(model, "
                         "SparseFTConfig(...)) first)")
    return sel


def make_optimizer(model: nn.Module, lr: float = 1e-3, **kwargs) -> SparseAdamW:
    """A :class:`SparseAdamW` over the selection :func:`peft_kernels.apply` made (Child-Tuning_F's density
    and seed included); ``kwargs`` go to SparseAdamW (betas, eps, weight_decay)."""
    sel = _selection(model, "make_optimizer")
    if sel.config.method == "diff_pruning":
        raise ValueError("make_optimizer: diff pruning trains dense diffs and gate logits; use a dense optimizer "
                         "(torch.optim.AdamW over the trainable parameters) and finalize_diff_pruning afterwards")
    return SparseAdamW(sparse_parameters(model, sel.indices), lr=lr, child_p=sel.child_p, seed=sel.config.seed,
                       **kwargs)


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of :meth:`DiffPruningLinear.expected_l0` over the model's diff-pruning layers (the expected number of
    non-zero diff entries): add ``lambda * l0_penalty(model)`` to the loss."""
    modules = [m for m in model.modules() if isinstance(m, DiffPruningLinear)]
    if not modules:
        raise ValueError("l0_penalty: the model has no DiffPruningLinear (apply SparseFTConfig(method='diff_pruning'))")
    return sum(m.expected_l0() for m in modules)


@torch.no_grad()
def finalize_diff_pruning(model: nn.Module, density: float | None = None) -> dict[str, torch.Tensor]:
    """End diff pruning: keep the top ``density`` fraction (default: the config's) of all entries of the eval-mode
    gated diffs z * delta by magnitude, globally (the authors' magnitude projection to a target sparsity), add
    them to the frozen weights, and turn each DiffPruningLinear back into an nn.Linear holding W + the kept
    diff. The kept entries become the model's sparse selection, so :func:`save_sparse_diff` writes them and
    :func:`load_sparse_diff` reproduces the model from the base. Returns the indices per weight name."""
    sel = _selection(model, "finalize_diff_pruning")
    if sel.config.method != "diff_pruning":
        raise ValueError(f"finalize_diff_pruning: the model was set up for method {sel.config.method!r}, "
                         "not 'diff_pruning'")
    density = sel.config.density if density is None else density
    _check_density(density)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, DiffPruningLinear)}
    if not modules:
        raise ValueError("finalize_diff_pruning: no DiffPruningLinear left (already finalized?)")
    diffs = {f"{n}.weight": m.final_diff() for n, m in modules.items()}
    indices = top_k({n: d.abs() for n, d in diffs.items()}, density)
    for name, module in modules.items():
        idx = indices[f"{name}.weight"]
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                           device="meta")
        weight = module.weight.detach().clone()
        flat = weight.view(-1)
        flat[idx] = (flat[idx].float() + diffs[f"{name}.weight"].view(-1)[idx]).to(weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = None if module.bias is None else nn.Parameter(module.bias.detach(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    sel.indices.update(indices)
    return indices


def save_sparse_diff(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the selected entries of the trained weights to ``directory/sparse_diff.safetensors``: per
    parameter ``<name>.indices`` (int32 when the parameter has fewer than 2^31 entries, else int64) and
    ``<name>.values`` (the entries' values in the parameter's dtype), so the file's size is proportional to k.
    The file is written to a temporary name and renamed: a failed save leaves any previous one intact."""
    sel = _selection(model, "save_sparse_diff")
    if sel.config.method == "diff_pruning" and not sel.indices:
        raise ValueError("save_sparse_diff: call finalize_diff_pruning(model) first: a diff-pruning model has no "
                         "sparse diff until its gated diffs are pruned and merged")
    params = dict(model.named_parameters())
    tensors, shapes = {}, {}
    for name, idx in sel.indices.items():
        p = params[name]
        small = p.numel() < 2**31
        tensors[f"{name}.indices"] = idx.to(torch.int32 if small else torch.int64).cpu().contiguous()
        tensors[f"{name}.values"] = p.detach().reshape(-1)[idx].cpu().contiguous()
        shapes[name] = list(p.shape)
    meta = {"format": "pt", "method": sel.config.method, "density": str(sel.config.density),
            "shapes": json.dumps(shapes)}
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write({directory / DIFF_NAME: lambda path: save_file(tensors, path, metadata=meta)})


def load_sparse_diff(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply a diff written by :func:`save_sparse_diff` to a base ``model`` in place: each parameter's entries at
    the saved indices take the saved values. Every name, shape, dtype and index is checked before anything is
    written: on error the model is left as it was."""
    path = pathlib.Path(directory) / DIFF_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for missing, truncated or corrupt files
        raise ValueError(f"load_sparse_diff: cannot read {path}: {exc}") from exc
    shapes = json.loads(meta.get("shapes", "{}"))
    params = dict(model.named_parameters())
    plan = []
    for name, shape in shapes.items():
        p = params.get(name)
        if p is None or list(p.shape) != shape:
            raise ValueError(f"load_sparse_diff: {name!r} has shape {shape} in the diff but "
                             f"{None if p is None else list(p.shape)} in {type(model).__name__}")
        idx, values = tensors.get(f"{name}.indices"), tensors.get(f"{name}.values")
        if idx is None or values is None or values.numel() != idx.numel() or values.dtype != p.dtype:
            raise ValueError(f"load_sparse_diff: {name!r} needs .indices and .values of equal length in the parameter's "
                             f"dtype {p.dtype}, got {None if values is None else values.dtype} values")
        plan.append((p, check_indices(name, p, idx), values.to(p.device)))
    with torch.no_grad():
        for p, idx, values in plan:
            p.view(-1)[idx] = values
    return model


__all__ = [
    "SparseFTConfig",
    "SparseSelection",
    "fisher_mask",
    "finalize_diff_pruning",
    "fisher_scores",
    "grad_sq_mask",
    "l0_penalty",
    "load_sparse_diff",
    "magnitude_change_mask",
    "make_optimizer",
    "random_mask",
    "save_sparse_diff",
    "threshold_mask",
    "top_k",
]
