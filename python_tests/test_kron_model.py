"""Model-level KronA on a tiny random LLaMA: apply by module name, trainable counts, save/load in HF PEFT's LoKr
format in both directions (same logits as PEFT), merged logits, a compiled decoder layer, and clear errors that
leave the model intact."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peft_kernels as pk
from test_lora_model import TOKENS, tiny_llama
from tiny_models import assert_untouched, randomize, snapshot


def kron_factors(name):
    """Ours (A, B) or PEFT's (lokr_w1, lokr_w2, and their low-rank pairs)."""
    return name.rpartition(".")[2] in ("A", "B") or ".lokr_" in name


def kron_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, pk.nn.KronALinear)}


def test_apply_targets_and_freezes():
    model = pk.apply(tiny_llama(), pk.KronAConfig(scaling=2.0))
    assert list(kron_modules(model)) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable, total = pk.trainable_parameters(model)
    # q: 64 -> 64 as A [8, 8] ⊗ B [8, 8]; v: 64 -> 32 (2 kv heads of 16) as A [4, 8] ⊗ B [8, 8]
    assert trainable == 2 * (8 * 8 + 8 * 8) + 2 * (4 * 8 + 8 * 8)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"A", "B"}
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable
    with torch.no_grad():  # A = 0: the fresh adapter leaves the model's logits unchanged
        assert torch.equal(model(TOKENS).logits, tiny_llama()(TOKENS).logits)


def test_a_layer_that_cannot_take_the_adapter_leaves_the_model_unchanged():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"apply: model.layers.0.self_attn.v_proj: KronALinear: residual=True .* 64 -> 32"):
        pk.apply(model, pk.KronAConfig(residual=True))
    assert not kron_modules(model) and all(p.requires_grad for p in model.parameters())


def test_targets_that_match_nothing():
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no nn.Linear of LlamaForCausalLM"):
        pk.apply(tiny_llama(), pk.KronAConfig(target_modules=["nope"]))


@pytest.mark.parametrize("factor", [-1, 4])
def test_ours_to_peft_same_logits(tmp_path, factor):
    config = pk.KronAConfig(scaling=0.75, decompose_factor=factor, target_modules=["q_proj", "v_proj", "down_proj"])
    model = pk.apply(tiny_llama(), config)
    randomize(model, scale=0.1, select=kron_factors, replace=True)
    pk.save_adapter(model, tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.mlp.down_proj.lokr_w1"
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"lokr_w1", "lokr_w2"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LOKR"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        ours_logits = model(TOKENS).logits
        assert not torch.allclose(ours_logits, tiny_llama()(TOKENS).logits, atol=1e-3)  # the adapter matters
        assert torch.allclose(ours_logits, theirs(TOKENS).logits, atol=1e-4)


@pytest.mark.parametrize("r,decompose_both", [(8, False), (2, False), (2, True)],
                         ids=["w1-w2", "w1-w2ab", "w1ab-w2ab"])
def test_peft_to_ours_same_logits(tmp_path, r, decompose_both):
    """PEFT stores w2 (and with decompose_both, w1) as a low-rank pair when r is small: we multiply it out."""
    lokr = peft.LoKrConfig(r=r, alpha=3 * r, target_modules=["q_proj", "v_proj"], decompose_both=decompose_both)
    theirs = peft.get_peft_model(tiny_llama(), lokr)
    randomize(theirs, scale=0.1, select=kron_factors, replace=True)
    theirs.save_pretrained(tmp_path)
    parts = {k.rsplit(".", 1)[-1] for k in load_file(tmp_path / "adapter_model.safetensors")}
    assert ("lokr_w2_a" in parts) == (r == 2) and ("lokr_w1_a" in parts) == decompose_both
    ours = pk.load_adapter(tiny_llama(), tmp_path)
    assert all(m.scaling == 3.0 for m in kron_modules(ours).values())
    with torch.no_grad():
        ours_logits = ours(TOKENS).logits
        assert not torch.allclose(ours_logits, tiny_llama()(TOKENS).logits, atol=1e-3)  # the adapter matters
        assert torch.allclose(ours_logits, theirs.eval()(TOKENS).logits, atol=1e-4)


def test_round_trip_into_an_adapted_model(tmp_path):
    source = pk.apply(tiny_llama(), pk.KronAConfig(scaling=0.5))
    randomize(source, scale=0.1, select=kron_factors, replace=True)
    pk.save_adapter(source, tmp_path)
    target = pk.load_adapter(pk.apply(tiny_llama(), pk.KronAConfig()), tmp_path)
    with torch.no_grad():
        assert torch.equal(target(TOKENS).logits, source(TOKENS).logits)


def test_merged_logits_equal_adapter_logits():
    model = pk.apply(tiny_llama(), pk.KronAConfig(scaling=0.5, target_modules=["q_proj", "o_proj", "up_proj"]))
    randomize(model, scale=0.1, select=kron_factors, replace=True)
    with torch.no_grad():
        before = model(TOKENS).logits
        for m in kron_modules(model).values():
            m.merge()
        assert torch.allclose(model(TOKENS).logits, before, atol=1e-4)


def test_failed_load_leaves_model_intact(tmp_path):
    source = pk.apply(tiny_llama(), pk.KronAConfig())
    randomize(source, scale=0.1, select=kron_factors, replace=True)
    pk.save_adapter(source, tmp_path)
    target = pk.apply(tiny_llama(), pk.KronAConfig(decompose_factor=2))
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"self_attn.q_proj has factors w1 \[8, 8\], w2 \[8, 8\] in the file but "
                                         r"A \[2, 2\], B \[32, 32\] in the model"):
        pk.load_adapter(target, tmp_path)
    assert_untouched(target, before)
    fresh = tiny_llama()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj": 4}}))
    with pytest.raises(NotImplementedError, match="per-layer rank_pattern"):
        pk.load_adapter(fresh, tmp_path)
    assert not kron_modules(fresh)


def test_save_errors(tmp_path):
    model = pk.apply(tiny_llama(), pk.KronAConfig(residual=True, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="no residual scale"):
        pk.save_adapter(model, tmp_path)
    model = pk.apply(tiny_llama(), pk.KronAConfig())
    next(iter(kron_modules(model).values())).merge()
    with pytest.raises(ValueError, match="unmerge"):
        pk.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_decoder_layer(dropout):
    """A KronA-wrapped LLaMA decoder layer compiles with fullgraph=True (the per-step dropout seed included) and,
    without dropout, matches eager in values and gradients."""
    model = pk.apply(tiny_llama(), pk.KronAConfig(dropout=dropout, target_modules=["q_proj", "v_proj", "gate_proj"]))
    randomize(model, scale=0.1, select=kron_factors, replace=True)
    layer = model.model.layers[0].train()
    h = torch.randn(2, 9, 64, requires_grad=True)
    position_embeddings = model.model.rotary_emb(h, torch.arange(9)[None].expand(2, -1))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(h, position_embeddings=position_embeddings)
    leaves = [h, layer.self_attn.q_proj.A, layer.mlp.gate_proj.B]
    grads = torch.autograd.grad(out.sum(), leaves)
    if dropout == 0.0:
        eager = layer(h, position_embeddings=position_embeddings)
        assert torch.allclose(out, eager, atol=1e-5)
        for a, b in zip(grads, torch.autograd.grad(eager.sum(), leaves)):
            assert torch.allclose(a, b, atol=1e-4)
    else:
        assert all(torch.isfinite(g).all() for g in grads)
