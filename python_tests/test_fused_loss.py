"""fuse_causal_lm_loss: the chunked causal-LM loss against HF's own loss (same model, same inputs), values and
gradients under the 2x-reference-error rule (HF's loss in float64 is the exact reference), what it keeps in memory,
eval/no-label behaviour, torch.compile, and bad input."""

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import peft_kernels as pk
from peft_kernels.loss import chunked_causal_lm_loss
from tiny_models import LLAMA_VOCAB, assert_tolerance, tiny_bert_classifier, tiny_llama, tokens

ATOL = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 2e-4}


def labels_for(ids: torch.Tensor) -> torch.Tensor:
    """Labels = input ids with a few positions ignored (-100), as a padded batch has."""
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return labels


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("chunk", [None, 1, 5, 7], ids=["default", "chunk1", "chunk5", "chunk7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_loss_and_grads_match_hf(dtype, chunk):
    """Every parameter's gradient (the head's included: it trains here) and the loss, 2 x 9 tokens in chunks that do
    and do not divide the 18 token rows, with ignored labels."""
    base = tiny_llama(seed=0).train()
    ids = tokens(LLAMA_VOCAB, (2, 9))
    labels = labels_for(ids)
    exact_out, exact = loss_and_grads(copy.deepcopy(base).double(), ids, labels)
    low_out, low = loss_and_grads(copy.deepcopy(base).to(dtype), ids, labels)
    ours_model = pk.fuse_causal_lm_loss(copy.deepcopy(base).to(dtype), chunk_tokens=chunk)
    ours_out, ours = loss_and_grads(ours_model, ids, labels)
    assert ours_out.logits is None
    assert ours_out.loss.dtype == torch.float32 and low_out.loss.dtype == torch.float32
    assert_tolerance(ours_out.loss.detach().to(dtype), low_out.loss.detach().to(dtype), exact_out.loss.detach(),
                     ATOL[dtype], "loss")
    assert set(ours) == set(exact) and "lm_head.weight" in ours
    for name in exact:
        assert_tolerance(ours[name], low[name], exact[name], ATOL[dtype], name)


def test_num_items_in_batch_and_loss_scaling():
    """The Trainer's gradient-accumulation divisor, and a loss scaled before backward (the incoming gradient)."""
    base = tiny_llama(seed=1).train()
    ids = tokens(LLAMA_VOCAB, (2, 9), seed=5)
    labels = labels_for(ids)
    hf, ours = copy.deepcopy(base), pk.fuse_causal_lm_loss(copy.deepcopy(base), chunk_tokens=4)
    for model in (hf, ours):
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40))
        (3.0 * out.loss).backward()
    torch.testing.assert_close(ours(input_ids=ids, labels=labels, num_items_in_batch=40).loss,
                               hf(input_ids=ids, labels=labels, num_items_in_batch=40).loss)
    for (name, a), b in zip(ours.named_parameters(), hf.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_head_and_checkpointing_with_lora():
    """The QLoRA-style setup: a frozen base and head, LoRA adapters, gradient checkpointing. Only the adapters get
    gradients, equal to HF's loss's."""
    def build():
        model = tiny_llama(seed=2).train()
        model = pk.apply(model, pk.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        for p in model.parameters():
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model.train()
    ids = tokens(LLAMA_VOCAB, (3, 11), seed=9)
    hf_out, hf = loss_and_grads(build(), ids, labels_for(ids))
    ours_out, ours = loss_and_grads(pk.fuse_causal_lm_loss(build(), chunk_tokens=8), ids, labels_for(ids))
    assert "lm_head.weight" not in ours and ours and set(ours) == set(hf)
    torch.testing.assert_close(ours_out.loss, hf_out.loss)
    for name in hf:
        torch.testing.assert_close(ours[name], hf[name], rtol=1e-5, atol=1e-6, msg=name)


def test_eval_and_no_labels_are_untouched():
    base = tiny_llama(seed=3)
    model = pk.fuse_causal_lm_loss(copy.deepcopy(base))
    ids = tokens(LLAMA_VOCAB, (2, 6))
    with torch.no_grad():
        for train in (False, True):
            base.train(train)
            model.train(train)
            torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
        base.eval()
        model.eval()
        a, b = model(input_ids=ids, labels=ids), base(input_ids=ids, labels=ids)
        torch.testing.assert_close(a.logits, b.logits)
        torch.testing.assert_close(a.loss, b.loss)
    assert type(model).forward is type(base).forward, "the class is never patched"


def test_other_llama_family_model():
    """Mistral takes the same path (Qwen2 and SmolLM2 share the layout)."""
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=57)
    base = MistralForCausalLM(config).train()
    ids = tokens(57, (2, 7))
    hf_out, hf = loss_and_grads(copy.deepcopy(base), ids, ids)
    ours_out, ours = loss_and_grads(pk.fuse_causal_lm_loss(copy.deepcopy(base), chunk_tokens=3), ids, ids)
    torch.testing.assert_close(ours_out.loss, hf_out.loss)
    for name in hf:
        torch.testing.assert_close(ours[name], hf[name], rtol=1e-5, atol=1e-6, msg=name)


def test_full_logits_never_exist():
    """No tensor of [tokens, vocab] is saved for backward or allocated at once: the largest float tensor the loss
    creates holds one chunk of logits (the profiler's allocation events), against HF's full [18, V] logits."""
    head = torch.nn.Linear(16, 4000, bias=False).requires_grad_(False)  # frozen, as under LoRA: no [V, H] gradient
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = tokens(4000, (2, 9))
    with torch.profiler.profile(profile_memory=True, record_shapes=True) as prof:
        chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=4).backward()
    largest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert largest <= 4 * 4000 * 4, f"largest allocation {largest} bytes exceeds one fp32 chunk of logits"


