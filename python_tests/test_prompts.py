"""Soft prompts (prompt tuning, P-tuning, prefix tuning) on a tiny LLaMA and a tiny BERT classifier: what apply
installs and freezes, trainable counts equal to HF PEFT's, forward against plain-torch references (manual
embedding concatenation, a KV cache built by hand or by running the model on real tokens), generation, training,
save/load in our format and in HF PEFT's (both directions), folding, and clear errors that leave the model intact."""

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import DistilBertConfig, DistilBertForSequenceClassification, DynamicCache

import peft_kernels as pk
from tiny_models import BERT_VOCAB, LLAMA_VOCAB, tiny_bert_classifier, tiny_llama, tokens

L = 5  # virtual tokens in every test
MODELS = {"llama": (tiny_llama, LLAMA_VOCAB, "CAUSAL_LM"), "bert": (tiny_bert_classifier, BERT_VOCAB, "SEQ_CLS")}
# (our config, the HF PEFT config of the same settings)
CONFIGS = {
    "prompt": (lambda: pk.PromptTuningConfig(L),
               lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=L)),
    "ptuning_mlp": (lambda: pk.PTuningConfig(L),
                    lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=L)),
    "ptuning_lstm": (lambda: pk.PTuningConfig(L, encoder="lstm", encoder_hidden_size=12),
                     lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=L, encoder_hidden_size=12,
                                                        encoder_reparameterization_type="LSTM")),
    "prefix": (lambda: pk.PrefixTuningConfig(L),
               lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=L)),
    "prefix_projection": (lambda: pk.PrefixTuningConfig(L, prefix_projection=True, encoder_hidden_size=24),
                          lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=L, prefix_projection=True,
                                                            encoder_hidden_size=24)),
}
CASES = [pytest.param(m, c, id=f"{m}-{c}") for m in MODELS for c in CONFIGS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every product here is tiny (at most 14 x 64 x 101): a second intra-op thread buys nothing, and on a busy 2-core
    # machine each op waited for it (a tiny LLaMA forward took 0.5 s with 2 threads, 7 ms with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on prompt learning (position ids, modules_to_save)
        yield


def batch(model_name, seed=3):
    """input_ids (2, 9), an attention mask with one padded position in row 1, and labels."""
    _, vocab, _ = MODELS[model_name]
    ids = tokens(vocab, (2, 9), seed=seed)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 0] = 0
    labels = ids.clone() if model_name == "llama" else torch.tensor([0, 2])
    return ids, mask, labels


def applied(model_name, config_name, seed=0):
    make, _, _ = MODELS[model_name]
    return pk.apply(make(seed), CONFIGS[config_name][0]())


def logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def prefix_cache(flat, layers, heads, head_dim, batch_size):
    """A DynamicCache holding HF PEFT's layout of prefixes: each row of ``flat`` (l, layers * 2 * heads * head_dim)
    is [layer 0 keys, layer 0 values, layer 1 keys, ...], each heads x head_dim."""
    pairs = []
    for layer in range(layers):
        parts = []
        for kv in range(2):
            start = (2 * layer + kv) * heads * head_dim
            chunk = flat[:, start:start + heads * head_dim].reshape(flat.shape[0], heads, head_dim)
            parts.append(chunk.transpose(0, 1).unsqueeze(0).repeat(batch_size, 1, 1, 1))
        pairs.append(tuple(parts))
    return DynamicCache(ddp_cache_data=pairs)


def kv_dims(model):
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_hidden_layers, heads, c.hidden_size // c.num_attention_heads


def mlp_reference(x, layers, activation):
    """x through alternating nn.Linear layers (given as modules, read as weight/bias) and ``activation``."""
    for i, layer in enumerate(layers):
        x = x @ layer.weight.T + layer.bias
        if i < len(layers) - 1:
            x = activation(x)
    return x


