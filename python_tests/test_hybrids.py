"""Hybrid methods (MAM adapter, UniPELT) on the tiny LLaMA and BERT classifier: which modules are installed and what
trains, logits against plain-torch references (an untouched model with hooks adding each adapter, and an explicit
KV cache holding the prefixes), gradients of the gated LoRA layer, training, save/load, fold, and bad input."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DistilBertConfig, DistilBertForSequenceClassification, DynamicCache

import peft_kernels as pk
from tiny_models import (BERT_VOCAB, LLAMA_VOCAB, assert_untouched, num_threads, randomize, snapshot,
                         tiny_bert_classifier, tiny_llama, tokens)

L = 5  # virtual tokens
M = 8  # adapter bottleneck
MODELS = {"llama": (tiny_llama, LLAMA_VOCAB), "bert": (tiny_bert_classifier, BERT_VOCAB)}
# (layers, KV width w, hidden d, task head parameters) of the tiny models
DIMS = {"llama": (2, 32, 64, 0), "bert": (1, 32, 32, 3 * 32 + 3)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Products here are at most 14 x 64 x 101: a second intra-op thread only adds waits on a busy 2-core machine.
    with num_threads(1):
        yield


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def batch(arch, seed=3):
    """input_ids (2, 9), a mask with row 1's first position padded, labels."""
    ids = tokens(MODELS[arch][1], (2, 9), seed=seed)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 0] = 0
    labels = ids.clone() if arch == "llama" else torch.tensor([0, 2])
    return ids, mask, labels


def mam(**kw):
    return pk.MAMConfig(num_virtual_tokens=L, bottleneck=M, **kw)


def unipelt(**kw):
    return pk.UniPELTConfig(r=4, alpha=8, num_virtual_tokens=L, bottleneck=M, **kw)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def of_type(model, kind):
    return [n for n, m in model.named_modules() if type(m) is kind]


def attention_modules(model):
    return [m for m in model.modules() if type(m).__name__ in ("LlamaAttention", "BertSelfAttention")]


# ------------------------------------------------------------------------------------- plain-torch references


def ref_adapter(adapter, h):
    """scaling * up(relu(down(h))) from the adapter's Linear weights."""
    down = F.relu(h @ adapter.down.weight.T + adapter.down.bias)
    return adapter.scaling * (down @ adapter.up.weight.T + adapter.up.bias)


def ref_gate(gate, h):
    return torch.sigmoid(h @ gate.weight.T + gate.bias)


def ref_gated_lora(layer, x):
    """σ(x w + c) · s · (x Aᵀ) Bᵀ: the gated LoRA branch alone."""
    return ref_gate(layer.lora_gate, x) * layer.scaling * ((x @ layer.lora_A.T) @ layer.lora_B.T)


def prefix_cache(flat, arch, batch_size, value_scales=None):
    """A DynamicCache of the prefixes ``flat`` (l, layers * 2 * w): per row [layer 0 keys, layer 0 values, ...], each
    of KV heads x head_dim (16 in both tiny models); layer i's values times ``value_scales[i]`` [batch]."""
    layers, w, _, _ = DIMS[arch]
    pairs = []
    for layer in range(layers):
        kv = []
        for part in range(2):
            chunk = flat[:, (2 * layer + part) * w:(2 * layer + part + 1) * w].reshape(flat.shape[0], w // 16, 16)
            kv.append(chunk.transpose(0, 1).unsqueeze(0).repeat(batch_size, 1, 1, 1))
        if value_scales is not None:
            kv[1] = kv[1] * value_scales[layer].view(-1, 1, 1, 1)
        pairs.append(tuple(kv))
    return DynamicCache(ddp_cache_data=pairs)


def take_head(fresh, adapted):
    if hasattr(fresh, "classifier"):
        fresh.classifier.load_state_dict(adapted.classifier.state_dict())


def hook_parallel_adapters(fresh, adapted):
    """Hooks on the untouched ``fresh`` adding each ParallelAdapter of ``adapted`` (f of the FFN input)."""
    handles = []
    for name, module in adapted.named_modules():
        if not isinstance(module, pk.nn.ParallelAdapter):
            continue
        if module.residual_inside:  # BERT: the FFN input enters `intermediate`; f joins `output.dense`'s output
            layer, seen = fresh.get_submodule(name.rpartition(".")[0]), {}
            handles.append(layer.intermediate.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0])))
            handles.append(layer.output.dense.register_forward_hook(
                lambda m, a, out, ad=module.adapter, seen=seen: out + ref_adapter(ad, seen["x"])))
        else:
            handles.append(fresh.get_submodule(name).register_forward_hook(
                lambda m, a, out, ad=module.adapter: out + ref_adapter(ad, a[0])))
    return handles


