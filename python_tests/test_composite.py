"""Hybrid methods on the tiny LLaMA and BERT models: CompositeConfig (several methods on one model), S4Config
(spindle layer groups), SparseAdapterConfig (pruned bottleneck adapters) and AdapterFusionConfig. Logits are
checked against plain-torch references built with hooks on an untouched copy of the model."""

import json

import pytest
import torch
import torch.nn.functional as F

import peft_kernels as pk
import tiny_models
from peft_kernels.composite import default_s4_assignment, kept_weights, spindle_split
from tiny_models import (BERT_VOCAB, LLAMA_VOCAB, assert_untouched, snapshot, tiny_bert_classifier, tiny_llama,
                         tokens)

LLAMA_TOKENS, BERT_TOKENS = tokens(LLAMA_VOCAB), tokens(BERT_VOCAB)
LABELS = torch.tensor([0, 2])
MODELS = {"llama": (tiny_llama, LLAMA_TOKENS), "bert": (tiny_bert_classifier, BERT_TOKENS)}


def randomize(model, seed=1):
    """Noise on every trainable parameter (zero-initialised LoRA B / adapter ups included): every test can fail.
    Pruned SparseAdapter weights stay zero."""
    def pruning_mask(name):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        return module.mask if isinstance(module, pk.nn.MaskedLinear) and leaf == "weight" else None

    tiny_models.randomize(model, seed, mask=pruning_mask)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def loss(model, x):
    return model(x, labels=x if x is LLAMA_TOKENS else LABELS).loss


def train(model, x, steps=5, **kwargs):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **kwargs)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        value = loss(model, x)
        value.backward()
        opt.step()
        losses.append(value.item())
    model.eval()
    return losses


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def of_kind(model, kind):
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


# ---------------------------------------------------------------- plain-torch reference


def ref_adapter(adapter, h):
    """scaling * up(relu(down(h))) from the adapter's weights (masked ones: the stored weights, zero where pruned)."""
    down = F.relu(h @ adapter.down.weight.T + adapter.down.bias)
    return adapter.scaling * (down @ adapter.up.weight.T + adapter.up.bias)


def reference_logits(fresh, adapted, x):
    """Logits of the untouched ``fresh`` with every method of ``adapted`` reproduced: trained biases copied in
    (BitFit; a wrapper's ``.base.`` dropped from the name), LoRA / IA3 / Hadamard / adapters added by hooks."""
    if hasattr(fresh, "classifier"):
        fresh.classifier.load_state_dict(adapted.classifier.state_dict())
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith(".bias") and ".adapter." not in name and ".adapters." not in name \
                    and ".fusion." not in name:
                module = fresh.get_submodule(name.replace(".base.", ".").rpartition(".")[0])
                module.bias = torch.nn.Parameter(p.detach().clone())
    handles = []

    def hook(name, fn):
        handles.append(fresh.get_submodule(name).register_forward_hook(fn))

    for name, m in adapted.named_modules():
        if isinstance(m, pk.nn.LoRALinear):
            hook(name, lambda mod, args, out, m=m: out + m.scaling * (args[0] @ m.lora_A.T @ m.lora_B.T))
        elif isinstance(m, pk.nn.IA3Linear):
            if m.feedforward:
                hook(name, lambda mod, args, out, m=m: F.linear(args[0] * m.ia3_l, mod.weight, mod.bias))
            else:
                hook(name, lambda mod, args, out, m=m: out * m.ia3_l.reshape(-1))
        elif isinstance(m, pk.nn.HadamardLinear):
            hook(name, lambda mod, args, out, m=m: out * m.hadamard_weight + m.hadamard_bias)
        elif isinstance(m, pk.nn.SequentialAdapter):
            hook(name, lambda mod, args, out, m=m: out + ref_adapter(m.adapter, out))
        elif isinstance(m, pk.nn.FusedAdapters):
            hook(name, lambda mod, args, out, m=m: ref_fusion(m, out))
    try:
        return logits(fresh, x)
    finally:
        for h in handles:
            h.remove()