# ------------------------------------------------------------------------------------------- apply, counts


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_apply_installs_and_freezes(model_name, config_name):
    make, _, _ = MODELS[model_name]
    base = make()
    model = pk.apply(base, CONFIGS[config_name][0]())
    assert model is base
    module = "peft_kernels_prefix" if config_name.startswith("prefix") else "peft_kernels_prompt"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ours = {n for n in trainable if n.startswith(module + ".")}
    assert ours == {n for n, _ in getattr(model, module).named_parameters(prefix=module)}
    head = {"classifier.weight", "classifier.bias"} if model_name == "bert" else set()
    assert trainable == ours | head
    assert type(model.peft_kernels_config).__name__ == type(CONFIGS[config_name][0]()).__name__


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_trainable_count_equals_peft(model_name, config_name):
    make, _, task = MODELS[model_name]
    ours, theirs = CONFIGS[config_name]
    model = pk.apply(make(), ours())
    reference = peft.get_peft_model(make(), theirs(task))
    assert pk.trainable_parameters(model)[0] == sum(p.numel() for p in reference.parameters() if p.requires_grad)


def test_expected_shapes():
    llama = applied("llama", "prefix_projection")
    # LLaMA: 2 layers, 2 KV heads of 16 -> w = 32; prefixes (5, 2 * 2 * 32); MLP 32 -> 24 -> 128.
    assert llama.peft_kernels_prefix().shape == (L, 128)
    assert llama.peft_kernels_prefix.embedding.shape == (L, 32)
    bert = applied("bert", "ptuning_lstm")
    assert bert.peft_kernels_prompt().shape == (L, 32)


# ------------------------------------------------------------------------------------ forward vs references


@pytest.mark.parametrize("model_name", MODELS)
def test_prompt_tuning_equals_manual_concat(model_name):
    model = applied(model_name, "prompt")
    reference = MODELS[model_name][0]()  # the same base weights, no hooks
    ids, mask, labels = batch(model_name)
    prompt = model.peft_kernels_prompt.embedding.detach()
    embeds = torch.cat([prompt.expand(2, -1, -1), reference.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], dim=1)
    extra, ref_labels = {}, labels
    if model_name == "bert":
        extra = {"token_type_ids": torch.zeros(2, L + 9, dtype=torch.long)}
    else:
        ref_labels = torch.cat([torch.full((2, L), -100), labels], dim=1)
    with torch.no_grad():
        want = reference(inputs_embeds=embeds, attention_mask=full_mask, labels=ref_labels, **extra)
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == ((2, L + 9, LLAMA_VOCAB) if model_name == "llama" else (2, 3))
    assert torch.allclose(got.logits, want.logits, atol=1e-6)
    assert torch.allclose(got.loss, want.loss, atol=1e-6)


def test_prompt_tuning_positional_args_token_types_and_positions():
    bert = applied("bert", "prompt")
    reference = tiny_bert_classifier()
    ids, mask, _ = batch("bert")
    types = torch.ones(2, 9, dtype=torch.long)
    embeds = torch.cat([bert.peft_kernels_prompt.embedding.detach().expand(2, -1, -1),
                        reference.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        want = reference(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, L, dtype=torch.long), mask], 1),
                         token_type_ids=torch.cat([torch.zeros(2, L, dtype=torch.long), types], 1)).logits
        got = bert(ids, mask, types).logits  # positional, as BertForSequenceClassification's signature orders them
    assert torch.allclose(got, want, atol=1e-6)
    llama = applied("llama", "prompt")
    ids, mask, _ = batch("llama")
    with torch.no_grad():
        plain = llama(input_ids=ids).logits
        positioned = llama(input_ids=ids, position_ids=torch.arange(9).unsqueeze(0)).logits
    assert torch.allclose(plain, positioned, atol=1e-6)


