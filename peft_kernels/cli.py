"""``peft-kernels``: the command line.

    peft-kernels info                      what this install contains, and an NF4 round trip vs bitsandbytes
    peft-kernels finetune --method M ...   fine-tune one method on a model and data, save the adapter
    peft-kernels compare [--quick] ...     every method, ours beside the peers that have it, one table
    peft-kernels bench [--op OP] ...       the microbenchmarks of a source checkout (bench/bench_<op>.py)
    peft-kernels methods [--model DIR]     every method's trainable parameters on a causal LM and BERT-base

Model and data default to the embedded offline pair of peft_kernels/experiment.py (SmolLM2-135M-Instruct, the
Rotten Tomatoes review snippets); ``--model`` takes a local Hugging Face folder (or a hub id, the only case
that uses the network), ``--data`` a JSON-lines file of {"text": ..., "label": 0|1}. Classification is by
verbalizer (the " positive" / " negative" next-token logits), the same for every method.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gc
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import experiment as ex

QUICK = dict(steps=30, batch=8, train_size=2000, test_size=200)
FULL = dict(steps=200, batch=8, train_size=2000, test_size=500)


class UserError(Exception):
    """A bad command line or input file: printed as one line, exit status 2, no traceback."""


# ---- methods -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """One way of training: ``method`` (the survey's name), ``impl`` (who implements it), ``build(model, ctx)``,
    which turns a fresh copy of the base model into the model to train, and ``optimizer(model, ctx)`` when the
    method needs its own (default: AdamW over the trainable parameters at ``lr``, or --lr when None: methods
    that train few scalars per layer, (IA)³ and BitFit, use their papers' higher rates). ``quick``: part of
    ``compare --quick``."""

    method: str
    impl: str
    build: Callable
    optimizer: Callable | None = None
    quick: bool = True
    lr: float | None = None
    after_step: Callable | None = None


# LoRA and QLoRA train with dropout 0.1 on the adapter input, the QLoRA paper's setting for models up to 13B and a
# common recipe: the regime where fusing dropout matters (PEFT keeps the dropped x for backward, ours redraws the
# Philox mask). KronA stays at 0: PEFT's LoKr has no input dropout to compare with.
LORA_DROPOUT = 0.1


def _ours_lora(model, ctx):
    from . import LoRAConfig, apply

    return apply(model, LoRAConfig(r=8, alpha=16, dropout=LORA_DROPOUT, target_modules=ex.TARGETS))


def _peft_lora(model, ctx):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=LORA_DROPOUT,
                                                      target_modules=ex.TARGETS))


def _ours_qlora(model, ctx):
    from . import QLoRAConfig, apply

    return apply(model, QLoRAConfig(r=8, alpha=16, dropout=LORA_DROPOUT, target_modules=ex.TARGETS,
                                    quantize="all_linear", compute_dtype=torch.float32))


def _bnb_qlora(model, ctx):
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=LORA_DROPOUT, target_modules=ex.TARGETS)
    return peft.get_peft_model(ex.bnb_quantize(model), config, autocast_adapter_dtype=False)


def _ours_krona(model, ctx):
    from . import KronAConfig, apply

    return apply(model, KronAConfig(scaling=1.0, target_modules=ex.TARGETS))


def _peft_lokr(model, ctx):
    import peft

    # r >= half of each factor's width keeps LoKr's second factor whole (as our KronA's B); alpha = r gives
    # scaling 1 like ours.
    return peft.get_peft_model(model, peft.LoKrConfig(r=16, alpha=16, target_modules=ex.TARGETS))


# Sparse runs select entries of every attention and MLP projection, as many as LoRA r=8 on ex.TARGETS trains
# (like with like: the survey compares partial methods at equal trainable counts).
SPARSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FISHER_EXAMPLES = 32  # single-example batches: the empirical Fisher of FISH / Child-Tuning_D
SPARSE_LR = 2e-4  # SparseAdamW's learning rate on raw weight entries (LoRA's 5e-4 diverges there)


def _sparse(method):
    def build(model, ctx):
        from . import SparseFTConfig, apply

        lora_count = sum(8 * (m.in_features + m.out_features) for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ex.TARGETS)
        total = sum(m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in SPARSE_TARGETS)
        examples = [ex.collate([ctx.train_data[i]], ctx.pad_id) for i in range(FISHER_EXAMPLES)]
        loss_fn = lambda m, b: torch.nn.functional.cross_entropy(ex.label_logits(m, b, ctx.head), b[3])  # noqa: E731
        return apply(model, SparseFTConfig(method=method, density=lora_count / total, target_modules=SPARSE_TARGETS,
                                           seed=ex.SEED, batches=examples, loss_fn=loss_fn))

    return build


def _ours(config_name, **kwargs):
    def build(model, ctx):
        import peft_kernels as pk

        return pk.apply(model, getattr(pk, config_name)(**kwargs))

    return build


def _peft_ia3(model, ctx):
    import peft

    return peft.get_peft_model(model, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                     feedforward_modules=["down_proj"]))


def _peft_prompt(model, ctx):
    import peft

    return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                              prompt_tuning_init="SAMPLE_VOCAB"))


def _peft_prefix(model, ctx):
    import peft

    return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))


def _adalora_config(ctx):
    # The budget schedule over this run's steps, as PEFT's AdaLoRA examples set it: warm-up 10 %, final 20 %.
    steps = len(ctx.batches)
    return dict(init_r=12, target_r=8, tinit=steps // 10, tfinal=steps // 5, deltaT=max(1, steps // 20),
                total_step=steps)


def _ours_adalora(model, ctx):
    import peft_kernels as pk

    return pk.apply(model, pk.AdaLoRAConfig(target_modules=ex.TARGETS, **_adalora_config(ctx)))


def _peft_adalora(model, ctx):
    import peft

    return peft.get_peft_model(model, peft.AdaLoraConfig(target_modules=ex.TARGETS, lora_alpha=8,
                                                         **_adalora_config(ctx)))


def _ours_allocate(model, step):
    from . import lora_variants

    lora_variants.update_and_allocate(model, step)


def _peft_allocate(model, step):
    model.base_model.update_and_allocate(step)


IA3_LR = 3e-3  # (IA)^3's paper rate: its vectors start at 1 and move little at LoRA's 5e-4
BITFIT_LR = 1e-3  # BitFit's paper range is 1e-4 to 1e-3 for BERT; its zero-initialised biases need the top
PROMPT_LR = 3e-2  # HF PEFT's prompt-tuning example rate: soft prompts barely move at LoRA's 5e-4
PREFIX_LR = 1e-2  # HF PEFT's prefix-tuning example rate


def _sparse_optimizer(model, ctx):
    from . import sparse

    return sparse.make_optimizer(model, lr=SPARSE_LR, weight_decay=0.0)


RUNS = [
    Run("lora", "peft_kernels", _ours_lora),
    Run("lora", "peft", _peft_lora),
    Run("qlora", "peft_kernels", _ours_qlora),
    Run("qlora", "bitsandbytes+peft", _bnb_qlora),
    Run("krona", "peft_kernels", _ours_krona),
    Run("krona", "peft (LoKr)", _peft_lokr),
    Run("child_d", "peft_kernels", _sparse("child_d"), _sparse_optimizer),
    Run("random_sparse", "peft_kernels", _sparse("random"), _sparse_optimizer, quick=False),
    Run("ia3", "peft_kernels", _ours("IA3Config"), lr=IA3_LR),
    Run("ia3", "peft", _peft_ia3, lr=IA3_LR, quick=False),
    Run("adapter", "peft_kernels", _ours("AdapterConfig", bottleneck=16, placement="houlsby")),
    Run("parallel_adapter", "peft_kernels", _ours("AdapterConfig", bottleneck=16, placement="parallel", scaling=4.0),
        quick=False),
    Run("compacter", "peft_kernels", _ours("CompacterConfig", n=4, rank=1, bottleneck=16), quick=False),
    Run("hadamard", "peft_kernels", _ours("HadamardAdapterConfig"), lr=IA3_LR, quick=False),
    Run("bitfit", "peft_kernels", _ours("BitFitConfig"), lr=BITFIT_LR),
    Run("prompt_tuning", "peft_kernels", _ours("PromptTuningConfig", num_virtual_tokens=20, init="vocab"),
        lr=PROMPT_LR, quick=False),
    Run("prompt_tuning", "peft", _peft_prompt, lr=PROMPT_LR, quick=False),
    Run("prefix_tuning", "peft_kernels", _ours("PrefixTuningConfig", num_virtual_tokens=20), lr=PREFIX_LR),
    Run("prefix_tuning", "peft", _peft_prefix, lr=PREFIX_LR),
    Run("p_tuning", "peft_kernels", _ours("PTuningConfig", num_virtual_tokens=20), lr=PROMPT_LR, quick=False),
    Run("lora_fa", "peft_kernels", _ours("LoRAFAConfig", r=8, alpha=16, target_modules=ex.TARGETS), quick=False),
    Run("dylora", "peft_kernels", _ours("DyLoRAConfig", r=8, alpha=16, target_modules=ex.TARGETS), quick=False),
    Run("adalora", "peft_kernels", _ours_adalora, after_step=_ours_allocate, quick=False),
    Run("adalora", "peft", _peft_adalora, after_step=_peft_allocate, quick=False),
    Run("propetl", "peft_kernels", _ours("ProPETLConfig", r=8, alpha=16, target_modules=ex.TARGETS), quick=False),
    Run("mam", "peft_kernels", _ours("MAMConfig", num_virtual_tokens=30, bottleneck=64, scaling=4.0),
        quick=False),
    Run("unipelt", "peft_kernels", _ours("UniPELTConfig", r=8, alpha=16, num_virtual_tokens=10, bottleneck=64),
        quick=False),
    Run("adamix", "peft_kernels", _ours("AdaMixConfig", num_experts=4, r=8, alpha=16, target_modules=ex.TARGETS),
        quick=False),
]
METHODS = sorted({r.method for r in RUNS})


# ---- measuring -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
    tok: object
    base: torch.nn.Module
    head: torch.Tensor
    train_data: list
    test_data: list
    pad_id: int
    args: argparse.Namespace
    batches: list


def load_context(args) -> Context:
    if args.model is None:
        model_dir = ex.cached_model_dir()
    elif Path(args.model).exists():
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"--model {args.model}: not a Hugging Face model folder (no config.json)")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", args.model):
        model_dir = args.model  # a hub id: the one case that goes to the network
    else:
        raise UserError(f"--model {args.model}: no such folder, and not a hub id of the form 'org/name'")
    tok = ex.AutoTokenizer.from_pretrained(model_dir)
    base = ex.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not hasattr(base, "model") or not hasattr(base.get_output_embeddings(), "weight"):
        raise UserError(f"--model {args.model}: expected a decoder-only causal LM with .model and an output head")
    neg, pos = tok(" negative").input_ids[0], tok(" positive").input_ids[0]
    if neg == pos:
        raise UserError("the tokenizer gives ' positive' and ' negative' the same first token: no verbalizer")
    head = base.get_output_embeddings().weight[[neg, pos]].detach().clone()
    try:
        train_data, test_data = ex.load_data(tok, args.train_size, args.test_size, args.data)
    except ValueError as exc:
        raise UserError(f"--data: {exc}") from exc
    if len(train_data) < args.batch:  # batch_order draws whole batches from the training examples
        raise UserError(f"--data / --test-size: {len(train_data)} training examples are left after the "
                        f"{len(test_data)} test examples; --batch {args.batch} needs at least {args.batch}")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = ex.batch_order(len(train_data), args.steps, args.batch)
    return Context(tok, base, head, train_data, test_data, pad_id, args, batches)


def prepare(run: Run, ctx: Context) -> tuple[ex.Training, int]:
    """A run's model, built on a fresh copy of the base model, ready to train, and the bytes of activations one
    training step saves for backward. Memory is reported as three deterministic parts (weights, activations
    saved for backward in one step, optimizer state), not as the process's resident size, which memory freed
    by the previous run blurs."""
    gc.collect()
    torch.manual_seed(ex.SEED)  # identical adapter initialisation for every run of a method family
    model = run.build(copy.deepcopy(ctx.base), ctx)
    optimizer = run.optimizer(model, ctx) if run.optimizer else None
    activations = ex.saved_bytes(model, ex.collate([ctx.train_data[i] for i in ctx.batches[0]], ctx.pad_id), ctx.head)
    if optimizer is None and run.lr is not None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr, weight_decay=0.0)
    training = ex.Training(f"{run.method} ({run.impl})", model, ctx.train_data, ctx.head, ctx.pad_id, ctx.args,
                           optimizer, run.after_step)
    return training, activations


def results(run: Run, ctx: Context, training: ex.Training, activations: int) -> dict:
    model = training.model
    trainable, _ = ex.trainable_parameters(model)
    res = dict(name=training.name, trainable=trainable, **training.results(ctx.test_data))
    res.pop("grads")
    selection = getattr(model, "peft_kernels_sparse", None)
    if selection is not None:  # the whole weights require grad; the selected entries are what trains
        res["trainable"] = sum(i.numel() for i in selection.indices.values())
    # % of the original model's parameters: a packed 4-bit weight is a buffer in ours and a uint8 "parameter"
    # in bitsandbytes, so the quantized model's own count is no common denominator.
    res.update(method=run.method, impl=run.impl, weights=ex.model_bytes(model), activations=activations,
               pct=100 * res["trainable"] / sum(p.numel() for p in ctx.base.parameters()))
    return res


def run_side_by_side(runs: list[Run], ctx: Context) -> list[dict]:
    """Train the runs of one method (ours and its peers) together, one step of each in turn, so that their step
    times are compared under the same conditions of this shared machine (timed one after the other, runs of the
    same code differed by +-10 % here)."""
    prepared = [prepare(run, ctx) for run in runs]
    ex.train_side_by_side([t for t, _ in prepared], ctx.batches)
    return [results(run, ctx, t, activations) for run, (t, activations) in zip(runs, prepared)]


# ---- commands ------------------------------------------------------------------------------------------------
def cmd_info(args) -> None:
    from .__main__ import main as smoke

    smoke()


def cmd_finetune(args) -> None:
    runs = [r for r in RUNS if r.method == args.method and r.impl == args.impl]
    if not runs:
        impls = sorted({r.impl for r in RUNS if r.method == args.method})
        raise UserError(f"--method {args.method} --impl {args.impl}: not available (implementations: {impls})")
    ctx = load_context(args)
    training, activations = prepare(runs[0], ctx)
    acc_before = ex.accuracy(training.model, ctx.test_data, ctx.head, ctx.pad_id)
    ex.train_side_by_side([training], ctx.batches)
    res, model = results(runs[0], ctx, training, activations), training.model
    out = Path(args.out)
    saved = out / "adapter"
    if getattr(model, "peft_kernels_sparse", None) is not None:
        from . import save_sparse_diff

        save_sparse_diff(model, saved)
    elif runs[0].impl == "peft_kernels":
        from . import save_adapter

        save_adapter(model, saved)
    else:
        model.save_pretrained(saved)
    print(f"\n{res['name']}: trainable {res['trainable']:,} ({res['pct']:.3f}% of all), weights "
          f"{res['weights'] / 2**20:.1f} MiB, activations saved per step {res['activations'] / 2**20:.1f} MiB, "
          f"optimizer state {res['optimizer_bytes'] / 2**20:.1f} MiB, "
          f"{res['s_per_step']:.2f} s/step (median), {res['tok_s']:.0f} tokens/s")
    print(f"test accuracy {acc_before:.3f} -> {res['acc_after']:.3f} ({len(ctx.test_data)} examples); "
          f"adapter saved to {saved}")


COLUMNS = ["method", "impl", "trainable", "pct", "weights_MiB", "activations_MiB", "optimizer_MiB", "s_per_step",
           "tokens_per_s", "loss_first", "loss_last", "test_acc"]
LOSS_WINDOW = 5  # steps averaged at each end of the run: one batch's loss is noisy


def cmd_compare(args) -> None:
    # --quick without --methods runs the quick runs; methods named explicitly run with all their peers.
    wanted = args.methods.split(",") if args.methods else METHODS
    unknown = sorted(set(wanted) - set(METHODS))
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; available: {METHODS}")
    runs = [r for r in RUNS if r.method in wanted and (r.quick or args.methods or not args.quick)]
    ctx = load_context(args)
    start = time.perf_counter()
    print(f"compare: {len(ctx.train_data)} train / {len(ctx.test_data)} test examples, {args.steps} steps of "
          f"{args.batch}, AdamW lr {args.lr} (per-method rates in peft_kernels/cli.py), LoRA-family r=8 alpha=16 on "
          f"{ex.TARGETS}, dropout {LORA_DROPOUT} for LoRA and QLoRA, 0 for the others; a method's runs (ours, "
          "peers) train side by side, one step of each in turn; s/step is the median over steps 2..N", flush=True)
    zero_shot = ex.accuracy(ctx.base, ctx.test_data, ctx.head, ctx.pad_id)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in dict.fromkeys(r.method for r in runs):  # RUNS order: ours first, then its peers
        for res in run_side_by_side([r for r in runs if r.method == method], ctx):
            rows.append(dict(method=res["method"], impl=res["impl"], trainable=res["trainable"], pct=res["pct"],
                             weights_MiB=res["weights"] / 2**20, activations_MiB=res["activations"] / 2**20,
                             optimizer_MiB=res["optimizer_bytes"] / 2**20, s_per_step=res["s_per_step"],
                             tokens_per_s=res["tok_s"],
                             loss_first=sum(res["losses"][:LOSS_WINDOW]) / len(res["losses"][:LOSS_WINDOW]),
                             loss_last=sum(res["losses"][-LOSS_WINDOW:]) / len(res["losses"][-LOSS_WINDOW:]),
                             test_acc=res["acc_after"], losses=res["losses"]))
            # Each run's figures as soon as they are known: a long run stopped midway keeps what it measured.
            print(f"{res['method']} ({res['impl']}): trainable {res['trainable']:,}, loss {rows[-1]['loss_first']:.3f} "
                  f"-> {rows[-1]['loss_last']:.3f}, test accuracy {res['acc_after']:.3f}", flush=True)
        _write_csvs(rows, out, args.steps)  # after every method, for the same reason
    print(f"\nbase model zero-shot test accuracy: {zero_shot:.3f}; total {time.perf_counter() - start:.0f} s\n")
    print("| method | implementation | trainable params | % of total | weights MiB | activations MiB | optimizer MiB "
          f"| s/step | tokens/s | loss, first {LOSS_WINDOW} steps | last {LOSS_WINDOW} | test acc |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['method']} | {r['impl']} | {r['trainable']:,} | {r['pct']:.3f} | {r['weights_MiB']:.1f} "
              f"| {r['activations_MiB']:.1f} | {r['optimizer_MiB']:.1f} | {r['s_per_step']:.2f} "
              f"| {r['tokens_per_s']:.0f} | {r['loss_first']:.3f} | {r['loss_last']:.3f} | {r['test_acc']:.3f} |")
    print(f"\nwrote {out / 'compare.csv'} and {out / 'losses.csv'} (per-step losses)")
    _plot(rows, out)


def _write_csvs(rows: list[dict], out: Path, steps: int) -> None:
    """compare.csv (the table) and losses.csv (every run's loss at every step, one column per run)."""
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "losses.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *(f"{r['method']} ({r['impl']})" for r in rows)])
        writer.writerows([step + 1, *(f"{r['losses'][step]:.6f}" for r in rows)] for step in range(steps))


def _plot(rows: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4))
    for r in rows:
        left.scatter(r["trainable"], r["test_acc"], marker="o" if r["impl"] == "peft_kernels" else "x")
        left.annotate(f"{r['method']} ({r['impl']})", (r["trainable"], r["test_acc"]), fontsize=7)
    left.set_xscale("log")
    left.set_xlabel("trainable parameters")
    left.set_ylabel("test accuracy")
    left.set_title("accuracy vs trainable parameters", fontsize=9)
    for r in rows:  # moving mean over LOSS_WINDOW steps: one batch's loss is noisy
        losses = torch.tensor(r["losses"])
        window = min(LOSS_WINDOW, len(losses))
        smooth = losses.unfold(0, window, 1).mean(1)
        middle.plot(range(window, len(losses) + 1), smooth, linewidth=0.8, marker="." if len(smooth) == 1 else None,
                    linestyle="-" if r["impl"] == "peft_kernels" else "--", label=f"{r['method']} ({r['impl']})")
    middle.set_xlabel("step")
    middle.set_ylabel(f"loss, mean of {LOSS_WINDOW} steps")
    middle.set_title("loss curves (dashed: peers)", fontsize=9)
    middle.legend(fontsize=5, ncol=2)
    labels = [f"{r['method']}\n{r['impl']}" for r in rows]
    bottom = [0.0] * len(rows)
    for part in ("weights_MiB", "activations_MiB", "optimizer_MiB"):
        right.bar(range(len(rows)), [r[part] for r in rows], bottom=bottom, label=part.removesuffix("_MiB"))
        bottom = [b + r[part] for b, r in zip(bottom, rows)]
    right.set_xticks(range(len(rows)), labels, fontsize=6)
    right.set_ylabel("MiB")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    print(f"wrote {out / 'compare.png'}")


def cmd_bench(args) -> None:
    bench_dir = Path(args.bench_dir)
    ops = sorted(p.stem.removeprefix("bench_") for p in bench_dir.glob("bench_*.py"))
    if not ops:
        raise UserError(f"--bench-dir {bench_dir}: no bench_<op>.py scripts; the microbenchmarks live in the "
                        "source checkout's bench/ folder")
    wanted = ops if args.op == "all" else [args.op]
    unknown = sorted(set(wanted) - set(ops))
    if unknown:
        raise UserError(f"--op: unknown {unknown}; available: {ops} or all")
    extra = (["--quick"] if args.quick else []) + (["--dtype", args.dtype] if args.dtype else [])
    extra += ["--out", str(Path(args.out).resolve())]
    for op in wanted:
        print(f"\n## bench_{op}.py\n", flush=True)
        done = subprocess.run([sys.executable, "-P", str(bench_dir / f"bench_{op}.py"), *extra])
        if done.returncode != 0:
            raise UserError(f"bench_{op}.py exited with status {done.returncode}")


# ---- every method's trainable parameters (the survey's parameter table) ------------------------------------
def _method_configs() -> dict[str, tuple[Callable, Callable | None]]:
    """Method name -> (our config at the survey's usual settings, with each architecture's default targets;
    HF PEFT's config for the same settings given the task type, or None where PEFT lacks the method)."""
    import peft

    import peft_kernels as pk

    llama_ia3 = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    bert_ia3 = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])
    return {
        "lora (r=8)": (lambda: pk.LoRAConfig(r=8, alpha=16),
                       lambda task, targets: peft.LoraConfig(task_type=task, r=8, lora_alpha=16, target_modules=targets)),
        "qlora (r=8, NF4 targets)": (lambda: pk.QLoRAConfig(r=8, alpha=16, compute_dtype=torch.float32), None),
        "lora-fa (r=8)": (lambda: pk.LoRAFAConfig(r=8, alpha=16), None),
        "dylora (r=8)": (lambda: pk.DyLoRAConfig(r=8, alpha=16), None),
        "delta-lora (r=8)": (lambda: pk.DeltaLoRAConfig(r=8, alpha=16), None),
        "adalora (init_r=12, target_r=8)": (
            lambda: pk.AdaLoRAConfig(init_r=12, target_r=8, total_step=1000),
            lambda task, targets: peft.AdaLoraConfig(task_type=task, init_r=12, target_r=8, total_step=1000,
                                                     target_modules=targets)),
        "krona (balanced factors)": (lambda: pk.KronAConfig(), None),
        "propetl (LoRA r=8 prototype)": (lambda: pk.ProPETLConfig(r=8, alpha=16), None),
        "adamix (4 LoRA experts, r=8)": (lambda: pk.AdaMixConfig(num_experts=4, r=8, alpha=16), None),
        "ia3": (lambda: pk.IA3Config(),
                lambda task, targets: peft.IA3Config(task_type=task, **(bert_ia3 if task == "SEQ_CLS" else llama_ia3))),
        "adapter (houlsby, m=64)": (lambda: pk.AdapterConfig(bottleneck=64, placement="houlsby"), None),
        "adapter (pfeiffer, m=64)": (lambda: pk.AdapterConfig(bottleneck=64, placement="pfeiffer"), None),
        "scaled parallel adapter (m=64, s=4)": (
            lambda: pk.AdapterConfig(bottleneck=64, placement="parallel", scaling=4.0), None),
        "compacter (n=4, rank 1, m=64)": (lambda: pk.CompacterConfig(n=4, rank=1, bottleneck=64), None),
        "compacter++ (n=4, rank 1, m=64)": (
            lambda: pk.CompacterConfig(n=4, rank=1, bottleneck=64, placement="pfeiffer"), None),
        "hadamard adapter": (lambda: pk.HadamardAdapterConfig(), None),
        "prompt tuning (l=20)": (lambda: pk.PromptTuningConfig(num_virtual_tokens=20),
                                 lambda task, targets: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=20)),
        "p-tuning (l=20, MLP)": (lambda: pk.PTuningConfig(num_virtual_tokens=20),
                                 lambda task, targets: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=20)),
        "prefix tuning (l=20)": (lambda: pk.PrefixTuningConfig(num_virtual_tokens=20),
                                 lambda task, targets: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=20)),
        "mam adapter (l=30, m=512, s=4)": (lambda: pk.MAMConfig(), None),
        "unipelt (r=8, l=10, m=64)": (lambda: pk.UniPELTConfig(), None),
        "sparse adapter (houlsby, m=64, 50% pruned by magnitude)": (
            lambda: pk.SparseAdapterConfig(bottleneck=64, sparsity=0.5), None),
        "s4 (4 spindle groups: adapter+LoRA, +BitFit)": (lambda: pk.S4Config(), None),
        "bitfit": (lambda: pk.BitFitConfig(), None),
        "sparse (random, density 0.5%)": (lambda: pk.SparseFTConfig(method="random", density=0.005), None),
        "diff pruning (trained dense; 0.5% kept)": (
            lambda: pk.SparseFTConfig(method="diff_pruning", density=0.005), None),
    }


