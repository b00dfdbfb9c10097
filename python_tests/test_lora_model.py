"""Model-level LoRA on transformers models: apply by module name, trainable counts, save/load in HF PEFT's
format in both directions (same logits as PEFT), merged logits, and clear errors that leave the model intact."""

import json
import os
import pathlib
import pickle

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peft_kernels as pk
from tiny_models import assert_untouched, randomize, snapshot, tiny_bert_classifier, tiny_llama


def lora_weights(name):
    return "lora_" in name


TOKENS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))


def test_apply_targets_and_freezes():
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=4, alpha=8))
    lora = [n for n, m in model.named_modules() if isinstance(m, pk.nn.LoRALinear)]
    assert lora == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable, total = pk.trainable_parameters(model)
    assert trainable == 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4)  # q: 64->64, v: 64->32 (2 kv heads of 16)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable


def test_classification_head_stays_trainable():
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                        vocab_size=50, num_labels=2)
    model = pk.apply(BertForSequenceClassification(config), pk.LoRAConfig(r=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable and any(n.endswith("query.lora_A") for n in trainable)


def test_targets_that_match_nothing():
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no nn.Linear of LlamaForCausalLM"):
        pk.apply(tiny_llama(), pk.LoRAConfig(target_modules=["nope"]))


def test_ours_to_peft_same_logits(tmp_path):
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    pk.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert next(iter(load_file(tmp_path / "adapter_model.safetensors"))).startswith("base_model.model.model.layers.")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(model(TOKENS).logits, theirs(TOKENS).logits, atol=1e-4)


def test_peft_to_ours_same_logits(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                                                               use_rslora=True))
    randomize(theirs, scale=0.1, select=lora_weights, replace=True)
    theirs.save_pretrained(tmp_path)
    ours = pk.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(ours(TOKENS).logits, theirs.eval()(TOKENS).logits, atol=1e-4)


def test_merged_logits_equal_adapter_logits():
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=4))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    with torch.no_grad():
        before = model(TOKENS).logits
        for m in model.modules():
            if isinstance(m, pk.nn.LoRALinear):
                m.merge()
        assert torch.allclose(model(TOKENS).logits, before, atol=1e-4)


def test_failed_load_leaves_model_intact(tmp_path):
    source = pk.apply(tiny_llama(), pk.LoRAConfig(r=4))
    randomize(source, scale=0.1, select=lora_weights, replace=True)
    pk.save_adapter(source, tmp_path)
    target = pk.apply(tiny_llama(), pk.LoRAConfig(r=8))
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"self_attn.q_proj.lora_A has shape \[4, 64\] in the file but \[8, 64\]"):
        pk.load_adapter(target, tmp_path)
    assert_untouched(target, before)
    # a truncated weights file, and a config for another method
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        pk.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "POLY"}))
    with pytest.raises(ValueError, match="peft_type 'POLY', expected 'LORA'"):
        pk.load_adapter(tiny_llama(), tmp_path)


