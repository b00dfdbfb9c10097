"""ProPETL (shared LoRA prototype + per-layer top-k masks) and AdaMix (LoRA experts, seeded routing, averaged
merge) on the tiny LLaMA and BERT: targeting and counts, forward against plain-torch references, training,
save/load, merging and clear errors."""

import copy
import functools
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peft_kernels as pk
from peft_kernels.unified import AdaMixLinear, ProPETLLinear
from tiny_models import (BERT_VOCAB, LLAMA_VOCAB, assert_untouched, randomize, snapshot, tiny_bert_classifier,
                         tiny_llama, tokens)

TOKENS = tokens(LLAMA_VOCAB)
BERT_TOKENS = tokens(BERT_VOCAB, (2, 7))
LLAMA_TARGETS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def lora_weights(name):
    return name.rpartition(".")[2] in ("lora_A", "lora_B")


def lm_loss(model, ids=TOKENS):
    logits = model(ids).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def modules_of(model, kind):
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def swap_in(base, make):
    """A copy of ``base`` whose LLaMA q/v projections are replaced by ``make(name, linear)`` modules."""
    ref = copy.deepcopy(base)
    for name in LLAMA_TARGETS:
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, make(name, getattr(ref.get_submodule(parent), child)))
    return ref


class RefLoRA(nn.Module):
    """Plain-torch y = x W^T + b + s (x A^T) B^T."""

    def __init__(self, linear, A, B, s):
        super().__init__()
        self.linear, self.A, self.B, self.s = linear, A.detach().clone(), B.detach().clone(), s

    def forward(self, x):
        return self.linear(x) + self.s * (x @ self.A.T) @ self.B.T


def topk_mask(scores, sparsity):
    keep = max(1, round((1 - sparsity) * scores.numel()))
    threshold = scores.flatten().sort(descending=True).values[keep - 1]
    return (scores >= threshold).float()


# ------------------------------------------------------------------------------------------------------- ProPETL


def test_propetl_apply_llama_shares_one_prototype_per_shape():
    model = pk.apply(tiny_llama(), pk.ProPETLConfig(r=4, alpha=8))
    layers = modules_of(model, ProPETLLinear)
    assert list(layers) == LLAMA_TARGETS
    q0, v0, q1, v1 = layers.values()
    assert q0.prototype is q1.prototype and v0.prototype is v1.prototype and q0.prototype is not v0.prototype
    trainable, total = pk.trainable_parameters(model)
    prototypes = 4 * (64 + 64) + 4 * (64 + 32)  # one per shape: q 64->64, v 64->32
    scores = 2 * (4 * (64 + 64) + 4 * (64 + 32))  # per layer and module
    assert trainable == prototypes + scores == 2688
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[1] for n in names} == {"lora_A", "lora_B", "scores_A", "scores_B"}
    assert sum(".prototype." in n for n in names) == 4  # counted and named once per shape
    for layer in layers.values():
        assert int(layer.masks()[0].sum()) == 128 and int(layer.masks()[1].sum()) == layer.out_features * 2


def test_propetl_apply_bert_classifier():
    model = pk.apply(tiny_bert_classifier(), pk.ProPETLConfig(r=2, sparsity=0.75))
    layers = modules_of(model, ProPETLLinear)
    assert list(layers) == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
    assert len({id(m.prototype) for m in layers.values()}) == 1  # query and value are both 32->32
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in names if not n.startswith("bert.")} == {"classifier.weight", "classifier.bias"}
    assert pk.trainable_parameters(model)[0] == 2 * 64 + 2 * 2 * 64 + (32 * 3 + 3)
    assert all(int(m.masks()[0].sum()) == 16 for m in layers.values())  # 25 % of 64