def ref_fusion(fused, h):
    z = [h + ref_adapter(a, h) for a in fused.adapters]
    f = fused.fusion
    q = h @ f.query.weight.T + f.query.bias
    keys = [zn @ f.key.weight.T + f.key.bias for zn in z]
    values = [zn @ f.value.weight.T + f.value.bias for zn in z]
    scores = torch.stack([(k * q).sum(-1) for k in keys], -1)
    w = torch.exp(scores - scores.max(-1, keepdim=True).values)
    w = w / w.sum(-1, keepdim=True)
    return sum(w[..., n:n + 1] * values[n] for n in range(len(values)))


# ---------------------------------------------------------------- CompositeConfig


def llama_composite():
    return pk.CompositeConfig(parts=[pk.LoRAConfig(r=4), pk.AdapterConfig(bottleneck=8, placement="pfeiffer"),
                                     pk.IA3Config(target_modules=["k_proj"], feedforward_modules=[])])


def bert_composite():
    return pk.CompositeConfig(parts=[pk.LoRAConfig(r=4), pk.AdapterConfig(bottleneck=8, placement="pfeiffer"),
                                     pk.BitFitConfig()])


COMPOSITES = {"llama": llama_composite, "bert": bert_composite}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_composite_modules_counts_and_forward(arch):
    make, x = MODELS[arch]
    model = pk.apply(make(), COMPOSITES[arch]())
    layers = range(2) if arch == "llama" else range(1)
    if arch == "llama":
        lora = [f"model.layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "v_proj")]
        adapters = [f"model.layers.{i}.mlp.down_proj" for i in layers]
        assert of_kind(model, pk.nn.IA3Linear) == [f"model.layers.{i}.self_attn.k_proj" for i in layers]
        # LoRA r=4: q 4·(64+64), v 4·(64+32); adapter 2·64·8+8+64; IA3 k: 32 per layer
        assert pk.trainable_parameters(model)[0] == 2 * (512 + 384 + 1096 + 32)
    else:
        lora = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
        adapters = ["bert.encoder.layer.0.output.dense"]
        biases = {n for n, _ in make().named_parameters() if n.startswith("bert.encoder.") and n.endswith(".bias")}
        assert len(biases) == 8  # q, k, v, attention dense + LayerNorm, intermediate, output dense + LayerNorm
        # LoRA 2·4·(32+32) + adapter 2·32·8+8+32 + the encoder's biases + head 3·32+3
        assert pk.trainable_parameters(model)[0] == 512 + 552 + sum(
            p.numel() for n, p in make().named_parameters() if n in biases) + 99
        bitfit = model.peft_kernels_config._layout[2]["parameters"]
        assert "bert.encoder.layer.0.attention.self.query.bias" in bitfit  # trains the LoRALinear's bias
        assert not any(".adapter." in n for n in bitfit)  # the adapter's biases stay the adapter part's
    assert of_kind(model, pk.nn.LoRALinear) == lora
    assert of_kind(model, pk.nn.SequentialAdapter) == adapters
    config = model.peft_kernels_config
    assert isinstance(config, pk.CompositeConfig) and not hasattr(model, "peft_kernels_lora")
    assert [type(p) for p in config._parts] == [type(p) for p in COMPOSITES[arch]().parts]
    owned = [n for group in config._layout for n in group["parameters"]]
    assert len(owned) == len(set(owned)) and set(owned) == trainable_names(model)
    allowed = (".lora_", ".adapter.", ".ia3_l", "classifier.", ".bias")
    assert all(any(a in n for a in allowed) for n in trainable_names(model))
    randomize(model)
    out = logits(model, x)
    assert not torch.allclose(out, logits(make(), x), atol=1e-3)
    assert torch.allclose(out, reference_logits(make(), model, x), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_composite_trains_saves_and_loads(arch, tmp_path):
    make, x = MODELS[arch]
    model = pk.apply(make(), COMPOSITES[arch]())
    randomize(model)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, x)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    pk.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "PEFT_KERNELS_COMPOSITE"
    assert [p["peft_type"] for p in raw["config"]["parts"]] == ["LORA", "PEFT_KERNELS_ADAPTER",
                                                                "IA3" if arch == "llama" else "PEFT_KERNELS_BITFIT"]
    loaded = pk.load_adapter(make(), tmp_path)
    assert loaded.peft_kernels_config == model.peft_kernels_config
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert trainable_names(loaded) == trainable_names(model)


def test_composite_merge_and_unmerge():
    x = LLAMA_TOKENS
    parts = [pk.LoRAConfig(r=4), pk.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
             pk.HadamardAdapterConfig(), pk.BitFitConfig(target_modules=["up_proj"])]
    model = pk.apply(tiny_llama(), pk.CompositeConfig(parts=parts))
    randomize(model)
    before = logits(model, x)
    weights = {n: p.clone() for n, p in model.named_parameters() if n.endswith("weight")}
    model.peft_kernels_config.merge(model)
    assert all(m.merged for m in model.modules() if hasattr(m, "merged"))
    assert torch.allclose(logits(model, x), before, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        model.peft_kernels_config.merge(model)
    model.peft_kernels_config.unmerge(model)
    assert torch.allclose(logits(model, x), before, atol=1e-5)
    assert all(torch.allclose(p, weights[n], atol=1e-6) for n, p in model.named_parameters() if n in weights)


def test_composite_merge_raises_for_adapters_or_skips_them():
    x = LLAMA_TOKENS
    model = pk.apply(tiny_llama(), pk.CompositeConfig(parts=[pk.AdapterConfig(bottleneck=8), pk.LoRAConfig(r=4)]))
    randomize(model)
    before = logits(model, x)
    with pytest.raises(NotImplementedError, match=r"part 0 \(AdapterConfig\) cannot be folded"):
        model.peft_kernels_config.merge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, pk.nn.LoRALinear))
    model.peft_kernels_config.merge(model, skip_unmergeable=True)
    assert all(m.merged for m in model.modules() if isinstance(m, pk.nn.LoRALinear))
    assert torch.allclose(logits(model, x), before, atol=1e-5)


