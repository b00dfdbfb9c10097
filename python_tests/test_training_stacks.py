"""Our modules inside the stacks users train with: torch.compile (loading another adapter of the same shapes
reuses the compiled graph), autocast (documented dtypes, values against the reference), and transformers'
gradient checkpointing, reentrant and not (same gradients, fewer saved activations).

The compiled LoRA / QLoRA decoder layers' values and gradients against eager are in test_lora_model.py and
test_qlora_linear.py; here the compiled graphs use the aot_eager backend: what is checked is dynamo's tracing
and guards, which do not depend on the code generator (inductor would add ~10 s per graph on 2 cores).
"""

import json

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LlamaConfig, LlamaForCausalLM

import peft_kernels as pk
from peft_kernels import reference as R
from tiny_models import assert_tolerance, randomize, saved_tensors

VOCAB = 101
TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(config)


def adapted(kind, dropout=0.0, alpha=8):
    """A tiny LLaMA with LoRA (fp32), QLoRA (every Linear but the head in NF4, fp32 compute) or KronA on q/v."""
    if kind == "lora":
        config = pk.LoRAConfig(r=4, alpha=alpha, dropout=dropout)
    elif kind == "krona":
        config = pk.KronAConfig(scaling=alpha / 4, dropout=dropout)
    else:
        config = pk.QLoRAConfig(r=4, alpha=alpha, dropout=dropout, quantize="all_linear", compute_dtype=torch.float32)
    return pk.apply(tiny_llama(), config)


def adapter_weights(name):
    return "lora_" in name or name.endswith((".A", ".B"))


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- torch.compile -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "qlora", "krona"])
def test_loading_another_adapter_does_not_recompile(kind, tmp_path):
    """Adapters are graph inputs, not constants: loading one of the same shapes (copied in place into the same
    parameters) runs the compiled decoder layer again without recompiling, with the new adapter's outputs. A
    different alpha changes the scale, a Python float the graph is specialized on: that one must recompile
    (the counter sees it, so it would see any other recompile; reusing the old graph would apply the old scale)."""
    model = adapted(kind).eval()
    for name, seed in [("a", 1), ("b", 2)]:
        randomize(model, seed, scale=0.1, select=adapter_weights, replace=True)
        pk.save_adapter(model, tmp_path / name)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_model.safetensors").write_bytes((tmp_path / "a" / "adapter_model.safetensors").read_bytes())
    alpha_key = "alpha" if kind == "krona" else "lora_alpha"  # LoKr's config names it alpha
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps({**config, alpha_key: 2 * config[alpha_key]}))

    layer = model.model.layers[0]
    h = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    position_embeddings = model.model.rotary_emb(h, torch.arange(9)[None].expand(2, -1))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    outputs = {}
    for name in ["a", "b", "a"]:
        pk.load_adapter(model, tmp_path / name)
        with torch._dynamo.config.patch(error_on_recompile=counter.frame_count > 0):
            outputs[name] = compiled(h, position_embeddings=position_embeddings)
        assert torch.equal(outputs[name], layer(h, position_embeddings=position_embeddings))
    assert counter.frame_count == 1
    assert not torch.allclose(outputs["a"], outputs["b"], atol=1e-3)  # the adapters differ, and so do outputs
    pk.load_adapter(model, tmp_path / "c")
    assert torch.equal(compiled(h, position_embeddings=position_embeddings), layer(h, position_embeddings=position_embeddings))
    assert counter.frame_count > 1


