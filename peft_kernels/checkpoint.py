"""Layer-wise gradient checkpointing whose backward recomputes each layer one micro-batch of sequences at a time.

Plain checkpointing keeps each decoder layer's input and, in backward, recomputes the layer over the whole batch:
at LLaMA-7B's shapes and 16 x 512 tokens that recompute and its backward hold about 2.25 GB at once (MLP
intermediates of 8192 x 11008, fp32 RMSNorm copies, attention tensors), as much as all 32 layers' checkpoints
together. A decoder layer treats the sequences of a batch independently (attention stays inside a sequence, every
other op is per token), so its backward splits exactly over them: ``checkpoint_in_micro_batches`` runs the layer's
forward and, in backward, its recompute + backward over micro-batches of whole sequences, one after the other. The
peak of one layer's backward shrinks by batch / micro-batch; the recompute is done once, as in plain checkpointing,
so no work is added (the BLAS calls get micro-batch rows instead of batch rows: 2048 by default, enough to keep them
efficient). The checkpoints themselves (one layer input per layer) are the same.

Dropout draws the same masks in the recompute as in forward: the RNG state (CPU, and the layer's device) is
recorded before the micro-batches' forward and restored for their recompute, which runs in the same order. Autocast
state is recorded and re-entered the same way. The layer's trainable parameters are inputs of the checkpoint op:
their gradients are summed over the micro-batches and come out once per step, as from any op, so DDP's and FSDP2's
gradient hooks see one gradient per parameter (python_tests/test_distributed.py trains under both).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

# 2048 tokens per micro-batch: BLAS keeps >= 2048 rows per GEMM, and one LLaMA-7B layer's recompute + backward holds
# about 0.56 GB instead of 2.25 GB at 16 x 512 tokens.
DEFAULT_MICRO_BATCH_TOKENS = 2048


def _slice(value, batch: int, start: int, end: int):
    """value[start:end] for a tensor of >= 2 dims whose first is the batch's (hidden states, position ids, a
    per-sequence mask, per-sequence rotary tables); tuples and lists element by element; anything else (a shared
    [1, ...] table, a 1-D cache position, None, flags) as it is."""
    if isinstance(value, torch.Tensor):
        return value[start:end] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, batch, start, end) for v in value)
    return value


def _device_rng_state(device: torch.device):
    return None if device.type == "cpu" else torch.get_device_module(device.type).get_rng_state(device)


class _MicroBatchCheckpoint(torch.autograd.Function):
    """out = layer(hidden, **kwargs), run by micro-batches [s, e) of the batch; only ``hidden`` is saved.

    The layer's trainable parameters are inputs, so that backward returns each one's gradient summed over the
    micro-batches, once: autograd accumulates it as for any op, and gradient hooks (DDP's, an optimizer step in
    backward) fire once per parameter and step."""

    @staticmethod
    def forward(ctx, layer_call, kwargs, bounds, hidden, *params):
        batch = hidden.shape[0]
        ctx.layer_call, ctx.kwargs, ctx.bounds = layer_call, kwargs, bounds
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = _device_rng_state(hidden.device)
        ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                        for kind in dict.fromkeys(("cpu", hidden.device.type))]
        out = None
        for start, end in bounds:
            y = layer_call(hidden[start:end], **_slice(kwargs, batch, start, end))
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"checkpoint_in_micro_batches: the decoder layer must return the hidden states as one "
                                f"tensor (transformers >= 5); it returned {type(y).__name__}")
            if out is None:
                out = y.new_empty((batch, *y.shape[1:]))
            out[start:end] = y
        ctx.save_for_backward(hidden, *params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, *params = ctx.saved_tensors
        need_hidden, need_params = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        wanted = [p for p, need in zip(params, need_params) if need]
        batch = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        devices = [] if hidden.device.type == "cpu" else [hidden.device]
        with torch.random.fork_rng(devices=devices, device_type=hidden.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.get_device_module(hidden.device.type).set_rng_state(ctx.device_rng, hidden.device)
            for start, end in ctx.bounds:
                part = hidden[start:end].detach().requires_grad_(need_hidden)
                with torch.enable_grad(), contextlib.ExitStack() as autocast:
                    for kind, enabled, dtype in ctx.autocast:  # the forward's autocast state, per device type
                        autocast.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
                    y = ctx.layer_call(part, **_slice(ctx.kwargs, batch, start, end))
                inputs = ([part] if need_hidden else []) + wanted
                grads = torch.autograd.grad(y, inputs, grad_out[start:end], allow_unused=True)
                if need_hidden:
                    grad_hidden[start:end] = grads[0]
                for i, g in enumerate(grads[len(inputs) - len(wanted):]):
                    if g is not None:
                        sums[i] = g if sums[i] is None else sums[i].add_(g)
                del y, part, grads
        it = iter(sums)
        return (None, None, None, grad_hidden, *(next(it) if need else None for need in need_params))


def micro_batch_checkpoint(function, *args, micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS):
    """The checkpoint function for one layer call, in the form Hugging Face's ``GradientCheckpointingLayer`` calls it:
    ``function`` is ``functools.partial(forward, layer, **kwargs)`` and ``args`` is ``(hidden_states,)``
    [batch, seq, hidden]. Micro-batches hold ``max(1, micro_batch_tokens // seq)`` sequences."""
    if not (isinstance(function, functools.partial) and function.args and isinstance(function.args[0], nn.Module)):
        raise TypeError(f"checkpoint_in_micro_batches: the layer call must be functools.partial(forward, layer, "
                        f"**kwargs), as transformers' GradientCheckpointingLayer makes it (its parameters are found "
                        f"through the layer), got {function!r}")
    if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2:
        raise TypeError("checkpoint_in_micro_batches: a decoder layer must be called with its hidden states "
                        "[batch, seq, ...] as the only positional argument, got "
                        f"{[type(a).__name__ for a in args]}")
    hidden = args[0]
    layer_call, kwargs = functools.partial(function.func, *function.args), dict(function.keywords)
    for name, value in kwargs.items():
        leaves = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, torch.Tensor) and v.requires_grad for v in leaves):
            # Its gradient would be lost: backward only returns the hidden states' and the parameters'.
            raise ValueError(f"checkpoint_in_micro_batches: keyword argument {name!r} of the decoder layer requires "
                             f"grad; only the hidden states may")
    params = [p for p in function.args[0].parameters() if p.requires_grad]
    batch, seq = hidden.shape[0], hidden.shape[1]
    per = max(1, micro_batch_tokens // max(1, seq))
    bounds = [(s, min(batch, s + per)) for s in range(0, batch, per)]
    return _MicroBatchCheckpoint.apply(layer_call, kwargs, bounds, hidden, *params)


def checkpoint_in_micro_batches(model: nn.Module, micro_batch_tokens: int | None = None) -> nn.Module:
    """Enables gradient checkpointing on every decoder layer of ``model`` (a Hugging Face model whose layers are
    ``GradientCheckpointingLayer``s: LLaMA, Mistral, Qwen2, SmolLM2, ...; or an HF PEFT model of one), with a backward
    that recomputes a layer over micro-batches of ``micro_batch_tokens`` tokens of whole sequences (default 2048; a
    micro-batch holds at least one sequence). Each layer keeps its input, as with
    ``model.gradient_checkpointing_enable()``; one layer's recompute + backward holds micro-batch / batch of what it
    holds there, for the same work. Active in training mode with gradients enabled; eager mode (the layer's backward
    runs autograd itself, which torch.compile does not trace). Returns ``model``."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    if micro_batch_tokens is None:
        micro_batch_tokens = DEFAULT_MICRO_BATCH_TOKENS
    if isinstance(micro_batch_tokens, bool) or not isinstance(micro_batch_tokens, int) or micro_batch_tokens <= 0:
        raise ValueError(f"checkpoint_in_micro_batches: argument 'micro_batch_tokens' must be a positive int or None, "
                         f"got {micro_batch_tokens!r}")
    # HF PEFT's PeftModel wraps the transformers model: checkpointing is enabled on that.
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(hf_model, PreTrainedModel):
        raise TypeError(f"checkpoint_in_micro_batches: argument 'model' must be a Hugging Face PreTrainedModel (or an "
                        f"HF PEFT model wrapping one), got {type(model).__name__}")
    layers = [m for m in hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"checkpoint_in_micro_batches: {type(hf_model).__name__} has no GradientCheckpointingLayer "
                         f"(its decoder layers do not support Hugging Face's gradient checkpointing)")
    enable = getattr(hf_model, "activation_checkpointing_enable", None)  # transformers >= 5.x; the older name warns
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    func = functools.partial(micro_batch_checkpoint, micro_batch_tokens=micro_batch_tokens)
    for layer in layers:
        layer._gradient_checkpointing_func = func
    return model