@pytest.mark.parametrize("model_name", MODELS)
def test_ptuning_mlp_equals_manual_encoder(model_name):
    model = applied(model_name, "ptuning_mlp")
    encoder = model.peft_kernels_prompt
    reference = MODELS[model_name][0]()
    ids, mask, _ = batch(model_name)
    with torch.no_grad():
        prompt = mlp_reference(encoder.embedding, [encoder.mlp_head[i] for i in (0, 2, 4)], torch.relu)
        embeds = torch.cat([prompt.expand(2, -1, -1), reference.get_input_embeddings()(ids)], dim=1)
        want = reference(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], 1))
    assert torch.allclose(logits(model, ids, mask), want.logits, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_ptuning_lstm_equals_peft_with_the_same_weights(model_name):
    make, _, task = MODELS[model_name]
    ours, theirs = CONFIGS["ptuning_lstm"]
    model = pk.apply(make(), ours())
    reference = peft.get_peft_model(make(), theirs(task)).eval()
    mine = dict(model.peft_kernels_prompt.named_parameters())
    with torch.no_grad():
        for name, p in reference.prompt_encoder["default"].named_parameters():
            p.copy_(mine["embedding" if name == "embedding.weight" else name])
    ids, mask, _ = batch(model_name)
    got, want = logits(model, ids, mask), logits(reference, ids, mask)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def llama_prefixes_from_tokens(prefix_ids):
    """Prefixes (l, layers * 2 * w) in PEFT's layout holding the keys and values tiny_llama computes for the real
    tokens ``prefix_ids`` (1, l): with them, a prefix model must give what the base model gives on
    cat(prefix_ids, ids) at the positions of ids."""
    with torch.no_grad():
        cache = tiny_llama()(input_ids=prefix_ids, use_cache=True).cache
    rows = []
    for layer in range(2):
        for kv in (cache.layers[layer].keys, cache.layers[layer].values):  # (1, heads, l, head_dim)
            rows.append(kv[0].transpose(0, 1).reshape(prefix_ids.shape[1], -1))
    return torch.cat(rows, dim=1)


def test_prefix_equals_the_model_run_on_real_prefix_tokens():
    model = applied("llama", "prefix")
    prefix_ids = tokens(LLAMA_VOCAB, (1, L), seed=11)
    with torch.no_grad():
        model.peft_kernels_prefix.prefixes.copy_(llama_prefixes_from_tokens(prefix_ids))
    ids, _, _ = batch("llama")
    with torch.no_grad():
        want = tiny_llama()(input_ids=torch.cat([prefix_ids.expand(2, -1), ids], dim=1)).logits[:, L:]
        got = model(input_ids=ids).logits
        got_masked = model(input_ids=ids, attention_mask=torch.ones(2, 9, dtype=torch.long)).logits
        got_positioned = model(input_ids=ids, position_ids=torch.arange(9).unsqueeze(0)).logits
    assert got.shape == (2, 9, LLAMA_VOCAB)
    for out in (got, got_masked, got_positioned):
        assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_prefix_equals_an_explicit_cache(model_name, projection):
    model = applied(model_name, "prefix_projection" if projection else "prefix")
    encoder = model.peft_kernels_prefix
    with torch.no_grad():
        if projection:
            flat = mlp_reference(encoder.embedding, [encoder.transform[0], encoder.transform[2]], torch.tanh)
        else:
            flat = encoder.prefixes.clone()
    reference = MODELS[model_name][0]()
    ids, mask, labels = batch(model_name)
    full_mask = torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=full_mask, labels=labels,
                         cache=prefix_cache(flat, *kv_dims(reference), 2))
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert torch.allclose(got.loss, want.loss, atol=1e-5)


def test_bert_prefix_honours_the_padding_mask():
    model = applied("bert", "prefix")
    ids, _, _ = batch("bert")
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 8] = 0  # padding on the right: position 0 ([CLS]) is what the classifier reads
    padded, real = ids.clone(), ids.clone()
    padded[1, 8] = (ids[1, 8] + 1) % BERT_VOCAB
    real[1, 3] = (ids[1, 3] + 1) % BERT_VOCAB
    assert torch.allclose(logits(model, padded, mask), logits(model, ids, mask), rtol=0, atol=1e-7)
    # The tiny BERT's logits move by ~1e-4 when a real token changes.
    assert (logits(model, real, mask)[1] - logits(model, ids, mask)[1]).abs().max() > 1e-5


