"""LoRA derivatives (peft_kernels.lora_variants): LoRA-FA, DyLoRA, Delta-LoRA, AdaLoRA and LoftQ, on the tiny
LLaMA and BERT classifier. Logits are checked against an independent reference: a copy of the base model whose
targeted weights get the update each method's paper defines, computed here in plain torch."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peft_kernels as pk
from peft_kernels import lora_variants as lv
from tiny_models import (BERT_VOCAB, LLAMA_VOCAB, assert_untouched, randomize, saved_tensors, snapshot,
                         tiny_bert_classifier, tiny_llama, tokens)

MODELS = {"llama": (tiny_llama, LLAMA_VOCAB), "bert": (tiny_bert_classifier, BERT_VOCAB)}
TARGETS = {"llama": [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")],
           "bert": [f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "value")]}
HEAD = {"llama": 0, "bert": 32 * 3 + 3}  # BERT's fresh classifier [3, 32] + bias stays trainable
SHAPES = {"llama": [(64, 64), (64, 32)] * 2, "bert": [(32, 32), (32, 32)]}  # (in, out) of each target


def adapter_weights(parts=("lora_A", "lora_B", "lora_E"), head=False):
    """Selects the adapter weights named ``parts`` (and, with ``head``, the classifier: BERT's trainable head)."""
    return lambda name: name.rpartition(".")[2] in parts or (head and "classifier" in name)


def logits(model, kind, seed=3):
    with torch.no_grad():
        return model(tokens(MODELS[kind][1], seed=seed)).logits


def reference_logits(kind, model, delta):
    """The base model with W += delta(module) on every target, in plain torch (the head copied over)."""
    ref = MODELS[kind][0]()
    with torch.no_grad():
        for name in TARGETS[kind]:
            ref.get_submodule(name).weight += delta(model.get_submodule(name))
        if kind == "bert":
            ref.classifier.load_state_dict(model.classifier.state_dict())
    return logits(ref, kind)


def train(model, kind, steps=5, lr=1e-2, after_backward=None, optimizer=None):
    model.train()
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = tokens(MODELS[kind][1], shape=(4, 9), seed=7)
    labels = ids if kind == "llama" else torch.tensor([0, 1, 2, 1])
    losses = []
    for step in range(steps):
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        if after_backward is not None:
            after_backward(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def check_applied(model, kind, kind_of_module, per_module):
    """The targets (only) became ``kind_of_module``; trainable = per_module(in, out) summed + the task head."""
    swapped = [n for n, m in model.named_modules() if isinstance(m, kind_of_module)]
    assert swapped == TARGETS[kind]
    trainable, total = pk.trainable_parameters(model)
    assert trainable == sum(per_module(i, o) for i, o in SHAPES[kind]) + HEAD[kind]
    assert all(".lora_" in n or n.startswith("classifier.") for n, p in model.named_parameters() if p.requires_grad)


def check_merge(model, kind, modules):
    before = logits(model, kind)
    weights = [m.weight.clone() for m in modules]
    for m in modules:
        m.merge()
    assert torch.allclose(logits(model, kind), before, atol=1e-5)
    for m in modules:
        m.unmerge()
    assert all(torch.allclose(m.weight, w, atol=1e-6) for m, w in zip(modules, weights))
    assert torch.allclose(logits(model, kind), before, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- LoRA-FA
@pytest.mark.parametrize("kind", MODELS)
def test_lorafa_apply_forward_train_merge(kind):
    model = pk.apply(MODELS[kind][0](), pk.LoRAFAConfig(r=4, alpha=8))
    check_applied(model, kind, pk.nn.LoRALinear, lambda i, o: 4 * o)  # only B [out, 4] trains
    randomize(model, replace=True, select=adapter_weights())
    assert torch.allclose(logits(model, kind), reference_logits(
        kind, model, lambda m: 8 / 4 * m.lora_B @ m.lora_A), atol=1e-5)
    frozen = {n: p.clone() for n, p in model.named_parameters() if n.endswith("lora_A")}
    losses = train(model, kind)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n.endswith("lora_A"))
    check_merge(model, kind, [model.get_submodule(n) for n in TARGETS[kind]])


def saved_bytes(model, ids):
    """Bytes of every tensor autograd saves for backward in a forward (a tensor saved twice counts twice)."""
    _, saved = saved_tensors(lambda: model(ids).logits.sum())
    return sum(t.numel() * t.element_size() for t in saved)


def test_lorafa_backward_keeps_xa_not_x():
    """Per targeted layer, LoRA-FA's backward keeps x A^T [2, 9, r] instead of x [2, 9, 64] (fp32): exactly
    4 layers * 2*9*64*4 bytes less than LoRA, and none of the saved tensors of a layer is its input."""
    ids = tokens(LLAMA_VOCAB)
    lora = pk.apply(tiny_llama(), pk.LoRAConfig(r=4))
    fa = pk.apply(tiny_llama(), pk.LoRAFAConfig(r=4))
    assert saved_bytes(lora, ids) - saved_bytes(fa, ids) == 4 * 2 * 9 * 64 * 4
    layer = fa.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 9, 64)
    _, saved = saved_tensors(lambda: layer(x))
    assert saved and not any(t.data_ptr() == x.data_ptr() for t in saved)
    assert any(tuple(t.shape) == (2, 9, 4) for t in saved)


def test_lorafa_saves_peft_lora_format(tmp_path):
    model = pk.apply(tiny_bert_classifier(), pk.LoRAFAConfig(r=4, alpha=8))
    randomize(model, replace=True, select=adapter_weights(parts=("lora_A", "lora_B"), head=True))
    ours = logits(model, "bert")
    pk.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(k.endswith("lora_A.weight") for k in keys) == 2 and sum(k.endswith("lora_B.weight") for k in keys) == 2
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path).eval()
    assert torch.allclose(logits(theirs, "bert"), ours, atol=1e-5)
    # Continuing LoRA-FA: apply the config, then load into it (A stays frozen).
    again = pk.load_adapter(pk.apply(tiny_bert_classifier(), pk.LoRAFAConfig(r=4, alpha=8)), tmp_path)
    assert torch.equal(logits(again, "bert"), ours)
    assert not any(p.requires_grad for n, p in again.named_parameters() if n.endswith("lora_A"))


