"""ProPETL and AdaMix with LoRA-shaped updates: every adapted layer computes one fused ``ops.lora_linear`` call.

* ProPETL (Zeng et al. 2023, "One Network, Many Masks"), LoRA prototype: one shared pair (A [r, in], B [out, r])
  per distinct (in, out) shape of the targeted layers, and per layer binary masks M_A, M_B over the prototype's
  entries; a layer computes ``y = x W^T + b + scaling * (x (A ⊙ M_A)^T) (B ⊙ M_B)^T``. The masks are learned
  through real-valued scores (one per entry and layer): the forward keeps the top (1 - sparsity) of each layer's
  scores (a hard threshold), the backward passes the mask's gradient straight through to the scores.
* AdaMix (Wang et al. 2022), LoRA experts: each layer holds ``num_experts`` pairs (A_e, B_e); a training forward
  routes to one A and, independently, one B drawn uniformly from a per-layer seeded generator. Evaluation and
  :func:`merge_experts` use the experts' averages (the paper's merging), after which the model is a plain LoRA.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from . import adapter_io, ops, targeting
from ._validate import check_lora_args
from .lora import LoRAConfig
from .nn import LoRALinear

# Both methods here adapt LoRA's modules: the attention query and value projections (as HF PEFT's LoRA defaults,
# and the ProPETL-LoRA / AdaMix-LoRA setups of the two papers).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}


def _fused_lora(who: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """``ops.lora_linear`` under LoRALinear's dtype rule: under autocast everything is cast to the autocast dtype;
    outside it x must have W's dtype and the adapter factors are cast to it."""
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    elif x.dtype != weight.dtype:
        raise TypeError(f"{who}: input 'x' must have the layer's dtype {weight.dtype} (or run under torch.autocast), "
                        f"got {x.dtype}")
    return ops.lora_linear(x, weight, bias, lora_A.to(x.dtype), lora_B.to(x.dtype), scaling, p)


def _frozen_copy_of(linear: nn.Linear) -> tuple[nn.Parameter, nn.Parameter | None]:
    """``linear``'s weight and bias as frozen Parameters sharing its storage (no copy)."""
    weight = nn.Parameter(linear.weight.data, requires_grad=False)
    bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
    return weight, bias


def _refuse_stacking(model: nn.Module, config_name: str) -> None:
    present = adapter_io.attached(model) or getattr(model, "peft_kernels_lora", None)
    if present is not None:
        raise ValueError(f"apply: the model already carries a {type(present).__name__}; {config_name} needs a model "
                         "without an adapter")


# ---------------------------------------------------------------------------------------------------------- ProPETL


def keep_count(numel: int, sparsity: float) -> int:
    """Entries a mask over ``numel`` entries keeps: round((1 - sparsity) * numel), at least 1."""
    return max(1, round((1.0 - sparsity) * numel))