def test_generate_prompt_tuning_matches_a_manual_greedy_loop():
    model = applied("llama", "prompt")
    reference = tiny_llama()
    ids = tokens(LLAMA_VOCAB, (2, 6), seed=5)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        seq, prompt = ids, model.peft_kernels_prompt.embedding.expand(2, -1, -1)
        for _ in range(4):
            embeds = torch.cat([prompt, reference.get_input_embeddings()(seq)], dim=1)
            seq = torch.cat([seq, reference(inputs_embeds=embeds).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (2, 10)
    assert torch.equal(out, seq)


def test_generate_prefix_matches_a_manual_greedy_loop():
    model = applied("llama", "prefix")
    with torch.no_grad():
        model.peft_kernels_prefix.prefixes.mul_(0.3)  # N(0, 1) prefixes saturate the tiny model's attention
    reference = tiny_llama()
    ids = tokens(LLAMA_VOCAB, (2, 6), seed=5)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        seq, flat = ids, model.peft_kernels_prefix.prefixes
        for _ in range(4):
            step = reference(input_ids=seq, cache=prefix_cache(flat, *kv_dims(reference), 2)).logits
            seq = torch.cat([seq, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_a_few_steps_reduce_the_loss(model_name, config_name):
    model = applied(model_name, config_name).train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids, mask, labels = batch(model_name)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_save_load_into_a_fresh_model(model_name, config_name, tmp_path):
    model = applied(model_name, config_name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    pk.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["format"] == "peft_kernels" and raw["peft_type"] == model.peft_kernels_config.peft_type
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == {"base_model.model." + n for n, p in model.named_parameters() if p.requires_grad}
    fresh = pk.load_adapter(MODELS[model_name][0](), tmp_path)
    ids, mask, _ = batch(model_name)
    assert torch.equal(logits(fresh, ids, mask), logits(model, ids, mask))


def test_text_init_records_token_ids_and_round_trips(tmp_path):
    def tokenizer(text):
        return {"input_ids": [ord(c) % LLAMA_VOCAB for c in text]}

    model = pk.apply(tiny_llama(), pk.PromptTuningConfig(L, init="text", init_text="abc", tokenizer=tokenizer))
    ids = [97, 98, 99, 97, 98]  # "abc" cycled to 5 tokens
    assert torch.equal(model.peft_kernels_prompt.embedding, model.get_input_embeddings().weight[ids])
    assert model.peft_kernels_config.init_text == ids[:3] and model.peft_kernels_config.tokenizer is None
    pk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["config"]["init_text"] == ids[:3]
    fresh = pk.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(fresh.peft_kernels_prompt.embedding, model.peft_kernels_prompt.embedding)


def test_vocab_init_takes_rows_of_the_vocabulary():
    model = pk.apply(tiny_llama(), pk.PromptTuningConfig(L, init="vocab"))
    vocab = model.get_input_embeddings().weight
    for row in model.peft_kernels_prompt.embedding:
        assert (vocab == row).all(dim=1).any()


@pytest.mark.parametrize("config_name", ["prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_projection"])
def test_ours_loads_in_peft_with_the_same_logits(config_name, tmp_path):
    model = applied("llama", config_name)
    pk.prompts.save_peft(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == model.peft_kernels_config.peft_type and "format" not in raw
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"prompt_embeddings"}
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids, mask, _ = batch("llama")
    got, want = logits(model, ids, mask), logits(theirs, ids, mask)
    assert got.shape == want.shape
    offset = 0 if config_name.startswith("prefix") else L  # the real tokens' positions
    assert torch.allclose(got[:, offset:], want[:, offset:], atol=1e-5)


@pytest.mark.parametrize("config_name", ["prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_projection"])
def test_ours_loads_in_peft_with_the_same_logits_bert(config_name, tmp_path):
    model = applied("bert", config_name)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)  # a trained head travels as PEFT's modules_to_save
    pk.prompts.save_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path).eval()
    ids, mask, _ = batch("bert")
    if config_name.startswith("prefix"):
        # PEFT 0.21's prefix forward refuses BERT on transformers 5.24 (it looks for a 'past_key_values' argument,
        # now 'cache'); its own prompt builder, fed to the model, is the reference.
        with torch.no_grad():
            cache = theirs.get_prompt(batch_size=2)
            full_mask = torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], dim=1)
            want = theirs.base_model(input_ids=ids, attention_mask=full_mask, cache=cache).logits
    else:
        want = logits(theirs, ids, mask)
    assert torch.allclose(logits(model, ids, mask), want, atol=1e-5)


@pytest.mark.parametrize("model_name,config_name", CASES)
def test_peft_saved_loads_here_with_the_same_logits(model_name, config_name, tmp_path):
    make, _, task = MODELS[model_name]
    theirs = peft.get_peft_model(make(), CONFIGS[config_name][1](task))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:  # the classifier's copy too: loading it must be what makes the logits agree
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    theirs.save_pretrained(tmp_path)
    theirs.eval()
    ours = pk.load_adapter(make(), tmp_path)
    ids, mask, _ = batch(model_name)
    if model_name == "bert" and config_name.startswith("prefix"):
        with torch.no_grad():
            cache = theirs.get_prompt(batch_size=2)
            full_mask = torch.cat([torch.ones(2, L, dtype=mask.dtype), mask], dim=1)
            want = theirs.base_model(input_ids=ids, attention_mask=full_mask, cache=cache).logits
    else:
        want = logits(theirs, ids, mask)
    got = logits(ours, ids, mask)
    offset = L if model_name == "llama" and not config_name.startswith("prefix") else 0
    assert got.shape == want.shape
    assert torch.allclose(got[:, offset:], want[:, offset:], atol=1e-5)


# --------------------------------------------------------------------------------------------------- fold


@pytest.mark.parametrize("model_name", MODELS)
def test_fold_prefix_projection(model_name, tmp_path):
    model = applied(model_name, "prefix_projection")
    ids, mask, _ = batch(model_name)
    before = logits(model, ids, mask)
    model.peft_kernels_config.fold(model)
    assert torch.allclose(logits(model, ids, mask), before, atol=1e-6)
    assert not model.peft_kernels_config.prefix_projection
    assert {n for n, _ in model.peft_kernels_prefix.named_parameters()} == {"prefixes"}
    pk.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    head = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} if model_name == "bert" else set()
    assert set(saved) == {"base_model.model.peft_kernels_prefix.prefixes"} | head
    fresh = pk.load_adapter(MODELS[model_name][0](), tmp_path)
    assert torch.equal(logits(fresh, ids, mask), logits(model, ids, mask))


