"""A causal-LM training loss that never holds the full logits.

``fuse_causal_lm_loss(model)`` patches one Hugging Face causal LM instance so that, in training with ``labels``, its
loss is computed over chunks of tokens: a chunk's logits (fp32), its cross-entropy and the gradient for its hidden
states (and for the head weight, when it trains) are formed together and the chunk's logits are dropped before the
next chunk's exist. At LLaMA-7B's head (vocabulary 32,000) and 16 × 512 tokens, HF's loss holds the bf16 logits
(0.5 GB), their fp32 upcast, the log-softmax and the logits' gradient (about 1 GB each); here one chunk of 524 tokens
holds 64 MiB of fp32 logits and half that as its bf16 gradient, and the hidden states' gradient (64 MiB) waits for
backward.

Numerics follow HF's ``ForCausalLMLoss``: logits in the model's dtype, upcast to fp32, labels shifted left with
``ignore_index = -100`` padding, the sum over non-ignored tokens divided by their count (or by
``num_items_in_batch`` when the Trainer passes it); the logits' gradient is cast to the model's dtype before the
products with the head and the hidden states, as autograd does through HF's ``.float()``.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100
# One chunk's fp32 logits: 64 MiB (524 tokens at a 32,000 vocabulary). With the chunk's 16-bit gradient (32 MiB) and
# the hidden states' gradient the loss path stays under 0.3 GB at 8192 tokens; a larger chunk buys nothing, the head
# GEMM is already 524 x 4096 x 32000.
DEFAULT_CHUNK_BYTES = 64 << 20
# Model types whose causal LM is `model` (the decoder, returning last_hidden_state) + `lm_head` (nn.Linear) and whose
# loss is HF's ForCausalLMLoss.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight.T (+ bias), targets) / divisor, by chunks of `chunk` tokens.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] (IGNORE_INDEX: no loss), divisor a 0-dim tensor. The
    gradients are computed in forward (the loss is the graph's end, so its incoming gradient only scales them) and
    scaled in backward: the logits are formed once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, divisor, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = nn.functional.linear(h, weight, bias).float()
            valid = t != IGNORE_INDEX
            picked = t.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1)
            total = total + ((lse - logits.gather(1, picked).squeeze(1)) * valid).sum()
            if need_h or need_w or need_b:
                # d loss / d logits = (softmax - onehot(target)) / divisor on valid rows, in place on the fp32 logits
                logits.sub_(lse.unsqueeze(1)).exp_()
                logits.scatter_add_(1, picked, torch.full_like(logits[:, :1], -1.0))
                logits.mul_(valid.unsqueeze(1) / divisor)
                g = logits.to(hidden.dtype)
                del logits
                if need_h:
                    grad_h[start:start + chunk] = g @ weight
                if need_w:
                    grad_w += (g.t() @ h).float()
                if need_b:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_loss).to(w_dtype)
        db = None if grad_b is None else (grad_b * grad_loss).to(b_dtype)
        return dh, dw, db, None, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, *,
                           num_items_in_batch: torch.Tensor | int | None = None,
                           chunk_tokens: int | None = None) -> torch.Tensor:
    """HF's causal-LM loss of ``head(hidden)`` against ``labels`` without the full logits.

    hidden [B, T, H] (or [T, H]), labels of the same leading shape (``-100``: ignored), head an ``nn.Linear`` [V, H].
    Tokens < n predict token n (labels shifted left). Returns the mean cross-entropy over non-ignored targets (NaN
    when there are none, as HF's), or their sum over ``num_items_in_batch``."""
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"chunked_causal_lm_loss: argument 'labels' must have the hidden states' leading shape "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"chunked_causal_lm_loss: argument 'labels' must hold integer token ids, got {labels.dtype}")
    vocab = head.weight.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(1, DEFAULT_CHUNK_BYTES // (4 * vocab))
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise ValueError(f"chunked_causal_lm_loss: argument 'chunk_tokens' must be a positive int, got {chunk_tokens!r}")
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(torch.int64)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        divisor = (targets != IGNORE_INDEX).sum().to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=flat.device)
    return _ChunkedLinearCrossEntropy.apply(flat, head.weight, head.bias, targets, divisor, chunk_tokens)


def _fused_forward(self, *args, **kwargs):
    """The patched forward: HF's unless training with labels; then the decoder, and the chunked loss in place of the
    logits (``logits`` is None in the output)."""
    cls_forward = type(self).forward
    bound = self._pk_forward_signature.bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    labels = arguments.get("labels")
    if labels is None or not self.training:
        return cls_forward(self, *args, **kwargs)
    arguments.pop("self")
    arguments.pop("labels")
    extra = arguments.pop("kwargs", {})
    if arguments.pop("logits_to_keep", 0) not in (0, None):
        raise ValueError("fuse_causal_lm_loss: the fused loss computes every position's loss; 'logits_to_keep' must be "
                         "0 in training with labels")
    if extra.pop("shift_labels", None) is not None:
        raise ValueError("fuse_causal_lm_loss: 'shift_labels' is not supported by the fused loss; pass 'labels'")
    num_items = extra.pop("num_items_in_batch", None)
    outputs = self.model(**arguments, **extra)
    hidden = outputs[0]
    loss = chunked_causal_lm_loss(hidden, self.lm_head, labels, num_items_in_batch=num_items,
                                  chunk_tokens=self._pk_chunk_tokens)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))


def fuse_causal_lm_loss(model: nn.Module, chunk_tokens: int | None = None) -> nn.Module:
    """Makes ``model`` (a Hugging Face LLaMA, Mistral or Qwen2 causal LM, SmolLM2 included) compute its training loss
    over chunks of ``chunk_tokens`` tokens (default: 64 MiB of fp32 logits per chunk) without materializing the full
    logits. Only this instance is patched. In training mode with ``labels``, ``outputs.loss`` is the same loss as HF's
    and ``outputs.logits`` is None; in eval mode or without labels the model is unchanged. Returns ``model``."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"fuse_causal_lm_loss: argument 'model' must be a Hugging Face causal LM of type "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}; got {type(model).__name__} (model_type {kind!r})")
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or not hasattr(model, "model"):
        raise ValueError(f"fuse_causal_lm_loss: {type(model).__name__} must have a decoder 'model' and an nn.Linear "
                         f"'lm_head'; lm_head is {type(head).__name__}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens <= 0):
        raise ValueError(f"fuse_causal_lm_loss: argument 'chunk_tokens' must be a positive int or None, got "
                         f"{chunk_tokens!r}")
    model._pk_chunk_tokens = chunk_tokens
    model._pk_forward_signature = inspect.signature(type(model).forward)  # once, not per step
    model.forward = types.MethodType(_fused_forward, model)
    return model
