"""torch.compile(fullgraph=True) on a tiny LLaMA carrying each method of the survey: no graph break anywhere in
the model's forward (method modules, hooks and all), the same logits as eager, and gradients for every trainable
parameter through the compiled graph. The aot_eager backend traces forward and backward through our ops' fake
kernels and autograd formulas like inductor would, without its ~10 s of code generation per graph on 2 cores
(inductor itself is exercised on LoRA / QLoRA / KronA layers in test_lora_model.py, test_qlora_linear.py and
test_kron_model.py)."""

import pytest
import torch

import peft_kernels as pk
from tiny_models import LLAMA_VOCAB, tiny_llama, tokens

CONFIGS = {
    "lora_fa": lambda: pk.LoRAFAConfig(r=4),
    "dylora": lambda: pk.DyLoRAConfig(r=4),
    "delta_lora": lambda: pk.DeltaLoRAConfig(r=4),
    "adalora": lambda: pk.AdaLoRAConfig(init_r=4, target_r=2, total_step=10),
    "propetl": lambda: pk.ProPETLConfig(r=4),
    "adamix": lambda: pk.AdaMixConfig(num_experts=2, r=4),
    "ia3": lambda: pk.IA3Config(),
    "adapter_houlsby": lambda: pk.AdapterConfig(bottleneck=8, placement="houlsby"),
    "adapter_parallel": lambda: pk.AdapterConfig(bottleneck=8, placement="parallel", scaling=4.0),
    "compacter": lambda: pk.CompacterConfig(n=4, rank=1, bottleneck=8),
    "hadamard": lambda: pk.HadamardAdapterConfig(),
    "bitfit": lambda: pk.BitFitConfig(),
    "sparse_adapter": lambda: pk.SparseAdapterConfig(bottleneck=8, sparsity=0.5),
    "prompt_tuning": lambda: pk.PromptTuningConfig(num_virtual_tokens=3, init="vocab"),
    "p_tuning": lambda: pk.PTuningConfig(num_virtual_tokens=3),
    "prefix_tuning": lambda: pk.PrefixTuningConfig(num_virtual_tokens=3),
    "mam": lambda: pk.MAMConfig(num_virtual_tokens=3, bottleneck=8),
    "unipelt": lambda: pk.UniPELTConfig(r=4, num_virtual_tokens=3, bottleneck=8),
    "diff_pruning": lambda: pk.SparseFTConfig(method="diff_pruning", density=0.1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_compiles_fullgraph(name):
    torch.manual_seed(0)
    model = pk.apply(tiny_llama(), CONFIGS[name]())
    model.eval()  # deterministic forward (no dropout, routing or gate sampling) to compare with eager
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # move every trainable tensor off its identity initialisation
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ids = tokens(LLAMA_VOCAB)
    eager = model(input_ids=ids).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids).logits
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in model.parameters() if p.requires_grad)
