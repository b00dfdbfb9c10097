"""Counters of every CUDA kernel at LLaMA-7B layer shapes, from the CPU executor (no GPU): one markdown table
per op, each row a kernel launch, the predicted H100 time labelled as predicted.

    python -P bench/kernel_counters.py                 # all ops at the default shapes (~11 min on 2 cores)
    python -P bench/kernel_counters.py nf4_gemv lora_backward
    python -P bench/kernel_counters.py --json out.json

Columns: sector efficiency (minimum 32-byte sectors / sectors the warps touched, loads and stores), DRAM bytes
(distinct sectors × 32) against the op's minimum bytes, extra shared-memory wavefronts (bank conflicts, plain
accesses and ldmatrix) relative to the conflict-free count, tensor FLOPs per byte of global traffic the warps
requested (32-byte sectors, L2 re-reads included), mma instructions, and the predicted H100 SXM time:
max(DRAM bytes / 3.35 TB/s, tensor FLOPs / 989 TFLOPS, CUDA-core FLOPs / 67 TFLOPS) + 3 µs, beside the same
roofline for the product with a dense bf16 weight. 989 TFLOPS is the wgmma peak: mma.sync reaches about two
thirds of it on H100, so at compute-bound sizes expect ~1.5x the predicted time. Grids over 512 blocks, and
the tensor-core kernels' grids at every size, are sampled (the edge blocks and 8 interior ones; "sampled"). Registers and static shared bytes per
block come from ptxas for sm_90 (python_tests/ptxas_report.py; "–" without nvcc), not from the executor.
Where the driver names its buffers (masked_adamw, adamw8bit), a second table gives each buffer's own sector efficiency,
warp requests and DRAM bytes.
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
H100_DRAM, H100_TENSOR, LAUNCH_US = 3.35e12, 989e12, 3.0  # as peft_kernels.sim predicts


def dense_us(m: int, n_in: int, n_out: int) -> float:
    """Roofline time of the same product with a dense bf16 weight (cuBLAS's best case), predicted like ours."""
    return 1e6 * max(2 * m * n_in * n_out / H100_TENSOR, B16 * (m * n_in + n_in * n_out + m * n_out) / H100_DRAM) + LAUNCH_US


# op -> list of (label, shape args, minimum bytes the op must move: inputs read once, outputs written once,
# dense bf16 roofline µs of the same product or None[, the case's DTYPE instead of --dtype])
def _cases() -> dict[str, list[tuple[str, tuple, float, float | None]]]:
    cases: dict[str, list] = {"nf4_gemv": [], "nf4_gemm": [], "nf4_linear_dx": [], "nf4_decode": [], "lora_down": [],
                              "lora_backward": [], "kron_forward": [], "kron_backward": [], "masked_adamw": [],
                              "adamw8bit": []}
    for n_in, n_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
        w = n_in * n_out
        packed = w / 2 + w / 64 + 4 * w / 64 / 256  # codes, 8-bit absmax, nested fp32 absmax
        for m in (1, 4, 8):
            cases["nf4_gemv"].append((f"{n_in}->{n_out} M={m}", (m, n_in, n_out), packed + B16 * m * (n_in + n_out),
                                      dense_us(m, n_in, n_out)))
        for m in (512, 2048, 8192):
            for op in ("nf4_gemm", "nf4_linear_dx"):
                cases[op].append((f"{n_in}->{n_out} M={m}", (m, n_in, n_out), packed + B16 * m * (n_in + n_out),
                                  dense_us(m, n_in, n_out)))
    cases["nf4_decode"].append(("4096x4096", (4096, 4096), 4096 * 4096 * (0.5 + 1 / 64 + B16), None))
    # LoRA's dropout kernels see x [M, in] and A [r, in] only (dxa = dy B and dB are cuBLAS): in = 4096 serves the
    # 4096->4096 and 4096->11008 layers, in = 11008 the 11008->4096 one (one dA split: dA written directly).
    # Minimum: forward x, A, xa; backward x, dxa, A, dx read and written, dA.
    for n, r, m in [(4096, r, m) for r in (16, 64) for m in (2048, 8192)] + [(11008, 16, 2048)]:
        label = f"in={n} r={r} M={m}"
        cases["lora_down"].append((label, (m, n, r), B16 * (m * n + r * n + m * r), None))
        cases["lora_backward"].append((label, (m, n, r), B16 * (m * n * 3 + 2 * r * n + m * r), None))
    # KronA at PEFT LoKr's default factors of the LLaMA-7B layers (A [a_out, a_in] (x) B [b_out, b_in]), y and dx added
    # onto the base layer's output. Minimum: forward x, A, B, y read and written; backward dy, x, A, B, dx read and
    # written, dA, dB.
    for m, ao, ai, bo, bi in ((2048, 64, 64, 64, 64), (8192, 64, 64, 64, 64), (2048, 86, 64, 128, 64),
                              (2048, 64, 86, 64, 128)):
        n_in, n_out, factors = ai * bi, ao * bo, ao * ai + bo * bi
        label = f"{n_in}->{n_out} M={m} {ao}x{ai} (x) {bo}x{bi}"
        cases["kron_forward"].append((label, (m, ao, ai, bo, bi), B16 * (m * (n_in + 2 * n_out) + factors), None))
        cases["kron_backward"].append((label, (m, ao, ai, bo, bi), B16 * (m * (3 * n_in + n_out) + 2 * factors), None))
    numel, k = 4096 * 4096, 4096 * 4096 // 100
    # (label, index bits, compact grad, param dtype): the minimum bytes are the indices, the grad, param read
    # (fp32) or master read and written (16-bit) besides param written, m and v read and written. The gathered
    # param and dense grad cannot reach it: at 1% every entry has a 32-byte sector of its own (see the
    # per-buffer table).
    for label, bits, compact, dtype in (("fp32, int64 idx, dense grad", 64, 0, "f32"),
                                        ("fp32, int32 idx, dense grad", 32, 0, "f32"),
                                        ("bf16 + fp32 master, int32 idx, dense grad", 32, 0, "bf16"),
                                        ("bf16 + fp32 master, int32 idx, compact grad", 32, 1, "bf16")):
        size = 4 if dtype == "f32" else B16
        param = 2 * 4 * k if dtype == "f32" else size * k + 2 * 4 * k
        cases["masked_adamw"].append((f"4096x4096, 1% selected, {label}", (numel, k, bits, compact),
                                      bits // 8 * k + size * k + param + 4 * k * 2 * 2, None, dtype))
    # AdamW8bit at LLaMA-7B's LoRA r = 64 factors (A of q_proj [64, 4096], B of up_proj [11008, 64]) and a full
    # 4096 x 4096 weight. Minimum: param read and written, grad read, both codes read and written, the absmax.
    for label, n, dtype in (("4096x64, fp32 (LoRA A, r=64)", 4096 * 64, "f32"),
                            ("11008x64, fp32 (LoRA B, r=64)", 11008 * 64, "f32"),
                            ("4096x4096, fp32", 4096 * 4096, "f32"), ("4096x4096, bf16", 4096 * 4096, "bf16")):
        size = 4 if dtype == "f32" else B16
        cases["adamw8bit"].append((label, (n, ), 3 * size * n + 2 * 2 * n + 2 * 2 * 4 * -(-n // 256), None, dtype))
    return cases


# The tensor-core kernels' grids are sampled at every size (8 interior blocks, plus the first and the last):
# an exact 512-block run of the 4096x4096 GEMM takes ~2.5 min on 2 cores, its sampled run ~3 s. KronA's kernels run
# whole (~1 min per shape): their blocks stride over rows, and a sample's extrapolated DRAM bytes came out 3% under
# the minimum.
SAMPLE = {"nf4_gemm": 8, "nf4_linear_dx": 8, "lora_down": 8, "lora_backward": 8}


def resources(arch: str) -> dict[str, tuple[int, int]]:
    """(registers, static shared bytes) per kernel instantiation, from ptxas for `arch`; empty without nvcc."""
    if shutil.which("nvcc") is None:
        return {}
    return {re.sub(r"^void (cuda::)?", "", u.kernel.split("(")[0]): (u.registers, u.smem) for u in report([arch])}


def lookup(res: dict, kernel: str, dtype: str) -> tuple[int, int] | None:
    """The ptxas entry of an executor launch name such as "(gemv_kernel<T, true>)" at `dtype`."""
    t = {"bf16": "__nv_bfloat16", "f16": "__half", "f32": "float"}[dtype]
    name = kernel.strip("()").replace("int64_t", "long").replace("int32_t", "int")
    name = re.sub(r"\bT\b", t, name)
    return res.get(name)


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(op: str, rows: list[tuple[str, dict]]) -> str:
    out = [f"### {op}", "",
           "| shape | kernel | sampled | sector eff. | DRAM MB | DRAM / min | FLOP / global B | extra smem wavefronts "
           "| mma | regs / smem B (sm_90) | predicted H100 µs | dense bf16 roofline µs |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for label, d in rows:
        out.append(f"| {label} | `{d['kernel']}` | {'yes' if d['sampled'] else 'no'} | {fmt(d['sector_efficiency'], '.3f')} "
                   f"| {d['dram_bytes'] / 1e6:.1f} | {fmt(d['dram_vs_min'], '.2f')} | {fmt(d.get('flop_per_byte'), '.0f')} "
                   f"| {fmt(d['bank_conflict_extra'], '.1%')} | {d['mma']:.0f} | {d.get('resources') or '–'} "
                   f"| {d['predicted_us']:.1f} | {fmt(d.get('dense_us'), '.1f')} |")
    return "\n".join(out)


def buffer_table(op: str, rows: list[tuple[str, dict]]) -> str:
    """Per named buffer of each launch: its global accesses' sector efficiency, warp requests and DRAM bytes."""
    out = [f"#### {op}: per buffer", "",
           "| shape | buffer | load sector eff. | load requests | store sector eff. | store requests | DRAM MB |",
           "|---|---|--:|--:|--:|--:|--:|"]
    for label, d in rows:
        for b in d.get("buffers", []):
            if b["name"]:
                out.append(f"| {label} | {b['name']} | {fmt(b['load_sector_efficiency'], '.3f')} "
                           f"| {b['load_requests']:.0f} | {fmt(b['store_sector_efficiency'], '.3f')} "
                           f"| {b['store_requests']:.0f} | {b['dram_bytes'] / 1e6:.2f} |")
    return "\n".join(out) if len(out) > 4 else ""


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
        for label, shape, min_bytes, dense, *case_dtype in cases[op]:
            dtype = case_dtype[0] if case_dtype else args.dtype
            print(f"{op} {label} ...", file=sys.stderr, flush=True)
            launches = sim.profile(op, *shape, dtype=dtype, sample=SAMPLE.get(op, "auto"))
            # DRAM against the op's minimum: on its one launch, or on the row that sums its launches
            for d in launches:
                regs_smem = lookup(res, d["kernel"], dtype)
                d["resources"] = f"{regs_smem[0]} / {regs_smem[1]}" if regs_smem else None
                d["dram_vs_min"] = d["dram_bytes"] / min_bytes if len(launches) == 1 else None
                # tensor-core work per byte the warps requested (32-byte sectors, re-reads from L2 included)
                d["flop_per_byte"] = d["tensor_flops"] / d["global_bytes"] if d["tensor_flops"] else None
                d["dense_us"] = dense if len(launches) == 1 else None
                rows.append((label, d))
                everything.append({"op": op, "shape": label, **d})
            if len(launches) > 1:
                total = sum(d["dram_bytes"] for d in launches)
                rows.append((label + " (all launches)", {
                    "kernel": "sum", "sampled": any(d["sampled"] for d in launches), "sector_efficiency": None,
                    "dram_bytes": total, "dram_vs_min": total / min_bytes, "bank_conflict_extra": None,
                    "dense_us": dense,
                    "mma": sum(d["mma"] for d in launches), "resources": None,
                    "predicted_us": sum(d["predicted_us"] for d in launches)}))
        print(table(op, rows) + "\n", flush=True)
        if per_buffer := buffer_table(op, rows):
            print(per_buffer + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