class _TopKMask(torch.autograd.Function):
    """Forward: 1 at the ``keep`` largest scores, 0 elsewhere (scores' shape and dtype). Backward: the mask's
    gradient passed straight through to the scores (the threshold has zero derivative almost everywhere)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: int) -> torch.Tensor:
        flat = scores.detach().reshape(-1)
        return torch.zeros_like(flat).scatter_(0, flat.topk(keep).indices, 1.0).view_as(scores)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class ProPETLPrototype(nn.Module):
    """The LoRA pair shared by every ProPETL layer of one shape: ``lora_A`` [r, in] (Kaiming-uniform, a = sqrt(5),
    as LoRALinear), ``lora_B`` [out, r] (zeros, so a fresh model computes the base model)."""

    def __init__(self, in_features: int, out_features: int, r: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class ProPETLLinear(nn.Module):
    """A frozen Linear plus a masked view of a shared LoRA prototype:
    ``y = x W^T + b + scaling * (dropout(x) (A ⊙ M_A)^T) (B ⊙ M_B)^T``, one ``ops.lora_linear`` call.

    Shapes: x [..., in] -> y [..., out]; ``weight`` [out, in] (shared with the wrapped Linear, frozen), ``bias``
    [out] or None; ``prototype.lora_A`` [r, in] and ``prototype.lora_B`` [out, r] (the same Parameters in every
    layer of this shape); ``scores_A`` [r, in], ``scores_B`` [out, r] this layer's real-valued mask scores
    (fp32, uniform in [0, 1)). M_A keeps the ``keep_count(r * in, sparsity)`` largest of ``scores_A``, M_B likewise.
    """

    def __init__(self, linear: nn.Linear, prototype: ProPETLPrototype, alpha: float = 16, sparsity: float = 0.5,
                 dropout: float = 0.0):
        super().__init__()
        r, in_features = prototype.lora_A.shape
        if (linear.in_features, linear.out_features) != (in_features, prototype.lora_B.shape[0]):
            raise ValueError(f"ProPETLLinear: argument 'prototype' has shape (in {in_features}, out "
                             f"{prototype.lora_B.shape[0]}), the linear (in {linear.in_features}, out "
                             f"{linear.out_features})")
        if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"ProPETLLinear: argument 'sparsity' must be in [0, 1), got {sparsity!r}")
        self.in_features, self.out_features, self.r = linear.in_features, linear.out_features, r
        self.alpha, self.sparsity, self.dropout = alpha, sparsity, dropout
        self.scaling = alpha / r
        self.weight, self.bias = _frozen_copy_of(linear)
        self.prototype = prototype
        # fp32 scores whatever W's dtype: bf16's 8-bit mantissa would tie many of r * in uniform scores at the
        # top-k threshold (256 distinct values in [0.5, 1)).
        factory = {"device": prototype.lora_A.device, "dtype": torch.float32}
        self.scores_A = nn.Parameter(torch.rand(r, in_features, **factory))
        self.scores_B = nn.Parameter(torch.rand(self.out_features, r, **factory))
        self.keep_A = keep_count(self.scores_A.numel(), sparsity)
        self.keep_B = keep_count(self.scores_B.numel(), sparsity)
        self.merged = False

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_A [r, in], M_B [out, r]): 0/1 in fp32, differentiable in the scores (straight through)."""
        return _TopKMask.apply(self.scores_A, self.keep_A), _TopKMask.apply(self.scores_B, self.keep_B)

    def masked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ⊙ M_A [r, in], B ⊙ M_B [out, r])."""
        mask_A, mask_B = self.masks()
        return self.prototype.lora_A * mask_A, self.prototype.lora_B * mask_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        lora_A, lora_B = self.masked_factors()
        return _fused_lora("ProPETLLinear", x, self.weight, self.bias, lora_A, lora_B, self.scaling,
                           self.dropout if self.training else 0.0)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * (B ⊙ M_B)(A ⊙ M_A) in fp32 [out, in]."""
        lora_A, lora_B = self.masked_factors()
        return (lora_B.float() @ lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W += this layer's masked update (fp32, rounded once to W's dtype); forward becomes the plain Linear.
        The shared prototype is untouched, so other layers are unaffected. Raises if already merged."""
        if self.merged:
            raise RuntimeError("ProPETLLinear.merge: already merged")
        self.weight.copy_(self.weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= the masked update: W back to within one rounding of its dtype. Raises if not merged."""
        if not self.merged:
            raise RuntimeError("ProPETLLinear.unmerge: not merged")
        self.weight.copy_(self.weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"sparsity={self.sparsity}, dropout={self.dropout}, merged={self.merged}")


_MASK_PARTS = {"mask_A": "scores_A", "mask_B": "scores_B"}


