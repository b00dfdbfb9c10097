"""LoRA derivatives on transformers models, applied by ``peft_kernels.apply``; every update still runs through the
fused ``ops.lora_linear`` (via :class:`LoRALinear` and its subclasses).

* :class:`LoRAFAConfig`: LoRA-FA (Zhang et al., 2023), A frozen at its random init; saved as HF PEFT LoRA.
* :class:`DyLoRAConfig`: DyLoRA (Valipour et al., 2023), rank sampled per training forward; :func:`set_rank`.
* :class:`DeltaLoRAConfig`: Delta-LoRA (Zi et al., 2023), the base weight follows the adapter's change;
  :func:`attach_optimizer`.
* :class:`AdaLoRAConfig`: AdaLoRA (Zhang et al., 2023), SVD-shaped updates with an importance-driven rank budget;
  :func:`update_and_allocate`, :func:`orth_regularization`, :func:`add_orth_regularization`.
* :func:`loftq_init`: LoftQ (Li et al., 2023) initialisation of a :class:`QLoRALinear`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import torch
from safetensors.torch import save_file
from torch import nn

from . import adapter_io, ops, targeting
from .lora import LoRAConfig
from .nn import AdaLoRALinear, DyLoRALinear, LoRALinear, QLoRALinear, enable_delta_lora
from .nn.nf4 import _PARTS
from ._validate import check_lora_args, check_targets, is_int, is_number, require

# Default targets per transformers model_type (every config here): the attention query and value projections.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}


def _swap(model: nn.Module, config, make) -> list[str]:
    """Replace the targets of ``config`` in ``model`` by ``make(linear)``, every new module built before the model
    is touched (a failure leaves it unchanged); freeze the rest but fresh task heads. Returns the targets."""
    targets = targeting.resolve_targets(model, config.target_modules, table=DEFAULT_TARGETS,
                                        config_name=type(config).__name__)
    names = targeting.linear_names(model, targets)
    made = {}
    for name in names:
        linear = model.get_submodule(name)
        # A new module starts in training mode; it takes the replaced one's (DyLoRA samples ranks in training).
        made[id(linear)] = make(linear).train(linear.training)
    targeting.freeze(model)
    targeting.replace(model, names, lambda linear: made[id(linear)])
    if config.train_task_head:
        targeting.unfreeze_task_head(model)
    return targets


def _modules(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


# ----------------------------------------------------------------------------------------------------- LoRA-FA
@dataclasses.dataclass
class LoRAFAConfig:
    """LoRA-FA: LoRA whose A [r, in] stays frozen at its Kaiming-uniform init; only B [out, r] (and a fresh task
    head) trains. Backward then keeps x A^T [..., r] instead of x [..., in] per layer (``ops.lora_linear`` saves x
    only while A has a gradient): for LLaMA-7B's q/v projections, r = 8 instead of 4096 values per token.

    On disk this is HF PEFT's LoRA format (A and B both written; PEFT loads it as plain LoRA), so the config is
    not registered with :mod:`adapter_io`: ``peft_kernels.load_adapter`` on a fresh model gives plain LoRA with A
    trainable; to keep training LoRA-FA, ``apply`` this config first and then ``load_adapter`` into that model.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    use_rslora: bool = False
    train_task_head: bool = True

    def __post_init__(self):
        check_lora_args("LoRAFAConfig", self.r, self.alpha, self.dropout)
        check_targets("LoRAFAConfig", "target_modules", self.target_modules)

    def apply_to(self, model: nn.Module) -> nn.Module:
        def make(linear):
            module = LoRALinear.from_linear(linear, self.r, self.alpha, self.dropout, self.use_rslora)
            module.lora_A.requires_grad_(False)
            return module

        targets = _swap(model, self, make)
        # lora.save_adapter writes what this LoRAConfig describes: HF PEFT's LoRA format.
        model.peft_kernels_lora = LoRAConfig(self.r, self.alpha, self.dropout, targets, self.use_rslora,
                                             self.train_task_head)
        return model


