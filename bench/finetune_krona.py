"""End-to-end KronA fine-tune beside LoRA: the model, data, prompt, loss, optimizer and batch order of
bench/finetune_lora.py (SmolLM2-135M-Instruct, Rotten Tomatoes snippets, verbalizer " positive"/" negative"),
both adapters on q_proj and v_proj through peft_kernels.apply.

    python -P bench/finetune_krona.py [--quick] [--steps 200] [--batch 8] [--lr 5e-4] [--scaling 1.0]

Runs: ``LoRA r=8`` (LoRAConfig(r=8, alpha=16)) and ``KronA`` (KronAConfig(scaling), balanced factors: q_proj
576 -> 576 as A 24x24 ⊗ B 24x24, v_proj 576 -> 192 as A 12x24 ⊗ B 16x24). Reported: trainable parameters, test
accuracy before and after, loss, time.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ alone, so the installed package is used
import finetune_lora as ft  # noqa: E402

import peft_kernels  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--scaling", type=float, default=1.0, help="KronA's scaling of A ⊗ B")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="30 steps, 200 test examples")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.test_size = 30, 200

    model_dir = ft.cached_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    neg, pos = tok(" negative").input_ids[0], tok(" positive").input_ids[0]
    head = base.get_output_embeddings().weight[[neg, pos]].detach().clone()  # class 0 = negative, 1 = positive
    train_data, test_data = ft.load_data(tok, args.train_size, args.test_size)
    batches = ft.batch_order(len(train_data), args.steps, args.batch)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    print(f"train {len(train_data)}, test {len(test_data)}; steps {args.steps}, batch {args.batch}, lr {args.lr}")

    configs = {
        "LoRA r=8": peft_kernels.LoRAConfig(r=8, alpha=16, target_modules=ft.TARGETS),
        f"KronA scaling={args.scaling}": peft_kernels.KronAConfig(scaling=args.scaling, target_modules=ft.TARGETS),
    }
    runs = []
    for name, config in configs.items():
        torch.manual_seed(ft.SEED)  # the same initial adapter draw for every run of this script
        model = peft_kernels.apply(copy.deepcopy(base), config)
        runs.append(ft.train(name, model, train_data, test_data, head, pad_id, args, batches))
        del model

    print("\n| run | trainable params | % of total | first loss | mean loss last 20 | test acc before "
          "| test acc after | wall s | s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        tail = r["losses"][-20:]
        print(f"| {r['name']} | {r['trainable']:,} | {r['pct']:.3f} | {r['losses'][0]:.4f} | {sum(tail) / len(tail):.4f} "
              f"| {r['acc_before']:.3f} | {r['acc_after']:.3f} | {r['wall']:.0f} | {r['wall'] / len(r['losses']):.2f} |")


if __name__ == "__main__":
    main()
