"""(IA)³ and BitFit on the tiny LLaMA and BERT models: targets and trainable counts (IA3's equal to HF PEFT's),
logits against plain-torch references, training, save/load (IA3 in PEFT's format, both directions with PEFT),
merge/unmerge, and bad input."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peft_kernels as pk
from test_adapters import MODELS, logits, take_head, trains, wrapped
from tiny_models import assert_untouched, randomize, snapshot, tiny_bert_classifier, tiny_llama

LLAMA_IA3 = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
BERT_IA3 = ["bert.encoder.layer.0." + p for p in ("attention.self.key", "attention.self.value", "attention.output.dense",
                                                  "output.dense")]


def peft_model(arch, **kwargs):
    make, _ = MODELS[arch]
    task = {"task_type": "SEQ_CLS"} if arch == "bert" else {}
    return peft.get_peft_model(make(), peft.IA3Config(**task, **kwargs))


def ia3_reference(fresh, adapted, x):
    """``fresh`` with each IA3Linear's vector applied by hooks: output rows scaled, or the input (feed-forward)."""
    handles = []
    for name, m in adapted.named_modules():
        if isinstance(m, pk.nn.IA3Linear) and m.feedforward:
            handles.append(fresh.get_submodule(name).register_forward_pre_hook(
                lambda mod, args, m=m: (args[0] * m.ia3_l[0],)))
        elif isinstance(m, pk.nn.IA3Linear):
            handles.append(fresh.get_submodule(name).register_forward_hook(
                lambda mod, args, out, m=m: out * m.ia3_l[:, 0]))
    take_head(fresh, adapted)
    try:
        return logits(fresh, x)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- IA3Config


@pytest.mark.parametrize("arch,expected,feedforward", [("llama", LLAMA_IA3, {"mlp.down_proj"}),
                                                       ("bert", BERT_IA3, {"attention.output.dense", "output.dense"})])