def test_composite_overlap_raises_before_touching_the_model():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"part 0 \(LoRAConfig\) and part 1 \(IA3Config\) both target the module "
                                         r"model.layers.0.self_attn.v_proj"):
        pk.apply(model, pk.CompositeConfig(parts=[pk.LoRAConfig(), pk.IA3Config()]))
    with pytest.raises(ValueError, match=r"part 0 \(AdapterConfig\) and part 1 \(IA3Config\) both target the module "
                                         r"model.layers.0.mlp.down_proj"):
        pk.apply(model, pk.CompositeConfig(parts=[pk.AdapterConfig(), pk.IA3Config(target_modules=["down_proj"],
                                                                                   feedforward_modules=[])]))
    with pytest.raises(ValueError, match=r"part 0 \(BitFitConfig\) and part 1 \(BitFitConfig\) both target the "
                                         r"parameter model.layers.0.mlp.up_proj.bias|both target the parameter"):
        pk.apply(tiny_bert_classifier(), pk.CompositeConfig(parts=[pk.BitFitConfig(), pk.BitFitConfig()]))
    with pytest.raises(ValueError, match=r"part 1 \(LoRAConfig\) replaces module model.layers.0.self_attn.q_proj, "
                                         r"whose parameter .*q_proj.bias part 0 \(BitFitConfig\) trains; put "
                                         "BitFitConfig after LoRAConfig"):
        pk.apply(model, pk.CompositeConfig(parts=[pk.BitFitConfig(), pk.LoRAConfig()]))
    with pytest.raises(ValueError, match=r"part 1 \(AdapterConfig\): apply: target_modules \['nope'\] match no module"):
        pk.apply(model, pk.CompositeConfig(parts=[pk.LoRAConfig(), pk.AdapterConfig(target_modules=["nope"])]))
    assert_untouched(model, before)
    assert pk.nn.LoRALinear not in map(type, model.modules())


