"""Why AdamW8bit scales its 8-bit moments in blocks of 256 elements: the error each block size adds to AdamW's
update on real gradients, against the state it costs (CPU, offline).

    python -P bench/adamw8bit_blocks.py [--steps 30] [--batch 8]

SmolLM2-135M-Instruct with QLoRA (r = 8, alpha 16, all seven projections, bf16 compute, dropout 0) trains with
torch.optim.AdamW (lr 5e-4) on the Rotten Tomatoes causal-LM sequences of bench/optim8bit_real.py. At every step
the same gradients also drive one shadow state per block size B: both moments stored as AdamW8bit stores them
(first moment in the signed dynamic map, second in the unsigned one, each scaled by its block's absmax, nearest
entry), decoded, updated, re-encoded. What is compared is the update direction m_hat / (sqrt(v_hat) + eps) the
shadow state gives against fp32 AdamW's at the same step: relative error ||u_B - u|| / ||u|| over all trainable
parameters. The shadows never move the weights, so every block size sees the same gradients; their errors
accumulate through their own moments, as they would in training. State bytes per element: 2 (codes) + 8 / B
(two fp32 absmax per block); fp32 AdamW keeps 8.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optim8bit_real import ALPHA, LR, R, TARGETS, WEIGHT_DECAY, lm_batch, lm_data  # noqa: E402

import peft_kernels  # noqa: E402
from peft_kernels import experiment as ex  # noqa: E402
from peft_kernels import reference  # noqa: E402

BLOCKS = [32, 64, 128, 256, 512, 2048, 16384]
BETAS, EPS = (0.9, 0.999), 1e-8


def quantize(x: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """x as AdamW8bit stores it with blocks of ``block`` elements, decoded again."""
    n = x.numel()
    blocks = -(-n // block)
    absmax = torch.nn.functional.pad(x, (0, blocks * block - n)).reshape(blocks, block).abs().amax(dim=1)
    scale = absmax.repeat_interleave(block)[:n]
    codes = reference._nearest_entry(code, (x / scale.clamp(min=1e-38)).clamp(-1, 1))
    return code[codes.long()] * scale


def direction(m, v, step):
    return (m / (1 - BETAS[0] ** step)) / ((v / (1 - BETAS[1] ** step)).sqrt() + EPS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    print(f"CPU {cpu.group(1) if cpu else platform.processor()}, torch {torch.__version__}", flush=True)
    model_dir = ex.cached_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = lm_data(tok)
    batches = [lm_batch([data[i] for i in idx], pad_id) for idx in ex.batch_order(len(data), args.steps, args.batch)]
    torch.manual_seed(ex.SEED)
    model = peft_kernels.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               peft_kernels.QLoRAConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    signed, unsigned = peft_kernels.dynamic_map(signed=True), peft_kernels.dynamic_map(signed=False)
    exact = [(torch.zeros(p.numel()), torch.zeros(p.numel())) for p in params]
    shadow = {b: [(torch.zeros(p.numel()), torch.zeros(p.numel())) for p in params] for b in BLOCKS}
    errors = {b: [] for b in BLOCKS}
    print(f"{sum(p.numel() for p in params):,} trainable elements in {len(params)} tensors; {args.steps} steps x batch "
          f"{args.batch}", flush=True)
    model.train()
    for step, (ids, mask, labels) in enumerate(batches, 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.reshape(-1).float() for p in params]
        u = []
        for i, g in enumerate(grads):
            m, v = exact[i]
            m.lerp_(g, 1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
            u.append(direction(m, v, step))
        norm = torch.cat(u).norm()
        for b in BLOCKS:
            diff = []
            for i, g in enumerate(grads):
                m, v = shadow[b][i]
                m = torch.lerp(m, g, 1 - BETAS[0])
                v = v * BETAS[1] + (1 - BETAS[1]) * g * g
                diff.append(direction(m, v, step) - u[i])
                shadow[b][i] = (quantize(m, signed, b), quantize(v, unsigned, b))
            errors[b].append((torch.cat(diff).norm() / norm).item())
        opt.step()
        if step % 10 == 0 or step == len(batches):
            print(f"  step {step}/{len(batches)} loss {loss.item():.4f}", flush=True)

    marks = sorted({2, 10, len(batches)})
    print("\n| block | state B/element | vs fp32 AdamW | " + " | ".join(f"update error, step {s}" for s in marks)
          + " | mean over steps 2.. |")
    print("|--:|--:|--:|" + "--:|" * len(marks) + "--:|")
    for b in BLOCKS:
        e = errors[b]
        per_elem = 2 + 8 / b
        print(f"| {b} | {per_elem:.3f} | {per_elem / 8:.3f}x | " + " | ".join(f"{e[s - 1]:.4f}" for s in marks)
              + f" | {sum(e[1:]) / len(e[1:]):.4f} |")


if __name__ == "__main__":
    main()