@adapter_io.method("PEFT_KERNELS_PROPETL")
@dataclasses.dataclass
class ProPETLConfig:
    """ProPETL with a LoRA prototype (see the module docstring), applied by ``peft_kernels.apply``.

    Trainable parameters: the prototypes, r * (in + out) per distinct (in, out) shape of the targeted layers,
    counted once, plus the mask scores, r * (in + out) per targeted layer (and any fresh task head). Inference
    needs only the prototypes and one bit per mask entry: ``save_adapter`` writes the prototypes (their dtype) and
    each layer's masks as 0/1 ``mask_A`` [r, in] / ``mask_B`` [out, r] in bf16, 2 bytes per entry (adapter_io reads
    floating-point tensors only, and torch has no isfinite for float8); the scores are not saved: loading sets
    them to the 0/1 masks, whose top-k threshold gives the same masks back, and training can go on from there.
    On the tiny LLaMA (q 64->64, v 64->32, 2 layers) at r = 4: 896 prototype + 1792 score parameters train; the
    file holds 896 * 4 + 1792 * 2 = 7168 bytes of tensors (1792 / 8 = 224 bytes if the masks were bit-packed).
    """

    r: int = 8
    alpha: float = 16
    sparsity: float = 0.5
    dropout: float = 0.0
    target_modules: list[str] | None = None
    train_task_head: bool = True

    def __post_init__(self):
        check_lora_args("ProPETLConfig", self.r, self.alpha, self.dropout)
        if not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool) or not 0 <= self.sparsity < 1:
            raise ValueError(f"ProPETLConfig: argument 'sparsity' must be a number in [0, 1), got {self.sparsity!r}")

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Replace the targeted nn.Linear modules of ``model`` in place by :class:`ProPETLLinear` (sharing their
        weights, and one prototype per shape), freeze every other parameter except fresh task heads."""
        _refuse_stacking(model, "ProPETLConfig")
        targets = targeting.resolve_targets(model, self.target_modules, table=DEFAULT_TARGETS,
                                            config_name="ProPETLConfig")
        names = targeting.linear_names(model, targets)
        prototypes: dict[tuple[int, int], ProPETLPrototype] = {}
        made = {}
        for name in names:
            linear = model.get_submodule(name)
            shape = (linear.in_features, linear.out_features)
            if shape not in prototypes:
                prototypes[shape] = ProPETLPrototype(*shape, self.r, device=linear.weight.device,
                                                     dtype=linear.weight.dtype)
            made[id(linear)] = ProPETLLinear(linear, prototypes[shape], self.alpha, self.sparsity,
                                             self.dropout).train(linear.training)
        targeting.freeze(model)
        for module in made.values():
            module.prototype.requires_grad_(True)
            module.scores_A.requires_grad_(True)
            module.scores_B.requires_grad_(True)
        targeting.replace(model, names, lambda linear: made[id(linear)])
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets))
        return model

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Trainable parameters but the scores (each prototype once, fresh task heads), and every layer's masks."""
        out = {n: p for n, p in model.named_parameters()
               if p.requires_grad and n.rpartition(".")[2] not in _MASK_PARTS.values()}
        for name, module in _modules(model, ProPETLLinear).items():
            if module.merged:
                raise ValueError(f"save_adapter: {name} is merged; unmerge() it before saving the adapter")
            with torch.no_grad():
                mask_A, mask_B = module.masks()
            out[f"{name}.mask_A"], out[f"{name}.mask_B"] = mask_A.to(torch.bfloat16), mask_B.to(torch.bfloat16)
        return out

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every mask holds only 0 and 1, with as many ones as ``sparsity`` keeps."""
        for key, value in tensors.items():
            if key.rpartition(".")[2] not in _MASK_PARTS:
                continue
            ones = int((value == 1).sum())
            if ones + int((value == 0).sum()) != value.numel():
                raise ValueError(f"load_adapter: {key} must hold only 0 and 1")
            if ones != keep_count(value.numel(), self.sparsity):
                raise ValueError(f"load_adapter: {key} keeps {ones} of {value.numel()} entries; sparsity "
                                 f"{self.sparsity} keeps {keep_count(value.numel(), self.sparsity)}")

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Parameters copied by name; each mask becomes its layer's scores (top-k of a 0/1 tensor with k ones is
        that tensor)."""
        params = dict(model.named_parameters())
        for key, value in tensors.items():
            module_name, _, part = key.rpartition(".")
            if part in _MASK_PARTS:
                getattr(model.get_submodule(module_name), _MASK_PARTS[part]).copy_(value)
            else:
                params[key].copy_(value)


def _modules(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


# ----------------------------------------------------------------------------------------------------------- AdaMix


class AdaMixLinear(nn.Module):
    """A frozen Linear plus ``num_experts`` LoRA experts, one ``ops.lora_linear`` call per forward.

    Shapes: x [..., in] -> y [..., out]; ``weight`` [out, in] (shared with the wrapped Linear, frozen), ``bias``
    [out] or None; ``lora_A`` [E, r, in] (each expert Kaiming-uniform, a = sqrt(5)), ``lora_B`` [E, out, r]
    (zeros). Training: ``y = x W^T + b + scaling * (dropout(x) A_i^T) B_j^T`` with i and j drawn independently
    and uniformly from ``generator`` (a CPU generator seeded with ``seed``) at every forward call; the last draw
    is kept in ``last_route`` (i, j). Evaluation: the experts' means, ``A = mean_e A_e``, ``B = mean_e B_e``.
    """

    def __init__(self, linear: nn.Linear, num_experts: int = 4, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 seed: int = 0):
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"AdaMixLinear: argument 'num_experts' must be an int >= 1, got {num_experts!r}")
        check_lora_args("AdaMixLinear", r, alpha, dropout)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.num_experts, self.r, self.alpha, self.dropout = num_experts, r, alpha, dropout
        self.scaling = alpha / r
        self.weight, self.bias = _frozen_copy_of(linear)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, r, **factory))
        for expert in self.lora_A.data:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        self.generator = torch.Generator().manual_seed(seed)
        self.last_route: tuple[int, int] | None = None

    def averaged_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean_e A_e [r, in], mean_e B_e [out, r])."""
        return self.lora_A.mean(0), self.lora_B.mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            i, j = torch.randint(self.num_experts, (2,), generator=self.generator).tolist()
            self.last_route = (i, j)
            lora_A, lora_B = self.lora_A[i], self.lora_B[j]
        else:
            lora_A, lora_B = self.averaged_factors()
        return _fused_lora("AdaMixLinear", x, self.weight, self.bias, lora_A, lora_B, self.scaling,
                           self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}")


@adapter_io.method("PEFT_KERNELS_ADAMIX")
@dataclasses.dataclass
class AdaMixConfig:
    """AdaMix with LoRA experts (see :class:`AdaMixLinear`), applied by ``peft_kernels.apply``. Layer k (in
    module order) routes with a generator seeded ``seed + k``. Trainable: num_experts * r * (in + out) per
    targeted layer (and any fresh task head). Train with :func:`consistency_loss` added to the task loss; for
    inference call :func:`merge_experts`."""

    num_experts: int = 4
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None
    seed: int = 0
    train_task_head: bool = True

    def __post_init__(self):
        check_lora_args("AdaMixConfig", self.r, self.alpha, self.dropout)
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
            raise ValueError(f"AdaMixConfig: argument 'num_experts' must be an int >= 1, got {self.num_experts!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"AdaMixConfig: argument 'seed' must be an int, got {self.seed!r}")

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Replace the targeted nn.Linear modules of ``model`` in place by :class:`AdaMixLinear` (sharing their
        weights), freeze every other parameter except fresh task heads."""
        _refuse_stacking(model, "AdaMixConfig")
        targets = targeting.resolve_targets(model, self.target_modules, table=DEFAULT_TARGETS,
                                            config_name="AdaMixConfig")
        names = targeting.linear_names(model, targets)
        # A new module takes the replaced one's train/eval mode: an eval-mode model must not start routing.
        made = {id(model.get_submodule(name)): AdaMixLinear(model.get_submodule(name), self.num_experts, self.r,
                                                            self.alpha, self.dropout, self.seed + k)
                .train(model.get_submodule(name).training) for k, name in enumerate(names)}
        targeting.freeze(model)
        for module in made.values():
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
        targeting.replace(model, names, lambda linear: made[id(linear)])
        if self.train_task_head:
            targeting.unfreeze_task_head(model)
        adapter_io.attach(model, dataclasses.replace(self, target_modules=targets))
        return model