def test_ia3_targets_counts_forward(arch, expected, feedforward):
    make, x = MODELS[arch]
    model = pk.apply(make(), pk.IA3Config())
    assert wrapped(model, pk.nn.IA3Linear) == expected
    ff = {n for n, m in model.named_modules() if isinstance(m, pk.nn.IA3Linear) and m.feedforward}
    assert {n.split(".", 4 if arch == "bert" else 3)[-1] for n in ff} == feedforward
    ours, theirs = pk.trainable_parameters(model)[0], peft_model(arch).get_nb_trainable_parameters()[0]
    assert ours == theirs == (320 if arch == "llama" else 4 * 32 + 48 - 32 + 3 * 32 + 3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} - {f"{n}.ia3_l" for n in expected} <= {
        "classifier.weight", "classifier.bias"}
    assert torch.equal(logits(model, x), logits(make(), x))
    randomize(model)
    out = logits(model, x)
    assert not torch.allclose(out, logits(make(), x), atol=1e-3)
    assert torch.allclose(out, ia3_reference(make(), model, x), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_ia3_trains_round_trips_through_peft_and_merges(arch, tmp_path):
    make, x = MODELS[arch]
    model = pk.apply(make(), pk.IA3Config())
    randomize(model)
    assert trains(model, x)
    out = logits(model, x)
    # ours -> PEFT's format: PEFT's keys and config, PEFT's logits equal ours
    pk.save_adapter(model, tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3" and "format" not in raw
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_saved = peft_model(arch)
    peft_saved.save_pretrained(tmp_path / "peft")
    assert {k: v.shape for k, v in saved.items()} == {
        k: v.shape for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert torch.allclose(logits(theirs, x), logits(model, x), atol=1e-5)
    assert torch.equal(logits(pk.load_adapter(make(), tmp_path / "ours"), x), logits(model, x))
    # merge: same logits within rounding, unmerge restores the weights
    base = copy.deepcopy({k: v for k, v in model.state_dict().items() if "ia3_l" not in k})
    config = model.peft_kernels_config
    key = next(k for k in base if k.endswith(("k_proj.weight", "key.weight")))
    config.merge(model)
    assert not torch.allclose(model.state_dict()[key], base[key])
    assert torch.allclose(logits(model, x), out, atol=1e-5)
    config.unmerge(model)
    assert all(torch.allclose(v, model.state_dict()[k], atol=1e-6) for k, v in base.items())
    # PEFT -> ours
    trained = peft_model(arch)
    randomize(trained)
    trained.save_pretrained(tmp_path / "theirs")
    ours = pk.load_adapter(make(), tmp_path / "theirs")
    assert isinstance(ours.peft_kernels_config, pk.IA3Config)
    assert torch.allclose(logits(ours, x), logits(trained.eval(), x), atol=1e-5)


def test_ia3_custom_targets_and_bad_input(tmp_path):
    model = pk.apply(tiny_llama(), pk.IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]))
    assert [n for n, m in model.named_modules() if isinstance(m, pk.nn.IA3Linear) and m.feedforward] == [
        f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    assert pk.trainable_parameters(model)[0] == 2 * (64 + 64) == peft.get_peft_model(
        tiny_llama(), peft.IA3Config(target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"])
    ).get_nb_trainable_parameters()[0]
    fresh = tiny_llama()
    with pytest.raises(ValueError, match=r"feedforward_modules must be a subset of target_modules \['k_proj'\]; "
                                         r"\['down_proj'\] are not in it"):
        pk.apply(fresh, pk.IA3Config(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="argument 'feedforward_modules' must be None or a list of module names"):
        pk.IA3Config(feedforward_modules="down_proj")
    assert all(p.requires_grad for p in fresh.parameters()) and not wrapped(fresh, pk.nn.IA3Linear)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.ia3_l[5] = 0.0
    with pytest.raises(ValueError, match="zero entries; merging would not be reversible"):
        layer.merge()
    # a PEFT file for BERT does not load into LLaMA, and a corrupt config is named
    peft_model("bert").save_pretrained(tmp_path)
    llama = tiny_llama()
    with pytest.raises(ValueError, match="match no nn.Linear of LlamaForCausalLM"):
        pk.load_adapter(llama, tmp_path)
    assert not wrapped(llama, pk.nn.IA3Linear)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"target_modules": ".*key"}))
    with pytest.raises(ValueError, match="key 'target_modules' must be a list of module names"):
        pk.load_adapter(tiny_bert_classifier(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw | {"fan_in_fan_out": True}))
    with pytest.raises(ValueError, match="sets fan_in_fan_out=True; only fan_in_fan_out=False is supported"):
        pk.load_adapter(tiny_bert_classifier(), tmp_path)
    # shapes: an adapter of a wider model
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    bert = pk.apply(tiny_bert_classifier(intermediate_size=64), pk.IA3Config())
    before = snapshot(bert)
    with pytest.raises(ValueError, match=r"output.dense.ia3_l has shape \[1, 48\] in the file but \[1, 64\]"):
        pk.load_adapter(bert, tmp_path)
    assert_untouched(bert, before)


# ---------------------------------------------------------------- BitFitConfig


def test_bitfit_bert():
    model = pk.apply(tiny_bert_classifier(), pk.BitFitConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder_biases = {n for n, _ in tiny_bert_classifier().named_parameters() if n.startswith("bert.encoder.")
                      and n.endswith(".bias")}
    assert trainable == encoder_biases | {"classifier.weight", "classifier.bias"}
    assert len(encoder_biases) == 8 and pk.trainable_parameters(model)[0] == 3 * 32 + 32 + 32 + 48 + 32 + 32 + 99
    randomize(model)
    # reference: a fresh model given the same biases and head through its state_dict
    fresh = tiny_bert_classifier()
    fresh.load_state_dict({n: p for n, p in model.named_parameters() if n in trainable}, strict=False)
    x = MODELS["bert"][1]
    assert torch.equal(logits(model, x), logits(fresh, x))
    assert not torch.allclose(logits(model, x), logits(tiny_bert_classifier(), x), atol=1e-3)
    assert trains(model, x)


def test_bitfit_llama_adds_biases(tmp_path):
    model = pk.apply(tiny_llama(), pk.BitFitConfig())
    linears = [n for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 14 and model.lm_head.bias is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.bias" for n in linears}
    assert pk.trainable_parameters(model)[0] == 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64)
    x = MODELS["llama"][1]
    assert torch.equal(logits(model, x), logits(tiny_llama(), x))  # zero biases
    randomize(model)
    fresh = tiny_llama()
    handles = [fresh.get_submodule(n).register_forward_hook(
        lambda mod, args, out, b=model.get_submodule(n).bias: out + b) for n in linears]
    assert torch.allclose(logits(model, x), logits(fresh, x), atol=1e-5)
    for h in handles:
        h.remove()
    assert trains(model, x)
    pk.save_adapter(model, tmp_path)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 14
    loaded = pk.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    with pytest.raises(NotImplementedError, match="trains the model's own biases in place; there is no separate"):
        model.peft_kernels_config.merge(model)


def test_bitfit_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"of LlamaForCausalLM have no bias: nothing to train; pass "
                                         r"BitFitConfig\(add_missing=True\)"):
        pk.apply(model, pk.BitFitConfig(add_missing=False))
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no module of LlamaForCausalLM"):
        pk.apply(model, pk.BitFitConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="argument 'add_missing' must be a bool, got 'yes'"):
        pk.BitFitConfig(add_missing="yes")
    assert all(p.requires_grad for p in model.parameters()) and model.model.layers[0].self_attn.q_proj.bias is None
    # BERT's own biases need nothing added
    bert = pk.apply(tiny_bert_classifier(), pk.BitFitConfig(add_missing=False, target_modules=["attention"]))
    assert pk.trainable_parameters(bert)[0] == 5 * 32 + 99


def test_bitfit_load_into_other_arch(tmp_path):
    pk.save_adapter(pk.apply(tiny_bert_classifier(), pk.BitFitConfig()), tmp_path)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"target_modules \['encoder'\] match no module of LlamaForCausalLM"):
        pk.load_adapter(model, tmp_path)
    assert model.model.layers[0].self_attn.q_proj.bias is None