def test_composite_bad_input():
    with pytest.raises(ValueError, match=r"CompositeConfig: argument 'parts' must be a non-empty list"):
        pk.CompositeConfig(parts=[])
    with pytest.raises(ValueError, match=r"argument 'parts'\[1\] must be a method config .* got str"):
        pk.CompositeConfig(parts=[pk.LoRAConfig(), "ia3"])
    with pytest.raises(ValueError, match=r"argument 'parts'\[0\] must be a method config .* got QLoRAConfig"):
        pk.CompositeConfig(parts=[pk.QLoRAConfig()])
    with pytest.raises(ValueError, match=r"got CompositeConfig"):
        pk.CompositeConfig(parts=[pk.CompositeConfig(parts=[pk.LoRAConfig()])])
    with pytest.raises(ValueError, match=r"LoRAConfig has no fields \['rank'\]"):
        pk.CompositeConfig(parts=[{"peft_type": "LORA", "config": {"rank": 4}}])
    model = pk.apply(tiny_llama(), pk.LoRAConfig())
    with pytest.raises(ValueError, match="the model already carries a LoRAConfig"):
        pk.apply(model, pk.CompositeConfig(parts=[pk.IA3Config(target_modules=["k_proj"], feedforward_modules=[])]))
    with pytest.raises(ValueError, match="carries no CompositeConfig"):
        pk.CompositeConfig(parts=[pk.LoRAConfig()]).merge(tiny_llama())


# ---------------------------------------------------------------- S4Config


def test_spindle_split():
    assert spindle_split(12, 4) == [2, 4, 4, 2]
    assert spindle_split(24, 4) == [4, 8, 8, 4]
    assert spindle_split(8, 4) == [1, 3, 3, 1]
    assert spindle_split(4, 4) == [1, 1, 1, 1]
    assert spindle_split(6, 4) == [1, 2, 2, 1]
    assert spindle_split(7, 2) == [4, 3]
    for n in range(3, 40):
        for g in range(1, 6):
            if n >= g:
                sizes = spindle_split(n, g)
                assert sum(sizes) == n and min(sizes) >= 1 and (g < 3 or sizes[0] <= min(sizes[1:-1]))
    with pytest.raises(ValueError, match=r"argument 'num_layers' must be an int >= groups \(4\), got 2"):
        spindle_split(2, 4)


def layer_of(name):
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "layer") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