def test_fold_ptuning_leaves_prompt_tuning():
    model = applied("llama", "ptuning_lstm")
    ids, mask, _ = batch("llama")
    before = logits(model, ids, mask)
    model.peft_kernels_config.fold(model)
    assert isinstance(model.peft_kernels_config, pk.PromptTuningConfig)
    assert isinstance(model.peft_kernels_prompt, pk.nn.PromptEmbedding)
    assert torch.allclose(logits(model, ids, mask), before, atol=1e-6)
    assert pk.trainable_parameters(model)[0] == L * 64


# ------------------------------------------------------------------------------------- other modules too


def test_install_prefix_next_to_lora_and_a_prompt():
    model = pk.apply(tiny_llama(), pk.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    reference = pk.apply(tiny_llama(), pk.LoRAConfig(r=4, alpha=8))
    reference.load_state_dict(model.state_dict())
    # Prefix first, prompt second: the prompt's hook still runs first.
    encoder = pk.prompts.install_prefix(model, pk.PrefixTuningConfig(L))
    prompt = pk.prompts.install_prompt(model, pk.PromptTuningConfig(3))
    assert model.peft_kernels_prefix is encoder and not hasattr(model, "peft_kernels_config")
    ids, mask, _ = batch("llama")
    with torch.no_grad():
        embeds = torch.cat([prompt.embedding.expand(2, -1, -1), reference.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, L + 3, dtype=mask.dtype), mask], dim=1)
        want = reference(inputs_embeds=embeds, attention_mask=full_mask,
                         cache=prefix_cache(encoder.prefixes, *kv_dims(reference), 2)).logits
    assert torch.allclose(logits(model, ids, mask), want, atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("make", [pk.PromptTuningConfig, pk.PTuningConfig, pk.PrefixTuningConfig])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_virtual_tokens_must_be_positive(make, bad):
    with pytest.raises(ValueError, match=rf"{make.__name__}: argument 'num_virtual_tokens' must be an int >= 1"):
        make(bad)


@pytest.mark.parametrize("make,kwargs,message", [
    (pk.PromptTuningConfig, {"init": "zeros"}, "argument 'init' must be one of"),
    (pk.PromptTuningConfig, {"init": "text"}, "init='text' needs argument 'init_text'"),
    (pk.PTuningConfig, {"encoder": "gru"}, "argument 'encoder' must be one of"),
    (pk.PTuningConfig, {"encoder_hidden_size": 0}, "argument 'encoder_hidden_size' must be an int >= 1"),
    (pk.PTuningConfig, {"encoder_dropout": 1.0}, r"argument 'encoder_dropout' must be in \[0, 1\)"),
    (pk.PrefixTuningConfig, {"prefix_projection": "yes"}, "argument 'prefix_projection' must be a bool"),
])
def test_bad_config_arguments(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_text_init_needs_a_tokenizer_and_valid_ids():
    with pytest.raises(ValueError, match="needs argument 'tokenizer'"):
        pk.apply(tiny_llama(), pk.PromptTuningConfig(L, init="text", init_text="abc"))
    with pytest.raises(ValueError, match=r"init_text must give token ids in \[0, 101\)"):
        pk.apply(tiny_llama(), pk.PromptTuningConfig(L, init="text", init_text=[5, 500]))


class NoEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def get_input_embeddings(self):
        raise NotImplementedError

    def forward(self, x):
        return self.linear(x)


@pytest.mark.parametrize("config", [pk.PromptTuningConfig(L), pk.PTuningConfig(L)], ids=["prompt", "ptuning"])
@pytest.mark.parametrize("model", [nn.Linear(4, 4), NoEmbeddings()], ids=["linear", "not_implemented"])
def test_model_without_input_embeddings(config, model):
    with pytest.raises(ValueError, match=r"has no input embeddings \(get_input_embeddings\(\) must return an "
                                         r"nn.Embedding"):
        pk.apply(model, config)
    assert not hasattr(model, "peft_kernels_prompt") and all(p.requires_grad for p in model.parameters())


def tiny_distilbert():
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=BERT_VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=48, num_labels=3)).eval()