# ------------------------------------------------------------------------------------------------------ DyLoRA
@adapter_io.method("PEFT_KERNELS_DYLORA")
@dataclasses.dataclass
class DyLoRAConfig:
    """DyLoRA: each targeted Linear becomes a :class:`DyLoRALinear` of maximum rank ``r``; every training forward
    of each layer draws b in {1..r} from one generator seeded with ``seed`` (shared by the model's layers, drawn
    in forward order) and uses A[:b], B[:, :b] with scaling alpha / b. :func:`set_rank` fixes b for evaluation,
    inference or merging. Saved in peft_kernels' format (HF PEFT has no DyLoRA): lora_A, lora_B, task head."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    seed: int = 0
    train_task_head: bool = True

    def __post_init__(self):
        check_lora_args("DyLoRAConfig", self.r, self.alpha, self.dropout)
        check_targets("DyLoRAConfig", "target_modules", self.target_modules)
        require("DyLoRAConfig", "seed", is_int(self.seed), "an int", self.seed)

    def apply_to(self, model: nn.Module) -> nn.Module:
        generator = torch.Generator().manual_seed(self.seed)
        targets = _swap(model, self, lambda linear: DyLoRALinear.from_linear(
            linear, self.r, self.alpha, self.dropout, generator))
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets))
        return model


def set_rank(model: nn.Module, rank: int | None) -> nn.Module:
    """Fix the rank b of every :class:`DyLoRALinear` of ``model`` (1 <= rank <= r), or None to draw it again per
    training forward (eval then uses r). Returns ``model``."""
    modules = _modules(model, DyLoRALinear)
    if not modules:
        raise ValueError(f"set_rank: {type(model).__name__} has no DyLoRALinear (apply a DyLoRAConfig first)")
    for module in modules.values():
        module.set_rank(rank)
    return model


# -------------------------------------------------------------------------------------------------- Delta-LoRA
@adapter_io.method("PEFT_KERNELS_DELTA_LORA")
@dataclasses.dataclass
class DeltaLoRAConfig:
    """Delta-LoRA: LoRA whose frozen base weight W of each targeted Linear also moves by ``update_ratio`` times
    the change of scaling * B A at every optimizer step (``nn.enable_delta_lora``), so after t steps
    W_t - W_0 = update_ratio * (dW_t - dW_0). Attach the optimizer with :func:`attach_optimizer` after creating it.
    Dropout on the adapter input is allowed but the paper trains without it (dropout 0 by default).

    Saved in peft_kernels' format: the trainable tensors plus the updated ``weight`` [out, in] of every targeted
    Linear (the base model alone no longer reproduces the trained model); loading copies each back into the
    parameter of its name (adapter_io's default), base weights included."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    update_ratio: float = 1.0
    target_modules: list[str] | None = None
    use_rslora: bool = False
    train_task_head: bool = True

    def __post_init__(self):
        check_lora_args("DeltaLoRAConfig", self.r, self.alpha, self.dropout)
        check_targets("DeltaLoRAConfig", "target_modules", self.target_modules)
        require("DeltaLoRAConfig", "update_ratio", is_number(self.update_ratio), "a number", self.update_ratio)

    def apply_to(self, model: nn.Module) -> nn.Module:
        targets = _swap(model, self, lambda linear: LoRALinear.from_linear(
            linear, self.r, self.alpha, self.dropout, self.use_rslora))
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets))
        return model

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        modules = _modules(model, LoRALinear)
        if any(m.merged for m in modules.values()):
            raise ValueError("save_adapter: some LoRALinear modules are merged; unmerge() them before saving")
        return adapter_io.default_state(model) | {f"{n}.weight": m.weight for n, m in modules.items()}