@pytest.mark.parametrize("arch,layers", [("llama", 8), ("bert", 4)])
def test_s4_groups_default_assignment_forward_train_save_load(arch, layers, tmp_path):
    make = (lambda: tiny_llama(num_hidden_layers=8)) if arch == "llama" else (
        lambda: tiny_bert_classifier(num_hidden_layers=4))
    x = MODELS[arch][1]
    model = pk.apply(make(), pk.S4Config())
    config = model.peft_kernels_config
    container = "model.layers" if arch == "llama" else "bert.encoder.layer"
    groups = [[0], [1, 2, 3], [4, 5, 6], [7]] if arch == "llama" else [[0], [1], [2], [3]]
    assert config.group_layers(model) == [[f"{container}.{i}" for i in g] for g in groups]
    kinds = [type(p).__name__ for p in config._parts]
    assert kinds == ["AdapterConfig", "LoRAConfig"] * 2 + ["AdapterConfig", "LoRAConfig", "BitFitConfig"] * 2
    # every layer: Houlsby adapters and LoRA on q/v; BitFit biases only in the groups G3, G4
    expected_adapters = 2 * layers
    assert len(of_kind(model, pk.nn.SequentialAdapter)) == expected_adapters
    assert len(of_kind(model, pk.nn.LoRALinear)) == 2 * layers
    parts_layers = [{layer_of(n) for n in group["parameters"]} for group in config._layout[:-1]]
    group_of_part = [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]
    for g, used in zip(group_of_part, parts_layers):
        assert used == set(groups[g])
    bitfit_layers = {layer_of(n) for n in trainable_names(model)
                     if n.endswith(".bias") and ".adapter." not in n and layer_of(n) is not None}
    assert bitfit_layers == set(groups[2] + groups[3])
    randomize(model)
    out = logits(model, x)
    assert torch.allclose(out, reference_logits(make(), model, x), atol=1e-5)
    losses = train(model, x)
    assert losses[-1] < losses[0]
    pk.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "PEFT_KERNELS_S4" and len(raw["config"]["assignment"]) == 4
    loaded = pk.load_adapter(make(), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_s4_custom_assignment_with_ia3_and_merge():
    x = LLAMA_TOKENS
    assignment = [[pk.LoRAConfig(r=2)], [pk.IA3Config()], [pk.LoRAConfig(r=4, target_modules=["o_proj"])],
                  [pk.HadamardAdapterConfig(), pk.BitFitConfig(target_modules=["mlp"])]]
    model = pk.apply(tiny_llama(num_hidden_layers=8), pk.S4Config(assignment=assignment))
    ia3 = of_kind(model, pk.nn.IA3Linear)
    assert {layer_of(n) for n in ia3} == {1, 2, 3} and len(ia3) == 9
    assert [n for n in ia3 if model.get_submodule(n).feedforward] == [f"model.layers.{i}.mlp.down_proj" for i in (1, 2, 3)]
    assert {layer_of(n) for n in of_kind(model, pk.nn.HadamardLinear)} == {7}
    randomize(model)
    before = logits(model, x)
    assert torch.allclose(before, reference_logits(tiny_llama(num_hidden_layers=8), model, x), atol=1e-5)
    model.peft_kernels_config.merge(model)
    assert torch.allclose(logits(model, x), before, atol=1e-5)
    model.peft_kernels_config.unmerge(model)
    assert torch.allclose(logits(model, x), before, atol=1e-5)


def test_s4_bad_input():
    with pytest.raises(ValueError, match=r"S4Config: argument 'groups' must be an int >= 1, got 0"):
        pk.S4Config(groups=0)
    with pytest.raises(ValueError, match=r"argument 'assignment' must be None or a list of 4 non-empty lists"):
        pk.S4Config(assignment=[[pk.LoRAConfig()]])
    with pytest.raises(ValueError, match=r"has 2 layers, fewer than groups=4"):
        pk.apply(tiny_llama(), pk.S4Config())
    assert len(default_s4_assignment(3)) == 3
    model = tiny_llama(num_hidden_layers=8)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"group 0 .*LoRAConfig's target_modules \['lm_head'\] match nothing inside"):
        pk.apply(model, pk.S4Config(assignment=[[pk.LoRAConfig(target_modules=["lm_head"])]] + [[pk.LoRAConfig()]] * 3))
    assert_untouched(model, before)


# ---------------------------------------------------------------- SparseAdapterConfig


def masked(model):
    return [m for m in model.modules() if isinstance(m, pk.nn.MaskedLinear)]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_sparse_adapter_magnitude_global_and_layer(arch):
    make, x = MODELS[arch]
    model = pk.apply(make(), pk.SparseAdapterConfig(bottleneck=16, sparsity=0.5))
    adapters = of_kind(model, pk.nn.SequentialAdapter)
    assert len(adapters) == (4 if arch == "llama" else 2)
    layers = masked(model)
    kept, total = kept_weights(model)
    assert kept == total // 2
    assert all(torch.equal(m.weight == 0, m.mask == 0) for m in layers)
    # global magnitude: every kept |w| is >= every pruned one, over all matrices together
    reference = pk.apply(make(), pk.SparseAdapterConfig(bottleneck=16, sparsity=0.0))
    initial = torch.cat([m.weight.abs().flatten() for m in masked(reference)])
    mask = torch.cat([m.mask.flatten() for m in layers]).bool()
    assert initial[mask].min() >= initial[~mask].max()
    per_layer = pk.apply(make(), pk.SparseAdapterConfig(bottleneck=16, sparsity=0.5, scope="layer"))
    assert all(int(m.mask.sum()) == m.mask.numel() // 2 for m in masked(per_layer))
    head = 3 * 32 + 3 if arch == "bert" else 0
    d = 64 if arch == "llama" else 32
    assert pk.trainable_parameters(model)[0] == len(adapters) * (2 * d * 16 + 16 + d) + head
    assert all(".adapter." in n or n.startswith("classifier.") for n in trainable_names(model))
    randomize(model)
    assert torch.allclose(logits(model, x), reference_logits(make(), model, x), atol=1e-5)


def test_sparse_adapter_snip_matches_independent_scores():
    x = LLAMA_TOKENS
    batches = [{"input_ids": x, "labels": x}, {"input_ids": tokens(LLAMA_VOCAB, seed=5), "labels": x}]
    model = pk.apply(tiny_llama(), pk.SparseAdapterConfig(bottleneck=16, sparsity=0.6, score="snip", batches=batches))
    dense = pk.apply(tiny_llama(), pk.SparseAdapterConfig(bottleneck=16, sparsity=0.0))
    weights = [m.weight for m in masked(dense)]
    for batch in batches:
        dense(**batch).loss.backward()
    scores = torch.cat([(w * w.grad).abs().flatten() for w in weights])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores.topk(round(0.4 * scores.numel())).indices] = True
    assert torch.equal(torch.cat([m.mask.flatten() for m in masked(model)]).bool(), keep)
    magnitude = pk.apply(tiny_llama(), pk.SparseAdapterConfig(bottleneck=16, sparsity=0.6))
    assert not torch.equal(torch.cat([m.mask.flatten() for m in masked(magnitude)]).bool(), keep)
    custom = pk.apply(tiny_llama(), pk.SparseAdapterConfig(bottleneck=16, sparsity=0.6, score="snip", batches=[x, x],
                                                           loss_fn=lambda m, b: m(b, labels=b).loss))
    assert kept_weights(custom)[0] == round(0.4 * kept_weights(custom)[1])


