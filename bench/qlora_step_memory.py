"""Memory of a QLoRA training step of a LLaMA-architecture model by component: ours (``peft_kernels.QLoRAConfig``)
vs bitsandbytes NF4 + HF PEFT LoRA, on the same model, tokens and adapter settings.

    python -P bench/qlora_step_memory.py [--layers 2 | --extrapolate] [--batch 1] [--seq 512] [--rank 16]
        [--alpha 32] [--checkpointing [--micro-batch-tokens N]] [--fused-loss] [--optim adamw|adamw8bit]
        [--compare-baseline | --only-ours] [--steps 2] [--dtype bf16|fp32] [--small] [--device cpu|cuda]

The full LLaMA-7B QLoRA recipe (issue 27) at 1 and 2 layers, extrapolated to 32:

    python -P bench/qlora_step_memory.py --extrapolate --batch 16 --seq 512 --rank 64 --alpha 16 \\
        --checkpointing --micro-batch-tokens 2048 --fused-loss --optim adamw8bit --compare-baseline

and measured at all 32 layers (ours alone, quantized in place: the 16-bit model is 13.5 GB):

    python -P bench/qlora_step_memory.py --layers 32 --only-ours --batch 16 --seq 512 --rank 64 --alpha 16 \\
        --checkpointing --micro-batch-tokens 2048 --fused-loss --optim adamw8bit

Model: transformers ``LlamaForCausalLM`` at LLaMA-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocabulary
32000, 32 layers; ``--small`` takes SmolLM2-135M's: 576 / 1536 / 9 heads / 49152 / 30 layers), ``--layers``
decoder layers, random init (seed 0), no download. Both runs quantize every decoder Linear to NF4 (blocksize 64,
double quantization; embeddings, norms and the output head stay in ``--dtype``) and put LoRA r = ``--rank``,
alpha = ``--alpha`` (default 32, the QLoRA paper's 2 r at r = 16; the issue's recipe is r = 64, alpha 16) on all
seven projections with fp32 adapters, each library's default for QLoRA: ours casts them to ``--dtype`` inside the
op, PEFT casts each adapter's input to fp32. Dropout 0.1, the QLoRA paper's for 7B and 13B, kept for the full
recipe: it costs ours nothing kept (the mask is redrawn in backward), PEFT one dropped fp32 copy of each
projection's input, inside one layer's recompute under ``--checkpointing``; the comparison counts that as PEFT's.
``--checkpointing``: ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`` on
both; with ``--micro-batch-tokens N`` ours uses ``peft_kernels.checkpoint_in_micro_batches`` instead (micro-batches of
N tokens of whole sequences), the others keep HF's. ``--fused-loss``: ``peft_kernels.fuse_causal_lm_loss`` on both (on PEFT's wrapped LlamaForCausalLM,
``get_base_model()``; PEFT's forward reaches the patched instance). ``--optim``: torch AdamW on both, or
``peft_kernels.optim.AdamW8bit`` on ours and ``bitsandbytes.optim.AdamW8bit`` (its CPU implementation runs
here) on bitsandbytes + PEFT; lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 in all.
``--compare-baseline`` adds ours with HF's loss and torch AdamW (everything else the same) and prints the step
time ratio. ``--tokens`` is an alias of ``--seq``.

Step: causal-LM loss on ``--batch`` x ``--seq`` random token ids (``use_cache=False``), backward, optimizer step,
``zero_grad(set_to_none=True)``. Step 1 creates the optimizer state; step 2 is the measured one. The runs take
turns step by step (all of step 1, then all of step 2, ...), so slow drift in the machine's load spreads over
all of them; each step's line shows the 1-minute load average, since other processes on the machine slow it. The
step time is the median of steps 3..``--steps``: on CPU step 2 runs under the profiler, which records every op and
allocation; with ``--steps 2`` it is step 2's time. glibc's malloc keeps its defaults: the pages of a freed
activation are faulted in again by the next one, as in a training process.

Printed per run, in MiB:
  at rest (counted from the live tensors' shapes and element sizes): NF4 codes; quantization scales (8-bit
  absmax, nested absmax, maps, offset; bitsandbytes' QuantState packed as it saves it); embeddings, head, norms
  and buffers; adapters; optimizer state after step 1 (every tensor in its state, shared ones once).
  transient, step 2, above the state at rest: the checkpoints computed from shapes (layers x batch x seq x hidden
  x element size: the input of each decoder layer that non-reentrant checkpointing keeps), and measured by the
  allocator at marks in the step (a forward hook at the decoder's end, a gradient hook on its output, after
  forward and after backward): what the decoder's forward leaves (checkpoints, the final norm's saved tensors);
  the loss path (head, loss and their backward) above that; the decoder's backward above its start (one layer's
  recompute and backward under checkpointing); the adapter gradients (computed: the adapters' bytes) and what
  is alive at backward's end (measured: those gradients, and the embeddings' output with its ``.grad``, freed
  with the graph when the step drops ``loss``: HF's gradient_checkpointing_enable calls
  enable_input_require_grads, which makes that output a leaf that requires grad, so backward runs through layer
  0 to it and stores a batch x seq x hidden gradient there); the optimizer step's temporaries; the peak of each phase and of the step (their maximum), and at rest + peak.
``--extrapolate`` measures 1 and 2 layers and extrapolates each row linearly to the model's depth (32 / 30);
the step's peak there is the maximum of the phases' extrapolated peaks, since the phase holding the peak can
change with depth (the loss path's does not grow with layers, the decoder's backward grows by one checkpoint).

How memory is counted. CPU: every allocation and free of torch's CPU allocator during the step, from the
profiler's memory events (exact byte counts in time order), with the marks as profiler ranges on the same clock;
a peak is the maximum of their running sum. Outside that count: memory not taken through torch's allocator (our
kernels' per-thread block buffers, at most 8 x 64K fp32 values per thread, made once per thread and reused).
CUDA: torch.cuda.memory_allocated and max_memory_allocated at each mark, the peak reset after each.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# `python -P` leaves the script's directory off sys.path; add bench/ alone, as the other bench scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import peft_kernels  # noqa: E402
from peft_kernels import experiment as ex  # noqa: E402
from peft_kernels.nn import NF4Linear  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DROPOUT = 0.1
OPTIM_ARGS = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
SHAPES = {  # hidden, MLP, heads, vocabulary, layers
    "llama-7b": (4096, 11008, 32, 32000, 32),
    "smollm2-135m": (576, 1536, 9, 49152, 30),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MARK = "qlora_step_memory::"
# The step's phases, each ended by StepMeter.mark(phase) (the last by the step's end).
PHASES = ("decoder forward", "loss forward", "loss backward", "decoder backward", "optimizer step")
MIB = 2**20


def build_base(shape: str, layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, heads, vocab, _ = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=layers, vocab_size=vocab,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    # Built in the compute dtype: LLaMA-7B's 6.7 B parameters take 13.5 GB in bf16, 27 GB in fp32 (over this
    # machine's memory at 32 layers).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)


def ours(base, dtype, rank, alpha, in_place=False):
    """`base` quantized and adapted: a copy, or `base` itself with `in_place` (its Linear weights are freed one by one
    as they are quantized: the 32-layer run never holds two 16-bit copies)."""
    return peft_kernels.apply(base if in_place else copy.deepcopy(base), peft_kernels.QLoRAConfig(
        r=rank, alpha=alpha, dropout=DROPOUT, target_modules=TARGETS, quantize="all_linear", compute_dtype=dtype))


def bnb_peft(base, dtype, rank, alpha):
    import peft

    return peft.get_peft_model(ex.bnb_quantize(copy.deepcopy(base), compute_dtype=dtype), peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=DROPOUT, target_modules=TARGETS))


def causal_lm(model):
    """The LlamaForCausalLM itself: PEFT's wrapper holds it as get_base_model()."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def make_optimizer(kind: str, params, peer: bool):
    """(optimizer, its name) for --optim `kind`; `peer`: the bitsandbytes + PEFT run."""
    if kind == "adamw":
        return torch.optim.AdamW(params, **OPTIM_ARGS), "torch AdamW"
    if peer:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **OPTIM_ARGS), "bitsandbytes AdamW8bit"
    from peft_kernels.optim import AdamW8bit

    return AdamW8bit(params, **OPTIM_ARGS), "peft_kernels AdamW8bit"