def test_adapter_for_another_architecture(tmp_path):
    source = pk.apply(tiny_llama(), pk.LoRAConfig(r=2))
    pk.save_adapter(source, tmp_path)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=50)
    bert = BertForSequenceClassification(config)
    with pytest.raises(ValueError, match="made for another architecture"):
        pk.load_adapter(bert, tmp_path)
    assert not any(isinstance(m, pk.nn.LoRALinear) for m in bert.modules())


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch, failing):
    """A write that fails midway, of either file, leaves the previous adapter's two files as they were (no
    new weights next to an old config) and no temporary file behind."""
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=2))
    pk.save_adapter(model, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    model.peft_kernels_lora.alpha = 4  # the new config differs too

    def crash(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    if failing == "weights":
        monkeypatch.setattr("peft_kernels.lora.save_file", lambda tensors, path, metadata=None: crash(path))
    else:
        monkeypatch.setattr(pathlib.Path, "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        pk.save_adapter(model, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def corrupt(tmp_path, how):
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    if how == "one-byte-short":
        path.write_bytes(data[:-1])
    elif how == "header-length":
        path.write_bytes((1 << 60).to_bytes(8, "little") + data[8:])
    elif how == "header-json":
        path.write_bytes(data[:8] + data[8:8 + header].replace(b'"', b"'") + data[8 + header:])
    elif how == "offsets":
        path.write_bytes(data[:8] + data[8:8 + header].replace(b'"data_offsets":[0,', b'"data_offsets":[9,') + data[8 + header:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    elif how == "nan":
        tensors = load_file(path)
        tensors[next(iter(tensors))][0, 0] = float("nan")
        save_file(tensors, path)
    elif how == "integer":
        save_file({k: v.to(torch.int8) for k, v in load_file(path).items()}, path)


@pytest.mark.parametrize("how", ["one-byte-short", "header-length", "header-json", "offsets", "empty", "missing",
                                 "nan", "integer"])
def test_corrupt_weights_are_refused_and_nothing_is_loaded(tmp_path, how):
    """A damaged adapter_model.safetensors: a clear ValueError naming the file, and the model (no LoRA yet, so
    load_adapter would apply it) left exactly as it was: no LoRA module added, nothing frozen, no value changed.
    (A file truncated to half: test_failed_load_leaves_model_intact.)"""
    source = pk.apply(tiny_llama(), pk.LoRAConfig(r=4))
    randomize(source, scale=0.1, select=lora_weights, replace=True)
    pk.save_adapter(source, tmp_path)
    corrupt(tmp_path, how)
    target = tiny_llama(seed=1)
    before = snapshot(target)
    message = {"nan": "must hold finite floating-point values, got a torch.float32 tensor with NaN",
               "integer": "must hold finite floating-point values, got a torch.int8 tensor"}.get(how, "cannot read .*adapter_model.safetensors")
    with pytest.raises(ValueError, match=message):
        pk.load_adapter(target, tmp_path)
    assert_untouched(target, before)


class _Boom:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(os.environ["PEFT_KERNELS_TEST_MARKER"]),))


def test_pickles_are_never_loaded(tmp_path, monkeypatch):
    """Only safetensors is read: an adapter_model.bin (PEFT's old pickle format) whose unpickling would create
    a file is ignored; the missing safetensors file is the error."""
    pk.save_adapter(pk.apply(tiny_llama(), pk.LoRAConfig(r=2)), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("PEFT_KERNELS_TEST_MARKER", str(marker))
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match="cannot read .*adapter_model.safetensors"):
        pk.load_adapter(tiny_llama(), tmp_path)
    assert not marker.exists()


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unknown_config_keys_are_ignored_with_a_warning(tmp_path):
    """Keys neither HF PEFT 0.21 nor we know (a newer PEFT's) load with a warning naming them, as PEFT does;
    PEFT's own metadata and init-only keys (peft_version, loftq_config, ...) load silently."""
    source = pk.apply(tiny_llama(), pk.LoRAConfig(r=4))
    randomize(source, scale=0.1, select=lora_weights, replace=True)
    pk.save_adapter(source, tmp_path)
    edit_config(tmp_path, future_option={"x": 1}, peft_version="0.99.0", loftq_config={}, eva_config=None,
                init_lora_weights="gaussian", layers_pattern="layers")
    with pytest.warns(UserWarning, match=r"keys this loader does not know, ignored: \['future_option'\]"):
        loaded = pk.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, source(TOKENS).logits)


UNSUPPORTED = [
    dict(use_dora=True), dict(fan_in_fan_out=True), dict(bias="lora_only"), dict(rank_pattern={"q_proj": 8}),
    dict(alpha_pattern={"v_proj": 32}), dict(layers_to_transform=[0]), dict(exclude_modules=["layers.1.q_proj"]),
    dict(lora_bias=True), dict(trainable_token_indices=[1, 2]), dict(layer_replication=[[0, 2]]),
    dict(use_qalora=True), dict(target_parameters=["mlp.experts.weight"]),
]
BAD_VALUES = [
    (dict(peft_type="POLY"), "peft_type 'POLY', expected 'LORA' \\(or 'LOKR'\\)"),
    (dict(peft_type="LOKR"), "a LoKr config needs an int 'r' >= 1 and a number 'alpha'"),
    (dict(r=None), "key 'r' must be an int >= 1, got None"),
    (dict(r=0), "key 'r' must be an int >= 1, got 0"),
    (dict(lora_alpha="16"), "key 'lora_alpha' must be a number, got '16'"),
    (dict(lora_dropout=1.0), r"key 'lora_dropout' must be a number in \[0, 1\), got 1.0"),
    (dict(target_modules="q_proj|v_proj"), "key 'target_modules' must be a non-empty list of module names"),
    (dict(use_rslora="yes"), "key 'use_rslora' must be a bool"),
]


@pytest.mark.parametrize("change,message", [(c, f"sets {next(iter(c))}=") for c in UNSUPPORTED] + BAD_VALUES,
                         ids=[next(iter(c)) for c in UNSUPPORTED] + [f"bad-{next(iter(c))}" for c, _ in BAD_VALUES])
def test_unsupported_config_is_refused_and_nothing_is_loaded(tmp_path, change, message):
    """A PEFT feature this loader does not implement, or a malformed value: ValueError naming the key, the model
    untouched (these used to surface as a KeyError, or mid-apply after LoRA modules were added)."""
    pk.save_adapter(pk.apply(tiny_llama(), pk.LoRAConfig(r=4)), tmp_path)
    edit_config(tmp_path, **change)
    target = tiny_llama()
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        pk.load_adapter(target, tmp_path)
    assert_untouched(target, before)


def test_rank_mismatch_into_a_model_without_lora_adds_nothing(tmp_path):
    """The config says r=8 but the file holds rank-4 tensors: the shapes are checked against what apply would
    create, before it runs (load_adapter used to apply LoRA first and leave it behind on this error)."""
    pk.save_adapter(pk.apply(tiny_llama(), pk.LoRAConfig(r=4)), tmp_path)
    edit_config(tmp_path, r=8)
    target = tiny_llama()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"self_attn.q_proj.lora_A has shape \[4, 64\] in the file but \[8, 64\]"):
        pk.load_adapter(target, tmp_path)
    assert_untouched(target, before)


def test_same_names_other_sizes_adds_nothing(tmp_path):
    """An adapter for a LLaMA of another width (same module names, other shapes): ValueError, nothing added."""
    pk.save_adapter(pk.apply(tiny_llama(), pk.LoRAConfig(r=4)), tmp_path)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101))
    before = snapshot(wider)
    with pytest.raises(ValueError, match=r"lora_A has shape \[4, 64\] in the file but \[4, 96\]"):
        pk.load_adapter(wider, tmp_path)
    assert_untouched(wider, before)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_decoder_layer(dropout):
    """A LoRA-wrapped LLaMA decoder layer compiles with fullgraph=True (no graph break, the per-step dropout seed
    included) and, without dropout, matches eager in values and gradients."""
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=4, dropout=dropout))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    layer = model.model.layers[0].train()
    h = torch.randn(2, 9, 64, requires_grad=True)
    position_embeddings = model.model.rotary_emb(h, torch.arange(9)[None].expand(2, -1))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(h, position_embeddings=position_embeddings)
    grads = torch.autograd.grad(out.sum(), [h, layer.self_attn.q_proj.lora_A])
    if dropout == 0.0:
        eager = layer(h, position_embeddings=position_embeddings)
        assert torch.allclose(out, eager, atol=1e-5)
        for a, b in zip(grads, torch.autograd.grad(eager.sum(), [h, layer.self_attn.q_proj.lora_A])):
            assert torch.allclose(a, b, atol=1e-4)
    else:
        assert all(torch.isfinite(g).all() for g in grads)