def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Make ``optimizer`` apply Delta-LoRA's base-weight update to ``model`` (which carries a DeltaLoRAConfig)
    after each of its steps. Returns the hook handles (``.remove()`` them to stop)."""
    config = adapter_io.attached(model)
    if not isinstance(config, DeltaLoRAConfig):
        raise ValueError(f"attach_optimizer: argument 'model' must carry a DeltaLoRAConfig (peft_kernels.apply), "
                         f"got one with {type(config).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach_optimizer: argument 'optimizer' must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    return enable_delta_lora(optimizer, list(_modules(model, LoRALinear).values()), config.update_ratio)


# ----------------------------------------------------------------------------------------------------- AdaLoRA
@adapter_io.method("ADALORA")
@dataclasses.dataclass
class AdaLoRAConfig:
    """AdaLoRA: each targeted Linear becomes an :class:`AdaLoRALinear` (update scaling * P diag(Lambda) Q, rank
    ``init_r``, scaling alpha / init_r) and the rank budget shrinks from init_r * n to target_r * n (n targeted
    modules) by masking Lambda entries of low importance (:func:`update_and_allocate`, once per step after
    backward). Between step ``tinit`` and ``total_step - tfinal`` the budget follows a cubic decay, masks are
    recomputed every ``deltaT`` steps; from ``total_step - tfinal`` on the final mask is kept. ``beta1``/``beta2``:
    EMA factors of the sensitivity |w * dL/dw| and of its uncertainty. ``orth_reg_weight``: weight of
    :func:`orth_regularization` in :func:`add_orth_regularization`. Defaults as HF PEFT's AdaLoraConfig
    (lora_alpha 8). Saved in peft_kernels' format, whose tensor keys are HF PEFT's (lora_A, lora_B, lora_E);
    :func:`save_peft_adalora` writes HF PEFT's file and ``load_adapter`` reads it."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    target_modules: list[str] | None = None
    train_task_head: bool = True

    def __post_init__(self):
        name = "AdaLoRAConfig"
        check_lora_args(name, self.init_r, self.alpha, self.dropout, r_name="init_r")
        require(name, "target_r", is_int(self.target_r) and 1 <= self.target_r <= self.init_r,
                f"an int in [1, init_r={self.init_r}]", self.target_r)
        require(name, "total_step", is_int(self.total_step) and self.total_step > 0, "an int > 0", self.total_step)
        for field in ("tinit", "tfinal"):
            require(name, field, is_int(getattr(self, field)) and getattr(self, field) >= 0, "an int >= 0",
                    getattr(self, field))
        require(name, "deltaT", is_int(self.deltaT) and self.deltaT >= 1, "an int >= 1", self.deltaT)
        require(name, "tinit", self.tinit < self.total_step - self.tfinal,
                f"< total_step - tfinal = {self.total_step - self.tfinal} (no budgeting phase otherwise)", self.tinit)
        for field in ("beta1", "beta2"):
            require(name, field, isinstance(getattr(self, field), float) and 0 < getattr(self, field) < 1,
                    "a float in (0, 1)", getattr(self, field))
        require(name, "orth_reg_weight", is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0,
                "a number >= 0", self.orth_reg_weight)
        check_targets(name, "target_modules", self.target_modules)

    def apply_to(self, model: nn.Module) -> nn.Module:
        targets = _swap(model, self, lambda linear: AdaLoRALinear.from_linear(
            linear, self.init_r, self.alpha, self.dropout))
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets))
        model.peft_kernels_adalora = _Allocator()
        return model

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable tensors (lora_A, lora_B, lora_E of every layer, a fresh head), all layers at init_r."""
        pruned = [n for n, m in _modules(model, AdaLoRALinear).items() if m.r != self.init_r]
        if pruned:
            raise NotImplementedError(f"save_adapter: {pruned[:2]} hold fewer than init_r={self.init_r} ranks (loaded "
                                      "from HF PEFT's rank_pattern); peft_kernels' format stores every layer at init_r")
        return adapter_io.default_state(model)

    @classmethod
    def load_foreign(cls, model: nn.Module, directory: pathlib.Path, raw: dict) -> nn.Module:
        """Load an AdaLoRA adapter written by HF PEFT (or :func:`save_peft_adalora`): its ``rank_pattern`` (layers
        pruned to fewer ranks) is restored as layers of those ranks with scaling alpha / init_r."""
        return _load_peft_adalora(model, pathlib.Path(directory), raw)


class _Allocator:
    """AdaLoRA's importance statistics, per parameter name: EMA of sensitivity and of uncertainty."""

    def __init__(self):
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None


def _adalora(model: nn.Module, what: str) -> tuple[AdaLoRAConfig, dict[str, AdaLoRALinear]]:
    config = adapter_io.attached(model)
    if not isinstance(config, AdaLoRAConfig):
        raise ValueError(f"{what}: argument 'model' must carry an AdaLoRAConfig (peft_kernels.apply), got "
                         f"{type(config).__name__}")
    return config, _modules(model, AdaLoRALinear)


