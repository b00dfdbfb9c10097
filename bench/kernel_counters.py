"""Counters of every CUDA kernel at LLaMA-7B layer shapes, from the CPU executor (no GPU): one markdown table
per op, each row a kernel launch, the predicted H100 time labelled as predicted.

    python -P bench/kernel_counters.py                 # all ops at the default shapes (~2-3 min on 2 cores)
    python -P bench/kernel_counters.py nf4_gemv lora_backward
    python -P bench/kernel_counters.py --json out.json

Columns: sector efficiency (minimum 32-byte sectors / sectors the warps touched, loads and stores), DRAM bytes
(distinct sectors × 32) against the op's minimum bytes, extra shared-memory wavefronts (bank conflicts, plain
accesses and ldmatrix) relative to the conflict-free count, mma instructions, and the predicted H100 SXM time:
max(DRAM bytes / 3.35 TB/s, tensor FLOPs / 989 TFLOPS, CUDA-core FLOPs / 67 TFLOPS) + 3 µs. Grids over 512
blocks are sampled (every edge block, 8 interior ones; "sampled" column). Registers and static shared bytes per
block come from ptxas for sm_90 (python_tests/ptxas_report.py; "–" without nvcc), not from the executor.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import sys

from peft_kernels import sim

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python_tests"))
from ptxas_report import report  # noqa: E402  (the ptxas parser the spill test uses)

B16 = 2  # bytes per bf16 element

# op -> list of (label, shape args, minimum bytes the op must move: inputs read once, outputs written once)
def _cases() -> dict[str, list[tuple[str, tuple, float]]]:
    cases: dict[str, list] = {"nf4_gemv": [], "nf4_decode": [], "lora_down": [], "lora_backward": [],
                              "kron_forward": [], "kron_backward": [], "masked_adamw": []}
    for n_in, n_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
        w = n_in * n_out
        packed = w / 2 + w / 64 + 4 * w / 64 / 256  # codes, 8-bit absmax, nested fp32 absmax
        for m in (1, 4, 8):
            cases["nf4_gemv"].append((f"{n_in}->{n_out} M={m}", (m, n_in, n_out), packed + B16 * m * (n_in + n_out)))
    cases["nf4_decode"].append(("4096x4096", (4096, 4096), 4096 * 4096 * (0.5 + 1 / 64 + B16)))
    m, n, r = 2048, 4096, 16
    cases["lora_down"].append((f"M={m} in={n} r={r}", (m, n, r), B16 * (m * n + r * n + m * r)))
    cases["lora_backward"].append((f"M={m} in={n} r={r}", (m, n, r), B16 * (m * n * 3 + 2 * r * n + m * r)))
    kron = (m, 64, 64, 64, 64)  # A 64x64 kron B 64x64 = 4096x4096
    cases["kron_forward"].append(("M=2048 64x64 (x) 64x64", kron, B16 * (m * 4096 * 3 + 2 * 64 * 64)))
    cases["kron_backward"].append(("M=2048 64x64 (x) 64x64", kron, B16 * (m * 4096 * 4 + 4 * 64 * 64)))
    numel, k = 4096 * 4096, 4096 * 4096 // 100
    # indices, the gradient, param read and written, m and v read and written
    cases["masked_adamw"].append(("4096x4096, 1% selected", (numel, k), 8 * k + 4 * k + 4 * k * 2 + 4 * k * 2 * 2))
    return cases


def resources(arch: str) -> dict[str, tuple[int, int]]:
    """(registers, static shared bytes) per kernel instantiation, from ptxas for `arch`; empty without nvcc."""
    if shutil.which("nvcc") is None:
        return {}
    return {re.sub(r"^void (cuda::)?", "", u.kernel.split("(")[0]): (u.registers, u.smem) for u in report([arch])}


def lookup(res: dict, kernel: str, dtype: str) -> tuple[int, int] | None:
    """The ptxas entry of an executor launch name such as "(gemv_kernel<T, true>)" at `dtype`."""
    t = {"bf16": "__nv_bfloat16", "f16": "__half", "f32": "float"}[dtype]
    name = kernel.strip("()").replace("int64_t", "long").replace("int32_t", "int")
    name = re.sub(r"\bT\b", "float" if name.startswith(("adamw", "sgd")) else t, name)
    return res.get(name)


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(op: str, rows: list[tuple[str, dict]]) -> str:
    out = [f"### {op}", "",
           "| shape | kernel | sampled | sector eff. | DRAM MB | DRAM / min | extra smem wavefronts | mma | "
           "regs / smem B (sm_90) | predicted H100 µs |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for label, d in rows:
        out.append(f"| {label} | `{d['kernel']}` | {'yes' if d['sampled'] else 'no'} | {fmt(d['sector_efficiency'], '.3f')} "
                   f"| {d['dram_bytes'] / 1e6:.1f} | {fmt(d['dram_vs_min'], '.2f')} | {fmt(d['bank_conflict_extra'], '.1%')} "
                   f"| {d['mma']:.0f} | {d.get('resources') or '–'} | {d['predicted_us']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    cases = _cases()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ops", nargs="*", default=[], metavar="OP", help=f"some of {sorted(cases)} (default: all)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--json", help="also write every launch's counters to this file")
    args = p.parse_args(argv)
    unknown = sorted(set(args.ops) - set(cases))
    if unknown:
        p.error(f"OP: expected some of {sorted(cases)}, got {unknown}")
    everything = []
    res = resources("9.0")
    print("Counters from the CPU executor (csrc/sim); times are PREDICTED by a roofline, never measured.\n")
    for op in args.ops or cases:
        rows = []
        for label, shape, min_bytes in cases[op]:
            print(f"{op} {label} ...", file=sys.stderr, flush=True)
            launches = sim.profile(op, *shape, dtype=args.dtype)
            # DRAM against the op's minimum: on its one launch, or on the row that sums its launches
            for d in launches:
                regs_smem = lookup(res, d["kernel"], "f32" if op == "masked_adamw" else args.dtype)
                d["resources"] = f"{regs_smem[0]} / {regs_smem[1]}" if regs_smem else None
                d["dram_vs_min"] = d["dram_bytes"] / min_bytes if len(launches) == 1 else None
                rows.append((label, d))
                everything.append({"op": op, "shape": label, **d})
            if len(launches) > 1:
                total = sum(d["dram_bytes"] for d in launches)
                rows.append((label + " (all launches)", {
                    "kernel": "sum", "sampled": any(d["sampled"] for d in launches), "sector_efficiency": None,
                    "dram_bytes": total, "dram_vs_min": total / min_bytes, "bank_conflict_extra": None,
                    "mma": sum(d["mma"] for d in launches), "resources": None,
                    "predicted_us": sum(d["predicted_us"] for d in launches)}))
        print(table(op, rows) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