# ---- autocast ------------------------------------------------------------------------------------------------
def reference_grads(fn, leaves, dy, dtype):
    """Outputs and gradients of ``fn`` (the reference) with every operand cast to ``dtype`` first, autograd
    flowing back through the casts (what autocast does to fp32 parameters)."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    y = fn(*[t.to(dtype) for t in leaves])
    return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p30"])
def test_autocast_lora_linear(x_dtype, dropout):
    """bf16 autocast around a LoRALinear whose W, b, A, B are fp32: as nn.Linear under autocast, the product
    runs in bf16 and y is bf16, whatever x's dtype; gradients reach x, A and B in their own dtypes. Values and
    gradients against the reference run on the same bf16-cast operands (in bf16, and in float64)."""
    torch.manual_seed(0)
    module = pk.nn.LoRALinear.from_linear(nn.Linear(67, 45), r=5, alpha=10, dropout=dropout)
    nn.init.normal_(module.lora_B, std=0.2)
    x = torch.randn(3, 11, 67).to(x_dtype).requires_grad_()
    dy = torch.randn(3, 11, 45)
    seed = 1234
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(seed)
        y = module(x)
        plain = nn.functional.linear(x, module.weight, module.bias)
    assert y.dtype == plain.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, [x, module.lora_A, module.lora_B], dy.bfloat16())
    assert [g.dtype for g in grads] == [x_dtype, torch.float32, torch.float32]
    # The module drew its dropout seed from torch's generator: draw it again for the reference.
    torch.manual_seed(seed)
    drawn = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64).item() if dropout else 0
    ref = lambda x_, a, b: R.lora_linear(x_, module.weight.to(x_.dtype), module.bias.to(x_.dtype), a, b,  # noqa: E731
                                         module.scaling, dropout, drawn)
    rounded = [t.detach().bfloat16() for t in (x, module.lora_A, module.lora_B)]
    low = reference_grads(ref, rounded, dy, torch.bfloat16)
    exact = reference_grads(ref, rounded, dy.bfloat16(), torch.float64)
    for name, o, lo, ex in zip(["y", "dx", "dA", "dB"], [y, *grads], low, exact):
        assert_tolerance(o, lo, ex, 1e-2, name, same_dtype=False)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=["compute-bf16", "compute-fp32"])
def test_autocast_qlora_linear(compute_dtype):
    """QLoRALinear under bf16 autocast: autocast does not change it. The product runs in ``compute_dtype`` (its
    own per-layer precision, as bitsandbytes' Linear4bit), y has x's dtype, the fp32 adapters get fp32
    gradients; values as the reference run in compute_dtype."""
    torch.manual_seed(0)
    module = pk.nn.QLoRALinear.from_linear(nn.Linear(128, 40), r=4, alpha=8, compute_dtype=compute_dtype)
    nn.init.normal_(module.lora_B, std=0.2)
    assert module.lora_A.dtype == torch.float32
    x = torch.randn(21, 128, requires_grad=True)
    dy = torch.randn(21, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.float32
    grads = torch.autograd.grad(y, [x, module.lora_A, module.lora_B], dy)
    assert all(g.dtype == torch.float32 for g in grads)
    q, bias = module.quantized, module.bias
    ref = lambda x_, a, b: R.qlora_linear(x_, q, bias.to(x_.dtype), a, b, module.scaling)  # noqa: E731
    leaves = [x, module.lora_A, module.lora_B]
    rounded = [t.detach().to(compute_dtype) for t in leaves]
    low = reference_grads(ref, rounded, dy, compute_dtype)
    exact = reference_grads(ref, rounded, dy.to(compute_dtype), torch.float64)
    atol = 1e-2 if compute_dtype == torch.bfloat16 else 1e-5
    for name, o, lo, ex in zip(["y", "dx", "dA", "dB"], [y, *grads], low, exact):
        assert_tolerance(o, lo, ex, atol, name, same_dtype=False)


@pytest.mark.parametrize("kind", ["lora", "qlora", "krona"])
def test_autocast_model_trains(kind):
    """A whole LLaMA with fp32 adapters under bf16 autocast: forward and backward run (LoRALinear inputs arrive
    in fp32 from RMSNorm and in bf16 from autocast's matmuls), every adapter gets a finite fp32 gradient, and
    the loss is the fp32 model's within bf16 rounding (|diff| 0.0002 measured on a loss of 4.64)."""
    model = adapted(kind).train()
    randomize(model, 1, scale=0.1, select=adapter_weights, replace=True)
    with torch.no_grad():
        fp32_loss = model(input_ids=TOKENS, labels=TOKENS).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
    loss.backward()
    assert abs(loss.item() - fp32_loss.item()) < 0.01
    grads = adapter_grads(model)
    assert len(grads) == 8 and all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
                                   for g in grads.values())


def test_autocast_lora_linear_compiles():
    """The autocast branch of LoRALinear.forward traces with fullgraph=True (dynamo reads the autocast state)
    and gives eager's values."""
    torch.manual_seed(0)
    module = pk.nn.LoRALinear.from_linear(nn.Linear(32, 24), r=4)
    nn.init.normal_(module.lora_B)
    x = torch.randn(5, 32)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = compiled(x), module(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    assert compiled(x).dtype == torch.float32  # outside autocast: fp32, a second graph


# ---- gradient checkpointing ----------------------------------------------------------------------------------
def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs, parameters and buffers
    excluded: the activation memory a step holds at its peak, counted deterministically."""
    out, saved = saved_tensors(fn)
    return out, {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}


def loss_and_grads(model, checkpointing, reentrant=None):
    randomize(model, 1, scale=0.1, select=adapter_weights, replace=True)  # B != 0, so that A gets a gradient
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    torch.manual_seed(7)  # the dropout seeds the adapters draw: the same in both runs
    loss, seen = saved_bytes(lambda: model(input_ids=TOKENS, labels=TOKENS).loss)
    loss.backward()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return loss, adapter_grads(model), sum(n for ptr, n in seen.items() if ptr not in weights)


@pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing(_enable)?` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_gradient_checkpointing(kind, reentrant):
    """model.gradient_checkpointing_enable() on a LLaMA carrying our adapters, with dropout 0.1: the same loss
    and the same adapter gradients as without (checkpoint restores torch's RNG state for the recompute, so each
    adapter draws the same Philox seed and the same mask), every adapter trained, and fewer bytes saved for
    backward. Reentrant mode needs an input that requires grad while the embedding is frozen: transformers'
    gradient_checkpointing_enable() registers enable_input_require_grads itself for input_ids models, and
    nothing we do removes it."""
    loss, grads, plain_bytes = loss_and_grads(adapted(kind, dropout=0.1), checkpointing=False)
    model = adapted(kind, dropout=0.1)
    assert not model.get_input_embeddings().weight.requires_grad
    ckpt_loss, ckpt_grads, ckpt_bytes = loss_and_grads(model, checkpointing=True, reentrant=reentrant)
    assert torch.equal(ckpt_loss, loss)
    assert grads.keys() == ckpt_grads.keys() and len(grads) == 8
    for name, g in grads.items():
        assert g.abs().sum() > 0 and torch.allclose(ckpt_grads[name], g, rtol=1e-5, atol=1e-7), name
    # Measured (2 decoder layers, 18 tokens, LoRA and QLoRA alike, both modes): 118.4 KiB saved for backward
    # without checkpointing, 20.8 KiB with it (what is saved outside the checkpointed layers: embedding output,
    # final norm, head, loss).
    assert ckpt_bytes < 0.25 * plain_bytes, (ckpt_bytes, plain_bytes)


@pytest.mark.filterwarnings("ignore:`(is_)?gradient_checkpointing(_enable)?` is deprecated:FutureWarning")
def test_reentrant_checkpointing_enabled_before_apply():
    """The other order: checkpointing enabled on the plain model, then our adapters applied. The input-grad
    hook sits on the embedding, which apply leaves in place, so the adapters still train."""
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pk.apply(model, pk.LoRAConfig(r=4, alpha=8))
    randomize(model, 1, scale=0.1, select=adapter_weights, replace=True)
    model.train()
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    grads = adapter_grads(model)
    assert len(grads) == 8 and all(g.abs().sum() > 0 for g in grads.values())
