"""Model-level LoRA on transformers models: apply by module name, trainable counts, save/load in HF PEFT's
format in both directions (same logits as PEFT), merged logits, and clear errors that leave the model intact."""

import copy
import json
import os

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peft_kernels as pk


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    return LlamaForCausalLM(config).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


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
    randomize_adapters(model)
    pk.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert next(iter(load_file(tmp_path / "adapter_model.safetensors"))).startswith("base_model.model.model.layers.")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(model(TOKENS).logits, theirs(TOKENS).logits, atol=1e-4)


def test_peft_to_ours_same_logits(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                                                               use_rslora=True))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = pk.load_adapter(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(ours(TOKENS).logits, theirs.eval()(TOKENS).logits, atol=1e-4)


def test_merged_logits_equal_adapter_logits():
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=4))
    randomize_adapters(model)
    with torch.no_grad():
        before = model(TOKENS).logits
        for m in model.modules():
            if isinstance(m, pk.nn.LoRALinear):
                m.merge()
        assert torch.allclose(model(TOKENS).logits, before, atol=1e-4)


def test_failed_load_leaves_model_intact(tmp_path):
    source = pk.apply(tiny_llama(), pk.LoRAConfig(r=4))
    randomize_adapters(source)
    pk.save_adapter(source, tmp_path)
    target = pk.apply(tiny_llama(), pk.LoRAConfig(r=8))
    state = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"self_attn.q_proj.lora_A has shape \[4, 64\] in the file but \[8, 64\]"):
        pk.load_adapter(target, tmp_path)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())
    # a truncated weights file, and a config for another method
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        pk.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'IA3', expected 'LORA'"):
        pk.load_adapter(tiny_llama(), tmp_path)


def test_adapter_for_another_architecture(tmp_path):
    source = pk.apply(tiny_llama(), pk.LoRAConfig(r=2))
    pk.save_adapter(source, tmp_path)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, vocab_size=50)
    bert = BertForSequenceClassification(config)
    with pytest.raises(ValueError, match="made for another architecture"):
        pk.load_adapter(bert, tmp_path)
    assert not any(isinstance(m, pk.nn.LoRALinear) for m in bert.modules())


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=2))
    pk.save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("peft_kernels.lora.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pk.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_decoder_layer(dropout):
    """A LoRA-wrapped LLaMA decoder layer compiles with fullgraph=True (no graph break, the per-step dropout seed
    included) and, without dropout, matches eager in values and gradients."""
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=4, dropout=dropout))
    randomize_adapters(model)
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


def tiny_bert_classifier(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                        vocab_size=50, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_trained_head_round_trips_with_peft(tmp_path):
    """A fresh classification head trains with the adapter and is saved as PEFT's modules_to_save: PEFT loads
    both and gives our logits; our load restores them into a new model."""
    model = pk.apply(tiny_bert_classifier(), pk.LoRAConfig(r=2))
    randomize_adapters(model)
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