def _profiled(fn):
    """(allocations, marks) of `fn()` under the profiler: [(time ns, bytes: + allocated, - freed)] and
    [(time ns, name)] of the record_function ranges named MARK + name, both in time order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations, marks = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            allocations.append((e.start_time_ns, e.typed[1].alloc_size))
        elif e.name.startswith(MARK):
            marks.append((e.start_time_ns, e.name[len(MARK):]))
        stack.extend(e.children)
    return sorted(allocations), sorted(marks)


def cpu_step_peak(step) -> int:
    """Peak of the running sum of torch CPU-allocator bytes allocated (+) and freed (-) during `step()`."""
    running = peak = 0
    for _, size in _profiled(step)[0]:
        running += size
        peak = max(peak, running)
    return peak


@dataclasses.dataclass
class Phase:
    """Allocator bytes above the step's start: live when the phase begins and ends, and the peak inside it."""

    name: str
    start: int
    peak: int
    end: int


class StepMeter:
    """Splits one step's allocator record into PHASES at ``mark(phase)`` calls (no-ops unless measuring)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.armed = False
        self._cuda_marks: list[tuple[str, int, int]] = []
        self._base = 0

    def mark(self, phase: str) -> None:
        if not self.armed:
            return
        if self.cuda:  # the caching allocator counts on the host at each call: no synchronization needed
            self._cuda_marks.append((phase, torch.cuda.memory_allocated() - self._base,
                                     torch.cuda.max_memory_allocated() - self._base))
            torch.cuda.reset_peak_memory_stats()
        else:
            with torch.profiler.record_function(MARK + phase):
                pass

    def measure(self, step) -> list[Phase]:
        self.armed = True
        try:
            if self.cuda:
                self._cuda_marks = []
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self._base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                self.mark(PHASES[-1])
                marks = self._cuda_marks
            else:
                marks = self._cpu_marks(step)
        finally:
            self.armed = False
        if [name for name, _, _ in marks] != list(PHASES):
            raise RuntimeError(f"qlora_step_memory: the step's marks came as {[m[0] for m in marks]}, "
                               f"expected {PHASES}")
        phases, start = [], 0
        for name, end, peak in marks:
            phases.append(Phase(name, start, peak, end))
            start = end
        return phases

    @staticmethod
    def _cpu_marks(step) -> list[tuple[str, int, int]]:
        """[(phase, live at its end, peak since the previous mark)] from the profiler's allocation record."""
        allocations, marks = _profiled(step)
        out, running, peak, i = [], 0, 0, 0
        for t, name in [*marks, (float("inf"), PHASES[-1])]:
            while i < len(allocations) and allocations[i][0] < t:
                running += allocations[i][1]
                peak = max(peak, running)
                i += 1
            out.append((name, running, peak))
            peak = running
        return out