def test_prefix_on_a_model_without_a_kv_cache_path():
    model = tiny_distilbert()  # its attention takes no cache in transformers 5.24
    with pytest.raises(ValueError, match=r"DistilBertForSequenceClassification has no KV-cache path for prefixes: "
                                         r"it needs, for each of its 1 layers, an attention module with a layer_idx"):
        pk.apply(model, pk.PrefixTuningConfig(L))
    assert not hasattr(model, "peft_kernels_prefix") and not hasattr(model, "peft_kernels_config")
    assert all(p.requires_grad for p in model.parameters()) and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="has no KV-cache path for prefixes: its config must give num_hidden_layers"):
        pk.prompts.install_prefix(NoEmbeddings(), pk.PrefixTuningConfig(L))
    # Prompts need no cache: the same model takes them.
    pk.apply(model, pk.PromptTuningConfig(L))
    ids, mask, _ = batch("bert")
    assert logits(model, ids, mask).shape == (2, 3)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_applying_twice(config_name):
    model = applied("llama", config_name)
    with pytest.raises(ValueError, match=r"apply: LlamaForCausalLM already carries a \w+Config; apply \w+Config to a "
                                         "fresh model"):
        pk.apply(model, CONFIGS[config_name][0]())
    with pytest.raises(ValueError, match="already carries"):
        pk.apply(model, pk.PromptTuningConfig(L))
    assert len(model._forward_pre_hooks) == 1


def test_installing_twice():
    model = tiny_llama()
    pk.prompts.install_prefix(model, pk.PrefixTuningConfig(L))
    with pytest.raises(ValueError, match=r"PrefixTuningConfig: LlamaForCausalLM already carries prefixes"):
        pk.prompts.install_prefix(model, pk.PrefixTuningConfig(L))
    pk.prompts.install_prompt(model, pk.PTuningConfig(L))
    with pytest.raises(ValueError, match=r"PromptTuningConfig: LlamaForCausalLM already carries soft prompts"):
        pk.prompts.install_prompt(model, pk.PromptTuningConfig(L))


def test_fold_needs_the_config_on_the_model():
    model = applied("llama", "prompt")
    with pytest.raises(ValueError, match="fold: LlamaForCausalLM does not carry a PrefixTuningConfig"):
        pk.PrefixTuningConfig(L, prefix_projection=True).fold(model)


def test_peft_file_for_another_model_loads_nothing(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L))
    theirs.save_pretrained(tmp_path)
    model = tiny_bert_classifier()
    with pytest.raises(ValueError, match=r"does not match a PrefixTuningConfig of BertForSequenceClassification: "
                                         r"missing \['classifier.bias', 'classifier.weight'\]"):
        pk.load_adapter(model, tmp_path)
    assert not hasattr(model, "peft_kernels_prefix") and all(p.requires_grad for p in model.parameters())
    other = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"peft_kernels_prefix.prefixes has shape \[5, 128\] in .* but \[5, 192\]"):
        pk.load_adapter(other, tmp_path)
    assert not hasattr(other, "peft_kernels_prefix")


def test_save_peft_needs_a_soft_prompt(tmp_path):
    with pytest.raises(ValueError, match="save_peft: LlamaForCausalLM carries no soft prompt"):
        pk.prompts.save_peft(pk.apply(tiny_llama(), pk.LoRAConfig(r=2)), tmp_path)
