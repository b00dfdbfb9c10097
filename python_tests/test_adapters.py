"""Bottleneck adapters (Houlsby, Pfeiffer, parallel), Compacter and the Hadamard adapter on the tiny LLaMA and BERT
models: which modules are wrapped, trainable counts, logits against plain-torch references built with hooks on an
untouched copy of the model, training, save/load, merge, and bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F

import peft_kernels as pk
from tiny_models import (BERT_VOCAB, LLAMA_VOCAB, assert_untouched, randomize, snapshot, tiny_bert_classifier,
                         tiny_llama, tokens)

LLAMA_TOKENS, BERT_TOKENS = tokens(LLAMA_VOCAB), tokens(BERT_VOCAB)
LABELS = torch.tensor([0, 2])
MODELS = {"llama": (tiny_llama, LLAMA_TOKENS), "bert": (tiny_bert_classifier, BERT_TOKENS)}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def loss(model, x):
    if x is LLAMA_TOKENS:
        return model(x, labels=x).loss
    return model(x, labels=LABELS).loss


def trains(model, x, steps=5):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        value = loss(model, x)
        value.backward()
        opt.step()
        losses.append(value.item())
    model.eval()
    return losses[-1] < losses[0]


def wrapped(model, kind):
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- plain-torch references


def ref_linear_adapter(adapter, h, act=F.relu):
    """scaling * up(act(down(h))) from the adapter's nn.Linear weights."""
    down = act(h @ adapter.down.weight.T + adapter.down.bias)
    return adapter.scaling * (down @ adapter.up.weight.T + adapter.up.bias)


def ref_phm(layer, x):
    w = sum(torch.kron(layer.A[i], layer.s[i] @ layer.t[i]) for i in range(layer.n))
    return x @ w.T + layer.bias


def ref_phm_adapter(adapter, h):
    return adapter.scaling * ref_phm(adapter.up, F.relu(ref_phm(adapter.down, h)))


def take_head(fresh, adapted):
    """The trained (randomized) classification head of ``adapted`` copied into the untouched model ``fresh``."""
    if hasattr(fresh, "classifier"):
        fresh.classifier.load_state_dict(adapted.classifier.state_dict())


def reference_logits(fresh, adapted, x, ref=ref_linear_adapter):
    """Logits of ``fresh`` (the untouched model) with each adapter of ``adapted`` added by hooks."""
    take_head(fresh, adapted)
    handles = []
    for name, module in adapted.named_modules():
        if isinstance(module, pk.nn.SequentialAdapter):
            def seq(mod, args, out, adapter=module.adapter):
                return out + ref(adapter, out)

            handles.append(fresh.get_submodule(name).register_forward_hook(seq))
        elif isinstance(module, pk.nn.ParallelAdapter) and not module.residual_inside:
            def par(mod, args, out, adapter=module.adapter):
                return out + ref(adapter, args[0])

            handles.append(fresh.get_submodule(name).register_forward_hook(par))
        elif isinstance(module, pk.nn.ParallelAdapter):
            # BERT: the FFN's input enters `intermediate`; f(input) joins the output of `output.dense`.
            layer = fresh.get_submodule(name.rpartition(".")[0])
            seen = {}
            handles.append(layer.intermediate.register_forward_pre_hook(lambda mod, args, seen=seen:
                                                                        seen.update(x=args[0])))
            handles.append(layer.output.dense.register_forward_hook(
                lambda mod, args, out, adapter=module.adapter, seen=seen: out + ref(adapter, seen["x"])))
    try:
        return logits(fresh, x)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- AdapterConfig


