"""End-to-end sparse fine-tuning (FISH / Child-Tuning_D masks, SparseAdamW) beside LoRA, on the model, data,
task and batches of bench/finetune_lora.py (SmolLM2-135M-Instruct, Rotten Tomatoes snippets, verbalizer
sentiment; CPU, offline).

    python -P bench/finetune_sparse.py [--quick] [--steps 200] [--batch 8] [--density D] [--sparse-lr 2e-4]

Runs, each in its own process (so that its peak resident memory is its own), same data order and steps:
  lora     peft_kernels LoRA r=8 (alpha 16) on q_proj/v_proj, torch.optim.AdamW lr 5e-4 (as finetune_lora.py)
  fisher   SparseFTConfig(method="fisher") on every attention and MLP projection: the entries with the largest
           empirical Fisher information (squared gradients of 32 single training examples), SparseAdamW
  random   the same number of entries chosen at random (the control FISH is compared with in its paper)
By default the sparse runs train as many values as LoRA has (--density overrides), so the columns compare
like with like. Reported: test accuracy before/after, optimizer-state bytes (tensors in the optimizer's
state, indices included), peak RSS of the run's process, seconds per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# `python -P` leaves the script's directory off sys.path; add bench/ alone (see bench_lora.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_lora as ft  # noqa: E402
import harness  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import peft_kernels  # noqa: E402

SPARSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FISHER_EXAMPLES = 32
METHODS = ("lora", "fisher", "random")


def run(method: str, args) -> dict:
    tok = AutoTokenizer.from_pretrained(ft.cached_model_dir())
    model = AutoModelForCausalLM.from_pretrained(ft.CACHE, dtype=torch.float32)
    neg, pos = tok(" negative").input_ids[0], tok(" positive").input_ids[0]
    head = model.get_output_embeddings().weight[[neg, pos]].detach().clone()
    train_data, test_data = ft.load_data(tok, args.train_size, args.test_size)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = ft.batch_order(len(train_data), args.steps, args.batch)
    acc_before = ft.accuracy(model, test_data, head, pad_id)

    def loss_of(m, batch):
        return F.cross_entropy(ft.label_logits(m, batch, head), batch[3])

    torch.manual_seed(ft.SEED)
    if method == "lora":
        peft_kernels.apply(model, peft_kernels.LoRAConfig(r=8, alpha=16, target_modules=ft.TARGETS))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        trained = peft_kernels.trainable_parameters(model)[0]
    else:
        total = sum(m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in SPARSE_TARGETS)
        density = args.density or args.lora_count / total
        fisher_batches = [ft.collate([train_data[i]], pad_id) for i in range(FISHER_EXAMPLES)]
        config = peft_kernels.SparseFTConfig(method=method, density=density, target_modules=SPARSE_TARGETS,
                                             seed=ft.SEED, batches=fisher_batches, loss_fn=loss_of)
        peft_kernels.apply(model, config)
        opt = peft_kernels.sparse.make_optimizer(model, lr=args.sparse_lr, weight_decay=0.0)
        trained = sum(i.numel() for i in model.peft_kernels_sparse.indices.values())
    model.train()
    losses, start = [], time.perf_counter()
    for step, idx in enumerate(batches, 1):
        batch = ft.collate([train_data[i] for i in idx], pad_id)
        loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == len(batches):
            print(f"{method} step {step}/{len(batches)} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    return dict(method=method, trained=trained, state_bytes=harness.tensor_bytes(opt.state),
                s_per_step=wall / len(batches),
                first_loss=losses[0], last20=sum(losses[-20:]) / len(losses[-20:]), acc_before=acc_before,
                acc_after=ft.accuracy(model, test_data, head, pad_id),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4, help="LoRA's AdamW learning rate")
    ap.add_argument("--sparse-lr", type=float, default=2e-4, help="SparseAdamW's learning rate")
    ap.add_argument("--density", type=float, default=None, help="default: as many entries as LoRA trains")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="30 steps, 200 test examples")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}; lora first")
    ap.add_argument("--method", choices=METHODS, help="run one method in this process and print its JSON")
    ap.add_argument("--lora-count", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.test_size = 30, 200
    if args.method:
        print(json.dumps(run(args.method, args)))
        return
    methods = args.methods.split(",")
    if methods[0] != "lora" or not set(methods) <= set(METHODS):
        ap.error(f"--methods must start with lora (the sparse runs match its count) and come from {METHODS}")
    results = []
    for method in methods:
        cmd = [sys.executable, "-P", __file__, "--method", method, *sys.argv[1:]]
        if results:
            cmd += ["--lora-count", str(results[0]["trained"])]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)  # each run's result as soon as it is known
    print(f"\nsteps {args.steps}, batch {args.batch}, LoRA lr {args.lr}, sparse lr {args.sparse_lr}, "
          f"test {args.test_size}\n")
    print("| run | trained values | optimizer state MiB | peak RSS MiB | s/step | first loss | mean loss last 20 "
          "| test acc before | test acc after |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in results:
        print(f"| {r['method']} | {r['trained']:,} | {r['state_bytes'] / 2**20:.2f} | {r['peak_rss_mib']:.0f} "
              f"| {r['s_per_step']:.2f} | {r['first_loss']:.4f} | {r['last20']:.4f} | {r['acc_before']:.3f} "
              f"| {r['acc_after']:.3f} |")


if __name__ == "__main__":
    main()