def test_propetl_logits_match_plain_torch():
    base = tiny_llama()
    model = pk.apply(copy.deepcopy(base), pk.ProPETLConfig(r=4, alpha=8, sparsity=0.6))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    layers = modules_of(model, ProPETLLinear)

    def make(name, linear):
        m = layers[name]
        return RefLoRA(linear, m.prototype.lora_A * topk_mask(m.scores_A, 0.6),
                       m.prototype.lora_B * topk_mask(m.scores_B, 0.6), 8 / 4)

    with torch.no_grad():
        ours, ref = model(TOKENS).logits, swap_in(base, make)(TOKENS).logits
        assert not torch.allclose(ours, base(TOKENS).logits, atol=1e-3)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_propetl_scores_get_the_masks_gradient_straight_through():
    model = pk.apply(tiny_llama(), pk.ProPETLConfig(r=4, alpha=8))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 5, 64)
    g = torch.randn(3, 5, 32)
    (layer(x) * g).sum().backward()
    A, B = layer.prototype.lora_A.detach(), layer.prototype.lora_B.detach()
    mask_A = topk_mask(layer.scores_A.detach(), 0.5).requires_grad_()
    mask_B = topk_mask(layer.scores_B.detach(), 0.5).requires_grad_()
    ref = x @ layer.weight.T + 2.0 * (x @ (A * mask_A).T) @ (B * mask_B).T
    (ref * g).sum().backward()
    torch.testing.assert_close(layer.scores_A.grad, mask_A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.scores_B.grad, mask_B.grad, atol=1e-5, rtol=1e-5)
    assert layer.scores_A.grad.abs().sum() > 0


def test_propetl_training_reduces_loss_and_moves_masks():
    model = pk.apply(tiny_llama(), pk.ProPETLConfig(r=4, sparsity=0.5))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    model.train()
    before_masks = [m.masks()[0].clone() for m in modules_of(model, ProPETLLinear).values()]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = lm_loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    after = [m.masks()[0] for m in modules_of(model, ProPETLLinear).values()]
    assert any(not torch.equal(a, b) for a, b in zip(before_masks, after))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_propetl_save_load_same_logits(tmp_path, arch):
    make, ids = (tiny_llama, TOKENS) if arch == "llama" else (tiny_bert_classifier, BERT_TOKENS)
    model = pk.apply(make(), pk.ProPETLConfig(r=4))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    if arch == "bert":
        with torch.no_grad():
            model.classifier.weight.normal_()
    pk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFT_KERNELS_PROPETL" and config["config"]["r"] == 4
    saved = load_file(tmp_path / "adapter_model.safetensors")
    masks = {k: v for k, v in saved.items() if k.endswith((".mask_A", ".mask_B"))}
    assert not any("scores" in k for k in saved)
    assert all(v.dtype == torch.bfloat16 and set(v.unique().tolist()) == {0.0, 1.0} for v in masks.values())
    if arch == "llama":
        assert sum(v.numel() * v.element_size() for v in saved.values()) == 896 * 4 + 1792 * 2  # the docstring's 7168
    loaded = pk.load_adapter(make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for (name, a), b in zip(modules_of(model, ProPETLLinear).items(), modules_of(loaded, ProPETLLinear).values()):
        assert torch.equal(a.masks()[0], b.masks()[0]) and torch.equal(a.masks()[1], b.masks()[1]), name
    assert len({id(m.prototype) for m in modules_of(loaded, ProPETLLinear).values()}) == (2 if arch == "llama" else 1)


def test_propetl_merge_and_unmerge():
    model = pk.apply(tiny_llama(), pk.ProPETLConfig(r=4))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    layers = modules_of(model, ProPETLLinear)
    weights = {n: m.weight.clone() for n, m in layers.items()}
    with torch.no_grad():
        before = model(TOKENS).logits
        for m in layers.values():
            m.merge()
        torch.testing.assert_close(model(TOKENS).logits, before, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="already merged"):
            layers[LLAMA_TARGETS[0]].merge()
        for m in layers.values():
            m.unmerge()
        assert all(torch.allclose(m.weight, weights[n], atol=1e-6) for n, m in layers.items())
        torch.testing.assert_close(model(TOKENS).logits, before, atol=1e-5, rtol=1e-5)


def test_propetl_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"'sparsity' must be a number in \[0, 1\), got 1.0"):
        pk.ProPETLConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="'r' must be an int >= 1, got 0"):
        pk.ProPETLConfig(r=0)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no nn.Linear"):
        pk.apply(tiny_llama(), pk.ProPETLConfig(target_modules=["nope"]))
    model = pk.apply(tiny_llama(), pk.ProPETLConfig(r=2))
    with pytest.raises(ValueError, match="already carries a ProPETLConfig"):
        pk.apply(model, pk.ProPETLConfig(r=2))
    with pytest.raises(TypeError, match="input 'x' must have the layer's dtype torch.float32"):
        model.model.layers[0].self_attn.q_proj(torch.randn(2, 64, dtype=torch.float64))
    pk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.mask_A"
    for how, message in [("half", "must hold only 0 and 1"), ("one-more", "keeps 65 of 128 entries; sparsity 0.5 keeps 64")]:
        mask = good[key].clone().view(-1)
        mask[(mask == 0).nonzero()[0]] = 0.5 if how == "half" else 1.0
        tensors = good | {key: mask.view(good[key].shape)}
        save_file(tensors, path)
        target = tiny_llama()
        before = snapshot(target)
        with pytest.raises(ValueError, match=message):
            pk.load_adapter(target, tmp_path)
        assert_untouched(target, before)


