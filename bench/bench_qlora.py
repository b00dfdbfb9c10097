"""QLoRA layer training step (forward + backward): a frozen dense nn.Linear (``base``, the baseline) vs
``peft_kernels.nn.QLoRALinear`` (``ours``: NF4 base + LoRA in one op) vs the same LoRA over the dense 16-bit
weight (``lora``: peft_kernels.nn.LoRALinear) vs bitsandbytes' Linear4bit with HF PEFT's LoRA on top
(``bnb+peft``); r=16, alpha=32, dropout 0.1, M=2048 tokens, 1024->1024 on CPU and LLaMA-7B's 4096->4096 on CUDA.

    python -P bench/bench_qlora.py [--device cpu|cuda] [--dtype bf16,fp32] [--repeats N]

Targets: ours/base <= 1.20 and ours/(bnb+peft) <= 0.75; on CUDA also ours/lora <= 1.20 (the NF4 weight costs
at most 20% over a 16-bit LoRA step). Ratios measured side by side in this process.
The adapters of ours and bnb+peft are kept in the compute dtype (PEFT: autocast_adapter_dtype=False), so both
run the same computation. On CPU, ``ours-blas`` is ours on its BLAS path (harness.on_blas_path).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from peft_kernels.nn import LoRALinear, QLoRALinear  # noqa: E402

try:
    import bitsandbytes as bnb
    import peft
except Exception as exc:  # bitsandbytes/peft raise more than ImportError when unusable
    bnb = peft = None
    print(f"note: bitsandbytes or peft unavailable ({type(exc).__name__}: {exc}); skipping bnb+peft")

R, ALPHA, P = 16, 32, 0.1
SHAPES = {"cpu": (1024, 1024, 2048), "cuda": (4096, 4096, 2048)}  # in, out, M tokens
DTYPE_NAMES = {dtype: name for name, dtype in harness.DTYPES.items()}


class Proj(torch.nn.Module):
    """PEFT picks the modules to adapt by name: a model that is one layer called ``proj``."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def cases(args) -> list[harness.Case]:
    i, o, m = SHAPES[args.device]
    return [harness.Case(f"{i}->{o} M={m} {DTYPE_NAMES[d]} p={P}", dict(dtype=d, device=args.device)) for d in args.dtypes]


def providers(case: harness.Case, mode: str) -> dict:
    dtype, device = case.params["dtype"], case.params["device"]
    i, o, m = SHAPES[device]
    linear = torch.nn.Linear(i, o, dtype=dtype, device=device).requires_grad_(False)
    ours = QLoRALinear.from_linear(linear, r=R, alpha=ALPHA, dropout=P, compute_dtype=dtype, adapter_dtype=dtype).train()
    x = torch.randn(m, i, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(m, o, dtype=dtype, device=device)
    lora = LoRALinear.from_linear(linear, r=R, alpha=ALPHA, dropout=P).train()
    nets = {"base": (linear, []), "ours": (ours, [ours.lora_A, ours.lora_B]), "lora": (lora, [lora.lora_A, lora.lora_B])}
    if bnb is not None:
        layer = bnb.nn.Linear4bit(i, o, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)._quantize(device)
        layer.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=P, target_modules=["proj"])
        model = peft.get_peft_model(Proj(layer), config, autocast_adapter_dtype=False).train()
        adapted = model.base_model.model.proj
        nets["bnb+peft"] = (model, [adapted.lora_A["default"].weight, adapted.lora_B["default"].weight])

    def step(fn, leaves):
        def run():
            for t in (x, *leaves):
                t.grad = None
            fn(x).backward(dy)
        return run

    out = {name: step(fn, leaves) for name, (fn, leaves) in nets.items()}
    if device == "cpu":
        out["ours-blas"] = harness.on_blas_path(out["ours"])
    return out


if __name__ == "__main__":
    args, rows = harness.main("qlora", cases, providers, modes=("full",), baseline="base")
    print("\nsummary (targets ours/base <= 1.20, ours/(bnb+peft) <= 0.75, on CUDA ours/lora <= 1.20):")
    by_case = {}
    for row in rows:
        by_case.setdefault(row.case, {})[row.provider] = row.median_ms
    for name, ms in by_case.items():
        line = f"  {name}: ours/base {ms['ours'] / ms['base']:.2f}, ours/lora {ms['ours'] / ms['lora']:.2f}"
        if "ours-blas" in ms:
            line += f", ours-blas/base {ms['ours-blas'] / ms['base']:.2f}"
        if "bnb+peft" in ms:
            line += f", bnb+peft/base {ms['bnb+peft'] / ms['base']:.2f}, ours/(bnb+peft) {ms['ours'] / ms['bnb+peft']:.2f}"
        print(line)