def test_sparse_adapter_pruned_weights_stay_zero_and_large_sparse(tmp_path):
    x = LLAMA_TOKENS
    # Large-Sparse: 4x the bottleneck at 75% sparsity keeps as many weights as a dense bottleneck of 16
    model = pk.apply(tiny_llama(), pk.SparseAdapterConfig(bottleneck=64, sparsity=0.75))
    dense_count = 4 * 2 * 64 * 16
    assert kept_weights(model) == (dense_count, 4 * dense_count)
    masks = [m.mask.clone() for m in masked(model)]
    losses = train(model, x, steps=6, weight_decay=0.1)
    assert losses[-1] < losses[0]
    for m, mask in zip(masked(model), masks):
        assert torch.equal(m.mask, mask)
        assert torch.all(m.weight[mask == 0] == 0) and torch.all(m.weight[mask == 1] != 0)
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(tiny_llama(), tmp_path)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(masked(loaded), masked(model)))
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_sparse_adapter_snip_saves_and_loads_without_batches(tmp_path):
    x = BERT_TOKENS
    batches = [{"input_ids": x, "labels": LABELS}]
    model = pk.apply(tiny_bert_classifier(), pk.SparseAdapterConfig(bottleneck=16, score="snip", batches=batches))
    randomize(model)
    pk.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["config"]["score"] == "snip" and "batches" not in raw["config"]
    loaded = pk.load_adapter(tiny_bert_classifier(), tmp_path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    with pytest.raises(NotImplementedError, match="cannot be folded"):
        model.peft_kernels_config.merge(model)


def test_sparse_adapter_in_a_composite_saves_its_masks(tmp_path):
    x = LLAMA_TOKENS
    config = pk.CompositeConfig(parts=[pk.LoRAConfig(r=4), pk.SparseAdapterConfig(bottleneck=16, placement="pfeiffer")])
    model = pk.apply(tiny_llama(), config)
    assert len(model.peft_kernels_config._layout[1]["buffers"]) == 4
    randomize(model)
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(tiny_llama(), tmp_path)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(masked(loaded), masked(model)))
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_sparse_adapter_bad_input():
    for kwargs, match in [({"sparsity": 1.0}, r"argument 'sparsity' must be a number in \[0, 1\), got 1.0"),
                          ({"score": "random"}, r"argument 'score' must be 'magnitude' or 'snip', got 'random'"),
                          ({"scope": "net"}, r"argument 'scope' must be 'global' or 'layer'"),
                          ({"loss_fn": 3}, r"argument 'loss_fn' must be None or a callable")]:
        with pytest.raises(ValueError, match=match):
            pk.SparseAdapterConfig(**kwargs)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"score='snip' needs argument 'batches'"):
        pk.apply(model, pk.SparseAdapterConfig(score="snip"))
    with pytest.raises(ValueError, match=r"batches\[0\] must be a dict of model inputs"):
        pk.apply(model, pk.SparseAdapterConfig(score="snip", batches=[LLAMA_TOKENS]))
    assert_untouched(model, before)
    assert not masked(model)
    with pytest.raises(ValueError, match=r"argument 'keep' must be a bool tensor of shape \[4, 3\]"):
        pk.nn.MaskedLinear(3, 4).prune_(torch.ones(4, 3))


