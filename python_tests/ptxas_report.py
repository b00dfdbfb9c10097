"""Compile every csrc/cuda/*.cu with nvcc for each arch and parse ptxas' resource report.

    python python_tests/ptxas_report.py [ARCH ...]     # prints a markdown table; default archs of the build

Used by test_ptxas.py, which fails on any register spill or local-memory (stack) use: on a GPU both turn
register-speed accesses into memory traffic, and they are invisible in the CPU executor.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = ["8.0", "8.6", "8.9", "9.0"]

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclasses.dataclass
class KernelUsage:
    source: str
    kernel: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


def demangle(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def compile_report(source: pathlib.Path, archs: list[str]) -> list[KernelUsage]:
    gencode = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}" for a in archs]
    cmd = ["nvcc", "-std=c++20", "-c", "-x", "cu", "--resource-usage", *gencode,
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}", str(source), "-o", "/dev/null"]
    return parse_report(subprocess.run(cmd, capture_output=True, text=True, check=True).stderr, source.name)


def parse_report(log: str, source: str) -> list[KernelUsage]:
    """ptxas -v's report: one usage per entry function, and one per non-inlined device function that ptxas gives
    properties for (its stack frame is local memory too). A frame line belongs to the function its "Function
    properties for" line names, not to the last entry compiled."""
    usages: list[KernelUsage] = []
    by_function: dict[tuple[str, str], KernelUsage] = {}  # (mangled name, arch)
    properties_of = entry = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = KernelUsage(source, m.group(1), m.group(2))
            usages.append(entry)
            by_function[m.group(1), m.group(2)] = entry
        elif (m := _PROPERTIES.search(line)) and entry:
            properties_of = (m.group(1), entry.arch)
            if properties_of not in by_function:
                usages.append(KernelUsage(source, *properties_of))
                by_function[properties_of] = usages[-1]
        elif (m := _FRAME.search(line)) and properties_of in by_function:
            usage = by_function[properties_of]
            usage.stack, usage.spill_stores, usage.spill_loads = map(int, m.groups())
        elif (m := _USED.search(line)) and entry:  # "Used N registers" closes the entry's own report
            entry.registers = int(m.group(1))
            entry.smem = int(m.group(2) or 0)
    for usage, name in zip(usages, demangle([u.kernel for u in usages])):
        usage.kernel = re.sub(r"\(anonymous namespace\)::|peft_kernels::", "", name)
    return usages


def report(archs: list[str]) -> list[KernelUsage]:
    return [u for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) for u in compile_report(cu, archs)]


def markdown(usages: list[KernelUsage]) -> str:
    rows = ["| file | kernel | arch | registers | stack B | spill st/ld B | smem B |", "|---|---|---|---|---|---|---|"]
    for u in usages:
        rows.append(f"| {u.source} | `{u.kernel}` | {u.arch} | {u.registers} | {u.stack} | "
                    f"{u.spill_stores}/{u.spill_loads} | {u.smem} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown(report(sys.argv[1:] or DEFAULT_ARCHS)))
