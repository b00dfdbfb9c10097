"""checkpoint_in_micro_batches: gradients against Hugging Face's own checkpointing and against float64 (the 2x
reference-error rule), dropout masks that the recompute reproduces (the gradient is the derivative of the forward
that ran), what one layer's backward holds, and bad input."""

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels.checkpoint import micro_batch_checkpoint
from tiny_models import LLAMA_VOCAB, assert_tolerance, randomize, tiny_llama, tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from qlora_step_memory import cpu_step_peak  # noqa: E402  (the bench's allocator count, shared)

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def lora_llama(dropout: float, dtype=torch.float32, seed: int = 0, **config):
    """tiny_llama(**config) with LoRA on five projections, random B (a zero B would make the A gradients vacuous),
    in training mode."""
    model = pk.apply(tiny_llama(seed=seed, **config), pk.LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS))
    randomize(model, seed=seed + 1, scale=0.2)
    return model.to(dtype).train()


def grads(model, ids, seed: int = 7):
    """(loss, {name: grad}) of one step; the RNG is seeded first so that runs draw the same dropout masks."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hf_checkpointing(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("micro_tokens", [7, 14, 21], ids=["5x1", "3x2", "2x3"])
def test_gradients_match_checkpointing_and_float64(micro_tokens):
    """Without dropout: every gradient (adapters, and the embeddings, trained here so the hidden states' gradient
    must flow through each layer's backward) within 2x the error of HF-checkpointed fp32 from float64; 5 sequences
    of 7 tokens in micro-batches of 1, 2 (uneven: 2 + 2 + 1) and 3 sequences."""
    base = lora_llama(dropout=0.0)
    base.model.embed_tokens.weight.requires_grad_(True)
    ids = tokens(LLAMA_VOCAB, (5, 7))
    exact_loss, exact = grads(copy.deepcopy(base).double(), ids)
    low_loss, low = grads(hf_checkpointing(copy.deepcopy(base)), ids)
    ours_model = pk.checkpoint_in_micro_batches(copy.deepcopy(base), micro_batch_tokens=micro_tokens)
    ours_loss, ours = grads(ours_model, ids)
    assert_tolerance(ours_loss, low_loss, exact_loss, 1e-6, "loss")
    assert set(ours) == set(exact) and "model.embed_tokens.weight" in ours and len(ours) == 2 * 2 * len(TARGETS) + 1
    for name in exact:
        assert_tolerance(ours[name], low[name], exact[name], 1e-6, name)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_one_micro_batch_is_hf_checkpointing_bit_for_bit():
    """With dropout, micro-batches as large as the batch draw what HF's checkpointing draws: equal bits."""
    base = lora_llama(dropout=0.3)
    ids = tokens(LLAMA_VOCAB, (3, 9))
    hf_loss, hf = grads(hf_checkpointing(copy.deepcopy(base)), ids)
    ours_loss, ours = grads(pk.checkpoint_in_micro_batches(copy.deepcopy(base), micro_batch_tokens=27), ids)
    assert torch.equal(ours_loss, hf_loss) and hf.keys() == ours.keys()
    for name in hf:
        assert torch.equal(ours[name], hf[name]), name


def test_dropout_gradient_is_the_derivative_of_the_forward():
    """With dropout and three micro-batches, the recompute must draw the forward's masks: in float64 (HF's RMSNorm
    still runs in fp32, hence eps 1e-3), the gradient's directional derivative equals the central difference of the
    forward (same seed, so the same masks): 4e-6 apart here, where a recompute drawing other masks gives -32 for
    184."""
    model = pk.checkpoint_in_micro_batches(lora_llama(dropout=0.3, dtype=torch.float64), micro_batch_tokens=14)
    ids = tokens(LLAMA_VOCAB, (5, 7))
    weights = torch.randn(5, 7, LLAMA_VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def loss():
        torch.manual_seed(11)
        with torch.enable_grad():  # checkpointing (and its micro-batching) is active only with gradients on
            return (model(input_ids=ids, use_cache=False).logits * weights).sum()

    loss().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    eps = 1e-3
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(eps * d)
        plus = loss().item()
        for p, d in zip(params, direction):
            p.sub_(2 * eps * d)
        minus = loss().item()
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-4 * abs(numeric), (analytic, numeric)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_backward_holds_a_micro_batch():
    """The backward's peak (torch's CPU allocator, as bench/qlora_step_memory.py counts it) with 8 sequences of 64
    tokens in micro-batches of 2 sequences is under 0.4x HF checkpointing's, where one layer's recompute over the
    whole batch dominates it (MLP 1024 wide)."""
    base = lora_llama(dropout=0.1, intermediate_size=1024)
    ids = tokens(LLAMA_VOCAB, (8, 64))

    def backward_peak(model):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        return cpu_step_peak(loss.backward)

    hf = backward_peak(hf_checkpointing(copy.deepcopy(base)))
    ours = backward_peak(pk.checkpoint_in_micro_batches(copy.deepcopy(base), micro_batch_tokens=128))
    assert ours < 0.4 * hf, (ours, hf)


def test_each_gradient_is_accumulated_once_per_step():
    """The layer's parameters are inputs of its checkpoint op: over 3 micro-batches each adapter gets one gradient
    accumulation (DDP's hooks and an optimizer step in backward rely on that), holding the micro-batches' sum."""
    model = pk.checkpoint_in_micro_batches(lora_llama(dropout=0.0), micro_batch_tokens=14)
    counts = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, name=name: counts.update({name: counts.get(name, 0) + 1}))
    grads(model, tokens(LLAMA_VOCAB, (5, 7)))
    assert len(counts) == 2 * 2 * len(TARGETS) and set(counts.values()) == {1}, counts


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hf_peft_model():
    """An HF PEFT LoRA model (its dropout is torch's nn.Dropout): one micro-batch per batch gives HF checkpointing's
    gradients bit for bit, with dropout; three micro-batches, without dropout, within the 2x rule of float64."""
    peft = pytest.importorskip("peft")

    def peft_llama(dropout):
        model = peft.get_peft_model(tiny_llama(seed=3), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                          target_modules=TARGETS))
        randomize(model, seed=4, scale=0.2)
        return model.train()

    ids = tokens(LLAMA_VOCAB, (5, 7))
    dropped = peft_llama(0.2)
    hf_loss, hf = grads(hf_checkpointing(copy.deepcopy(dropped).get_base_model()), ids)
    ours_loss, ours = grads(pk.checkpoint_in_micro_batches(copy.deepcopy(dropped), micro_batch_tokens=35), ids)
    assert torch.equal(ours_loss, hf_loss) and hf.keys() == {k.removeprefix("base_model.model.") for k in ours}
    assert all(torch.equal(ours["base_model.model." + k], v) for k, v in hf.items())
    base = peft_llama(0.0)
    _, exact = grads(copy.deepcopy(base).double(), ids)
    _, low = grads(hf_checkpointing(copy.deepcopy(base).get_base_model()), ids)
    _, ours = grads(pk.checkpoint_in_micro_batches(copy.deepcopy(base), micro_batch_tokens=14), ids)
    assert len(ours) == 2 * 2 * len(TARGETS)
    for name, value in exact.items():
        assert_tolerance(ours[name], low[name.removeprefix("base_model.model.")], value, 1e-6, name)


