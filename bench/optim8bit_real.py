"""Issue 27 on the real model and data: QLoRA causal-LM training of SmolLM2-135M-Instruct on the Rotten Tomatoes
snippets with the fused loss and the 8-bit AdamW, against HF's loss and torch's fp32 AdamW (CPU, offline).

    python -P bench/optim8bit_real.py [--steps 100] [--batch 8] [--csv bench/results/optim8bit_real.csv]

Three runs from the same initial adapter over the same batches, differing only in loss and optimizer:
  A  HF loss (full logits, ForCausalLMLoss)             + torch.optim.AdamW
  B  fused loss (peft_kernels.fuse_causal_lm_loss)      + torch.optim.AdamW
  C  fused loss                                         + peft_kernels.optim.AdamW8bit
QLoRA (peft_kernels.QLoRAConfig) with the compare job's r=8, alpha=16 and lr 5e-4 (peft_kernels/cli.py), adapters
on all seven projections (q, k, v, o, gate, up, down: every decoder Linear, so all of them are NF4), QLoRAConfig's
default bf16 compute (its default on every device; adapters stay fp32, the rest of the model fp32), dropout 0 so
that the runs draw no random numbers; AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0.01 in both optimizers.
Data: the compare job's training split (peft_kernels.experiment.load_data) as plain causal-LM data: each sequence is
its prompt "Review: {text}\\nSentiment:" followed by the verbalizer token (" positive" / " negative"), at most 64
tokens, right-padded with labels -100 on the padding; batches in experiment.batch_order's seeded order.

What it shows (the issue's claims):
  * fused vs HF loss at every step: in run B, HF's loss is evaluated (no grad) at the very weights each fused
    training loss was computed at; its relative gap is reported, and checked against the project's tolerance rule,
    |fused - ref| <= 2 |HF - ref| + atol, where ref is the loss in float64 from the same final hidden states (the
    decoder is the same code in both; only the loss differs). The A-vs-B gap along their separate trajectories
    is reported too.
  * AdamW8bit vs fp32 AdamW: the mean loss of the last 10 steps of C within 2% of B's (and the raw last-step gap),
    and the optimizer-state bytes of each.
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_kernels
from peft_kernels import experiment as ex
from peft_kernels.loss import IGNORE_INDEX, fuse_causal_lm_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR = 8, 16, 5e-4  # the compare job's LoRA/QLoRA rank, alpha and --lr default (peft_kernels/cli.py)
WEIGHT_DECAY = 0.01
TRAIN_SIZE, TEST_SIZE = 2000, 500  # the compare job's split (cli.FULL): the same training examples
FINAL_WINDOW = 10  # one batch's loss is noisy: the optimizers are compared on the mean of the last 10 steps
MAX_GAP = 0.02  # the bound on AdamW8bit's final loss relative to fp32 AdamW
# The rule's absolute slack: a mean of ~500 fp32 token losses of ~3 nats carries a summation rounding of order
# sqrt(500) * 3 * 6e-8 = 4e-6; 1e-5 keeps the rule from failing on a step where HF's own error happens to be ~0.
ATOL = 1e-5


def lm_data(tok) -> list[tuple[list[int], int]]:
    """The training split as causal-LM sequences: prompt ids + the verbalizer token of the label, <= 64 tokens."""
    train, _ = ex.load_data(tok, TRAIN_SIZE, TEST_SIZE)
    verbalizer = {1: tok(" positive").input_ids[0], 0: tok(" negative").input_ids[0]}
    suffix = len(tok(ex.SUFFIX).input_ids)
    out = []
    for ids, label in train:
        if len(ids) == ex.MAX_LEN:  # make room for the label token: one more review token goes, the suffix stays
            ids = ids[: ex.MAX_LEN - 1 - suffix] + ids[-suffix:]
        out.append((ids + [verbalizer[label]], label))
    return out


def lm_batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention mask and labels (the ids, -100 on the right padding)."""
    ids, mask, _, _ = ex.collate(examples, pad_id)
    return ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)


def loss_f64(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor) -> float:
    """HF's causal-LM loss (tokens < n predict n, mean over non-ignored targets) computed in float64."""
    logits = hidden[:, :-1].double() @ head.weight.double().T
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX).item()