# ------------------------------------------------------------------------------------------------------ DyLoRA
@pytest.mark.parametrize("kind", MODELS)
def test_dylora_apply_rank_forward_train_merge(kind):
    model = pk.apply(MODELS[kind][0](), pk.DyLoRAConfig(r=6, alpha=12, seed=5))
    check_applied(model, kind, pk.nn.DyLoRALinear, lambda i, o: 6 * (i + o))
    randomize(model, replace=True, select=adapter_weights())
    for b in (1, 3, 6):
        lv.set_rank(model, b)
        expected = reference_logits(kind, model, lambda m: 12 / b * m.lora_B[:, :b] @ m.lora_A[:b])
        assert torch.allclose(logits(model, kind), expected, atol=1e-5)
    lv.set_rank(model, None)  # eval without a fixed rank: the full rank r
    assert torch.allclose(logits(model, kind), expected, atol=1e-5)
    losses = train(model, kind, steps=8)
    assert losses[-1] < losses[0]
    lv.set_rank(model, 2)
    modules = [model.get_submodule(n) for n in TARGETS[kind]]
    check_merge(model, kind, modules)
    modules[0].merge()
    with pytest.raises(RuntimeError, match="merged at rank 2; unmerge"):
        lv.set_rank(model, 3)


def test_dylora_samples_from_its_seed_and_grads_reach_the_first_b():
    """Each training forward draws b with the seeded generator (replayed here); the gradients of the rows of A
    and columns of B past b are exactly zero, those before it are not."""
    model = pk.apply(tiny_llama(), pk.DyLoRAConfig(r=6, seed=11)).train()
    randomize(model, replace=True, select=adapter_weights())
    replay = torch.Generator().manual_seed(11)
    ids = tokens(LLAMA_VOCAB)
    for _ in range(3):
        model(ids).logits.square().mean().backward()
        for name in TARGETS["llama"]:  # modules run in this order in the forward
            m = model.get_submodule(name)
            b = int(torch.randint(1, 7, (), generator=replay))
            assert m.lora_A.grad[b:].abs().sum() == 0 and m.lora_B.grad[:, b:].abs().sum() == 0
            assert m.lora_A.grad[:b].abs().sum() > 0 and m.lora_B.grad[:, :b].abs().sum() > 0
        model.zero_grad()