def _budget(config: AdaLoRAConfig, step: int, init_budget: int, target_budget: int) -> tuple[int, bool]:
    """(number of ranks kept, whether to mask at ``step``): init_budget up to tinit, then a cubic decay to
    target_budget at total_step - tfinal (masking every deltaT steps), then target_budget (masking)."""
    end = config.total_step - config.tfinal
    if step <= config.tinit:
        return init_budget, False
    if step > end:
        return target_budget, True
    left = 1 - (step - config.tinit) / (end - config.tinit)
    return int((init_budget - target_budget) * left**3 + target_budget), step % config.deltaT == 0


@torch.no_grad()
def update_and_allocate(model: nn.Module, global_step: int) -> dict[str, list[bool]] | None:
    """AdaLoRA's step, called after ``loss.backward()`` (and ``optimizer.step()``) and before ``zero_grad()``:
    update each adapter entry's importance from its gradient, and, where the schedule says so, zero the Lambda
    entries of the least important singular triplets so that the budget of :func:`_budget` remains. A triplet's
    score is S(Lambda_i) + mean_j S(Q_ij) + mean_j S(P_ji) with S = EMA(|w g|) * EMA(| |w g| - EMA(|w g|) |).
    Returns the rank pattern ({module name: kept flags [r]}) when masks changed or were re-applied, else None."""
    config, modules = _adalora(model, "update_and_allocate")
    require("update_and_allocate", "global_step", is_int(global_step) and global_step >= 0, "an int >= 0",
            global_step)
    state: _Allocator = model.peft_kernels_adalora
    end = config.total_step - config.tfinal
    if global_step > end:
        if state.rank_pattern is not None:
            _mask(modules, state.rank_pattern)
        return state.rank_pattern
    if global_step < end:
        for name, module in modules.items():
            for part in ("lora_A", "lora_B", "lora_E"):
                p = getattr(module, part)
                if p.grad is None:
                    raise ValueError(f"update_and_allocate: {name}.{part} has no gradient; call it after backward() "
                                     "and before zero_grad()")
                key = f"{name}.{part}"
                importance = (p * p.grad).abs().float()
                avg = state.sensitivity.get(key, torch.zeros_like(importance))
                avg = config.beta1 * avg + (1 - config.beta1) * importance
                unc = state.uncertainty.get(key, torch.zeros_like(importance))
                state.sensitivity[key] = avg
                state.uncertainty[key] = config.beta2 * unc + (1 - config.beta2) * (importance - avg).abs()
    init_budget = sum(m.r for m in modules.values())
    kept, mask_now = _budget(config, global_step, init_budget, config.target_r * len(modules))
    if not (mask_now or global_step == end):
        return None
    if not state.sensitivity:
        raise ValueError("update_and_allocate: no importance scores yet; call it at every step from step 0")
    scores = {}
    for name in modules:
        score = lambda part: state.sensitivity[f"{name}.{part}"] * state.uncertainty[f"{name}.{part}"]  # noqa: E731
        scores[name] = score("lora_E").view(-1) + score("lora_A").mean(1) + score("lora_B").mean(0)
    drop = init_budget - kept
    if drop <= 0:
        threshold = -torch.inf
    else:
        threshold = torch.kthvalue(torch.cat(list(scores.values())), drop).values.item()
    state.rank_pattern = {name: (s > threshold).tolist() for name, s in scores.items()}
    _mask(modules, state.rank_pattern)
    if global_step == end:
        state.sensitivity.clear()
        state.uncertainty.clear()
    return state.rank_pattern


def _mask(modules: dict[str, AdaLoRALinear], rank_pattern: dict[str, list[bool]]) -> None:
    for name, module in modules.items():
        keep = torch.tensor(rank_pattern[name], device=module.lora_E.device).view(-1, 1)
        module.lora_E.masked_fill_(~keep, 0.0)