@torch.no_grad()
def hf_check(model, ids, mask, labels) -> tuple[float, float]:
    """HF's own loss (the class's forward, not the fused patch) at the model's current weights, and the float64
    loss of the same final hidden states."""
    captured = []
    handle = model.model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        hf = type(model).forward(model, input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    finally:
        handle.remove()
    return hf.item(), loss_f64(captured[-1], model.lm_head, labels)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def train(name: str, model, batches, make_optimizer, fused: bool, check: bool) -> dict:
    """One run over ``batches``. With ``check``, each step also evaluates HF's loss and the float64 loss at the
    weights of the step's training loss (before the optimizer step); that time is kept out of ``wall``."""
    if fused:
        fuse_causal_lm_loss(model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    model.train()
    losses, hf, ref = [], [], []
    wall = 0.0
    for step, (ids, mask, labels) in enumerate(batches, 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        wall += time.perf_counter() - start
        if check:
            h, r = hf_check(model, ids, mask, labels)
            hf.append(h)
            ref.append(r)
        start = time.perf_counter()
        opt.step()
        wall += time.perf_counter() - start
        losses.append(loss.item())
        if step % 10 == 0 or step == len(batches):
            print(f"  {name} step {step}/{len(batches)} loss {losses[-1]:.5f} ({wall / step:.2f} s/step)", flush=True)
    return dict(losses=losses, hf=hf, ref=ref, wall=wall, state=state_bytes(opt))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--csv", type=Path, help="write the per-step losses here (e.g. bench/results/optim8bit_real.csv)")
    args = ap.parse_args()
    from peft_kernels.optim import AdamW8bit

    cpu = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    print(f"CPU {cpu.group(1) if cpu else platform.processor()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}", flush=True)
    model_dir = ex.cached_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = lm_data(tok)
    batches = [lm_batch([data[i] for i in idx], pad_id) for idx in ex.batch_order(len(data), args.steps, args.batch)]
    tokens = sum(int((b[2][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(ex.SEED)  # the adapters' initial A; every run starts from a copy of this one model
    init = peft_kernels.apply(base, peft_kernels.QLoRAConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules=TARGETS))
    trainable = sum(p.numel() for p in init.parameters() if p.requires_grad)
    compute = {m.compute_dtype for m in init.modules() if hasattr(m, "compute_dtype")}
    print(f"{len(data)} training sequences; {args.steps} steps x batch {args.batch}, {tokens / args.steps:.0f} target "
          f"tokens/step; QLoRA r={R} alpha={ALPHA} on {len(TARGETS)} projections, compute {compute}, "
          f"{trainable:,} trainable; lr {LR}, weight decay {WEIGHT_DECAY}", flush=True)

    def adamw(params):
        return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)

    def adamw8bit(params):
        return AdamW8bit(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)

    runs = {}
    for key, name, make, fused in (("A", "A hf+adamw", adamw, False), ("B", "B fused+adamw", adamw, True),
                                   ("C", "C fused+adamw8bit", adamw8bit, True)):
        print(f"run {name}", flush=True)
        runs[key] = train(name, copy.deepcopy(init), batches, make, fused, check=key == "B")
    a, b, c = (runs[k]["losses"] for k in "ABC")
    hf, ref = runs["B"]["hf"], runs["B"]["ref"]

    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "A_hf_adamw", "B_fused_adamw", "B_hf_same_weights", "B_f64_same_weights",
                        "C_fused_adamw8bit"])
            w.writerows([i + 1, *row] for i, row in enumerate(zip(a, b, hf, ref, c)))
        print(f"per-step losses: {args.csv}")

    print("\n| step | A hf+adamw | B fused+adamw | HF at B's weights | (B-HF)/HF | C fused+adamw8bit | (C-B)/B |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i in range(len(a)):
        if i == 0 or (i + 1) % 10 == 0 or i == len(a) - 1:
            print(f"| {i + 1} | {a[i]:.5f} | {b[i]:.5f} | {hf[i]:.5f} | {(b[i] - hf[i]) / hf[i]:+.1e} | {c[i]:.5f} "
                  f"| {(c[i] - b[i]) / b[i]:+.2%} |")

    same = max(abs(x - y) / y for x, y in zip(b, hf))
    bound = [abs(x - r) <= 2 * abs(y - r) + ATOL for x, y, r in zip(b, hf, ref)]
    worst = max(range(len(b)), key=lambda i: abs(b[i] - ref[i]) - 2 * abs(hf[i] - ref[i]))
    apart = max(abs(y - x) / x for x, y in zip(a, b))
    mean_b, mean_c = (sum(v[-FINAL_WINDOW:]) / len(v[-FINAL_WINDOW:]) for v in (b, c))
    gap = (mean_c - mean_b) / mean_b
    sb, sc = runs["B"]["state"], runs["C"]["state"]
    print(f"\nfused vs HF loss, same weights (run B, every step): max |B - HF| / HF = {same:.1e}; vs the float64 loss of "
          f"the same hidden states, |fused - f64| <= 2 |HF - f64| + {ATOL:g} at {sum(bound)}/{len(bound)} steps "
          f"(tightest: step {worst + 1}, fused err {abs(b[worst] - ref[worst]):.1e}, HF err "
          f"{abs(hf[worst] - ref[worst]):.1e}): {'PASS' if all(bound) else 'FAIL'}")
    print(f"A (HF loss) vs B (fused loss), separate trajectories: max over steps |A - B| / A = {apart:.1e}")
    print(f"C (AdamW8bit) vs B (fp32 AdamW): mean loss of the last {FINAL_WINDOW} steps {mean_c:.5f} vs {mean_b:.5f}, "
          f"{gap:+.2%} (bound {MAX_GAP:.0%}: {'PASS' if abs(gap) <= MAX_GAP else 'FAIL'}); last step "
          f"{c[-1]:.5f} vs {b[-1]:.5f}, {(c[-1] - b[-1]) / b[-1]:+.2%}")
    print(f"optimizer state: B {sb:,} bytes, C {sc:,} bytes, C/B = {sc / sb:.3f}")
    print("wall per run (training steps only): " + ", ".join(f"{k} {r['wall']:.0f} s ({r['wall'] / len(a):.2f} "
                                                               f"s/step)" for k, r in runs.items()))


if __name__ == "__main__":
    main()