def merge_experts(model: nn.Module) -> nn.Module:
    """AdaMix's merging: replace every :class:`AdaMixLinear` of ``model`` by a :class:`LoRALinear` with
    ``lora_A = mean_e A_e`` [r, in] and ``lora_B = mean_e B_e`` [out, r] (same weight, scaling), in place. The model
    then is an ordinary LoRA model: ``LoRALinear.merge`` folds it into W, and ``peft_kernels.save_adapter`` writes
    HF PEFT's LoRA format. Returns ``model``."""
    config = adapter_io.attached(model)
    if not isinstance(config, AdaMixConfig):
        raise ValueError(f"merge_experts: argument 'model' must carry an AdaMix adapter (peft_kernels.apply with "
                         f"AdaMixConfig), got one with {type(config).__name__ if config is not None else 'none'}")
    modules = _modules(model, AdaMixLinear)
    made = {}
    for module in modules.values():
        with torch.device("meta"):
            shell = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        shell.weight, shell.bias = module.weight, module.bias
        lora = LoRALinear.from_linear(shell, module.r, module.alpha, module.dropout)
        with torch.no_grad():
            lora_A, lora_B = module.averaged_factors()
            lora.lora_A.copy_(lora_A)
            lora.lora_B.copy_(lora_B)
        made[id(module)] = lora.train(module.training)
    targeting.replace(model, list(modules), lambda module: made[id(module)])
    model.peft_kernels_lora = LoRAConfig(r=config.r, alpha=config.alpha, dropout=config.dropout,
                                         target_modules=list(config.target_modules),
                                         train_task_head=config.train_task_head)
    del model.peft_kernels_config
    return model


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """AdaMix's consistency regulariser between two stochastic passes over the same batch:
    ``(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` with p = softmax over the last dim, summed over classes and averaged
    over every leading position (batch, and sequence for a causal LM). Computed in fp32; add ``lambda *`` it to
    the task loss.

    Args:
        logits_a, logits_b: [..., classes], the same shape.

    Returns:
        A 0-d fp32 tensor, differentiable in both inputs.
    """
    if not isinstance(logits_a, torch.Tensor) or not isinstance(logits_b, torch.Tensor):
        raise TypeError(f"consistency_loss: arguments 'logits_a' and 'logits_b' must be tensors, got "
                        f"{type(logits_a).__name__} and {type(logits_b).__name__}")
    if logits_a.shape != logits_b.shape or logits_a.dim() == 0:
        raise ValueError(f"consistency_loss: 'logits_a' and 'logits_b' must have one shape [..., classes], got "
                         f"{list(logits_a.shape)} and {list(logits_b.shape)}")
    log_a = torch.log_softmax(logits_a.float(), dim=-1)
    log_b = torch.log_softmax(logits_b.float(), dim=-1)
    both = (log_a.exp() - log_b.exp()) * (log_a - log_b)  # p_a (log p_a - log p_b) + p_b (log p_b - log p_a)
    return both.sum(-1).mean() / 2
