"""qlora_linear (the fused LoRA op over a frozen NF4 base) and the modules NF4Linear / QLoRALinear: values and
gradients against the float64 reference on every backend, every base path (GEMV for few rows, CUDA's
tensor-core GEMM and dx, the tiled workspace GEMM), dropout, gradcheck, opcheck, what is saved, bitsandbytes interop, merge_to, compile.
"""

import pytest
import torch
from torch import nn

import peft_kernels as pk
from peft_kernels import reference as R
from tiny_models import assert_tolerance, saved_tensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make(rows, n_in, n_out, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    q = pk.nf4_quantize(torch.randn(n_out, n_in, generator=g) * n_in**-0.5, 32, True)
    args = dict(x=t(rows, n_in).requires_grad_(), bias=t(n_out).requires_grad_(),
                lora_A=t(r, n_in, scale=n_in**-0.5).requires_grad_(), lora_B=t(n_out, r, scale=r**-0.5).requires_grad_())
    return q, args


def ours(ops, q, scaling, p, seed):
    def run(x, bias, lora_A, lora_B):
        return ops.qlora_linear_fwd(x, q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize,
                                    q.shape[0], bias, lora_A, lora_B, scaling, p, torch.tensor(seed))[0]
    return run


# (rows, in, out): the GEMV and the tiled workspace path (in 67), and on CUDA the tensor-core GEMM and dx
# (in 160, out 40: a partial tile each way, 3 pipeline stages; a whole layer on the executor, same dropout mask)
SHAPES = [(5, 67, 32), (41, 67, 32), (41, 160, 40)]


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p30"])
@pytest.mark.parametrize("shape", SHAPES, ids=["gemv", "tiled", "tensor-core"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_values_and_grads(backend, dtype, shape, p, monkeypatch):
    rows, n_in, n_out = shape
    monkeypatch.setenv("PEFT_KERNELS_NF4_WORKSPACE_BYTES", str(7 * n_in * 4))  # several tiles, starting mid-block
    q, args = make(rows, n_in, n_out, 7, dtype, seed=rows)
    dy = torch.randn(rows, n_out, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    runs = [(ours(backend.ops, q.to(backend.device), 0.6, p, 5), args, dy, backend.device),
            (lambda **a: R.qlora_linear(q=q, scaling=0.6, dropout_p=p, seed=5, **a), args, dy, "cpu"),
            (lambda **a: R.qlora_linear(q=q, scaling=0.6, dropout_p=p, seed=5, **a),
             {k: v.detach().double().requires_grad_() for k, v in args.items()}, dy.double(), "cpu")]
    for fn, a, g, device in runs:
        a = {k: v.to(device) if device != "cpu" else v for k, v in a.items()}
        y = fn(**a)
        results.append([t.cpu() for t in (y, *torch.autograd.grad(y, list(a.values()), g.to(y.device)))])
    for name, o, lo, ex in zip(["y", "dx", "dbias", "dA", "dB"], *results):
        assert lo.dtype == dtype, name
        assert_tolerance(o, lo, ex, ATOL[dtype], name)


def test_dropout_mask_same_as_lora():
    """The QLoRA op draws the same Philox mask as lora_linear over the dequantized weight."""
    q, args = make(20, 64, 16, 4, torch.float32)
    w = pk.nf4_dequantize(q).float()
    a = {k: v.detach() for k, v in args.items()}
    y = pk.qlora_linear(a["x"], q, a["bias"], a["lora_A"], a["lora_B"], 1.5, 0.5, seed=11)
    want = pk.lora_linear(a["x"], w, a["bias"], a["lora_A"], a["lora_B"], 1.5, 0.5, seed=11)
    assert torch.allclose(y, want, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 30])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(rows, p):
    q, args = make(rows, 40, 16, 3, torch.float64)
    fn = lambda x, b, a, bb: pk.qlora_linear(x, q, b, a, bb, 0.8, p, seed=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(args.values()))


@pytest.mark.parametrize("rows", [4, 20])
def test_opcheck(backend, rows):
    q, args = make(rows, 64, 24, 4, torch.float32)
    q = q.to(backend.device)
    a = {k: v.detach().to(backend.device).requires_grad_() for k, v in args.items()}
    inputs = (a["x"], q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, 24, a["bias"],
              a["lora_A"], a["lora_B"], 0.5, 0.2, torch.tensor(4))
    torch.library.opcheck(backend.ops.qlora_linear_fwd, inputs)


def test_saves_x_and_xa_only():
    q, args = make(40, 64, 32, 4, torch.float32)
    y, saved = saved_tensors(lambda: pk.qlora_linear(args["x"], q, None, args["lora_A"], args["lora_B"], 1.0, 0.1,
                                                     seed=1))
    packed = {t.data_ptr() for t in (q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset)}
    activations = [t for t in saved if t.data_ptr() not in packed and t.dim() == 2 and t.shape[0] == 40]
    assert sorted(t.shape[1] for t in activations) == [4, 64]  # xa [40, r] and x [40, in]; no mask, no W copy
    y.sum().backward()


def test_bad_input():
    q, args = make(4, 64, 32, 4, torch.float32)
    a = {k: v.detach() for k, v in args.items()}
    with pytest.raises(ValueError, match=r"qlora_linear: argument 'lora_B' must be \[out=32, r=4\]"):
        pk.qlora_linear(a["x"], q, None, a["lora_A"], a["lora_B"][:, :3], 1.0)
    with pytest.raises(TypeError, match=r"qlora_linear: argument 'lora_A' must have dtype BFloat16"):
        pk.qlora_linear(a["x"].bfloat16(), q, None, a["lora_A"], a["lora_B"].bfloat16(), 1.0)
    with pytest.raises(ValueError, match=r"qlora_linear: argument 'x' must have last dimension in=64"):
        pk.qlora_linear(a["x"][:, :60], q, None, a["lora_A"], a["lora_B"], 1.0)


# ---- modules --------------------------------------------------------------------------------------------------
def test_nf4linear_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, dtype=torch.bfloat16)
    ours = pk.nn.NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)._quantize("cpu")
    packed, state = ours.to_bnb()
    assert torch.equal(packed.reshape(-1), layer.weight.data.reshape(-1))
    theirs = pk.nn.NF4Linear.from_bnb(layer.weight.data, layer.weight.quant_state, linear.bias)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    want = nn.functional.linear(x.float(), bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float(), linear.bias.float())
    for module in (ours, theirs):
        assert (module(x).float() - want).abs().max() <= 0.05


def test_qlora_module_merge_to_and_requantize():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    module = pk.nn.QLoRALinear.from_linear(linear, r=4, alpha=8, compute_dtype=torch.float32)
    with torch.no_grad():
        module.lora_B.normal_()
    x = torch.randn(3, 7, 96)
    merged = module.merge_to(torch.float32)
    assert torch.allclose(merged(x), module(x), atol=1e-4)
    requantized, err = pk.nn.requantize(merged)
    assert 0.0 < err < 0.2 and isinstance(requantized, pk.nn.NF4Linear)


def test_qlora_module_trains_and_compiles():
    torch.manual_seed(0)
    module = pk.nn.QLoRALinear.from_linear(nn.Linear(64, 32), r=4, dropout=0.1, compute_dtype=torch.float32)
    assert not any(b.requires_grad for b in module.buffers())
    x = torch.randn(6, 64)
    module.eval()
    compiled = torch.compile(module, fullgraph=True)
    assert torch.allclose(compiled(x), module(x), atol=1e-5)
    module.train()
    module(x).square().sum().backward()
    assert module.lora_B.grad is not None and module.lora_B.grad.abs().sum() > 0


def test_qlora_config_on_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 101, (2, 9))
    dense = model(tokens).logits
    model = pk.apply(model, pk.QLoRAConfig(r=4, quantize="all_linear", compute_dtype=torch.float32))
    report = model.peft_kernels_qlora_report
    assert report["weight_bytes_after"] < report["weight_bytes_before"] / 3
    assert isinstance(model.model.layers[0].self_attn.q_proj, pk.nn.QLoRALinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, pk.nn.NF4Linear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, pk.nn.NF4Linear)
    assert (model(tokens).logits - dense).abs().max() < 0.5  # 4-bit base: close, not equal
    trainable, _ = pk.trainable_parameters(model)
    assert trainable == 2 * 4 * ((64 + 64) + (64 + 32))  # q_proj [64, 64] and v_proj [32, 64] (2 kv heads) per layer


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_qlora_decoder_layer(dropout):
    """A QLoRA LLaMA decoder layer (all Linear in NF4, adapters on q/v) compiles with fullgraph=True; without
    dropout it matches eager in values and gradients."""
    model = pk.apply(tiny_llama(), pk.QLoRAConfig(r=4, dropout=dropout, quantize="all_linear",
                                                  compute_dtype=torch.float32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
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


def test_qlora_adapter_round_trip(tmp_path):
    """A QLoRA adapter is saved in HF PEFT's LoRA format and loads into a fresh QLoRA model (same logits)."""
    model = pk.apply(tiny_llama(), pk.QLoRAConfig(r=4, compute_dtype=torch.float32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    pk.save_adapter(model, tmp_path)
    fresh = pk.apply(tiny_llama(), pk.QLoRAConfig(r=4, compute_dtype=torch.float32))
    pk.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh(tokens).logits, model(tokens).logits)


def test_bitsandbytes_checkpoint_loads_without_requantizing():
    """A model whose Linear layers are bitsandbytes Linear4bit: its state dict loads into a plain model as our
    NF4Linear modules holding the same bytes (same logits as bitsandbytes), and ours exports back to it."""
    bnb = pytest.importorskip("bitsandbytes")
    source = tiny_llama()
    for name, linear in list(source.named_modules()):
        if type(linear) is nn.Linear and name != "lm_head":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32,
                                      quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)._quantize("cpu")
            parent, _, child = name.rpartition(".")
            setattr(source.get_submodule(parent), child, layer)
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    state = source.state_dict()
    ours = pk.load_bnb_nf4(tiny_llama(seed=5), state, compute_dtype=torch.float32)
    assert isinstance(ours.model.layers[1].mlp.up_proj, pk.nn.NF4Linear)
    assert torch.allclose(ours(tokens).logits, source(tokens).logits, atol=1e-4)
    back = pk.bnb_nf4_state_dict(ours)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k].reshape(-1).cpu(), state[k].reshape(-1).cpu()) for k in state if state[k].dtype == torch.uint8)
    broken = {k: v for k, v in state.items() if not k.endswith("layers.0.mlp.up_proj.weight.absmax")}
    untouched = tiny_llama(seed=5)
    with pytest.raises((ValueError, KeyError)):
        pk.load_bnb_nf4(untouched, broken)
    assert not any(isinstance(m, pk.nn.NF4Linear) for m in untouched.modules())


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_quant_storage_views_the_same_bytes(storage):
    """quant_storage keeps the packed codes as a frozen float parameter (what FSDP shards), viewing the same
    bytes: identical outputs and gradients, identical bitsandbytes export, and a state dict round trip."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    torch.manual_seed(1)  # the same lora_A for both
    plain = pk.nn.QLoRALinear.from_linear(linear, r=4, compute_dtype=torch.float32)
    torch.manual_seed(1)
    stored = pk.nn.QLoRALinear.from_linear(linear, r=4, compute_dtype=torch.float32, quant_storage=storage)
    with torch.no_grad():
        plain.lora_B.normal_()
        stored.lora_B.copy_(plain.lora_B)
    assert isinstance(stored.codes, nn.Parameter) and not stored.codes.requires_grad
    assert stored.codes.dtype == storage and "codes" not in dict(stored.named_buffers())
    assert stored.codes.numel() * stored.codes.element_size() == plain.codes.numel()
    assert torch.equal(stored.codes.view(torch.uint8), plain.codes)
    x = torch.randn(5, 128, requires_grad=True)
    assert torch.equal(stored(x), plain(x))
    assert torch.equal(torch.autograd.grad(stored(x).sum(), x)[0], torch.autograd.grad(plain(x).sum(), x)[0])
    for a, b in zip(stored.to_bnb()[1].values(), plain.to_bnb()[1].values()):
        assert torch.equal(a, b)
    assert torch.equal(stored.to_bnb()[0], plain.to_bnb()[0])
    fresh = pk.nn.QLoRALinear.from_linear(nn.Linear(128, 48), r=4, compute_dtype=torch.float32, quant_storage=storage)
    fresh.load_state_dict(stored.state_dict())
    assert torch.equal(fresh(x), stored(x))
    with pytest.raises(TypeError, match="argument 'quant_storage' must be torch.uint8"):
        pk.nn.NF4Linear.from_linear(linear, quant_storage=torch.int32)