def mam_reference(arch, adapted, ids, mask):
    fresh = MODELS[arch][0]()
    take_head(fresh, adapted)
    handles = hook_parallel_adapters(fresh, adapted)
    full_mask = torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], dim=1)
    try:
        with torch.no_grad():
            cache = prefix_cache(adapted.peft_kernels_prefix.prefixes, arch, 2)
            return fresh(input_ids=ids, attention_mask=full_mask, cache=cache).logits
    finally:
        for h in handles:
            h.remove()


def unipelt_reference(arch, adapted, ids, mask):
    """Logits of an untouched model with hooks adding the gated LoRA branches and gated adapters of ``adapted``, and
    an explicit cache of its prefixes with layer i's values scaled by mean_t σ(h_t w_i + c_i) of layer i's attention
    input h. Layer i's input depends on the gates of layers < i only, so ``layers`` passes (each recomputing the
    gates from the previous pass's inputs) make every gate exact for the final pass."""
    fresh = MODELS[arch][0]()
    take_head(fresh, adapted)
    handles = []
    # LoRA first: a Linear carrying both gets the LoRA branch added before the adapter reads its output.
    for name, module in adapted.named_modules():
        if isinstance(module, pk.nn.GatedLoRALinear):
            handles.append(fresh.get_submodule(name.removesuffix(".base")).register_forward_hook(
                lambda m, a, out, layer=module: out + ref_gated_lora(layer, a[0])))
    for name, module in adapted.named_modules():
        if isinstance(module, pk.nn.GatedSequentialAdapter):
            handles.append(fresh.get_submodule(name).register_forward_hook(
                lambda m, a, out, w=module: out + ref_gate(w.gate, out) * ref_adapter(w.adapter, out)))
    inputs = {}
    for i, (mine, theirs) in enumerate(zip(attention_modules(fresh), attention_modules(adapted))):
        def capture(m, args, kwargs, i=i):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        handles.append(mine.register_forward_pre_hook(capture, with_kwargs=True))
    gates = [theirs.peft_kernels_prefix_gate for theirs in attention_modules(adapted)]
    full_mask = torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], dim=1)
    scales = [torch.ones(2) for _ in gates]
    try:
        with torch.no_grad():
            for _ in range(len(gates) + 1):
                cache = prefix_cache(adapted.peft_kernels_prefix.prefixes, arch, 2, scales)
                out = fresh(input_ids=ids, attention_mask=full_mask, cache=cache).logits
                scales = [ref_gate(g, inputs[i]).mean(dim=(1, 2)) for i, g in enumerate(gates)]
            return out
    finally:
        for h in handles:
            h.remove()


def loss(model, arch):
    ids, mask, labels = batch(arch)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def trains(model, arch, steps=5):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        value = loss(model, arch)
        value.backward()
        opt.step()
        losses.append(value.item())
    model.eval()
    return losses[-1] < losses[0]


def tiny_distilbert():
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=BERT_VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=48, num_labels=3)).eval()


# ------------------------------------------------------------------------------------------------------- MAM


@pytest.mark.parametrize("arch,wrapped", [("llama", [f"model.layers.{i}.mlp" for i in range(2)]),
                                          ("bert", ["bert.encoder.layer.0.output"])])
def test_mam_installs_prefix_and_parallel_adapters(arch, wrapped):
    model = pk.apply(MODELS[arch][0](), mam())
    layers, w, d, head = DIMS[arch]
    assert of_type(model, pk.nn.ParallelAdapter) == wrapped
    assert all(model.get_submodule(n).adapter.scaling == 4.0 for n in wrapped)
    assert model.peft_kernels_prefix.prefixes.shape == (L, layers * 2 * w)
    assert pk.trainable_parameters(model)[0] == L * layers * 2 * w + len(wrapped) * (2 * d * M + M + d) + head
    assert all(n == "peft_kernels_prefix.prefixes" or ".adapter." in n or n.startswith("classifier.")
               for n in trainable(model))
    config = model.peft_kernels_config
    assert isinstance(config, pk.MAMConfig) and config.target_modules == (["mlp"] if arch == "llama" else
                                                                          ["layer.*.output"])