def test_dylora_save_load(tmp_path):
    model = pk.apply(tiny_bert_classifier(), pk.DyLoRAConfig(r=4))
    randomize(model, replace=True, select=adapter_weights(parts=("lora_A", "lora_B"), head=True))
    pk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEFT_KERNELS_DYLORA"
    loaded = pk.load_adapter(tiny_bert_classifier(), tmp_path)
    for b in (2, 4):
        assert torch.equal(logits(lv.set_rank(loaded, b), "bert"), logits(lv.set_rank(model, b), "bert"))


def test_dylora_bad_input():
    model = pk.apply(tiny_llama(), pk.DyLoRAConfig(r=4))
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match=r"argument 'rank' must be None or an int in \[1, 4\], got"):
            lv.set_rank(model, bad)
    with pytest.raises(ValueError, match="has no DyLoRALinear"):
        lv.set_rank(tiny_llama(), 2)
    with pytest.raises(ValueError, match="DyLoRAConfig: argument 'r' must be an int >= 1, got 0"):
        pk.DyLoRAConfig(r=0)


# -------------------------------------------------------------------------------------------------- Delta-LoRA
@pytest.mark.parametrize("kind", MODELS)
def test_delta_lora_base_weight_follows_the_adapter(kind):
    """After N AdamW steps, W_N - W_0 == update_ratio * (dW_N - dW_0), dW = alpha / r * B A, per target."""
    model = pk.apply(MODELS[kind][0](), pk.DeltaLoRAConfig(r=4, alpha=8, update_ratio=0.5))
    check_applied(model, kind, pk.nn.LoRALinear, lambda i, o: 4 * (i + o))
    randomize(model, replace=True, select=adapter_weights(parts=("lora_A", "lora_B")))
    assert torch.allclose(logits(model, kind), reference_logits(kind, model, lambda m: 2 * m.lora_B @ m.lora_A),
                          atol=1e-5)
    modules = [model.get_submodule(n) for n in TARGETS[kind]]
    w0 = [m.weight.clone() for m in modules]
    d0 = [2 * m.lora_B.detach() @ m.lora_A.detach() for m in modules]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lv.attach_optimizer(model, optimizer)
    losses = train(model, kind, steps=6, optimizer=optimizer)
    assert losses[-1] < losses[0]
    for m, w, d in zip(modules, w0, d0):
        change = 2 * m.lora_B.detach() @ m.lora_A.detach() - d
        assert change.abs().max() > 1e-3
        assert torch.allclose(m.weight - w, 0.5 * change, atol=1e-6)


def test_delta_lora_save_keeps_updated_weights(tmp_path):
    model = pk.apply(tiny_llama(), pk.DeltaLoRAConfig(r=4))
    randomize(model, replace=True, select=adapter_weights(parts=("lora_A", "lora_B")))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    lv.attach_optimizer(model, optimizer)
    train(model, "llama", steps=2, optimizer=optimizer)
    pk.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model.") for k in keys if k.endswith(".weight")} == {
        f"{n}.weight" for n in TARGETS["llama"]}
    loaded = pk.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, "llama"), logits(model, "llama"))
    assert not torch.equal(loaded.model.layers[0].self_attn.q_proj.weight,
                           tiny_llama().model.layers[0].self_attn.q_proj.weight)
    check_merge(loaded, "llama", [loaded.get_submodule(n) for n in TARGETS["llama"]])


def test_delta_lora_bad_input():
    with pytest.raises(ValueError, match="attach_optimizer: argument 'model' must carry a DeltaLoRAConfig"):
        lv.attach_optimizer(pk.apply(tiny_llama(), pk.DyLoRAConfig()), torch.optim.SGD([nn.Parameter(torch.ones(1))]))
    model = pk.apply(tiny_llama(), pk.DeltaLoRAConfig())
    with pytest.raises(TypeError, match="argument 'optimizer' must be a torch.optim.Optimizer, got list"):
        lv.attach_optimizer(model, [])
    with pytest.raises(ValueError, match="DeltaLoRAConfig: argument 'update_ratio' must be a number, got 'x'"):
        pk.DeltaLoRAConfig(update_ratio="x")