# -------------------------------------------------------------------------------------------------------- AdaMix


def test_adamix_apply_llama_and_bert():
    model = pk.apply(tiny_llama(), pk.AdaMixConfig(num_experts=3, r=4))
    assert list(modules_of(model, AdaMixLinear)) == LLAMA_TARGETS
    assert pk.trainable_parameters(model)[0] == 3 * 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    bert = pk.apply(tiny_bert_classifier(), pk.AdaMixConfig(num_experts=2, r=2))
    assert list(modules_of(bert, AdaMixLinear)) == ["bert.encoder.layer.0.attention.self.query",
                                                    "bert.encoder.layer.0.attention.self.value"]
    names = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert {n for n in names if not n.endswith(("lora_A", "lora_B"))} == {"classifier.weight", "classifier.bias"}
    assert pk.trainable_parameters(bert)[0] == 2 * 2 * (2 * 64) + 32 * 3 + 3


def test_adamix_training_forward_uses_the_routed_experts():
    model = pk.apply(tiny_llama(), pk.AdaMixConfig(num_experts=4, r=4, alpha=8))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    layer = model.model.layers[1].self_attn.q_proj.train()
    x = torch.randn(2, 3, 64)
    routes = set()
    for _ in range(12):
        y = layer(x)
        i, j = layer.last_route
        routes.add((i, j))
        ref = x @ layer.weight.T + 2.0 * (x @ layer.lora_A[i].T) @ layer.lora_B[j].T
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert any(i != j for i, j in routes) and len({i for i, _ in routes}) > 1  # A and B routed independently


def routes_of(model, n=5):
    model.train()
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(TOKENS).logits
            out.append(([m.last_route for m in modules_of(model, AdaMixLinear).values()], logits))
    return out


