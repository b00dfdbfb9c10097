"""Shared benchmark harness: every ``bench/bench_<op>.py`` describes its cases and providers, this times them.

A bench file supplies
  * ``cases_fn(args) -> list[Case]``: the problem sizes (``args`` is the parsed command line: ``quick``,
    ``device``, ``dtypes``, ...);
  * ``providers_fn(case, mode) -> {provider: callable | None}``: creates the inputs once (outside timing) and
    returns zero-argument callables; ``None`` marks a provider that does not apply to that mode.

Each (case, mode, provider) is run ``--warmup`` times, then timed ``--repeats`` times, the providers of a
(case, mode) taking turns. The table reports the median and the interquartile range (IQR = q3 - q1) in ms, and
the median divided by the baseline provider's median for the same case and mode, measured side by side in this
process: the ratios are the claim, since absolute times depend on the machine and its load.

Bench files run as scripts and put bench/ on ``sys.path`` themselves (see bench_nf4.py), so that
``python -P bench/bench_<op>.py`` works and the source tree never shadows the installed package.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUARTILES = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem: ``name`` is shown in the table (e.g. "4096x4096 bf16"); ``params`` is whatever the
    bench's setup needs (shape, dtype, device, ...)."""

    name: str
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Row:
    """One timed (case, mode, provider); times in ms, ``mem_bytes`` as described by the memory column."""

    case: str
    mode: str
    provider: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    ratio: float | None  # median / the baseline's median; None when the baseline did not run
    mem_bytes: int


def tensor_bytes(obj, _seen: set | None = None) -> int:
    """Bytes of the tensors in ``obj``: a tensor, or tensors nested in tuples/lists/dicts, dataclasses and
    plain objects (e.g. bitsandbytes' QuantState); the same tensor data or object reached twice counts once."""
    seen = set() if _seen is None else _seen
    is_tensor = isinstance(obj, torch.Tensor)
    key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel()) if is_tensor else id(obj)
    if key in seen:  # also ends reference cycles between objects
        return 0
    seen.add(key)
    if is_tensor:
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(x, seen) for x in vars(obj).values())
    return 0


def time_interleaved(fns: dict[str, Callable[[], object]], cuda: bool, warmup: int, repeats: int) -> dict[str, list]:
    """``repeats`` wall times in ms per provider, after ``warmup`` untimed calls each. The providers take turns,
    one call each per round, so that slow drift in the machine's state (other tenants, clocks) spreads over all
    of them instead of landing on one; it cannot make numbers from a busy machine trustworthy."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()  # do not charge this call for earlier queued work
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()  # kernels are asynchronous: wait for the work to finish
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def on_blas_path(run: Callable[[], object]) -> Callable[[], object]:
    """``run`` with our CPU kernels capped below AVX-512 (PEFT_KERNELS_CPU_ISA=avx2, read on every call): their
    BLAS path, what CPUs without AVX-512 run, timed beside the AVX-512 register tiles as provider ``ours-blas``."""
    def capped():
        before = os.environ.get("PEFT_KERNELS_CPU_ISA")
        os.environ["PEFT_KERNELS_CPU_ISA"] = "avx2"
        try:
            return run()
        finally:
            if before is None:
                del os.environ["PEFT_KERNELS_CPU_ISA"]
            else:
                os.environ["PEFT_KERNELS_CPU_ISA"] = before
    return capped


def memory_bytes(fn: Callable[[], object], cuda: bool) -> int:
    """Memory of one extra, untimed call (the bookkeeping never lands inside a timed region): on CUDA the
    peak allocation above what was allocated before the call (workspace + outputs), on CPU the bytes of the
    returned tensors."""
    if not cuda:
        return tensor_bytes(fn())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def hold_freed_memory() -> None:
    """Keep freed memory in the process: glibc hands blocks of 4 MiB and more back to the kernel on free (its mmap
    and trim thresholds), so a step's activations (4 MiB at the layer benchmarks' 2048 x 1024 bf16) are faulted in
    again on the next step. On an AMX Xeon VM that was ~1,000 page faults and ~1 ms a step, hitting whichever
    provider ran after a free: one bench_qlora.py bf16 ratio ranged 1.22-2.33 over four runs. Raising both thresholds
    (mallopt, as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ would) takes the allocator out of the ratios;
    ``--glibc-malloc`` keeps glibc's defaults."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):  # not glibc (musl has no mallopt)
        raise RuntimeError("hold_freed_memory: this C library has no mallopt; run with --glibc-malloc")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31)):
        raise RuntimeError("hold_freed_memory: mallopt refused the thresholds; run with --glibc-malloc")