# ----------------------------------------------------------------------------------------------------- AdaLoRA
def ada_delta(alpha, init_r):
    return lambda m: alpha / init_r * m.lora_B @ torch.diag(m.lora_E.view(-1)) @ m.lora_A


@pytest.mark.parametrize("kind", MODELS)
def test_adalora_matches_peft_count_and_reference(kind):
    model = pk.apply(MODELS[kind][0](), pk.AdaLoRAConfig(init_r=6, target_r=2, total_step=10))
    check_applied(model, kind, pk.nn.AdaLoRALinear, lambda i, o: 6 * (i + o + 1))
    extra = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    theirs = peft.get_peft_model(MODELS[kind][0](), peft.AdaLoraConfig(
        init_r=6, target_r=2, total_step=10, target_modules=sorted({n.rpartition(".")[2] for n in TARGETS[kind]}),
        **extra))
    assert pk.trainable_parameters(model)[0] == theirs.get_nb_trainable_parameters()[0]
    assert torch.equal(logits(model, kind), logits(MODELS[kind][0](), kind))  # Lambda starts at zero
    randomize(model, replace=True, select=adapter_weights())
    assert torch.allclose(logits(model, kind), reference_logits(kind, model, ada_delta(8, 6)), atol=1e-5)
    model.train()
    ids = tokens(MODELS[kind][1])
    model(ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_" in n)
    model.eval()
    check_merge(model, kind, [model.get_submodule(n) for n in TARGETS[kind]])


def test_adalora_orth_regularization():
    model = pk.apply(tiny_llama(), pk.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, orth_reg_weight=0.3))
    randomize(model, replace=True, select=adapter_weights())
    expected = 0.0
    for name in TARGETS["llama"]:
        m = model.get_submodule(name)
        expected += torch.linalg.matrix_norm(m.lora_B.T @ m.lora_B - torch.eye(4)) ** 2
        expected += torch.linalg.matrix_norm(m.lora_A @ m.lora_A.T - torch.eye(4)) ** 2
    reg = lv.orth_regularization(model)
    assert torch.allclose(reg, expected / 4, rtol=1e-5)
    loss = lv.add_orth_regularization(model, torch.tensor(1.0))
    assert torch.allclose(loss, 1 + 0.3 * expected / 4, rtol=1e-5)
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.grad.abs().sum() > 0


def test_adalora_budget_schedule():
    config = pk.AdaLoRAConfig(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)
    init, target = 24, 8
    for step in range(15):
        got = lv._budget(config, step, init, target)
        if step <= 2:
            assert got == (init, False)
        elif step > 9:
            assert got == (target, True)
        else:
            assert got == (int((init - target) * (1 - (step - 2) / 7) ** 3 + target), step % 2 == 0)


def test_adalora_allocation_matches_an_independent_reference():
    """Two calls with set gradients (steps 0 and 1, tinit 0): the Lambda entries kept at step 1 are the top
    `budget` triplets by EMA(|w g|) * EMA(uncertainty) summed over Lambda_i, mean over Q's row, mean over P's column."""
    config = pk.AdaLoRAConfig(init_r=4, target_r=1, beta1=0.7, beta2=0.6, total_step=3)
    model = pk.apply(tiny_llama(), config)
    randomize(model, replace=True, select=adapter_weights())
    modules = {n: model.get_submodule(n) for n in TARGETS["llama"]}
    g = torch.Generator().manual_seed(9)
    ema, unc = {}, {}
    for step in range(2):
        for name, m in modules.items():
            for part in ("lora_A", "lora_B", "lora_E"):
                p = getattr(m, part)
                p.grad = torch.randn(p.shape, generator=g)
                imp = (p.detach() * p.grad).abs()
                key = (name, part)
                ema[key] = 0.7 * ema.get(key, 0) + 0.3 * imp
                unc[key] = 0.6 * unc.get(key, 0) + 0.4 * (imp - ema[key]).abs()
        pattern = lv.update_and_allocate(model, step)
        assert (pattern is None) == (step == 0)
    s = {(n, p): ema[(n, p)] * unc[(n, p)] for n in modules for p in ("lora_A", "lora_B", "lora_E")}
    scores = torch.cat([s[(n, "lora_E")].view(-1) + s[(n, "lora_A")].mean(1) + s[(n, "lora_B")].mean(0)
                        for n in modules])
    kept = int((16 - 4) * (1 - 1 / 3) ** 3 + 4)
    expected = torch.zeros(16, dtype=torch.bool)
    expected[scores.topk(kept).indices] = True
    got = torch.cat([m.lora_E.view(-1) != 0 for m in modules.values()])
    assert torch.equal(got, expected) and kept < 16
    assert pattern == {n: e.tolist() for n, e in zip(modules, expected.view(4, 4))}


