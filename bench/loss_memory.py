"""Memory of the causal-LM loss path alone: HF's (head, fp32 upcast, cross-entropy) vs ``fuse_causal_lm_loss``'s
chunked loss, forward and backward, on the same hidden states and frozen head.

    python -P bench/loss_memory.py [--tokens 8192] [--hidden 4096] [--vocab 32000] [--dtype bf16] [--chunk N]

The defaults are LLaMA-7B's head at batch 16 x 512. Printed per path: the peak of torch's CPU-allocator bytes above
the inputs (hidden states, head, labels) during forward + backward (the profiler's allocation events, as in
qlora_step_memory.py), the time of the pass, and the loss (the two must agree). CPU only: on CUDA,
torch.cuda.max_memory_allocated gives the same comparison.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qlora_step_memory import cpu_step_peak  # noqa: E402

from peft_kernels.loss import DEFAULT_CHUNK_BYTES, chunked_causal_lm_loss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_loss(hidden, head, labels):
    """What LlamaForCausalLM does with labels: the full logits, then ForCausalLMLoss (upcast, shift, mean CE)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(head(hidden), labels, vocab_size=head.weight.shape[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: 64 MiB of fp32 logits)")
    args = ap.parse_args()
    for flag in ("tokens", "hidden", "vocab"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.chunk is not None and args.chunk < 1:
        ap.error(f"--chunk must be >= 1, got {args.chunk}")
    dtype = DTYPES[args.dtype]
    chunk = args.chunk or max(1, DEFAULT_CHUNK_BYTES // (4 * args.vocab))
    print(f"# loss path: {args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}, {args.dtype}, frozen head "
          f"| chunk {chunk} tokens | torch {torch.__version__} | cpu ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)")
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, args.hidden**-0.5, generator=g)
    hidden = torch.randn(1, args.tokens, args.hidden, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g)
    paths = {"hf": lambda: hf_loss(hidden, head, labels),
             "fused": lambda: chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=chunk)}
    print("| path | peak above inputs (MB) | forward + backward (s) | loss |")
    print("|---|--:|--:|--:|")
    for name, loss_fn in paths.items():
        result = {}

        def step():
            hidden.grad = None
            loss = loss_fn()
            loss.backward()
            result["loss"] = loss.item()

        start = time.perf_counter()
        peak = cpu_step_peak(step)
        print(f"| {name} | {peak / 1e6:.0f} | {time.perf_counter() - start:.1f} | {result['loss']:.5f} |", flush=True)


if __name__ == "__main__":
    main()
