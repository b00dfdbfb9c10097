"""Sparse fine-tuning at the model level: SparseAdamW / SparseSGD in a training loop (against the reference step,
bit for bit), state_dict resume, the mask builders of peft_kernels.sparse, SparseFTConfig through
peft_kernels.apply, and sparse diffs on disk."""

import copy
import io
import os

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import peft_kernels as pk
from peft_kernels import reference as R
from peft_kernels import sparse


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 29), nn.Tanh(), nn.Linear(29, 7)).to(dtype)


def batches(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 13, generator=g).to(dtype), torch.randn(8, 7, generator=g).to(dtype)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).float().mean()


def train(model, opt, data):
    for batch in data:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()


def test_sparse_adamw_matches_reference_in_a_training_loop():
    """50 steps of a model whose gradients depend on the weights: SparseAdamW and the reference step applied by
    hand stay identical bit for bit; entries outside the selection never move."""
    model = mlp()
    start = copy.deepcopy(model)
    masks = sparse.random_mask(model, 0.3, seed=5)
    opt = pk.optim.SparseAdamW(pk.optim.sparse_parameters(model, masks), lr=1e-2, weight_decay=0.1)
    train(model, opt, batches(50))

    ref = copy.deepcopy(start)
    params = dict(ref.named_parameters())
    state = {n: (torch.zeros(i.numel()), torch.zeros(i.numel())) for n, i in masks.items()}
    for step, batch in enumerate(batches(50), start=1):
        ref.zero_grad()
        mse(ref, batch).backward()
        with torch.no_grad():
            for n, idx in masks.items():
                R.masked_adamw_step_(params[n], params[n].grad, idx, *state[n], None, step, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    for (n, p), q, p0 in zip(model.named_parameters(), ref.parameters(), start.parameters()):
        assert torch.equal(p, q), n
        outside = torch.ones(p.numel(), dtype=torch.bool)
        outside[masks[n]] = False
        assert torch.equal(p.detach().reshape(-1)[outside], p0.detach().reshape(-1)[outside]), n
        assert not torch.equal(p, p0), n


@pytest.mark.parametrize("kind", ["adamw-fp32", "adamw-bf16", "adamw-child", "sgd-momentum"])
def test_state_dict_resume_is_bit_exact(kind):
    dtype = torch.bfloat16 if kind == "adamw-bf16" else torch.float32

    def make(model):
        named = pk.optim.sparse_parameters(model, sparse.random_mask(model, 0.4, seed=2))
        if kind == "sgd-momentum":
            return pk.optim.SparseSGD(named, lr=0.05, momentum=0.9, weight_decay=0.01)
        return pk.optim.SparseAdamW(named, lr=1e-2, child_p=0.5 if kind == "adamw-child" else 1.0, seed=11)

    data = batches(12, dtype=dtype)
    model = mlp(dtype=dtype)
    opt = make(model)
    train(model, opt, data[:6])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[6:])

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = mlp(seed=99, dtype=dtype)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(checkpoint["opt"])
    if kind == "adamw-bf16":
        assert all(s["master"].dtype == torch.float32 and s["exp_avg"].dtype == torch.float32 for s in opt2.state.values())
    train(resumed, opt2, data[6:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_checks_before_changing_anything():
    model = mlp()
    opt = pk.optim.SparseAdamW(pk.optim.sparse_parameters(model, sparse.random_mask(model, 0.2)), lr=1e-2)
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros(3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter '0.weight' needs exp_avg of 75 entries \(one per index\), got \[3\]"):
        opt.load_state_dict(saved)
    assert all(torch.equal(opt.state_dict()["state"][0][k], before["state"][0][k]) for k in ("exp_avg", "indices"))


@pytest.mark.parametrize("idx,message", [
    (torch.tensor([3, 1]), r"parameter 'w' must be strictly increasing .* got indices\[0\] = 3, indices\[1\] = 1"),
    (torch.tensor([1, 1]), "strictly increasing"),
    (torch.tensor([0, 20]), r"parameter 'w' must be in \[0, 20\), got values from 0 to 20"),
    (torch.tensor([0.5]), "parameter 'w' must be a 1-D int64/int32 tensor, got torch.float32"),
], ids=["unsorted", "duplicate", "range", "dtype"])
def test_optimizer_rejects_bad_indices(idx, message):
    w = nn.Parameter(torch.zeros(4, 5))
    with pytest.raises((ValueError, TypeError), match=message):
        pk.optim.SparseAdamW([("w", w, idx)])


def test_optimizer_bad_hyperparameters():
    w = nn.Parameter(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"child_p .* must be in \(0, 1\], got 0"):
        pk.optim.SparseAdamW([("w", w, torch.tensor([1]))], child_p=0.0)
    with pytest.raises(TypeError, match="parameter 'w' must be float32, bfloat16 or float16"):
        pk.optim.SparseAdamW([("w", nn.Parameter(torch.zeros(3, dtype=torch.float64)), torch.tensor([1]))])


def test_lr_scheduler_drives_the_optimizer():
    model = mlp()
    opt = pk.optim.SparseAdamW(pk.optim.sparse_parameters(model, sparse.random_mask(model, 0.5)), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    train(model, opt, batches(1))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


# ---- mask builders ------------------------------------------------------------------------------------------
def assert_valid(masks, params):
    for name, idx in masks.items():
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert (idx[1:] > idx[:-1]).all() and idx.min() >= 0 and idx.max() < params[name].numel()


def test_random_mask():
    params = {"a": torch.zeros(37, 11), "b": torch.zeros(1001)}
    m = sparse.random_mask(params, 0.1, seed=3)
    assert_valid(m, params)
    assert m["a"].numel() == 41 and m["b"].numel() == 100
    assert all(torch.equal(m[n], sparse.random_mask(params, 0.1, seed=3)[n]) for n in m)
    assert not torch.equal(m["b"], sparse.random_mask(params, 0.1, seed=4)["b"])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_0_1(density):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got"):
        sparse.random_mask({"a": torch.zeros(10)}, density)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        pk.SparseFTConfig(method="random", density=density)


class Linear2(nn.Module):
    """loss = sum(a * ca) + sum(b * cb) per batch: the gradient of a batch is (ca, cb) exactly."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4, 5))
        self.b = nn.Parameter(torch.zeros(7))


def linear_loss(model, coeffs):
    ca, cb = coeffs
    return (model.a * ca).sum() + (model.b * cb).sum()


def test_fisher_and_grad_sq_masks_pick_the_expected_entries():
    g = torch.Generator().manual_seed(0)
    c1 = (torch.randn(4, 5, generator=g), torch.randn(7, generator=g))
    c2 = (torch.randn(4, 5, generator=g), torch.randn(7, generator=g))
    model = Linear2()
    fisher = sparse.fisher_mask(model, [c1, c2], density=0.25, loss_fn=linear_loss)
    sam = sparse.grad_sq_mask(model, [c1, c2], density=0.25, loss_fn=linear_loss)
    for masks, score in ((fisher, lambda x, y: x * x + y * y), (sam, lambda x, y: (x + y) ** 2)):
        scores = torch.cat([score(c1[0], c2[0]).reshape(-1), score(c1[1], c2[1])])
        want = torch.topk(scores, 7).indices.sort().values  # round(0.25 * 27) = 7
        got = torch.cat([masks["a"], masks["b"] + 20])
        assert torch.equal(got, want)
    assert not torch.equal(torch.cat([fisher["a"], fisher["b"]]), torch.cat([sam["a"], sam["b"]]))
    assert model.a.grad is None


def test_magnitude_change_and_threshold_masks():
    w0 = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    w1 = {"a": torch.tensor([[0.0, 5, 0, 0], [0, 0, -7, 0], [0, 0, 0, 1]]), "b": torch.tensor([0, 0, 6, 0, -0.5])}
    m = sparse.magnitude_change_mask(w0, w1, density=3 / 17)
    assert m["a"].tolist() == [1, 6] and m["b"].tolist() == [2]
    t = sparse.threshold_mask(w1, 0.9)
    assert t["a"].tolist() == [1, 11] and t["b"].tolist() == [2]
    with pytest.raises(ValueError, match=r"'a' has shape \[3, 4\] in w1 but \[12\] in w0"):
        sparse.magnitude_change_mask({"a": torch.zeros(12), "b": torch.zeros(5)}, w1, 0.1)


# ---- SparseFTConfig, apply, diffs -----------------------------------------------------------------------------
def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    return LlamaForCausalLM(config)


def lm_batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (t := torch.randint(0, 101, (2, 9), generator=g)), "labels": t} for _ in range(n)]


@pytest.mark.parametrize("method", ["random", "fisher", "sam", "child_f", "lt_sft"])
def test_config_apply_train_save_load(tmp_path, method):
    base = tiny_llama()
    extra = {}
    if method in ("fisher", "sam"):
        extra["batches"] = lm_batches(2)
    if method == "lt_sft":
        extra["finetuned"] = {n: p.detach() + torch.randn(p.shape) * 0.01 for n, p in base.named_parameters()}
    model = pk.apply(copy.deepcopy(base), pk.SparseFTConfig(method=method, density=0.05, **extra))
    sel = model.peft_kernels_sparse
    names = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")]
    assert sorted(sel.indices) == sorted(names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    k = sum(i.numel() for i in sel.indices.values())
    total = sum(dict(model.named_parameters())[n].numel() for n in names)
    assert k == (total if method == "child_f" else pytest.approx(0.05 * total, abs=4))

    opt = sparse.make_optimizer(model, lr=1e-2)
    assert opt.param_groups[0]["child_p"] == (0.05 if method == "child_f" else 1.0)
    for batch in lm_batches(3, seed=4):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    changed = [n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    # A global top-k may leave a weight with no entries (at init FISH puts none in q_proj: its gradient is tiny).
    assert changed and sorted(changed) == sorted(n for n in names if sel.indices[n].numel() > 0)

    pk.save_sparse_diff(model, tmp_path)
    restored = pk.load_sparse_diff(tiny_llama(), tmp_path)
    for (n, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p, q), n


def test_diff_size_is_proportional_to_k(tmp_path):
    sizes = {}
    for density in (0.02, 0.2):
        model = pk.apply(tiny_llama(), pk.SparseFTConfig(density=density, target_modules=["q_proj", "gate_proj"]))
        pk.save_sparse_diff(model, tmp_path / str(density))
        sizes[density] = os.path.getsize(tmp_path / str(density) / sparse.DIFF_NAME)
    # 8 bytes per entry (int32 index + fp32 value) plus a JSON header under 2 KB, whatever the density.
    for density, size in sizes.items():
        k = 2 * round(density * 64 * 64) + 2 * round(density * 96 * 64)  # 2 layers of q_proj 64x64, gate_proj 96x64
        assert 8 * k < size < 8 * k + 2048


def test_load_diff_checks_before_writing(tmp_path):
    model = pk.apply(tiny_llama(), pk.SparseFTConfig(density=0.1))
    pk.save_sparse_diff(model, tmp_path)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=101))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"has shape \[64, 64\] in the diff but \[32, 32\]"):
        pk.load_sparse_diff(other, tmp_path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="cannot read"):
        pk.load_sparse_diff(other, tmp_path / "missing")


def test_config_errors():
    with pytest.raises(ValueError, match="method must be one of"):
        pk.SparseFTConfig(method="nope")
    with pytest.raises(ValueError, match=r"method='fisher'\) needs batches"):
        pk.apply(tiny_llama(), pk.SparseFTConfig(method="fisher"))
    with pytest.raises(ValueError, match="no sparse selection"):
        pk.save_sparse_diff(tiny_llama(), "unused")


def test_hf_trainer_runs_sparse_adamw(tmp_path):
    """SparseAdamW as HF Trainer's optimizer (its LR scheduler, gradient clipping and zero_grad around it)."""
    from transformers import Trainer, TrainingArguments

    base = tiny_llama()
    model = pk.apply(copy.deepcopy(base), pk.SparseFTConfig(density=0.05))
    opt = sparse.make_optimizer(model, lr=1e-2)
    data = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in lm_batches(6)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert all(s["step"] == 3 for s in opt.state.values())
    changed = {n for (n, p), q in zip(model.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    assert changed == set(model.peft_kernels_sparse.indices)


def test_rejected_step_leaves_the_state_and_groups_need_indices():
    w = nn.Parameter(torch.zeros(4, 5))
    opt = pk.optim.SparseAdamW([("w", w, torch.tensor([1, 7]))], lr=0.1)
    w.grad = torch.ones(4, 5)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"masked_adamw_step_: argument 'lr' must be in \[0, inf\), got -1"):
        opt.step()
    assert opt.state[w]["step"] == 0
    with pytest.raises(TypeError, match="every parameter needs its indices"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


# ---- Diff Pruning ---------------------------------------------------------------------------------------------
def diff_pruning_reference(x, weight, bias, delta, log_alpha, lower=-1.5, upper=1.5):
    """Eval-mode Diff Pruning written from the paper's formulas: z = min(1, max(0, sigmoid(a) (r - l) + l))."""
    z = torch.sigmoid(log_alpha) * (upper - lower) + lower
    z = torch.where(z < 0, torch.zeros_like(z), torch.where(z > 1, torch.ones_like(z), z))
    return x @ (weight + z * delta).T + bias


def random_diff_layer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = pk.nn.DiffPruningLinear.from_linear(nn.Linear(13, 7).to(dtype))
    with torch.no_grad():
        layer.delta.normal_()
        layer.log_alpha.normal_(0, 3)  # gates spread over closed, fractional and open
    return layer


def test_diff_pruning_layer_matches_reference_and_gradcheck():
    layer = random_diff_layer(dtype=torch.float64).eval()
    z = layer.gate()
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    ref = diff_pruning_reference(x, layer.weight, layer.bias, layer.delta, layer.log_alpha)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-12)
    torch.autograd.gradcheck(lambda x, d, a: diff_pruning_reference(x, layer.weight, layer.bias, d, a),
                             (x, layer.delta, layer.log_alpha))
    grads = torch.autograd.grad(layer(x).sum(), [layer.delta, layer.log_alpha])
    refs = torch.autograd.grad(ref.sum(), [layer.delta, layer.log_alpha])
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r)
    # Expected L0: P(z > 0) = sigmoid(log_alpha - log(-lower / upper)); with the default symmetric stretch the
    # shift is 0.
    torch.testing.assert_close(layer.expected_l0(), torch.sigmoid(layer.log_alpha).sum())


def test_diff_pruning_training_gates_are_hard_concrete_samples():
    layer = random_diff_layer().train()
    torch.manual_seed(5)
    samples = torch.stack([layer.gate() for _ in range(400)])
    # P(z > 0) of the stretched, clipped concrete is sigmoid(log_alpha - log(-l/r)) = sigmoid(log_alpha) here.
    empirical = (samples > 0).float().mean(0)
    assert (empirical - torch.sigmoid(layer.log_alpha.detach())).abs().max() < 0.12
    assert not torch.equal(samples[0], samples[1])


def test_diff_pruning_fresh_layer_is_the_base_linear():
    linear = nn.Linear(13, 7)
    layer = pk.nn.DiffPruningLinear.from_linear(linear)
    x = torch.randn(3, 13)
    assert torch.equal(layer.train()(x), linear(x))
    assert layer.weight is not None and layer.weight.data_ptr() == linear.weight.data_ptr()


def test_diff_pruning_train_finalize_save_load(tmp_path):
    base = tiny_llama()
    model = pk.apply(copy.deepcopy(base), pk.SparseFTConfig(method="diff_pruning", density=0.02))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, pk.nn.DiffPruningLinear)}
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in layers for p in ("delta", "log_alpha")}
    with pytest.raises(ValueError, match="dense optimizer"):
        sparse.make_optimizer(model)
    with pytest.raises(ValueError, match="finalize_diff_pruning"):
        sparse.save_sparse_diff(model, tmp_path)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = lm_batches(1)[0]
    model.train()
    losses, l0 = [], []
    for _ in range(8):
        torch.manual_seed(len(losses))
        loss = model(**batch).loss
        penalty = sparse.l0_penalty(model)
        losses.append(loss.item())
        l0.append(penalty.item())
        (loss + 1e-3 * penalty).backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] and l0[-1] < l0[0]
    model.eval()
    tokens = batch["input_ids"]
    # The kept entries: the global top 2% of |z * delta| over all layers, merged into W.
    diffs = {f"{n}.weight": m.final_diff() for n, m in layers.items()}
    flat = torch.cat([d.reshape(-1).abs() for d in diffs.values()])
    k = round(0.02 * flat.numel())
    cut = flat.topk(k).values.min()
    expected = copy.deepcopy(base).eval()
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for name, d in diffs.items():
            params[name].add_(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    indices = sparse.finalize_diff_pruning(model)
    assert sum(i.numel() for i in indices.values()) == k
    assert not any(isinstance(m, pk.nn.DiffPruningLinear) for m in model.modules())
    torch.testing.assert_close(model(tokens).logits, expected(tokens).logits, rtol=0, atol=1e-5)
    sparse.save_sparse_diff(model, tmp_path)
    assert os.path.getsize(tmp_path / sparse.DIFF_NAME) < 8 * k + 2048
    restored = sparse.load_sparse_diff(copy.deepcopy(base).eval(), tmp_path)
    assert torch.equal(restored(tokens).logits, model(tokens).logits)
    with pytest.raises(ValueError, match="already finalized"):
        sparse.finalize_diff_pruning(model)


def test_diff_pruning_bad_input():
    with pytest.raises(ValueError, match="'lower' and 'upper'"):
        pk.nn.DiffPruningLinear(4, 4, lower=0.0)
    with pytest.raises(ValueError, match="'temperature'"):
        pk.nn.DiffPruningLinear(4, 4, temperature=0.0)
    with pytest.raises(TypeError, match="'linear' must be an nn.Linear"):
        pk.nn.DiffPruningLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="no DiffPruningLinear"):
        sparse.l0_penalty(tiny_llama())
    model = pk.apply(tiny_llama(), pk.SparseFTConfig(method="random", density=0.1))
    with pytest.raises(ValueError, match="not 'diff_pruning'"):
        sparse.finalize_diff_pruning(model)