def test_trained_head_round_trips_with_peft(tmp_path):
    """A fresh classification head trains with the adapter and is saved as PEFT's modules_to_save: PEFT loads
    both and gives our logits; our load restores them into a new model."""
    model = pk.apply(tiny_bert_classifier(), pk.LoRAConfig(r=2))
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    with torch.no_grad():
        model.classifier.weight.normal_()
        model.classifier.bias.normal_()
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(4))
    ours = model(tokens).logits
    pk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path).eval()
    assert torch.allclose(theirs(tokens).logits, ours, atol=1e-5)
    loaded = pk.load_adapter(tiny_bert_classifier(), tmp_path)
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
    assert torch.allclose(loaded(tokens).logits, ours, atol=1e-6)


def test_peft_head_loads_here(tmp_path):
    source = peft.get_peft_model(tiny_bert_classifier(), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                                        task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in source.named_parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    source.eval()
    tokens = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(5))
    source.save_pretrained(tmp_path)
    ours = pk.load_adapter(tiny_bert_classifier(), tmp_path)
    assert torch.allclose(ours(tokens).logits, source(tokens).logits, atol=1e-5)


def test_save_refuses_a_partly_trainable_module(tmp_path):
    model = pk.apply(tiny_bert_classifier(), pk.LoRAConfig(r=2))
    model.classifier.bias.requires_grad_(False)
    with pytest.raises(NotImplementedError, match=r"classifier.weight is trainable but other parameters of classifier"):
        pk.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_new_modules_take_the_model_mode():
    """A LoRA layer put into a model in eval mode is in eval mode (its dropout off), and one put into a model in
    training mode trains."""
    model = pk.apply(tiny_llama().eval(), pk.LoRAConfig(r=2, dropout=0.5))
    layers = [m for m in model.modules() if isinstance(m, pk.nn.LoRALinear)]
    assert layers and not any(m.training for m in layers)
    randomize(model, scale=0.1, select=lora_weights, replace=True)
    assert torch.equal(model(TOKENS).logits, model(TOKENS).logits)
    trained = pk.apply(tiny_llama().train(), pk.LoRAConfig(r=2, dropout=0.5))
    assert all(m.training for m in trained.modules() if isinstance(m, pk.nn.LoRALinear))