@pytest.mark.parametrize("arch", MODELS)
def test_mam_equals_reference(arch):
    model = pk.apply(MODELS[arch][0](), mam())
    randomize(model)
    ids, mask, _ = batch(arch)
    out = logits(model, ids, mask)
    assert out.shape == ((2, 9, LLAMA_VOCAB) if arch == "llama" else (2, 3))
    assert torch.allclose(out, mam_reference(arch, model, ids, mask), atol=1e-5)
    # Both parts matter: without the adapters (their up projections zeroed) the logits move.
    with torch.no_grad():
        for name in of_type(model, pk.nn.ParallelAdapter):
            model.get_submodule(name).adapter.up.weight.zero_()
    assert not torch.allclose(logits(model, ids, mask), out, atol=1e-4)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_mam_trains_saves_and_loads(arch, projection, tmp_path):
    config = mam(prefix_projection=True, encoder_hidden_size=12) if projection else mam()
    model = pk.apply(MODELS[arch][0](), config)
    randomize(model)
    assert trains(model, arch)
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(MODELS[arch][0](), tmp_path)
    assert loaded.peft_kernels_config == model.peft_kernels_config
    ids, mask, _ = batch(arch)
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask))


def test_mam_fold_keeps_logits_and_round_trips(tmp_path):
    model = pk.apply(tiny_llama(), mam(prefix_projection=True))
    randomize(model)
    ids, mask, _ = batch("llama")
    before = logits(model, ids, mask)
    model.peft_kernels_config.fold(model)
    assert not model.peft_kernels_config.prefix_projection and "peft_kernels_prefix.prefixes" in trainable(model)
    assert torch.allclose(logits(model, ids, mask), before, atol=1e-6)
    assert torch.allclose(logits(model, ids, mask), mam_reference("llama", model, ids, mask), atol=1e-5)
    pk.save_adapter(model, tmp_path)
    assert torch.equal(logits(pk.load_adapter(tiny_llama(), tmp_path), ids, mask), logits(model, ids, mask))


def test_mam_not_mergeable():
    model = pk.apply(tiny_llama(), mam())
    with pytest.raises(NotImplementedError, match="MAMConfig.merge: .*neither can be folded into the frozen weights"):
        model.peft_kernels_config.merge(model)
    with pytest.raises(NotImplementedError, match="MAMConfig.merge"):
        model.peft_kernels_config.unmerge(model)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_virtual_tokens": 0}, r"MAMConfig: argument 'num_virtual_tokens' must be an int >= 1, got 0"),
    ({"num_virtual_tokens": 2.5}, r"MAMConfig: argument 'num_virtual_tokens' must be an int >= 1, got 2.5"),
    ({"bottleneck": 0}, r"MAMConfig: argument 'bottleneck' must be an int >= 1, got 0"),
    ({"scaling": "4"}, r"MAMConfig: argument 'scaling' must be a number, got '4'"),
    ({"prefix_projection": 1}, r"MAMConfig: argument 'prefix_projection' must be a bool, got 1"),
    ({"non_linearity": "sigmoid"}, r"MAMConfig: argument 'non_linearity' must be one of"),
    ({"target_modules": "mlp"}, r"MAMConfig: argument 'target_modules' must be None or a list of module names"),
])
def test_mam_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk.MAMConfig(**kwargs)


# --------------------------------------------------------------------------------------------------- UniPELT