def _trainable(model) -> int:
    """Trainable values: the selected entries of a sparse selection, the unpruned weights of a SparseAdapter
    (its masked entries stay zero), else every element of the trainable parameters."""
    from .composite import MaskedLinear, kept_weights

    selection = getattr(model, "peft_kernels_sparse", None)
    if selection is not None and selection.indices:
        return sum(i.numel() for i in selection.indices.values())
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    masked = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    if masked:
        kept, total = kept_weights(model)
        count -= total - kept
    return count


def cmd_methods(args) -> None:
    import peft
    from transformers import BertConfig, BertForSequenceClassification

    if args.model is None:
        causal_dir = ex.cached_model_dir()
    elif Path(args.model).is_dir():
        causal_dir = Path(args.model)
    else:
        raise UserError(f"--model {args.model}: not a local Hugging Face model folder")
    models = {"causal LM": ex.AutoModelForCausalLM.from_pretrained(causal_dir, dtype=torch.float32)}
    torch.manual_seed(ex.SEED)
    # BERT-base's shape (12 layers, hidden 768) with random weights: parameter counts need no download.
    models["BERT-base classifier"] = BertForSequenceClassification(
        BertConfig(num_labels=2, num_hidden_layers=args.encoder_layers))
    configs = _method_configs()
    tasks = {"causal LM": ("CAUSAL_LM", ["q_proj", "v_proj"]), "BERT-base classifier": ("SEQ_CLS", ["query", "value"])}
    rows = []
    bar = ex.tqdm(list(configs.items()), desc="methods", ncols=100) if ex.tqdm else configs.items()
    for name, (make, make_peft) in bar:
        row = {"method": name}
        for kind, base in models.items():
            total = sum(p.numel() for p in base.parameters())
            trainable = _trainable(make().apply_to(copy.deepcopy(base)))
            peer = None
            if make_peft is not None:
                peer = peft.get_peft_model(copy.deepcopy(base), make_peft(*tasks[kind])).get_nb_trainable_parameters()[0]
            row[kind] = (trainable, 100 * trainable / total, peer)
            gc.collect()
        rows.append(row)
    kinds = list(models)
    print(f"\n| method | {' | '.join(f'{k} trainable | % | HF PEFT' for k in kinds)} |")
    print("|---|" + "--:|--:|--:|" * len(kinds))
    for r in rows:
        cells = [f"{r[k][0]:,} | {r[k][1]:.3f} | {'—' if r[k][2] is None else f'{r[k][2]:,}'}" for k in kinds]
        print(f"| {r['method']} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "methods.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method"] + [f"{k} {c}" for k in kinds for c in ("trainable", "pct", "peft")])
        writer.writerows([[r["method"]] + [v for k in kinds for v in r[k]] for r in rows])
    print(f"\ncausal LM: {causal_dir}; totals {', '.join(f'{k} {sum(p.numel() for p in m.parameters()):,}' for k, m in models.items())}"
          f"\nwrote {out / 'methods.csv'}")


def _count(text: str) -> int:
    """argparse type of the counts (steps, batch, sizes): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _rate(text: str) -> float:
    """argparse type of --lr: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _add_experiment_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--model", help="local HF model folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="JSON-lines file of {\"text\": ..., \"label\": 0|1} (default: review snippets)")
    p.add_argument("--steps", type=_count, default=defaults["steps"])
    p.add_argument("--batch", type=_count, default=defaults["batch"])
    p.add_argument("--lr", type=_rate, default=5e-4)
    p.add_argument("--train-size", type=_count, default=defaults["train_size"])
    p.add_argument("--test-size", type=_count, default=defaults["test_size"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build facts and an NF4 round trip checked against bitsandbytes")
    p = sub.add_parser("finetune", help="fine-tune one method, evaluate, save the adapter")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--impl", default="peft_kernels", help="peft_kernels (default) or a peer that has the method")
    p.add_argument("--out", default="peft_kernels_out")
    _add_experiment_args(p, FULL)
    p = sub.add_parser("compare", help="every method side by side: params, memory, speed, accuracy")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps, {QUICK['test_size']} test examples")
    p.add_argument("--methods", help=f"comma list from {METHODS} (default: all)")
    p.add_argument("--out", default="peft_kernels_out")
    _add_experiment_args(p, FULL)
    p = sub.add_parser("methods", help="every method's trainable parameters on a causal LM and a BERT-base encoder")
    p.add_argument("--model", help="local HF causal LM folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--encoder-layers", type=int, default=12, help="layers of the BERT-base-shaped encoder")
    p.add_argument("--out", default="peft_kernels_out")
    p = sub.add_parser("bench", help="microbenchmarks (bench/bench_<op>.py of a source checkout)")
    p.add_argument("--op", default="all")
    p.add_argument("--dtype")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--bench-dir", default="bench")
    p.add_argument("--out", default="peft_kernels_out/bench")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare" and args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == FULL[key]:
                setattr(args, key, value)
    try:
        {"info": cmd_info, "finetune": cmd_finetune, "compare": cmd_compare, "bench": cmd_bench,
         "methods": cmd_methods}[args.command](args)
    except UserError as exc:
        print(f"peft-kernels: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