# ---------------------------------------------------------------- AdapterFusionConfig


def task_adapter(make, directory, seed, placement="pfeiffer"):
    model = pk.apply(make(), pk.AdapterConfig(bottleneck=8, placement=placement))
    randomize(model, seed)
    pk.save_adapter(model, directory)
    return model


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_fusion_of_one_adapter_equals_it(arch, tmp_path):
    make, x = MODELS[arch]
    task = task_adapter(make, tmp_path / "a", 1)
    model = pk.apply(make(), pk.AdapterFusionConfig(adapters=[str(tmp_path / "a")], train_task_head=False))
    assert of_kind(model, pk.nn.FusedAdapters) == of_kind(task, pk.nn.SequentialAdapter)
    d = 64 if arch == "llama" else 32
    assert pk.trainable_parameters(model)[0] == len(of_kind(model, pk.nn.FusedAdapters)) * 3 * (d * d + d)
    assert all(".fusion." in n for n in trainable_names(model))
    if arch == "bert":
        model.classifier.load_state_dict(task.classifier.state_dict())
    assert torch.allclose(logits(model, x), logits(task, x), atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_fusion_forward_trains_saves_and_loads(arch, tmp_path):
    make, x = MODELS[arch]
    dirs = [str(tmp_path / name) for name in ("a", "b", "c")]
    for seed, directory in enumerate(dirs):
        task_adapter(make, directory, seed + 1)
    model = pk.apply(make(), pk.AdapterFusionConfig(adapters=dirs))
    assert all(len(model.get_submodule(n).adapters) == 3 for n in of_kind(model, pk.nn.FusedAdapters))
    randomize(model, seed=7)
    assert torch.allclose(logits(model, x), reference_logits(make(), model, x), atol=1e-5)
    adapters = {n: p.clone() for n, p in model.named_parameters() if ".adapters." in n}
    fusion = {n: p.clone() for n, p in model.named_parameters() if ".fusion." in n}
    losses = train(model, x)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, adapters[n]) for n, p in model.named_parameters() if n in adapters)
    assert all(not torch.equal(p, fusion[n]) for n, p in model.named_parameters() if n in fusion)
    pk.save_adapter(model, tmp_path / "fusion")
    loaded = pk.load_adapter(make(), tmp_path / "fusion")
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_fusion_bad_input(tmp_path):
    task_adapter(tiny_llama, tmp_path / "a", 1)
    task_adapter(tiny_llama, tmp_path / "h", 2, placement="houlsby")
    task_adapter(tiny_llama, tmp_path / "p", 3, placement="parallel")
    pk.save_adapter(pk.apply(tiny_llama(), pk.LoRAConfig()), tmp_path / "lora")
    with pytest.raises(ValueError, match=r"argument 'adapters' must be a non-empty list of directories"):
        pk.AdapterFusionConfig(adapters=[])
    model = tiny_llama()
    before = snapshot(model)
    cases = [([tmp_path / "a", tmp_path / "h"], "fused adapters must share their placement"),
             ([tmp_path / "p"], "holds parallel adapters"),
             ([tmp_path / "lora"], r"must hold an AdapterConfig adapter .* got peft_type 'LORA'"),
             ([tmp_path / "missing"], "cannot read")]
    for dirs, match in cases:
        with pytest.raises(ValueError, match=match):
            pk.apply(model, pk.AdapterFusionConfig(adapters=dirs))
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="does not fit|match no module"):
        pk.apply(tiny_bert_classifier(), pk.AdapterFusionConfig(adapters=[tmp_path / "a"]))