def rest_bytes(model, opt) -> dict[str, int]:
    """The state at rest by component, from the tensors: parameters and buffers (ours' NF4Linear buffers among
    them), plus bitsandbytes' QuantState, held outside both, packed as bitsandbytes saves it. Each quantized weight
    counts once: PEFT's LoRA layer shows its base layer's Params4bit as its own ``weight`` too (ex.model_bytes
    counts that QuantState twice)."""
    from peft_kernels.qlora import weight_bytes

    codes = scales = 0
    quantized = {}
    for m in model.modules():
        if isinstance(m, NF4Linear):
            codes += m.codes.numel() * m.codes.element_size()
            scales += sum(t.numel() * t.element_size() for t in (m.absmax, m.nested_absmax, m.nested_code, m.offset)
                          if t is not None)
        weight = getattr(m, "weight", None)
        if getattr(weight, "quant_state", None) is not None:
            quantized[id(weight)] = weight
    quant_states = sum(t.numel() * t.element_size() for w in quantized.values()
                       for t in w.quant_state.as_dict(packed=True).values())
    codes += sum(w.numel() * w.element_size() for w in quantized.values())
    scales += quant_states
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = weight_bytes(model) + quant_states - codes - scales - adapters
    out = dict(codes=codes, scales=scales, frozen=frozen, adapters=adapters, state=harness.tensor_bytes(opt.state))
    out["rest"] = sum(out.values())
    return out