def test_adalora_training_ends_at_target_budget(tmp_path):
    config = pk.AdaLoRAConfig(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=8)
    model = pk.apply(tiny_llama(), config)
    losses = train(model, "llama", steps=10, after_backward=lambda step: lv.update_and_allocate(model, step))
    assert losses[-1] < losses[0]
    kept = sum(int((m.lora_E != 0).sum()) for m in model.modules() if isinstance(m, pk.nn.AdaLoRALinear))
    assert kept == 2 * 4
    pk.save_adapter(model, tmp_path)
    loaded = pk.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, "llama"), logits(model, "llama"))


@pytest.mark.parametrize("kind", MODELS)
def test_adalora_round_trips_with_peft(tmp_path, kind):
    """Ours -> PEFT's ADALORA format -> peft loads the same logits; PEFT's save (rank_pattern pruning the layers)
    -> our load_adapter -> the same logits as PEFT's model."""
    model = pk.apply(MODELS[kind][0](), pk.AdaLoRAConfig(init_r=4, target_r=2, total_step=10))
    randomize(model, replace=True, select=adapter_weights(head=True))
    lv.save_peft_adalora(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(MODELS[kind][0](), tmp_path / "ours").eval()
    assert torch.allclose(logits(theirs, kind), logits(model, kind), atol=1e-5)
    extra = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    source = peft.get_peft_model(MODELS[kind][0](), peft.AdaLoraConfig(
        init_r=4, target_r=1, total_step=10, target_modules=sorted({n.rpartition(".")[2] for n in TARGETS[kind]}),
        **extra))
    randomize(source, replace=True, select=adapter_weights(head=True))
    pattern = {f"{n}.lora_E.default": [i != j % 4 for i in range(4)]
               for j, n in enumerate(TARGETS[kind])}
    source.peft_config["default"].rank_pattern = pattern
    source.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["rank_pattern"]
    reloaded = peft.PeftModel.from_pretrained(MODELS[kind][0](), tmp_path / "theirs").eval()
    ours = pk.load_adapter(MODELS[kind][0](), tmp_path / "theirs")
    assert [m.r for m in ours.modules() if isinstance(m, pk.nn.AdaLoRALinear)] == [3] * len(TARGETS[kind])
    assert torch.allclose(logits(ours, kind), logits(reloaded, kind), atol=1e-5)
    with pytest.raises(NotImplementedError, match="hold fewer than init_r=4 ranks"):
        pk.save_adapter(ours, tmp_path / "again")


def test_adalora_bad_input():
    for kwargs, message in [(dict(), "argument 'total_step' must be an int > 0, got None"),
                            (dict(total_step=10, target_r=13), r"argument 'target_r' must be an int in \[1, init_r=12\]"),
                            (dict(total_step=10, tinit=8, tfinal=2), "argument 'tinit' must be < total_step - tfinal"),
                            (dict(total_step=10, beta1=1.0), r"argument 'beta1' must be a float in \(0, 1\)")]:
        with pytest.raises(ValueError, match=f"AdaLoRAConfig: {message}"):
            pk.AdaLoRAConfig(**kwargs)
    model = pk.apply(tiny_llama(), pk.AdaLoRAConfig(init_r=4, target_r=2, total_step=10))
    with pytest.raises(ValueError, match="q_proj.lora_A has no gradient; call it after backward"):
        lv.update_and_allocate(model, 0)
    with pytest.raises(ValueError, match="must carry an AdaLoRAConfig"):
        lv.orth_regularization(tiny_llama())


# ------------------------------------------------------------------------------------------------------- LoftQ
def test_loftq_reduces_the_quantization_error():
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    with torch.no_grad():  # a weight with a strong low-rank part, which LoftQ's adapter can take over
        linear.weight += 0.3 * torch.randn(96, 4) @ torch.randn(4, 128) / 8
    w = linear.weight.detach().clone()
    plain = pk.nn.QLoRALinear.from_linear(linear, r=8, alpha=16, compute_dtype=torch.float32)
    nf4_error = (w - plain.dequantize(torch.float32)).norm().item()
    errors = []
    for iters in (1, 2, 4):
        module = pk.nn.QLoRALinear.from_linear(linear, r=8, alpha=16, compute_dtype=torch.float32)
        reported = pk.loftq_init(module, w, iters)
        approx = module.dequantize(torch.float32) + 2 * module.lora_B @ module.lora_A
        errors.append((w - approx).norm().item())
        assert errors[-1] == pytest.approx(reported[-1], rel=1e-4)
        x = torch.randn(5, 128)
        assert torch.allclose(module(x), x @ approx.T + linear.bias, atol=1e-4)
    assert errors[0] < 0.9 * nf4_error
    assert errors[1] <= errors[0] * (1 + 1e-4) and errors[2] <= errors[1] * (1 + 1e-4)


def test_qlora_config_loftq_init():
    """QLoRAConfig(init="loftq") on the tiny LLaMA: each adapted layer approximates its original weight better
    than NF4 alone, and the model's logits move closer to the full-precision model's."""
    fp = tiny_llama()
    plain = pk.apply(tiny_llama(), pk.QLoRAConfig(r=4, compute_dtype=torch.float32))
    loftq = pk.apply(tiny_llama(), pk.QLoRAConfig(r=4, compute_dtype=torch.float32, init="loftq", loftq_iter=2))
    for name in TARGETS["llama"]:
        w = fp.get_submodule(name).weight
        a, b = plain.get_submodule(name), loftq.get_submodule(name)
        assert torch.equal(a.lora_B, torch.zeros_like(a.lora_B))
        approx = b.dequantize(torch.float32) + b.scaling * b.lora_B @ b.lora_A
        assert (w - approx).norm() < 0.95 * (w - a.dequantize(torch.float32)).norm()
    reference = logits(fp, "llama")
    assert (logits(loftq, "llama") - reference).norm() < (logits(plain, "llama") - reference).norm()
    with pytest.raises(ValueError, match="QLoRAConfig: argument 'init' must be 'default' or 'loftq', got 'svd'"):
        pk.apply(tiny_llama(), pk.QLoRAConfig(init="svd"))


def test_loftq_bad_input():
    module = pk.nn.QLoRALinear.from_linear(nn.Linear(64, 32), r=4, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"argument 'weight' must be a tensor of shape \[32, 64\], got \[64, 32\]"):
        pk.loftq_init(module, torch.zeros(64, 32))
    with pytest.raises(TypeError, match="argument 'module' must be a QLoRALinear, got Linear"):
        pk.loftq_init(nn.Linear(64, 32), torch.zeros(32, 64))
    with pytest.raises(ValueError, match="argument 'iters' must be an int >= 1, got 0"):
        pk.loftq_init(module, torch.zeros(32, 64), 0)


# ------------------------------------------------------------------------------------------------------ common
@pytest.mark.parametrize("config", [pk.LoRAFAConfig(target_modules=["nope"]), pk.DyLoRAConfig(target_modules=["nope"]),
                                    pk.DeltaLoRAConfig(target_modules=["nope"]),
                                    pk.AdaLoRAConfig(total_step=5, target_modules=["nope"])],
                         ids=lambda c: type(c).__name__)
def test_failed_apply_leaves_the_model_unchanged(config):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no nn.Linear"):
        pk.apply(model, config)
    assert_untouched(model, before)


def test_loftq_keeps_quant_storage():
    """LoftQ replaces the packed base; with quant_storage the codes stay a frozen float parameter (what FSDP
    shards) viewing the new bytes."""
    torch.manual_seed(0)
    model = tiny_llama()
    pk.apply(model, pk.QLoRAConfig(r=4, compute_dtype=torch.float32, init="loftq", quant_storage=torch.bfloat16))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.codes, torch.nn.Parameter) and layer.codes.dtype == torch.bfloat16
    assert not layer.codes.requires_grad
    plain = tiny_llama()
    pk.apply(plain, pk.QLoRAConfig(r=4, compute_dtype=torch.float32, init="loftq"))
    assert torch.equal(layer.codes.view(torch.uint8), plain.model.layers[0].self_attn.q_proj.codes)
