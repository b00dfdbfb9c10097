"""End-to-end LoRA fine-tuning, HF PEFT vs peft_kernels, on a real model and a real dataset (CPU, offline).

    python -P bench/finetune_lora.py [--quick] [--steps 200] [--batch 8] [--lr 5e-4] [--train-size 2000]
                                     [--test-size 500]

Model, data, task and loss: peft_kernels/experiment.py (SmolLM2-135M-Instruct, Rotten Tomatoes snippets,
sentiment by verbalizer).

Runs, identical in data order, optimizer (AdamW, no weight decay), steps and initial adapter:
  peft         peft.get_peft_model + LoraConfig(r=8, lora_alpha=16, dropout 0, q_proj/v_proj)
  ours         peft_kernels.apply + LoRAConfig(same), lora_A/lora_B copied from peft's initial values
  ours p=0.1   as ours with dropout 0.1 (its mask stream differs from PEFT's, so it is reported, not compared)
The claim: |loss_ours - loss_peft| / loss_peft <= 1% at every step. Per-step losses go to
bench/results/finetune_lora.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_kernels
from peft_kernels.experiment import (  # noqa: F401  (re-exported for bench/finetune_*.py)
    CACHE,
    SEED,
    TARGETS,
    accuracy,
    batch_order,
    cached_model_dir,
    collate,
    label_logits,
    load_data,
    lora_params,
    train,
)

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_lora.csv"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="30 steps, 200 test examples")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.test_size = 30, 200

    model_dir = cached_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    first = tok("Review:").input_ids[0]
    assert first not in tok.all_special_ids, f"tokenizer prepends special token {first}: delete {CACHE}"
    neg, pos = tok(" negative").input_ids[0], tok(" positive").input_ids[0]
    print(f"label tokens: ' positive' -> {pos}, ' negative' -> {neg}")
    assert pos != neg, "the label tokens must differ"
    head = base.get_output_embeddings().weight[[neg, pos]].detach().clone()  # class 0 = negative, 1 = positive
    train_data, test_data = load_data(tok, args.train_size, args.test_size)
    print(f"train {len(train_data)} (positive {sum(l for _, l in train_data)}), test {len(test_data)} "
          f"(positive {sum(l for _, l in test_data)}); steps {args.steps}, batch {args.batch}, lr {args.lr}")
    batches = batch_order(len(train_data), args.steps, args.batch)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    torch.manual_seed(SEED)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    init = {k: p.detach().clone() for k, p in lora_params(peft_model).items()}

    def ours(dropout):
        model = peft_kernels.apply(copy.deepcopy(base), peft_kernels.LoRAConfig(
            r=8, alpha=16, dropout=dropout, target_modules=TARGETS))
        params = lora_params(model)
        assert params.keys() == init.keys(), sorted(params.keys() ^ init.keys())[:4]
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(init[k])
        return model

    ours_model = ours(0.0)
    with torch.no_grad():  # both start as the base model: their logits must agree before any training
        probe = collate(test_data[:8], pad_id)
        diff = (label_logits(peft_model.eval(), probe, head) - label_logits(ours_model.eval(), probe, head)).abs().max()
    print(f"max |logit diff| before training (8 test rows): {diff.item():.3g}")

    runs = [train("peft", peft_model, train_data, test_data, head, pad_id, args, batches)]
    del peft_model
    runs.append(train("ours", ours_model, train_data, test_data, head, pad_id, args, batches))
    del ours_model
    runs.append(train("ours p=0.1", ours(0.1), train_data, test_data, head, pad_id, args, batches))

    p, o, d = (r["losses"] for r in runs)
    rel = [abs(a - b) / b for a, b in zip(o, p)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_peft", "loss_ours", "rel_diff", "loss_ours_dropout0.1"])
        w.writerows([i + 1, *row] for i, row in enumerate(zip(p, o, rel, d)))

    print()
    for step, (g_peft, g_ours) in enumerate(zip(runs[0]["grads"], runs[1]["grads"]), 1):
        for kind in ("lora_A", "lora_B"):
            keys = [k for k in g_peft if k.endswith(kind)]
            diff = max((g_ours[k] - g_peft[k]).abs().max().item() for k in keys)
            scale = max(g_peft[k].abs().max().item() for k in keys)
            print(f"step {step} {kind} grads: max |ours-peft| {diff:.3g}, max |peft| {scale:.3g} ({len(keys)} tensors)")
    print(f"max relative loss difference |ours-peft|/peft: {rel[worst]:.3g} at step {worst + 1} "
          f"(target <= 0.01: {'PASS' if rel[worst] <= 0.01 else 'FAIL'}); mean {sum(rel) / len(rel):.3g}")
    print(f"per-step losses: {RESULTS}\n")
    print("| run | trainable params | % of total | first loss | last loss | mean loss last 20 | test acc before "
          "| test acc after | wall s | s/step | tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        tail = r["losses"][-20:]
        print(f"| {r['name']} | {r['trainable']:,} | {r['pct']:.3f} | {r['losses'][0]:.4f} | {r['losses'][-1]:.4f} "
              f"| {sum(tail) / len(tail):.4f} | {r['acc_before']:.3f} | {r['acc_after']:.3f} | {r['wall']:.0f} "
              f"| {r['wall'] / len(r['losses']):.2f} | {r['tok_s']:.0f} |")


if __name__ == "__main__":
    main()
