"""Optimizers with less state than torch's, each an ordinary ``torch.optim.Optimizer`` subclass (LR schedulers, HF
Trainer's ``optimizers=(opt, sched)``, ``state_dict()`` / ``load_state_dict()`` with bit-exact resume):

* :class:`AdamW8bit`: AdamW with both moments stored in 8 bits (2.03 bytes of state per parameter element
  instead of 8), one ``adamw8bit_step_`` call per parameter.
* :class:`SparseAdamW` and :class:`SparseSGD`: update only selected entries of each parameter, with state for
  those entries alone.

For the sparse ones, each step is one ``masked_adamw_step_`` / ``masked_sgd_step_`` call per parameter: it reads the k selected
entries of the dense ``.grad`` autograd produced and writes k entries of the parameter; every other entry keeps
its value bit for bit (weight decay included). Per parameter the state is fp32 ``exp_avg`` / ``exp_avg_sq``
(AdamW) or ``momentum_buffer`` (SGD with momentum) of length k, the indices, and for bf16/fp16 parameters an
fp32 ``master`` copy of the selected entries (4 bytes per selected entry; bf16 rounding alone would lose
every update below half an ulp, see python_tests/test_masked_adamw.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .nf4 import dynamic_map

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


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW with both moments stored in 8 bits, blockwise.

    Each step decodes a parameter's moments, applies AdamW's update in fp32 (the same roundings as torch's
    single-tensor AdamW), and stores the new moments again as uint8 codes, one code per element, with an fp32
    absmax per block of 256 elements: the first moment in bitsandbytes' signed dynamic map, the second (never
    negative) in the unsigned one (:func:`peft_kernels.dynamic_map`). State per parameter of n elements:
    ``exp_avg``, ``exp_avg_sq`` uint8 [n]; ``exp_avg_absmax``, ``exp_avg_sq_absmax`` fp32 [ceil(n / 256)];
    ``step`` (int): 2 + 8/256 = 2.03 bytes per element, 0.254x fp32 AdamW's 8. Parameters are fp32, bf16 or
    fp16 and are updated in their own dtype (no fp32 master copy: keep 16-bit parameters' updates above half
    an ulp, or train fp32 adapters as QLoRA does). Why 256 and how this compares with bitsandbytes:
    docs/optim8bit.md.

    Args:
        params: parameters or parameter groups, as for torch.optim.AdamW; dense gradients only.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
    """

    _CODES = ("exp_avg", "exp_avg_sq")
    _SCALES = ("exp_avg_absmax", "exp_avg_sq_absmax")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not lr >= 0.0:
            raise ValueError(f"AdamW8bit: lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW8bit: betas must be two values in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"AdamW8bit: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW8bit: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for param in group["params"]:
                if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise TypeError(f"AdamW8bit: parameters must be float32, bfloat16 or float16, got {param.dtype} "
                                    f"for a parameter of shape {list(param.shape)}")
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _maps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._maps:
            self._maps[device] = (dynamic_map(device, signed=True), dynamic_map(device, signed=False))
        return self._maps[device]

    @staticmethod
    def _blocks(param: torch.Tensor) -> int:
        return -(-param.numel() // 256)

    def _fresh_state(self, param: torch.Tensor) -> dict:
        signed, unsigned = self._maps_on(param.device)
        n, blocks = param.numel(), self._blocks(param)
        # All-zero moments: the codes of 0.0 (127 in the signed map, 0 in the unsigned one) with absmax 0.
        zero = lambda code: int((code == 0).nonzero()[0, 0])  # noqa: E731
        return {
            "step": 0,
            "exp_avg": torch.full((n,), zero(signed), dtype=torch.uint8, device=param.device),
            "exp_avg_absmax": torch.zeros(blocks, dtype=torch.float32, device=param.device),
            "exp_avg_sq": torch.full((n,), zero(unsigned), dtype=torch.uint8, device=param.device),
            "exp_avg_sq_absmax": torch.zeros(blocks, dtype=torch.float32, device=param.device),
        }

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise TypeError("AdamW8bit: sparse gradients are not supported (use SparseAdamW)")
                if grad.dtype != param.dtype:
                    raise TypeError(f"AdamW8bit: a gradient must have its parameter's dtype {param.dtype}, got "
                                    f"{grad.dtype} for a parameter of shape {list(param.shape)}")
                state = self.state[param]
                if not state:
                    state.update(self._fresh_state(param))
                signed, unsigned = self._maps_on(param.device)
                step = state["step"] + 1
                torch.ops.peft_kernels.adamw8bit_step_(
                    param, grad.contiguous(), state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"],
                    state["exp_avg_sq_absmax"], signed, unsigned, step, group["lr"], beta1, beta2, group["eps"],
                    group["weight_decay"])
                state["step"] = step
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, after checking that every entry is this optimizer's 8-bit state of the right size (a state
        dict of torch.optim.AdamW, say, is refused with the reason, and nothing changes); the codes stay uint8 and
        the scales fp32 (torch casts every state tensor of a floating parameter to the parameter's dtype), so a
        resumed run continues bit for bit."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(saved_ids) != len(params):
            raise ValueError(f"AdamW8bit.load_state_dict: the state dict holds {len(saved_ids)} parameters, this "
                             f"optimizer has {len(params)}")
        for position, (pid, param) in enumerate(zip(saved_ids, params)):
            entry = state_dict["state"].get(pid)
            if entry is None:
                continue
            where = f"parameter {position} (shape {list(param.shape)})"
            expected = {"exp_avg": (torch.uint8, param.numel()), "exp_avg_sq": (torch.uint8, param.numel()),
                        "exp_avg_absmax": (torch.float32, self._blocks(param)),
                        "exp_avg_sq_absmax": (torch.float32, self._blocks(param))}
            for key, (dtype, numel) in expected.items():
                value = entry.get(key)
                if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.numel() != numel:
                    got = (f"{value.dtype} tensor of {value.numel()} elements" if isinstance(value, torch.Tensor)
                           else "nothing" if value is None else type(value).__name__)
                    raise ValueError(f"AdamW8bit.load_state_dict: {where} needs {key} as a {dtype} tensor of {numel} "
                                     f"elements, got {got}: is this the state dict of another optimizer?")
            if not isinstance(entry.get("step"), int) or entry["step"] < 0:
                raise ValueError(f"AdamW8bit.load_state_dict: {where} needs an int step >= 0, got {entry.get('step')!r}")
        super().load_state_dict(state_dict)
        for pid, param in zip(saved_ids, params):
            entry = state_dict["state"].get(pid)
            if entry is not None:
                for key in (*self._CODES, *self._SCALES):
                    self.state[param][key] = entry[key].to(device=param.device).clone()


def sparse_parameters(model: torch.nn.Module, indices: Mapping[str, torch.Tensor]) -> list[tuple]:
    """(name, parameter, indices) triples of ``model`` for the optimizers, from a mask builder's result."""
    params = dict(model.named_parameters())
    missing = sorted(set(indices) - set(params))
    if missing:
        raise ValueError(f"sparse_parameters: {missing[:4]} name no parameter of {type(model).__name__}")
    return [(name, params[name], idx) for name, idx in indices.items()]


__all__ = ["AdamW8bit", "SparseAdamW", "SparseSGD", "check_indices", "sparse_parameters"]
