"""Optimizers that update only selected entries of each parameter, with state for those entries alone:
:class:`SparseAdamW` and :class:`SparseSGD`, ordinary ``torch.optim.Optimizer`` subclasses (LR schedulers, HF
Trainer's ``optimizers=(opt, sched)``, ``state_dict()`` / ``load_state_dict()`` with bit-exact resume).

Each step is one ``masked_adamw_step_`` / ``masked_sgd_step_`` call per parameter: it reads the k selected
entries of the dense ``.grad`` autograd produced and writes k entries of the parameter; every other entry keeps
its value bit for bit (weight decay included). Per parameter the state is fp32 ``exp_avg`` / ``exp_avg_sq``
(AdamW) or ``momentum_buffer`` (SGD with momentum) of length k, the indices, and for bf16/fp16 parameters an
fp32 ``master`` copy of the selected entries (4 bytes per selected entry; bf16 rounding alone would lose
every update below half an ulp, see python_tests/test_masked_adamw.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Child-Tuning_F draws each element's mask from Philox keyed by (seed, step, flat element index): parameters
# get distinct seeds (seed + position * the 64-bit golden ratio) so that element i of two parameters of the
# same step does not share a draw.
_SEED_STRIDE = 0x9E3779B97F4A7C15


def _as_int64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def check_indices(name: str, param: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``indices`` as a contiguous 1-D int64 tensor on param's device, after checking that they are strictly
    increasing flat indices into ``param``; raises ValueError/TypeError naming the parameter otherwise."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
        got = f"{indices.dtype} tensor of shape {list(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"indices of parameter {name!r} must be a 1-D int64/int32 tensor, got {got}")
    idx = indices.to(device=param.device, dtype=torch.int64).contiguous()
    if idx.numel() > 0:
        low, high = idx.min().item(), idx.max().item()
        if low < 0 or high >= param.numel():
            raise ValueError(f"indices of parameter {name!r} must be in [0, {param.numel()}), got values from {low} "
                             f"to {high}")
        steps = idx[1:] - idx[:-1]
        if (steps <= 0).any():
            j = int((steps <= 0).nonzero()[0, 0])
            raise ValueError(f"indices of parameter {name!r} must be strictly increasing (sorted, no duplicates), got "
                             f"indices[{j}] = {idx[j].item()}, indices[{j + 1}] = {idx[j + 1].item()}")
    return idx


def _triples(named_params_with_indices) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    items = (
        [(n, p, i) for n, (p, i) in named_params_with_indices.items()]
        if isinstance(named_params_with_indices, Mapping)
        else list(named_params_with_indices)
    )
    if not items:
        raise ValueError("named_params_with_indices is empty: nothing to optimize")
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[1], torch.Tensor)):
            raise TypeError("named_params_with_indices must hold (name, parameter, indices) triples or map name -> "
                            f"(parameter, indices), got an item of type {type(item).__name__}")
        name, param, indices = item
        if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"parameter {name!r} must be float32, bfloat16 or float16, got {param.dtype}")
        out.append((name, param, check_indices(name, param, indices)))
    return out


class _SparseOptimizer(torch.optim.Optimizer):
    """Shared set-up: one parameter group, eager per-parameter state, fp32 state kept fp32 across a load."""

    _FP32_STATE: tuple[str, ...] = ()

    def __init__(self, named_params_with_indices, defaults: dict, seed: int):
        child_p = defaults["child_p"]
        if not 0.0 < child_p <= 1.0:
            raise ValueError(f"child_p (the Child-Tuning_F keep density) must be in (0, 1], got {child_p}")
        if defaults["lr"] < 0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        triples = _triples(named_params_with_indices)
        super().__init__([{"params": [p for _, p, _ in triples], "names": [n for n, _, _ in triples]}], defaults)
        for position, (_, param, idx) in enumerate(triples):
            state = self.state[param]
            state["step"] = 0
            state["indices"] = idx
            state["seed"] = _as_int64(seed + position * _SEED_STRIDE)
            k = idx.numel()
            for key in self._state_keys():
                state[key] = torch.zeros(k, dtype=torch.float32, device=param.device)
            if param.dtype != torch.float32:
                state["master"] = param.detach().reshape(-1)[idx].float()

    def _state_keys(self) -> tuple[str, ...]:
        return self._FP32_STATE

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the fp32 state of bf16/fp16 parameters stays fp32 (torch casts floating state to the
        parameter's dtype), so a resumed run continues bit for bit; shapes are checked before anything changes."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(f"load_state_dict: the state holds {len(saved_ids)} parameters, this optimizer has "
                             f"{len(params)}")
        names = [n for g in self.param_groups for n in g["names"]]
        saved = state_dict["state"]
        for pid, param, name in zip(saved_ids, params, names):
            entry = saved.get(pid, {})
            if "indices" not in entry:
                raise ValueError(f"load_state_dict: no state for parameter {name!r}")
            check_indices(name, param, entry["indices"])
            k = entry["indices"].numel()
            for key in (*self._state_keys(), *(["master"] if param.dtype != torch.float32 else [])):
                value = entry.get(key)
                if value is None or value.numel() != k:
                    raise ValueError(f"load_state_dict: parameter {name!r} needs {key} of {k} entries (one per index), "
                                     f"got {None if value is None else list(value.shape)}")
        super().load_state_dict(state_dict)
        for pid, param in zip(saved_ids, params):
            state = self.state[param]
            state["indices"] = saved[pid]["indices"].to(device=param.device, dtype=torch.int64).clone()
            for key in (*self._state_keys(), "master"):
                if key in saved[pid]:
                    state[key] = saved[pid][key].to(device=param.device, dtype=torch.float32).clone()

    def add_param_group(self, param_group: dict) -> None:
        if "names" not in param_group:
            raise TypeError(f"{type(self).__name__}: every parameter needs its indices; pass all of them to the "
                            "constructor as (name, parameter, indices)")
        super().add_param_group(param_group)

    def _each(self):
        """(group, parameter, state, this step's 1-based count) for every parameter with a gradient; the caller
        stores the count once the step has succeeded, so a rejected step leaves the state as it was."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    state = self.state[param]
                    yield group, param, state, state["step"] + 1


class SparseAdamW(_SparseOptimizer):
    """torch.optim.AdamW restricted to the selected entries of each parameter.

    Args:
        named_params_with_indices: (name, parameter, indices) triples, or a mapping name -> (parameter,
            indices); indices are sorted flat indices into the parameter (int64/int32, no duplicates), e.g. from
            :mod:`peft_kernels.sparse`'s mask builders. Parameters: fp32, bf16 or fp16.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay, selected entries only).
        child_p: Child-Tuning_F: every step each element's gradient is kept with probability child_p (drawn in
            the kernel from Philox keyed by (seed, step, element), never stored) and scaled by 1/child_p.
        seed: keys that mask.
    """

    _FP32_STATE = ("exp_avg", "exp_avg_sq")

    def __init__(self, named_params_with_indices, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, child_p: float = 1.0, seed: int = 0):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, child_p=child_p)
        super().__init__(named_params_with_indices, defaults, seed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, param, state, step in self._each():
            beta1, beta2 = group["betas"]
            torch.ops.peft_kernels.masked_adamw_step_(
                param, param.grad, state["indices"], state["exp_avg"], state["exp_avg_sq"], state.get("master"), step,
                group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["child_p"], state["seed"])
            state["step"] = step
        return loss


class SparseSGD(_SparseOptimizer):
    """torch.optim.SGD (no dampening, no Nesterov) restricted to the selected entries of each parameter;
    arguments as :class:`SparseAdamW`. The momentum buffer [k] exists when momentum != 0."""

    def __init__(self, named_params_with_indices, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0,
                 child_p: float = 1.0, seed: int = 0):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, child_p=child_p)
        super().__init__(named_params_with_indices, defaults, seed)

    def _state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.defaults["momentum"] != 0 else ()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, param, state, step in self._each():
            torch.ops.peft_kernels.masked_sgd_step_(
                param, param.grad, state["indices"], state.get("momentum_buffer"), state.get("master"), step,
                group["lr"], group["momentum"], group["weight_decay"], group["child_p"], state["seed"])
            state["step"] = step
        return loss


def sparse_parameters(model: torch.nn.Module, indices: Mapping[str, torch.Tensor]) -> list[tuple]:
    """(name, parameter, indices) triples of ``model`` for the optimizers, from a mask builder's result."""
    params = dict(model.named_parameters())
    missing = sorted(set(indices) - set(params))
    if missing:
        raise ValueError(f"sparse_parameters: {missing[:4]} name no parameter of {type(model).__name__}")
    return [(name, params[name], idx) for name, idx in indices.items()]


__all__ = ["SparseAdamW", "SparseSGD", "check_indices", "sparse_parameters"]
