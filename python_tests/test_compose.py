"""Composition of saved LoRA adapters (peft_kernels.compose): task arithmetic and averaging against plain-torch
weight updates, the composed model saved and reloaded, LoRAHub's search finding the right adapter, clear errors
that leave the model untouched."""

import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels.compose import lorahub_search, merge_adapters
from tiny_models import LLAMA_VOCAB, assert_untouched, snapshot, tiny_bert_classifier, tiny_llama, tokens

TOKENS = tokens(LLAMA_VOCAB)


def saved_adapter(directory, r, alpha, targets=("q_proj", "v_proj"), seed=1, use_rslora=False, scale=0.1):
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=r, alpha=alpha, target_modules=list(targets), use_rslora=use_rslora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pk.save_adapter(model, directory)
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scaling)
            for n, m in model.named_modules() if isinstance(m, pk.nn.LoRALinear)}


def with_deltas(deltas):
    """Plain torch: the base tiny LLaMA with W += delta for each named Linear."""
    model = tiny_llama()
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight += delta
    return model


def test_task_arithmetic_is_exact_with_mixed_ranks_and_targets(tmp_path):
    adapters = [saved_adapter(tmp_path / "a", 2, 4, seed=1),
                saved_adapter(tmp_path / "b", 3, 9, seed=2, targets=("q_proj", "down_proj")),
                saved_adapter(tmp_path / "c", 4, 8, seed=3, use_rslora=True)]
    weights = [0.7, -0.4, 1.3]
    deltas = {}
    for w, adapter in zip(weights, adapters):
        for name, (A, B, s) in adapter.items():
            deltas[name] = deltas.get(name, 0) + w * s * B @ A
    model = merge_adapters(tiny_llama(), [tmp_path / d for d in "abc"], weights)
    lora = {n: m for n, m in model.named_modules() if isinstance(m, pk.nn.LoRALinear)}
    assert sorted(lora) == sorted(deltas) and all(m.r == 2 + 3 + 4 for m in lora.values())
    assert pk.trainable_parameters(model)[0] == sum(p.numel() for m in lora.values() for p in (m.lora_A, m.lora_B))
    with torch.no_grad():
        expected = with_deltas(deltas)(TOKENS).logits
        torch.testing.assert_close(model(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
        # an ordinary LoRA: saved in PEFT's format and loaded back, or merged into W
        pk.save_adapter(model, tmp_path / "composed")
        torch.testing.assert_close(pk.load_adapter(tiny_llama(), tmp_path / "composed")(TOKENS).logits, expected,
                                   atol=1e-5, rtol=1e-5)
        for m in lora.values():
            m.merge()
        torch.testing.assert_close(model(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


def test_average_is_adaptersoup_of_a_and_b(tmp_path):
    adapters = [saved_adapter(tmp_path / str(i), 4, 8 * (i + 1), seed=i) for i in range(3)]
    weights = torch.tensor([1.0, 2.0, 1.0])
    norm = weights / weights.sum()
    deltas = {}
    for name in adapters[0]:
        A = sum(w * a[name][0] for w, a in zip(norm, adapters))
        B = sum(w * a[name][2] * a[name][1] for w, a in zip(norm, adapters))
        deltas[name] = B @ A
    model = merge_adapters(tiny_llama(), [tmp_path / str(i) for i in range(3)], weights, mode="average")
    assert all(m.r == 4 for m in model.modules() if isinstance(m, pk.nn.LoRALinear))
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, with_deltas(deltas)(TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_a_second_composition_overwrites_the_first(tmp_path):
    saved_adapter(tmp_path / "a", 2, 4, seed=1)
    b = saved_adapter(tmp_path / "b", 2, 4, seed=2)
    dirs = [tmp_path / "a", tmp_path / "b"]
    model = merge_adapters(tiny_llama(), dirs, [1.0, 1.0])
    merge_adapters(model, dirs, [0.0, 2.0])
    deltas = {n: 2.0 * s * B @ A for n, (A, B, s) in b.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, with_deltas(deltas)(TOKENS).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"already carries LoRA modules .* of rank \[4\]; this composition needs rank 2"):
        merge_adapters(model, dirs, [1.0, 1.0], mode="average")


def test_bad_input_leaves_the_model_untouched(tmp_path):
    saved_adapter(tmp_path / "r2", 2, 4)
    saved_adapter(tmp_path / "r4", 4, 8)
    head = pk.apply(tiny_bert_classifier(), pk.LoRAConfig(r=2))
    pk.save_adapter(head, tmp_path / "head")
    pk.save_adapter(pk.apply(tiny_bert_classifier(), pk.LoRAConfig(r=2, train_task_head=False)), tmp_path / "bert")
    pk.save_adapter(pk.apply(tiny_llama(), pk.ProPETLConfig(r=2)), tmp_path / "propetl")
    dirs = [tmp_path / "r2", tmp_path / "r4"]
    cases = [
        (dict(directories=dirs, weights=[1.0]), "argument 'weights' must be 2 finite numbers"),
        (dict(directories=dirs, weights=[1.0, float("nan")]), "argument 'weights' must be 2 finite numbers"),
        (dict(directories=[], weights=[]), "argument 'directories' must be a non-empty list"),
        (dict(directories=dirs, weights=[1, 1], mode="ties"), r"argument 'mode' must be one of \['task_arithmetic'"),
        (dict(directories=dirs, weights=[1, 1], mode="average"), r"mode='average' needs adapters of one rank, got r=2"),
        (dict(directories=[tmp_path / "r2"] * 2, weights=[1, -1], mode="average"), "divides by the weights' sum"),
        (dict(directories=[tmp_path / "head"], weights=[1]), r"head: it also carries whole modules \['classifier'\]"),
        (dict(directories=[tmp_path / "bert"], weights=[1]), "which is no targeted Linear of LlamaForCausalLM"),
        (dict(directories=[tmp_path / "propetl"], weights=[1]), "peft_type 'PEFT_KERNELS_PROPETL', expected 'LORA'"),
        (dict(directories=[tmp_path / "missing"], weights=[1]), "merge_adapters: adapter .*missing: cannot read"),
    ]
    for kwargs, message in cases:
        model = tiny_llama()
        before = snapshot(model)
        with pytest.raises(ValueError, match=message):
            merge_adapters(model, **kwargs)
        assert_untouched(model, before, what=str(kwargs))
    with pytest.raises(ValueError, match="the model carries a ProPETLConfig"):
        merge_adapters(pk.apply(tiny_llama(), pk.ProPETLConfig(r=2)), dirs, [1, 1])


def test_lorahub_finds_the_right_adapter(tmp_path):
    """Three candidates; the few-shot labels are the next tokens adapter 1 alone predicts. The search weights it
    highest and beats uniform weights on the loss; the model is left composed with the returned weights."""
    for i in range(3):
        saved_adapter(tmp_path / str(i), 4, 8, seed=10 + i, scale=0.3)
    dirs = [tmp_path / str(i) for i in range(3)]
    examples = tokens(LLAMA_VOCAB, (4, 8), seed=5)
    with torch.no_grad():
        labels = merge_adapters(tiny_llama(), dirs, [0.0, 1.0, 0.0])(examples).logits.argmax(-1)

    def loss_fn(model, ids):
        return nn.functional.cross_entropy(model(ids).logits.reshape(-1, LLAMA_VOCAB), labels.reshape(-1))

    with torch.no_grad():
        uniform = loss_fn(merge_adapters(tiny_llama(), dirs, [1 / 3] * 3), examples).item()
    model = tiny_llama()
    weights = lorahub_search(model, dirs, examples, loss_fn, steps=10, seed=0)
    assert max(range(3), key=lambda i: weights[i]) == 1, weights
    with torch.no_grad():
        found = loss_fn(model, examples).item()
        assert found < uniform - 0.1, (found, uniform)
        again = merge_adapters(tiny_llama(), dirs, weights)
        torch.testing.assert_close(model(examples).logits, again(examples).logits, atol=1e-6, rtol=1e-6)
    short = [lorahub_search(tiny_llama(), dirs, examples, loss_fn, steps=2, seed=s) for s in (0, 0, 1)]
    assert short[0] == short[1] != short[2]  # seeded


def test_lorahub_bad_input(tmp_path):
    saved_adapter(tmp_path / "a", 2, 4)
    loss = lambda model, ids: model(ids).logits.square().mean()  # noqa: E731
    with pytest.raises(TypeError, match="argument 'loss_fn' must be callable"):
        lorahub_search(tiny_llama(), [tmp_path / "a"], TOKENS, "mse")
    with pytest.raises(ValueError, match="argument 'steps' must be an int >= 1, got 0"):
        lorahub_search(tiny_llama(), [tmp_path / "a"], TOKENS, loss, steps=0)
    with pytest.raises(ValueError, match="argument 'l1' must be a number >= 0, got -1"):
        lorahub_search(tiny_llama(), [tmp_path / "a"], TOKENS, loss, l1=-1)
