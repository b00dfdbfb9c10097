"""Peak memory of one QLoRA training step of a LLaMA-architecture model: ours (``peft_kernels.QLoRAConfig``)
vs bitsandbytes NF4 + HF PEFT LoRA, on the same model, tokens and adapter settings.

    python -P bench/qlora_step_memory.py [--layers 2] [--tokens 512] [--dtype bf16|fp32] [--device cpu|cuda]

Model: transformers ``LlamaForCausalLM`` at LLaMA-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocabulary
32000; ``--small`` takes SmolLM2-135M's: 576 / 1536 / 9 heads / 49152), ``--layers`` decoder layers, random
init (seed 0), no download. Both runs quantize every decoder Linear to NF4 (blocksize 64, double quantization;
embeddings and the output head stay in ``--dtype``) and put LoRA r = 16, alpha = 32, dropout 0.1 on all seven
projections (the QLoRA paper's recipe). Adapters are fp32 in both, each library's default for QLoRA: ours casts
them to ``--dtype`` inside the op, PEFT casts each adapter's input to fp32 (and its dropout keeps that copy for
backward). No gradient checkpointing in either.

Step: causal-LM loss on ``--tokens`` random token ids (batch 1), backward, AdamW step. The second step is
measured (the first creates AdamW's state). Printed per run: the bytes resident before the step (weights with
their quantization state, adapters, AdamW state), the peak above that during the step, their sum, ours/peer.

How memory is counted. CPU: every allocation and free of torch's CPU allocator during the step, from the
profiler's memory events (exact byte counts in time order); the step's peak is the maximum of their running
sum. Outside that count: memory not taken through torch's allocator (our kernels' per-thread block buffers,
at most 8 x 64K fp32 values per thread, made once per thread and reused). CUDA: torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
from pathlib import Path

import torch

# `python -P` leaves the script's directory off sys.path; add bench/ alone, as the other bench scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import peft_kernels  # noqa: E402
from peft_kernels import experiment as ex  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, DROPOUT = 16, 32, 0.1
SHAPES = {  # hidden, MLP, heads, vocabulary
    "llama-7b": (4096, 11008, 32, 32000),
    "smollm2-135m": (576, 1536, 9, 49152),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_base(shape: str, layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, heads, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


def ours(base, dtype):
    return peft_kernels.apply(copy.deepcopy(base), peft_kernels.QLoRAConfig(
        r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=TARGETS, quantize="all_linear", compute_dtype=dtype))


def bnb_peft(base, dtype):
    import peft

    return peft.get_peft_model(ex.bnb_quantize(copy.deepcopy(base), compute_dtype=dtype), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS))


def cpu_step_peak(step) -> int:
    """Peak of the running sum of torch CPU-allocator bytes allocated (+) and freed (-) during `step()`."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.typed[1].alloc_size))
        stack.extend(e.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def measure(model, tokens: int, vocab: int, device: str) -> dict:
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates AdamW's state
    gc.collect()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    resident = ex.model_bytes(model) + state
    peak = harness.memory_bytes(step, cuda=True) if device == "cuda" else cpu_step_peak(step)
    return dict(trainable=sum(p.numel() for p in params), resident=resident, state=state, peak=peak)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--small", action="store_true", help="SmolLM2-135M's shapes instead of LLaMA-7B's")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    for flag in ("layers", "tokens"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    dtype, shape = DTYPES[args.dtype], "smollm2-135m" if args.small else "llama-7b"
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    print(f"# QLoRA step memory: {shape} shapes, {args.layers} layers, {args.tokens} tokens, {args.dtype} | "
          f"torch {torch.__version__} | {where}")
    base = build_base(shape, args.layers, dtype)
    vocab = SHAPES[shape][3]
    runs = {}
    for name, build in (("ours", ours), ("bnb+peft", bnb_peft)):
        model = build(base, dtype)
        runs[name] = measure(model, args.tokens, vocab, args.device)
        del model
        gc.collect()
    mib = 2**20
    print("\n| run | trainable params | resident before the step MiB (AdamW state) | step peak above it MiB | total MiB |")
    print("|---|--:|--:|--:|--:|")
    for name, r in runs.items():
        print(f"| {name} | {r['trainable']:,} | {r['resident'] / mib:.1f} ({r['state'] / mib:.1f}) | "
              f"{r['peak'] / mib:.1f} | {(r['resident'] + r['peak']) / mib:.1f} |")
    a, b = runs["ours"], runs["bnb+peft"]
    print(f"\nours / bnb+peft: step peak {a['peak'] / b['peak']:.3f}, total {(a['resident'] + a['peak']) / (b['resident'] + b['peak']):.3f} "
          f"({(b['resident'] + b['peak'] - a['resident'] - a['peak']) / mib:+.1f} MiB in ours' favour)")


if __name__ == "__main__":
    main()