def test_gated_lora_linear_matches_reference_values_and_gradients():
    torch.manual_seed(7)
    linear = torch.nn.Linear(12, 10)
    layer = pk.nn.GatedLoRALinear.from_linear(linear, r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_gate.weight.normal_()
        layer.lora_gate.bias.fill_(0.3)
    x = torch.randn(3, 5, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    params = [layer.lora_A, layer.lora_B, layer.lora_gate.weight, layer.lora_gate.bias]
    refs = [p.detach().clone().requires_grad_(True) for p in params]
    a, b, gw, gb = refs
    want = x_ref @ linear.weight.T + linear.bias + torch.sigmoid(x_ref @ gw.T + gb) * 2.0 * ((x_ref @ a.T) @ b.T)
    got = layer(x)
    assert got.shape == (3, 5, 10)
    assert torch.allclose(got, want, atol=1e-5)
    # Per-token gates: the gates of the 15 rows are not all equal, so a per-sequence gate could not pass this test.
    gates = torch.sigmoid(x.detach() @ layer.lora_gate.weight.detach().T + 0.3)
    assert gates.std() > 0.05
    grad = torch.randn(3, 5, 10)
    got.backward(grad)
    want.backward(grad)
    for mine, ref in zip([x] + params, [x_ref] + refs):
        assert torch.allclose(mine.grad, ref.grad, atol=1e-4)
    with pytest.raises(NotImplementedError, match="GatedLoRALinear.merge: the LoRA branch is scaled by a gate"):
        layer.merge()


@pytest.mark.parametrize("arch,lora,adapters", [
    ("llama", [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")],
     [f"model.layers.{i}.mlp.down_proj" for i in range(2)]),
    ("bert", [f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "value")],
     ["bert.encoder.layer.0.output.dense"]),
])
def test_unipelt_installs_gated_modules(arch, lora, adapters):
    model = pk.apply(MODELS[arch][0](), unipelt())
    layers, w, d, head = DIMS[arch]
    assert of_type(model, pk.nn.GatedLoRALinear) == lora
    assert of_type(model, pk.nn.GatedSequentialAdapter) == adapters
    assert len(of_type(model, pk.nn.PrefixGate)) == layers
    lora_count = sum(4 * (m.in_features + m.out_features) + m.in_features + 1 for n in lora
                     for m in [model.get_submodule(n)])
    expected = lora_count + L * layers * 2 * w + layers * (d + 1) + len(adapters) * (2 * d * M + M + d + d + 1) + head
    assert pk.trainable_parameters(model)[0] == expected
    allowed = (".lora_", ".adapter.", ".gate.", ".peft_kernels_prefix_gate.", "peft_kernels_prefix.", "classifier.")
    assert all(any(a in n or n.startswith(a) for a in allowed) for n in trainable(model))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith((".weight", ".bias"))
                   and not any(a in n or n.startswith(a) for a in allowed))


def test_unipelt_lora_and_adapter_on_one_module():
    model = pk.apply(tiny_llama(), unipelt(lora_target_modules=["down_proj"]))
    for i in range(2):
        wrapper = model.model.layers[i].mlp.down_proj
        assert isinstance(wrapper, pk.nn.GatedSequentialAdapter) and isinstance(wrapper.base, pk.nn.GatedLoRALinear)
    randomize(model)
    ids, mask, _ = batch("llama")
    assert torch.allclose(logits(model, ids, mask), unipelt_reference("llama", model, ids, mask), atol=1e-5)


@pytest.mark.parametrize("arch", MODELS)
def test_unipelt_equals_reference(arch):
    model = pk.apply(MODELS[arch][0](), unipelt())
    randomize(model)
    ids, mask, _ = batch(arch)
    out = logits(model, ids, mask)
    assert torch.allclose(out, unipelt_reference(arch, model, ids, mask), atol=1e-5)
    # Every gate kind moves the logits (each can make this test fail).
    for kind, attr in ((pk.nn.GatedLoRALinear, "lora_gate"), (pk.nn.GatedSequentialAdapter, "gate"),
                       (pk.nn.PrefixGate, None)):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            for m in changed.modules():
                if isinstance(m, kind):
                    (getattr(m, attr) if attr else m).bias.add_(3.0)
        assert not torch.allclose(logits(changed, ids, mask), out, atol=1e-4), kind.__name__


@pytest.mark.parametrize("arch", MODELS)
def test_unipelt_gates_get_gradients_and_training_reduces_the_loss(arch):
    model = pk.apply(MODELS[arch][0](), unipelt())
    randomize(model)
    loss(model, arch).backward()
    gates = {n: p for n, p in model.named_parameters() if "gate." in n}
    assert len(gates) == 2 * (len(of_type(model, pk.nn.GatedLoRALinear)) + len(of_type(model, pk.nn.PrefixGate))
                              + len(of_type(model, pk.nn.GatedSequentialAdapter)))
    for name, p in gates.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()
    assert trains(model, arch)


@pytest.mark.parametrize("arch", MODELS)
def test_unipelt_saves_and_loads(arch, tmp_path):
    model = pk.apply(MODELS[arch][0](), unipelt(prefix_projection=True, encoder_hidden_size=12))
    randomize(model)
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(MODELS[arch][0](), tmp_path)
    assert loaded.peft_kernels_config == model.peft_kernels_config
    ids, mask, _ = batch(arch)
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask))
    model.peft_kernels_config.fold(model)
    assert torch.allclose(logits(model, ids, mask), logits(loaded, ids, mask), atol=1e-6)