def orth_regularization(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty, the mean over its layers of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2
    (P = lora_B [out, r], Q = lora_A [r, in]); a 0-d fp32 tensor differentiable in P and Q. (HF PEFT adds the
    unsquared norms, averaged over the 2n matrices.)"""
    _, modules = _adalora(model, "orth_regularization")
    total = 0.0
    for m in modules.values():
        p, q = m.lora_B.float(), m.lora_A.float()
        eye = torch.eye(m.lora_A.shape[0], device=p.device)
        total = total + ((p.T @ p - eye) ** 2).sum() + ((q @ q.T - eye) ** 2).sum()
    return total / len(modules)


def add_orth_regularization(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """``loss + orth_reg_weight * orth_regularization(model)`` (the config's weight)."""
    config, _ = _adalora(model, "add_orth_regularization")
    return loss + config.orth_reg_weight * orth_regularization(model)


def _peft_dict(config: AdaLoRAConfig, rank_pattern: dict | None, modules_to_save: list[str] | None) -> dict:
    return {
        "peft_type": "ADALORA", "init_r": config.init_r, "target_r": config.target_r, "r": 8,
        "lora_alpha": config.alpha, "lora_dropout": config.dropout, "tinit": config.tinit, "tfinal": config.tfinal,
        "deltaT": config.deltaT, "beta1": config.beta1, "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight, "total_step": config.total_step,
        "target_modules": sorted(config.target_modules), "rank_pattern": rank_pattern,
        "modules_to_save": modules_to_save, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "task_type": None, "base_model_name_or_path": None,
    }


def save_peft_adalora(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model``'s AdaLoRA adapter in HF PEFT's ADALORA format (``peft.PeftModel.from_pretrained`` loads it):
    lora_A/lora_B/lora_E of each layer, a fresh task head as modules_to_save. Masked triplets are kept (their
    Lambda is zero), so ``rank_pattern`` is null and every layer keeps its rank."""
    config, modules = _adalora(model, "save_peft_adalora")
    if any(m.merged for m in modules.values()):
        raise ValueError("save_peft_adalora: some AdaLoRALinear modules are merged; unmerge() them first")
    if any(m.r != config.init_r for m in modules.values()):
        raise NotImplementedError("save_peft_adalora: layers pruned below init_r (loaded from a rank_pattern) are "
                                  "not written back in PEFT's format; use peft_kernels.save_adapter")
    tensors, heads = {}, set()
    for name, p in adapter_io.default_state(model).items():
        module_name, _, part = name.rpartition(".")
        if part not in ("lora_A", "lora_B", "lora_E"):
            heads.add(module_name)
        tensors[adapter_io.PREFIX + name] = p.detach().contiguous()
    peft_dict = _peft_dict(config, None, sorted(heads) or None)
    if heads and type(model).__name__.endswith("ForSequenceClassification"):
        peft_dict["task_type"] = "SEQ_CLS"
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(peft_dict, indent=2)
    adapter_io.atomic_write({
        directory / adapter_io.WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
        directory / adapter_io.CONFIG_NAME: lambda path: pathlib.Path(path).write_text(text)})


def _load_peft_adalora(model: nn.Module, directory: pathlib.Path, raw: dict) -> nn.Module:
    """HF PEFT's ADALORA files into ``model`` (no adapter yet); everything checked before the model changes."""
    path = directory / adapter_io.CONFIG_NAME
    for key, neutral in (("fan_in_fan_out", False), ("bias", "none"), ("layers_to_transform", None),
                         ("use_dora", False), ("alpha_pattern", {})):
        if raw.get(key) not in (neutral, None, {}, [], False):
            raise ValueError(f"load_adapter: {path} sets {key}={raw[key]!r}; only {key}={neutral!r} is supported")
    if adapter_io.attached(model) is not None:
        raise ValueError(f"load_adapter: the model already carries a {type(adapter_io.attached(model)).__name__}; "
                         "load an HF PEFT AdaLoRA adapter into a model without one")
    targets = raw.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"load_adapter: {path} key 'target_modules' must be a non-empty list of module names, got "
                         f"{targets!r}")
    try:
        config = AdaLoRAConfig(init_r=raw.get("init_r", 12), target_r=raw.get("target_r", 8),
                               alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                               tinit=raw.get("tinit", 0), tfinal=raw.get("tfinal", 0), deltaT=raw.get("deltaT", 1),
                               beta1=raw.get("beta1", 0.85), beta2=raw.get("beta2", 0.85),
                               orth_reg_weight=raw.get("orth_reg_weight", 0.5), total_step=raw.get("total_step"),
                               target_modules=sorted(targets))
    except ValueError as exc:
        raise ValueError(f"load_adapter: {path}: {exc}") from exc
    tensors = {k.removeprefix(adapter_io.PREFIX): v for k, v in adapter_io.read_tensors(directory).items()}
    heads = list(raw.get("modules_to_save") or [])
    probe = config.apply_to(adapter_io.skeleton(model))
    # Each layer's rank is what the file's lora_E holds: PEFT prunes layers to their rank_pattern when saving.
    ranks, expected = {}, {}
    for name, m in _modules(probe, AdaLoRALinear).items():
        lora_E = tensors.get(f"{name}.lora_E")
        if lora_E is None:
            raise ValueError(f"load_adapter: {directory / adapter_io.WEIGHTS_NAME} lacks {name}.lora_E")
        r = ranks[name] = lora_E.shape[0]
        if not 1 <= r <= config.init_r:
            raise ValueError(f"load_adapter: {name}.lora_E has {r} ranks in the file; this loader supports 1 to "
                             f"init_r={config.init_r} (a layer pruned to rank 0 is not supported)")
        expected |= {f"{name}.lora_A": (r, m.in_features), f"{name}.lora_B": (m.out_features, r),
                     f"{name}.lora_E": (r, 1)}
    for name, p in probe.named_parameters():
        if ".lora_" not in name and targeting.matches(name.rpartition(".")[0], heads):
            expected[name] = tuple(p.shape)
    adapter_io.check_match(expected, tensors, directory / adapter_io.WEIGHTS_NAME, config, model)
    config.apply_to(model)
    with torch.no_grad():
        for name, module in _modules(model, AdaLoRALinear).items():
            r = ranks[name]
            if r != module.r:
                factory = {"device": module.lora_A.device, "dtype": module.lora_A.dtype}
                module.r = r
                module.lora_A = nn.Parameter(torch.empty(r, module.in_features, **factory))
                module.lora_B = nn.Parameter(torch.empty(module.out_features, r, **factory))
                module.lora_E = nn.Parameter(torch.empty(r, 1, **factory))
                module.set_ranknum(config.init_r)
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value)
    return model


# ------------------------------------------------------------------------------------------------------- LoftQ
@torch.no_grad()
def loftq_init(module: QLoRALinear, weight: torch.Tensor, iters: int = 1) -> list[float]:
    """LoftQ: re-initialise ``module``'s NF4 base and adapter from the full-precision ``weight`` [out, in] so that
    dequant(Q) + scaling * B A approximates W better than NF4(W) alone. Each iteration: Q <- NF4(W - s B A), then
    (B, A) <- the top-r SVD of R = W - dequant(Q), sqrt(sigma) on each side, divided by sqrt(s). Uses the
    module's blocksize and double quantization. Returns ||W - (dequant(Q) + s B A)||_F after each iteration."""
    if not isinstance(module, QLoRALinear):
        raise TypeError(f"loftq_init: argument 'module' must be a QLoRALinear, got {type(module).__name__}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (module.out_features, module.in_features):
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"loftq_init: argument 'weight' must be a tensor of shape "
                         f"[{module.out_features}, {module.in_features}], got {got}")
    require("loftq_init", "iters", is_int(iters) and iters >= 1, "an int >= 1", iters)
    if module.r > min(module.in_features, module.out_features):
        raise ValueError(f"loftq_init: the module's rank r={module.r} exceeds min(in, out) = "
                         f"{min(module.in_features, module.out_features)}; the SVD has no more components")
    w = weight.detach().to(module.codes.device, torch.float32)
    s, r = module.scaling, module.r
    lora_A = torch.zeros(r, module.in_features, device=w.device)
    lora_B = torch.zeros(module.out_features, r, device=w.device)
    errors = []
    for _ in range(iters):
        q = ops.nf4_quantize((w - s * (lora_B @ lora_A)).to(module.weight_dtype).contiguous(), module.blocksize,
                             module.nested_absmax is not None)
        residual = w - ops.nf4_dequantize(q).float()
        u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
        root = (sigma[:r] / s).sqrt()
        lora_B, lora_A = u[:, :r] * root, root[:, None] * vh[:r]
        errors.append((residual - s * (lora_B @ lora_A)).norm().item())
    for name in _PARTS[1:]:
        setattr(module, name, getattr(q, name))
    # The codes keep the module's storage: a buffer, or a frozen float parameter viewing them (quant_storage).
    codes = module.codes
    module.codes = q.codes if codes.dtype == torch.uint8 else nn.Parameter(q.codes.view(codes.dtype), requires_grad=False)
    module.lora_A.copy_(lora_A)
    module.lora_B.copy_(lora_B)
    return errors