def test_compile_fullgraph():
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = labels_for(tokens(50, (2, 9)))

    def loss(h):
        return chunked_causal_lm_loss(h, head, labels, chunk_tokens=5)

    eager = loss(hidden)
    (g_eager,) = torch.autograd.grad(eager, hidden)
    compiled = torch.compile(loss, fullgraph=True)(hidden)
    (g_compiled,) = torch.autograd.grad(compiled, hidden)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)


def test_bad_input():
    with pytest.raises(ValueError, match=r"'model' must be a Hugging Face causal LM of type llama, mistral, qwen2; "
                                         r"got BertForSequenceClassification"):
        pk.fuse_causal_lm_loss(tiny_bert_classifier())
    with pytest.raises(ValueError, match=r"'chunk_tokens' must be a positive int or None, got 0"):
        pk.fuse_causal_lm_loss(tiny_llama(), chunk_tokens=0)
    model = pk.fuse_causal_lm_loss(tiny_llama().train())
    ids = tokens(LLAMA_VOCAB, (2, 9))
    with pytest.raises(ValueError, match=r"'labels' must have the hidden states' leading shape \(2, 9\), got \(2, 8\)"):
        model(input_ids=ids, labels=ids[:, :8])
    with pytest.raises(ValueError, match=r"'labels' must hold integer token ids, got torch.float32"):
        model(input_ids=ids, labels=ids.float())
    with pytest.raises(ValueError, match=r"'logits_to_keep' must be 0"):
        model(input_ids=ids, labels=ids, logits_to_keep=1)


def test_patched_model_compiles_whole():
    """torch.compile of the patched model, training with labels: one graph (the decoder, the chunk loop and our
    autograd.Function), the same loss and gradients as eager."""
    base = tiny_llama(seed=4).train()
    ids = tokens(LLAMA_VOCAB, (2, 9), seed=6)
    eager_out, eager = loss_and_grads(pk.fuse_causal_lm_loss(copy.deepcopy(base), chunk_tokens=5), ids, ids)
    model = pk.fuse_causal_lm_loss(copy.deepcopy(base), chunk_tokens=5)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager_out.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)