def test_adamix_routing_is_deterministic_under_a_seed():
    def make(seed):
        model = pk.apply(tiny_llama(), pk.AdaMixConfig(r=4, seed=seed))
        randomize(model, scale=0.1, select=lora_weights, replace=True)
        return model

    first, again, other = routes_of(make(7)), routes_of(make(7)), routes_of(make(8))
    assert [r for r, _ in first] == [r for r, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    assert [r for r, _ in first] != [r for r, _ in other]
    assert len({tuple(r) for r, _ in first}) > 1  # a fresh draw at every forward call
    assert len(set(first[0][0])) > 1  # layers draw from their own generators


def test_adamix_eval_and_merge_experts_equal_lora_with_averaged_factors(tmp_path):
    base = tiny_llama()
    model = pk.apply(copy.deepcopy(base), pk.AdaMixConfig(num_experts=3, r=4, alpha=8))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    layers = modules_of(model, AdaMixLinear)
    ref = swap_in(base, lambda name, linear: RefLoRA(linear, layers[name].lora_A.mean(0), layers[name].lora_B.mean(0), 2.0))
    with torch.no_grad():
        expected = ref(TOKENS).logits
        torch.testing.assert_close(model.eval()(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
        pk.merge_experts(model)
        assert not modules_of(model, AdaMixLinear) and list(modules_of(model, pk.nn.LoRALinear)) == LLAMA_TARGETS
        torch.testing.assert_close(model(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
        # an ordinary LoRA now: HF PEFT loads what save_adapter writes, and it merges into W
        pk.save_adapter(model, tmp_path)
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        torch.testing.assert_close(theirs(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
        lora = list(modules_of(model, pk.nn.LoRALinear).values())
        weights = [m.weight.clone() for m in lora]
        for m in lora:
            m.merge()
        torch.testing.assert_close(model(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
        for m in lora:
            m.unmerge()
        assert all(torch.allclose(m.weight, w, atol=1e-6) for m, w in zip(lora, weights))


def test_adamix_training_with_consistency_reduces_loss():
    model = pk.apply(tiny_bert_classifier(), pk.AdaMixConfig(num_experts=4, r=4))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    labels = torch.tensor([0, 2])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()

    def loss_of():
        a, b = model(BERT_TOKENS).logits, model(BERT_TOKENS).logits
        return nn.functional.cross_entropy(a, labels) + nn.functional.cross_entropy(b, labels) \
            + pk.consistency_loss(a, b)

    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        assert nn.functional.cross_entropy(model.eval()(BERT_TOKENS).logits, labels) < losses[0] / 2


def test_consistency_loss_is_the_symmetric_kl():
    a = torch.randn(2, 5, 11, requires_grad=True)
    b = torch.randn(2, 5, 11)
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl_ab = nn.functional.kl_div(lb.reshape(-1, 11), la.reshape(-1, 11), log_target=True, reduction="batchmean")
    kl_ba = nn.functional.kl_div(la.reshape(-1, 11), lb.reshape(-1, 11), log_target=True, reduction="batchmean")
    loss = pk.consistency_loss(a, b)
    torch.testing.assert_close(loss, (kl_ab + kl_ba) / 2)
    loss.backward()
    assert a.grad.abs().sum() > 0
    assert pk.consistency_loss(b, b).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"one shape \[..., classes\], got \[2, 5, 11\] and \[2, 11\]"):
        pk.consistency_loss(a, b[:, 0])
    with pytest.raises(TypeError, match="must be tensors, got Tensor and list"):
        pk.consistency_loss(a, [1.0])


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_adamix_save_load_same_logits(tmp_path, arch):
    # BERT without its own dropout, so that two training-mode passes differ only by the routing
    make, ids = (tiny_llama, TOKENS) if arch == "llama" else (functools.partial(
        tiny_bert_classifier, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), BERT_TOKENS)
    model = pk.apply(make(), pk.AdaMixConfig(num_experts=2, r=4, seed=3))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    pk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["config"]["seed"] == 3
    loaded = pk.load_adapter(make(), tmp_path)
    assert not any(m.training for m in modules_of(loaded, AdaMixLinear).values())  # the eval model's mode
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert all(m.last_route is None for m in modules_of(loaded, AdaMixLinear).values())
        # training-mode routing restarts from the saved seed in both
        fresh = pk.apply(make(), pk.AdaMixConfig(num_experts=2, r=4, seed=3))
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(loaded.train()(ids).logits, fresh.train()(ids).logits)


def test_adamix_bad_input():
    with pytest.raises(ValueError, match="'num_experts' must be an int >= 1, got 0"):
        pk.AdaMixConfig(num_experts=0)
    with pytest.raises(ValueError, match=r"'dropout' must be in \[0, 1\), got 1.5"):
        pk.AdaMixConfig(dropout=1.5)
    with pytest.raises(ValueError, match="merge_experts: argument 'model' must carry an AdaMix adapter"):
        pk.merge_experts(pk.apply(tiny_llama(), pk.ProPETLConfig(r=2)))
    with pytest.raises(ValueError, match="no default target_modules for model_type 'gpt2'"):
        from transformers import GPT2Config, GPT2LMHeadModel
        pk.apply(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)), pk.AdaMixConfig())