def test_eval_and_no_grad_run_the_layers_as_they_are():
    base = lora_llama(dropout=0.3)
    ids = tokens(LLAMA_VOCAB, (3, 5))
    ours = pk.checkpoint_in_micro_batches(copy.deepcopy(base), micro_batch_tokens=5).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, base.eval()(input_ids=ids).logits)


def test_bad_input():
    model = lora_llama(dropout=0.0)
    for bad in (0, -3, 2.5, True, "2048"):
        with pytest.raises(ValueError, match=r"argument 'micro_batch_tokens' must be a positive int or None, got"):
            pk.checkpoint_in_micro_batches(model, micro_batch_tokens=bad)
    with pytest.raises(TypeError, match=r"argument 'model' must be a Hugging Face PreTrainedModel \(or an HF PEFT model "
                                        r"wrapping one\), got Linear"):
        pk.checkpoint_in_micro_batches(nn.Linear(2, 2))
    layer = model.model.layers[0]
    hidden = torch.randn(2, 3, 64)
    needs_grad = torch.randn(2, 3, 64, requires_grad=True)
    call = functools.partial(type(layer).forward, layer)
    with pytest.raises(TypeError, match=r"the layer call must be functools.partial\(forward, layer, \*\*kwargs\)"):
        micro_batch_checkpoint(layer, hidden)
    with pytest.raises(ValueError, match=r"keyword argument 'extra' of the decoder layer requires grad"):
        micro_batch_checkpoint(functools.partial(lambda self, h, extra: h + extra, layer, extra=needs_grad), hidden)
    with pytest.raises(TypeError, match=r"hidden states \[batch, seq, \.\.\.\] as the only positional argument"):
        micro_batch_checkpoint(call, hidden, hidden)
    with pytest.raises(TypeError, match=r"must return the hidden states as one tensor"):
        micro_batch_checkpoint(functools.partial(lambda self, h: (h, None), layer), hidden.requires_grad_())