class Run:
    """One model, its optimizer and inputs; step(i) runs training step i (step 2 under the meter)."""

    def __init__(self, name, model, args, fused: bool, optim: str, peer: bool, micro_batch: bool):
        self.name, self.model, self.device = name, model, args.device
        self.model.to(args.device).train()
        lm = causal_lm(model)
        if args.checkpointing and micro_batch:
            peft_kernels.checkpoint_in_micro_batches(lm, micro_batch_tokens=args.micro_batch_tokens)
        elif args.checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if fused:
            peft_kernels.fuse_causal_lm_loss(lm)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt, opt_name = make_optimizer(optim, params, peer)
        self.label = f"{'fused' if fused else 'HF'} loss, {opt_name}"
        self.meter = StepMeter(args.device)

        def at_decoder_end(module, inputs, output):
            self.meter.mark("decoder forward")
            output[0].register_hook(lambda grad: self.meter.mark("loss backward"))

        lm.model.register_forward_hook(at_decoder_end)
        vocab = lm.config.vocab_size
        self.ids = torch.randint(0, vocab, (args.batch, args.seq),
                                 generator=torch.Generator().manual_seed(1)).to(args.device)
        self.trainable = sum(p.numel() for p in params)
        self.times: dict[int, float] = {}
        self.rest: dict[str, int] = {}
        self.phases: list[Phase] = []

    def _step(self):
        loss = self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss
        self.meter.mark("loss forward")
        loss.backward()
        self.meter.mark("decoder backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, i: int) -> None:
        if i == 2:
            gc.collect()
            self.rest = rest_bytes(self.model, self.opt)
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if i == 2:
            self.phases = self.meter.measure(self._step)
        else:
            self._step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.times[i] = seconds
        print(f"  [{self.name}] step {i}{' (creates the optimizer state)' if i == 1 else ''}: {seconds:.1f} s, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)

    def rows(self) -> dict[str, float]:
        """Every table row in bytes (the step time in seconds)."""
        p = {ph.name: ph for ph in self.phases}
        out = dict(self.rest)
        out["kept"] = p["decoder forward"].end
        out["loss"] = max(p["loss forward"].peak, p["loss backward"].peak) - p["decoder forward"].end
        out["recompute"] = p["decoder backward"].peak - p["decoder backward"].start
        out["adapter grads"] = self.rest["adapters"]
        out["grads"] = p["decoder backward"].end
        out["optim"] = p["optimizer step"].peak - p["optimizer step"].start
        for name in PHASES:
            out["peak " + name] = p[name].peak
        out["peak"] = max(ph.peak for ph in self.phases)
        out["total"] = out["rest"] + out["peak"]
        out["time"] = statistics.median([t for i, t in self.times.items() if i >= min(3, len(self.times))])
        return out


ROWS = [  # key, label, how it is counted
    ("codes", "NF4 codes", "tensors"),
    ("scales", "quantization scales (absmax, nested absmax, maps)", "tensors"),
    ("frozen", "embeddings, head, norms", "tensors"),
    ("adapters", "adapters (fp32)", "tensors"),
    ("state", "optimizer state (after step 1)", "tensors"),
    ("rest", "**at rest**", "tensors"),
    ("checkpoints", "checkpoints: layers x batch x seq x hidden x {bytes} B", "shapes"),
    ("kept", "left by the decoder's forward (checkpoints, final norm)", "allocator"),
    ("loss", "loss path (head, loss, backward) above that", "allocator"),
    ("recompute", "decoder backward above its start (a layer's recompute)", "allocator"),
    ("adapter grads", "adapter gradients (fp32, as the adapters)", "shapes"),
    ("grads", "alive at backward's end (gradients, embeddings' output and its grad)", "allocator"),
    ("optim", "optimizer step's temporaries", "allocator"),
    *[("peak " + name, f"peak in {name}", "allocator") for name in PHASES],
    ("peak", "**second-step peak above at rest**", "allocator"),
    ("total", "**at rest + peak**", "sum"),
    ("time", "step time, s (median of steps 3..N; N = 2: step 2)", "wall clock"),
]


def print_table(title: str, runs: dict[str, dict[str, float]], elem: int) -> None:
    print(f"\n{title}\n")
    print(f"| component, MiB | {' | '.join(runs)} | counted |")
    print(f"|---|{'--:|' * len(runs)}---|")
    for key, label, how in ROWS:
        if not all(key in r for r in runs.values()):
            continue
        cells = [f"{r[key]:.1f}" if key == "time" else f"{r[key] / MIB:.1f}" for r in runs.values()]
        print(f"| {label.format(bytes=elem)} | {' | '.join(cells)} | {how} |")


def plural(layers: int) -> str:
    return f"{layers} layer{'s' if layers > 1 else ''}"


def measure_layers(args, shape: str, layers: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Build the runs at `layers` decoder layers, take their steps in turn, print the table; returns the rows."""
    print(f"\n## {plural(layers)}: building the {args.dtype} model", flush=True)
    base = build_base(shape, layers, dtype)
    micro = args.micro_batch_tokens is not None
    plans = [("ours", functools.partial(ours, in_place=args.only_ours), args.fused_loss, args.optim, False, micro)]
    if args.compare_baseline:
        plans.append(("ours HF+AdamW", ours, False, "adamw", False, False))
    if not args.only_ours:
        plans.append(("bnb+peft", bnb_peft, args.fused_loss, args.optim, True, False))
    runs = []
    for name, build, fused, optim, peer, micro_batch in plans:
        print(f"  [{name}] quantizing to NF4, adding adapters", flush=True)
        runs.append(Run(name, build(base, dtype, args.rank, args.alpha), args, fused, optim, peer, micro_batch))
        print(f"  [{name}] {runs[-1].label}; {runs[-1].trainable:,} trainable parameters", flush=True)
    del base
    gc.collect()
    for i in range(1, args.steps + 1):
        for run in runs:
            run.step(i)
    elem = torch.tensor([], dtype=dtype).element_size()
    table = {}
    for run in runs:
        table[run.name] = run.rows()
        if args.checkpointing:
            table[run.name]["checkpoints"] = layers * args.batch * args.seq * SHAPES[shape][0] * elem
    peak_in = ", ".join(f"{r.name}: {max(r.phases, key=lambda p: p.peak).name}" for r in runs)
    print_table(f"{plural(layers)}; the peak is reached in {peak_in}", table, elem)
    a, b = table["ours"], table.get("bnb+peft")
    if b is not None:
        print(f"\nours / bnb+peft: step peak {a['peak'] / b['peak']:.3f}, total {a['total'] / b['total']:.3f} "
              f"({(b['total'] - a['total']) / MIB:+.1f} MiB in ours' favour)")
    if args.compare_baseline:
        ratio = a["time"] / table["ours HF+AdamW"]["time"]
        print(f"step time, ours ({runs[0].label}) / ours ({runs[1].label}): {ratio:.3f} "
              f"({plural(layers)}, steps {min(3, args.steps)}..{args.steps}, interleaved in this process)")
    for run in runs:
        del run.model, run.opt
    gc.collect()
    return table


def print_extrapolation(one: dict, two: dict, depth: int, elem: int) -> None:
    print(f"\nlinear extrapolation to {depth} layers: value(L) = value(1) + (L - 1) x (value(2) - value(1)); "
          f"the peak is the maximum of the phases' extrapolated peaks\n")
    print("| run | component, MiB | 1 layer | 2 layers | per layer | " f"{depth} layers |")
    print("|---|---|--:|--:|--:|--:|")
    for name in one:
        at = {}
        for key, label, _ in ROWS:
            if key not in one[name]:
                continue
            v1, v2 = one[name][key], two[name][key]
            if key == "peak":
                at[key] = max(at["peak " + phase] for phase in PHASES)
            elif key == "total":
                at[key] = at["rest"] + at["peak"]
            else:
                at[key] = v1 + (depth - 1) * (v2 - v1)
            scale = 1 if key == "time" else MIB
            print(f"| {name} | {label.format(bytes=elem)} | {v1 / scale:.1f} | {v2 / scale:.1f} | "
                  f"{(v2 - v1) / scale:.1f} | {at[key] / scale:.1f} |")
        print(f"| {name} | **at rest + peak, GB** | {one[name]['total'] / 1e9:.2f} | {two[name]['total'] / 1e9:.2f} | "
              f"{(two[name]['total'] - one[name]['total']) / 1e9:.2f} | {at['total'] / 1e9:.2f} |")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 2)")
    ap.add_argument("--extrapolate", action="store_true",
                    help="measure 1 and 2 layers and extrapolate linearly to the model's depth (not with --layers)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", "--tokens", dest="seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--checkpointing", action="store_true", help="non-reentrant gradient checkpointing")
    ap.add_argument("--only-ours", action="store_true",
                    help="measure ours alone, quantizing the model in place (no bitsandbytes + PEFT run, no copy of "
                         "the 16-bit model): what fits the full 32 layers in this machine's memory")
    ap.add_argument("--micro-batch-tokens", type=int, default=None,
                    help="with --checkpointing, ours uses peft_kernels.checkpoint_in_micro_batches with micro-batches "
                         "of this many tokens (the others keep HF's checkpointing)")
    ap.add_argument("--fused-loss", action="store_true", help="peft_kernels.fuse_causal_lm_loss on both models")
    ap.add_argument("--optim", choices=("adamw", "adamw8bit"), default="adamw")
    ap.add_argument("--compare-baseline", action="store_true",
                    help="also run ours with HF's loss and torch AdamW, and print the step time ratio")
    ap.add_argument("--steps", type=int, default=2,
                    help="steps per run; step 2 is measured, 3..N are timed (N = 2: step 2)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--small", action="store_true", help="SmolLM2-135M's shapes instead of LLaMA-7B's")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.extrapolate and args.layers is not None:
        ap.error("--extrapolate measures 1 and 2 layers itself: leave out --layers")
    layer_counts = [1, 2] if args.extrapolate else [2 if args.layers is None else args.layers]
    for flag in ("batch", "seq", "rank"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if min(layer_counts) < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if args.only_ours and args.compare_baseline:
        ap.error("--only-ours quantizes the model in place: it cannot also build the --compare-baseline run")
    if args.micro_batch_tokens is not None and (not args.checkpointing or args.micro_batch_tokens < 1):
        ap.error(f"--micro-batch-tokens needs --checkpointing and a value >= 1, got {args.micro_batch_tokens}")
    if args.steps < 2:
        ap.error(f"--steps must be >= 2 (step 2 is the measured one), got {args.steps}")
    if args.compare_baseline and not args.fused_loss and args.optim == "adamw":
        ap.error("--compare-baseline compares against HF's loss and torch AdamW: add --fused-loss or --optim adamw8bit")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.optim == "adamw8bit":
        try:
            from peft_kernels.optim import AdamW8bit  # noqa: F401
        except ImportError as e:
            ap.error(f"--optim adamw8bit: peft_kernels.optim.AdamW8bit is not importable from the installed package "
                     f"({e}); run --optim adamw, or reinstall a peft_kernels that has it")
    dtype, shape = DTYPES[args.dtype], "smollm2-135m" if args.small else "llama-7b"
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    checkpointing = ("off" if not args.checkpointing else "on" if args.micro_batch_tokens is None
                     else f"in micro-batches of {args.micro_batch_tokens} tokens (ours)")
    print(f"# QLoRA step memory: {shape} shapes, batch {args.batch} x seq {args.seq}, r {args.rank} alpha "
          f"{args.alpha:g} dropout {DROPOUT} on {len(TARGETS)} projections, {args.dtype}, checkpointing "
          f"{checkpointing}, loss {'fused' if args.fused_loss else 'HF'}, --optim "
          f"{args.optim}, {args.steps} steps | torch {torch.__version__} | {where} | load {os.getloadavg()[0]:.2f} | "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}", flush=True)
    tables = {layers: measure_layers(args, shape, layers, dtype) for layers in layer_counts}
    if args.extrapolate:
        print_extrapolation(tables[1], tables[2], SHAPES[shape][4], torch.tensor([], dtype=dtype).element_size())


if __name__ == "__main__":
    main()