@pytest.mark.parametrize("arch,placement,expected", [
    ("llama", "houlsby", [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")]),
    ("llama", "pfeiffer", [f"model.layers.{i}.mlp.down_proj" for i in range(2)]),
    ("llama", "parallel", [f"model.layers.{i}.mlp" for i in range(2)]),
    ("bert", "houlsby", ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"]),
    ("bert", "pfeiffer", ["bert.encoder.layer.0.output.dense"]),
    ("bert", "parallel", ["bert.encoder.layer.0.output"]),
])
def test_adapter_targets_counts_and_forward(arch, placement, expected):
    make, x = MODELS[arch]
    model = pk.apply(make(), pk.AdapterConfig(bottleneck=8, placement=placement, scaling=4.0 if placement ==
                                              "parallel" else 1.0))
    kind = pk.nn.ParallelAdapter if placement == "parallel" else pk.nn.SequentialAdapter
    assert wrapped(model, kind) == expected
    d = 64 if arch == "llama" else 32
    head = 3 * 32 + 3 if arch == "bert" else 0
    assert pk.trainable_parameters(model)[0] == len(expected) * (2 * d * 8 + 8 + d) + head
    assert all(".adapter." in n or n.startswith("classifier.") for n in trainable_names(model))
    # identity while fresh, then the independent reference with random weights
    assert torch.equal(logits(model, x), logits(make(), x))
    randomize(model)
    out, ref = logits(model, x), reference_logits(make(), model, x)
    assert not torch.allclose(out, logits(make(), x), atol=1e-3)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_adapter_trains_saves_and_loads(arch, tmp_path):
    make, x = MODELS[arch]
    model = pk.apply(make(), pk.AdapterConfig(bottleneck=8, non_linearity="gelu"))
    randomize(model)
    assert trains(model, x)
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(make(), tmp_path)
    assert loaded.peft_kernels_config == model.peft_kernels_config
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert torch.allclose(logits(model, x), reference_logits(make(), model, x,
                                                             lambda a, h: ref_linear_adapter(a, h, F.gelu)), atol=1e-5)


def test_adapter_not_mergeable():
    model = pk.apply(tiny_llama(), pk.AdapterConfig(bottleneck=8))
    with pytest.raises(NotImplementedError, match="cannot be folded into the frozen weights"):
        model.peft_kernels_config.merge(model)
    with pytest.raises(NotImplementedError, match="non-linearity"):
        model.model.layers[0].self_attn.o_proj.merge()


@pytest.mark.parametrize("kwargs,match", [
    ({"placement": "serial"}, r"argument 'placement' must be one of \['houlsby', 'parallel', 'pfeiffer'\], got 'serial'"),
    ({"bottleneck": 0}, r"argument 'bottleneck' must be an int >= 1, got 0"),
    ({"non_linearity": "sigmoid"}, r"argument 'non_linearity' must be one of .*got 'sigmoid'"),
    ({"scaling": "4"}, r"argument 'scaling' must be a number, got '4'"),
    ({"target_modules": "o_proj"}, r"argument 'target_modules' must be None or a list of module names"),
])
def test_adapter_config_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk.AdapterConfig(**kwargs)


def test_adapter_bad_targets_leave_model_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no module of LlamaForCausalLM"):
        pk.apply(model, pk.AdapterConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="the Linear must map d -> d; it maps 64 -> 32"):
        pk.apply(model, pk.AdapterConfig(placement="parallel", target_modules=["o_proj", "k_proj"]))
    with pytest.raises(ValueError, match="match both model.layers.0.mlp and model.layers.0.mlp.down_proj"):
        pk.apply(model, pk.AdapterConfig(target_modules=["mlp", "down_proj"]))
    assert_untouched(model, before)


def test_adapter_load_mismatch_leaves_model_intact(tmp_path):
    source = pk.apply(tiny_llama(), pk.AdapterConfig(bottleneck=8))
    pk.save_adapter(source, tmp_path)
    target = pk.apply(tiny_llama(), pk.AdapterConfig(bottleneck=16))
    before = snapshot(target)
    with pytest.raises(ValueError, match="carries a AdapterConfig|has shape"):
        pk.load_adapter(target, tmp_path)
    assert_untouched(target, before)
    with pytest.raises(ValueError, match=r"target_modules \['o_proj', 'down_proj'\] match no module of BertForSequenceClassification"):
        pk.load_adapter(tiny_bert_classifier(), tmp_path)


# ---------------------------------------------------------------- CompacterConfig


@pytest.mark.parametrize("arch,placement,count", [("llama", "houlsby", 4), ("llama", "pfeiffer", 2),
                                                  ("bert", "houlsby", 2), ("bert", "pfeiffer", 1)])
def test_compacter_shares_one_A_and_matches_reference(arch, placement, count):
    make, x = MODELS[arch]
    model = pk.apply(make(), pk.CompacterConfig(n=4, rank=1, bottleneck=8, placement=placement))
    adapters = [m.adapter for m in model.modules() if isinstance(m, pk.nn.SequentialAdapter)]
    assert len(adapters) == count
    phms = [p for a in adapters for p in (a.down, a.up)]
    assert all(isinstance(p, pk.nn.PHMLinear) and p.A is phms[0].A for p in phms)
    d, m, n = (64 if arch == "llama" else 32), 8, 4
    head = 99 if arch == "bert" else 0
    # one A (n³), per adapter: down s/t (rank·(m + d)) + bias m, up s/t (rank·(d + m)) + bias d
    assert pk.trainable_parameters(model)[0] == n**3 + count * (2 * (d + m) + m + d) + head
    assert sum(name.endswith(".A") for name in trainable_names(model)) == 1
    assert torch.equal(logits(model, x), logits(make(), x))
    randomize(model)
    assert torch.allclose(logits(model, x), reference_logits(make(), model, x, ref_phm_adapter), atol=1e-5)
    assert trains(model, x)


def test_compacter_save_load_and_unshared(tmp_path):
    model = pk.apply(tiny_llama(), pk.CompacterConfig(bottleneck=8))
    randomize(model)
    pk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file
    assert sum(k.endswith(".A") for k in load_file(tmp_path / "adapter_model.safetensors")) == 1
    loaded = pk.load_adapter(tiny_llama(), tmp_path)
    phms = [m for m in loaded.modules() if isinstance(m, pk.nn.PHMLinear)]
    assert all(p.A is phms[0].A for p in phms)
    assert torch.equal(logits(loaded, LLAMA_TOKENS), logits(model, LLAMA_TOKENS))

    unshared = pk.apply(tiny_llama(), pk.CompacterConfig(bottleneck=8, shared=False, rank=None))
    phms = [m for m in unshared.modules() if isinstance(m, pk.nn.PHMLinear)]
    assert len({id(p.A) for p in phms}) == len(phms) == 8
    randomize(unshared)
    full = lambda a, h: a.scaling * (F.relu(h @ a.down.weight().T + a.down.bias) @ a.up.weight().T  # noqa: E731
                                     + a.up.bias)
    assert torch.allclose(logits(unshared, LLAMA_TOKENS), reference_logits(tiny_llama(), unshared, LLAMA_TOKENS, full),
                          atol=1e-5)
    with pytest.raises(NotImplementedError, match="cannot be folded"):
        unshared.peft_kernels_config.merge(unshared)


def test_compacter_bad_input():
    with pytest.raises(ValueError, match=r"argument 'rank' must be None \(full PHM factors\) or an int >= 1, got 0"):
        pk.CompacterConfig(rank=0)
    with pytest.raises(ValueError, match=r"argument 'n' must be an int >= 1, got 2.5"):
        pk.CompacterConfig(n=2.5)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"apply: model.layers.0.self_attn.o_proj: PHMLinear: argument 'n' must divide"):
        pk.apply(model, pk.CompacterConfig(n=3, bottleneck=9))
    assert not wrapped(model, pk.nn.SequentialAdapter) and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- HadamardAdapterConfig


def hadamard_reference(fresh, adapted, x):
    handles = [fresh.get_submodule(n).register_forward_hook(
        lambda mod, args, out, m=m: out * m.hadamard_weight + m.hadamard_bias)
        for n, m in adapted.named_modules() if isinstance(m, pk.nn.HadamardLinear)]
    take_head(fresh, adapted)
    try:
        return logits(fresh, x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_hadamard(arch, tmp_path):
    make, x = MODELS[arch]
    model = pk.apply(make(), pk.HadamardAdapterConfig())
    expected = ([f"model.layers.{i}.self_attn.o_proj" for i in range(2)] if arch == "llama"
                else ["bert.encoder.layer.0.attention.output.dense"])
    assert wrapped(model, pk.nn.HadamardLinear) == expected
    d = 64 if arch == "llama" else 32
    assert pk.trainable_parameters(model)[0] == len(expected) * 2 * d + (99 if arch == "bert" else 0)
    assert torch.equal(logits(model, x), logits(make(), x))
    randomize(model)
    out = logits(model, x)
    assert torch.allclose(out, hadamard_reference(make(), model, x), atol=1e-5)
    base = copy.deepcopy({k: v for k, v in model.state_dict().items() if "hadamard" not in k})
    config = model.peft_kernels_config
    config.merge(model)
    assert torch.allclose(logits(model, x), out, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        config.merge(model)
    config.unmerge(model)
    after = model.state_dict()
    assert after.keys() - {k for k in after if "hadamard" in k} == base.keys()
    assert all(torch.allclose(v, after[k], atol=1e-6) for k, v in base.items())
    assert torch.allclose(logits(model, x), out, atol=1e-6)
    assert trains(model, x)
    pk.save_adapter(model, tmp_path)
    # the unmerged base differs from a fresh one by a rounding (1e-6 above)
    assert torch.allclose(logits(pk.load_adapter(make(), tmp_path), x), logits(model, x), atol=1e-5)


def test_hadamard_bad_input(tmp_path):
    model = pk.apply(tiny_llama(), pk.HadamardAdapterConfig())
    layer = model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        layer.hadamard_weight[3] = 0.0
    with pytest.raises(ValueError, match="zero entries; merging would not be reversible"):
        layer.merge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    with pytest.raises(TypeError, match="argument 'linear' must be an nn.Linear, got LlamaMLP"):
        pk.nn.HadamardLinear(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        pk.apply(tiny_llama(), pk.HadamardAdapterConfig(target_modules=["mlp"]))
    pk.save_adapter(model, tmp_path)
    merged = pk.apply(tiny_llama(), pk.HadamardAdapterConfig())
    merged.peft_kernels_config.merge(merged)
    with pytest.raises(ValueError, match="modules are merged; unmerge them before loading"):
        pk.load_adapter(merged, tmp_path)