def parse_args(description: str, default_dtypes: str) -> argparse.Namespace:
    """The common command line; adds ``args.dtypes`` (torch dtypes parsed from ``--dtype``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of the CSV")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the inputs live")
    parser.add_argument("--dtype", default=default_dtypes, help=f"comma list from {','.join(DTYPES)}")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument("--glibc-malloc", action="store_true",
                        help="keep glibc's mmap/trim thresholds (default: raised, see hold_freed_memory)")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    unknown = [d for d in args.dtype.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"--dtype: unknown {unknown}, choose from {list(DTYPES)}")
    args.dtypes = [DTYPES[d] for d in args.dtype.split(",")]
    return args


def main(
    name: str,
    cases_fn: Callable[[argparse.Namespace], list[Case]],
    providers_fn: Callable[[Case, str], dict[str, Callable[[], object] | None]],
    *,
    modes: tuple[str, ...] = ("forward", "backward", "full"),
    baseline: str = "ref",
    default_dtypes: str = "bf16,fp32",
) -> tuple[argparse.Namespace, list[Row]]:
    """Parse the command line, time every (case, mode, provider), print a markdown table (rows appear as
    each case/mode finishes) and write ``<out>/<name>.csv``. Returns the parsed arguments and the rows, for
    bench-specific extras."""
    args = parse_args(f"Benchmark {name}: times per provider and ratios to {baseline!r}.", default_dtypes)
    if not args.glibc_malloc:
        hold_freed_memory()
    cuda = args.device == "cuda"
    torch.manual_seed(0)  # identical inputs from run to run
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    date = datetime.datetime.now().isoformat(timespec="seconds")
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]  # other tenants' load skews every timing: record it next to them
    print(f"# {name}: torch {torch.__version__} | {device_name} | torch threads {threads} | load {load:.2f} | {date}")
    print(f"warmup {args.warmup}, repeats {args.repeats}; IQR = q3 - q1; x {baseline} = median / {baseline} median; "
          f"malloc: {'glibc defaults' if args.glibc_malloc else 'freed memory held (hold_freed_memory)'}")
    mem_label = "CUDA peak MiB (above inputs)" if cuda else "out MiB (returned tensors)"
    print(f"\n| case | mode | provider | median ms | IQR ms | x {baseline} | {mem_label} |")
    print("|---|---|---|--:|--:|--:|--:|")

    rows = []
    for case in cases_fn(args):
        for mode in modes:
            providers = {p: fn for p, fn in providers_fn(case, mode).items() if fn is not None}
            times = time_interleaved(providers, cuda, args.warmup, args.repeats)
            quartiles = {p: torch.tensor(t, dtype=torch.float64).quantile(QUARTILES).tolist() for p, t in times.items()}
            base_ms = quartiles[baseline][1] if baseline in quartiles else None
            for provider in sorted(providers, key=lambda p: p != baseline):  # the baseline's row first
                q1, med, q3 = quartiles[provider]
                ratio = None if base_ms is None else med / base_ms
                mem = memory_bytes(providers[provider], cuda)
                t = times[provider]
                rows.append(Row(case.name, mode, provider, med, q1, q3, min(t), max(t), ratio, mem))
                shown = "" if ratio is None else f"{ratio:.2f}"
                cells = [case.name, mode, provider, f"{med:.3f}", f"{q3 - q1:.3f}", shown, f"{mem / 2**20:.2f}"]
                print(f"| {' | '.join(cells)} |", flush=True)
            del providers  # free this mode's inputs before the next setup allocates its own

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.csv"
    meta = dict(baseline=baseline, mem_kind="cuda_peak_above_inputs" if cuda else "out_bytes", device=device_name,
                threads=threads, load_1m=load, torch=torch.__version__, date=date, warmup=args.warmup,
                repeats=args.repeats)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*Row.__dataclass_fields__, *meta])
        writer.writeheader()
        writer.writerows({**dataclasses.asdict(r), **meta} for r in rows)
    print(f"\nwrote {path}")
    plot(rows, baseline, args.out / f"{name}.png", f"{name}: {device_name}, load {load:.2f}")
    return args, rows


def plot(rows: list[Row], baseline: str, path: Path, title: str) -> None:
    """A bar chart of the ratio column: one panel per mode, cases along x, one bar per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    modes = list(dict.fromkeys(r.mode for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6, 1.2 * len({r.case for r in rows})), 3 * len(modes)),
                             squeeze=False)
    width = 0.8 / len(providers)
    for ax, mode in zip(axes[:, 0], modes):
        cases = list(dict.fromkeys(r.case for r in rows if r.mode == mode))
        for i, provider in enumerate(providers):
            ratio = {r.case: r.ratio for r in rows if r.mode == mode and r.provider == provider and r.ratio is not None}
            xs = [j + i * width for j, c in enumerate(cases) if c in ratio]
            ax.bar(xs, [ratio[c] for c in cases if c in ratio], width, label=provider)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=7, rotation=15)
        ax.set_ylabel(f"time / {baseline}")
        ax.set_title(f"{mode}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