def test_unipelt_generation_gates_the_prompt_once():
    model = pk.apply(tiny_llama(), unipelt())
    randomize(model)
    ids, _, _ = batch("llama")
    with torch.no_grad():
        first = model(input_ids=ids).logits[:, -1].argmax(-1)
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 12) and torch.equal(out[:, 9], first)


def test_unipelt_not_mergeable():
    model = pk.apply(tiny_llama(), unipelt())
    with pytest.raises(NotImplementedError, match="UniPELTConfig.merge: the LoRA, prefix and adapter gates"):
        model.peft_kernels_config.merge(model)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_virtual_tokens": 0}, r"UniPELTConfig: argument 'num_virtual_tokens' must be an int >= 1, got 0"),
    ({"num_virtual_tokens": -1}, r"UniPELTConfig: argument 'num_virtual_tokens' must be an int >= 1, got -1"),
    ({"r": 0}, r"UniPELTConfig: argument 'r' must be an int >= 1, got 0"),
    ({"alpha": None}, r"UniPELTConfig: argument 'alpha' must be a number, got None"),
    ({"dropout": 1.0}, r"UniPELTConfig: argument 'dropout' must be in \[0, 1\), got 1.0"),
    ({"bottleneck": True}, r"UniPELTConfig: argument 'bottleneck' must be an int >= 1, got True"),
    ({"lora_target_modules": "query"}, r"UniPELTConfig: argument 'lora_target_modules' must be None or a list"),
    ({"adapter_target_modules": [""]}, r"UniPELTConfig: argument 'adapter_target_modules' must be None or a list"),
])
def test_unipelt_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pk.UniPELTConfig(**kwargs)


# ------------------------------------------------------------------------------------------- both: bad input


@pytest.mark.parametrize("config", [mam(), unipelt()], ids=["mam", "unipelt"])
def test_model_without_a_kv_cache_path_is_left_untouched(config):
    model = tiny_distilbert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{type(config).__name__}: DistilBertForSequenceClassification has no "
                                         "KV-cache path for prefixes"):
        pk.apply(model, config)
    assert_untouched(model, before)


@pytest.mark.parametrize("config,match", [
    (mam(target_modules=["nope"]), r"target_modules \['nope'\] match no module of LlamaForCausalLM"),
    (unipelt(lora_target_modules=["nope"]), r"target_modules \['nope'\] match no nn.Linear of LlamaForCausalLM"),
    (unipelt(adapter_target_modules=["nope"]), r"target_modules \['nope'\] match no module of LlamaForCausalLM"),
], ids=["mam", "unipelt-lora", "unipelt-adapter"])
def test_bad_targets_leave_the_model_untouched(config, match):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        pk.apply(model, config)
    assert_untouched(model, before)


@pytest.mark.parametrize("first", [mam(), unipelt(), pk.PrefixTuningConfig(L), pk.LoRAConfig(r=2)],
                         ids=["mam", "unipelt", "prefix", "lora"])
@pytest.mark.parametrize("second", [mam(), unipelt()], ids=["mam", "unipelt"])
def test_applying_on_an_adapted_model(first, second):
    model = pk.apply(tiny_llama(), first)
    with pytest.raises(ValueError, match=r"apply: LlamaForCausalLM already carries a \w+Config; apply "
                                         rf"{type(second).__name__} to a fresh model"):
        pk.apply(model, second)


def test_fold_needs_the_config_on_the_model():
    model = pk.apply(tiny_llama(), mam())
    with pytest.raises(ValueError, match="fold: LlamaForCausalLM does not carry a UniPELTConfig"):
        unipelt().fold(model)


@pytest.mark.parametrize("config,field", [(mam(), "MAMConfig\\(target_modules"),
                                          (unipelt(), "UniPELTConfig\\(lora_target_modules"),
                                          (unipelt(lora_target_modules=["q_proj"]),
                                           "UniPELTConfig\\(adapter_target_modules")], ids=["mam", "lora", "adapter"])
def test_unknown_model_type_names_the_field_to_pass(config, field):
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=rf"no default \w+ for model_type 'mystery' .*; pass {field}=\[...\]\)"):
        pk.apply(model, config)
    assert not hasattr(model, "peft_kernels_config")
