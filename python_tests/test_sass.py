"""The machine code (SASS) of the CUDA kernels uses the instructions they are written for, checked without a GPU.

The CPU executor runs the kernels' sources, so it proves them correct but not fast: an mma.sync that ptxas lowered
to something other than a tensor-core HMMA, a cp.async that became a plain load, or an array that went to local
memory all pass every executor test. nvcc and cuobjdump show what the GPU would run:

* python_tests/cuda/mma_gemm.cu, the reference tensor-core GEMM written with pk::ptx, compiles for sm_80 and
  sm_90 to HMMA (mma.sync), LDSM (ldmatrix) and LDGSTS (cp.async) with no spills, no stack and no LDL/STL.
* Every kernel of the built extension that DECLARED below names has its trait's instruction, every declared name
  still matches a kernel, and no kernel of the extension touches local memory.
* The helpers can fail: a scalar FMA kernel shows no HMMA/LDGSTS/LDG.E.128 and a data-indexed array shows LDL/STL.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shutil
import subprocess

import pytest

import peft_kernels
from ptxas_report import ROOT, demangle, parse_report

# What each product kernel must compile to. Keys are traits (TRAIT_OPCODE), values are substrings of kernel
# names in peft_kernels/_C.so, matched against the demangled and the mangled name, for example "nf4_mm_kernel".
# A name must match at least one kernel, so a renamed or deleted kernel fails here instead of going unchecked.
# The sparse optimizer's 16-byte path is declared for each index width, param dtype and optimizer (its lane-strided
# twin, "..., false>", makes 4-byte accesses by design).
_SPARSE_VECTOR = {f"{op}_kernel<{t}, {i}, true>" for op in ("adamw", "sgd") for t in ("float", "__nv_bfloat16")
                  for i in ("int", "long")}
# The 8-bit AdamW's aligned instantiations move the parameter, gradient and codes 16 bytes at a time.
_ADAMW8_VECTOR = {f"adamw8bit_kernel<{t}, true>" for t in ("float", "__nv_bfloat16", "__half")}
_TENSOR_CORE = {"nf4_gemm_kernel", "nf4_dx_kernel", "down_tc_kernel", "dx_tc_kernel", "da_tc_kernel",
                "kron_fwd_tc_kernel", "kron_bwd_tc_kernel"}
# KronA's y (forward) and dx are read-modify-written 16 bytes at a time
_KRON_VECTOR = {"kron_fwd_tc_kernel", "kron_bwd_tc_kernel"}
DECLARED: dict[str, set[str]] = {
    "tensor_core": _TENSOR_CORE,
    "pipelined": _TENSOR_CORE,
    "vector16_load": _SPARSE_VECTOR | _KRON_VECTOR | _ADAMW8_VECTOR,
    "vector16_store": _SPARSE_VECTOR | _KRON_VECTOR | _ADAMW8_VECTOR,
}

# The SASS opcode proving each trait on sm_80..sm_90: mma.sync -> HMMA, cp.async -> LDGSTS, a 16-byte global load
# or store -> LDG.E.128 / STG.E.128 (nvcc can split a 16-byte store into four STG.E when it loses the vector's
# alignment: csrc/cuda/masked_adamw.cu, vec_at). A Hopper-only kernel (wgmma -> HGMMA, TMA -> UTMALDG) would need
# a trait of its own.
TRAIT_OPCODE = {"tensor_core": "HMMA", "pipelined": "LDGSTS", "vector16_load": "LDG.E.128", "vector16_store": "STG.E.128"}
LOCAL_MEMORY = {"LDL", "STL"}


def _cuobjdump() -> str | None:
    """The pip wheel's cuobjdump (nvidia-cuda-cuobjdump, nvidia/cu13/bin), else one on PATH. Its -sass runs the
    nvdisasm beside it (nvidia-cuda-nvdisasm, the same folder): without it cuobjdump exits 1."""
    try:
        import nvidia
    except ImportError:
        return shutil.which("cuobjdump")
    wheels = sorted(p for base in nvidia.__path__ for p in pathlib.Path(base).glob("*/bin/cuobjdump"))
    return str(wheels[-1]) if wheels else shutil.which("cuobjdump")


CUOBJDUMP = _cuobjdump()
NVCC = shutil.which("nvcc")

pytestmark = pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump (pip install nvidia-cuda-cuobjdump)")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CPU-only toolchain)")

_CODE_FOR = re.compile(r"^\s*code for (sm_\w+)")
_FUNCTION = re.compile(r"^\s*Function : (\S+)")
# "/*0340*/  @!P0 STL.128 [R1+0x10], R8 ;": the opcode's base name, before its first modifier, and the whole
# mnemonic (STL and STL.128 both go into a kernel's opcodes). The encoding lines ("/* 0x000fe4... */") have a space
# after "/*" and do not match.
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(([A-Z][A-Z0-9_]*)(?:\.[A-Z0-9_]+)*)")


@dataclasses.dataclass
class Kernel:
    arch: str
    mangled: str
    name: str
    opcodes: set[str]


def sass_kernels(binary: pathlib.Path) -> list[Kernel]:
    """Every function of every cubin in `binary` (a cubin or a host library with a fatbin), with its opcodes."""
    dump = subprocess.run([CUOBJDUMP, "-sass", str(binary)], capture_output=True, text=True, check=True).stdout
    kernels: list[Kernel] = []
    arch = None
    for line in dump.splitlines():
        if m := _CODE_FOR.match(line):
            arch = m.group(1)
        elif m := _FUNCTION.match(line):
            kernels.append(Kernel(arch, m.group(1), m.group(1), set()))
        elif (m := _OPCODE.match(line)) and kernels:
            kernels[-1].opcodes.update(m.group(1, 2))
    for kernel, name in zip(kernels, demangle([k.mangled for k in kernels])):
        kernel.name = name
    return kernels


def declaration_problems(kernels: list[Kernel], declared: dict[str, set[str]]) -> list[str]:
    """Declared names that match no kernel, and matched kernels (on any arch) lacking their trait's opcode."""
    problems = []
    for trait, substrings in declared.items():
        for substring in sorted(substrings):
            matched = [k for k in kernels if substring in k.name or substring in k.mangled]
            if not matched:
                problems.append(f"{trait} {substring!r}: matches no kernel (renamed or removed? update DECLARED)")
            problems += [f"{trait} {substring!r}: {k.arch} {k.name} has no {TRAIT_OPCODE[trait]}"
                         for k in matched if TRAIT_OPCODE[trait] not in k.opcodes]
    return problems


def local_memory_users(kernels: list[Kernel]) -> list[str]:
    return [f"{k.arch} {k.name}: {sorted(k.opcodes & LOCAL_MEMORY)}" for k in kernels if k.opcodes & LOCAL_MEMORY]


def compile_cubin(source: pathlib.Path, arch: str, out: pathlib.Path, *defines: str) -> str:
    """nvcc -cubin for one arch; returns ptxas' -v report (stderr)."""
    cmd = [NVCC, "-std=c++20", "-cubin", f"-arch={arch}", *(f"-D{d}" for d in defines),
           f"-I{ROOT / 'csrc' / 'include'}", "-Xptxas", "-v", str(source), "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def mma_gemm(request, tmp_path_factory):
    """mma_gemm.cu's cubin and ptxas report for one arch. MMA_GEMM_MAIN compiles its main, whose launches
    instantiate the two gemm_kernel templates (bf16, f16); without it the cubin has no kernel at all."""
    cubin = tmp_path_factory.mktemp(request.param) / "mma_gemm.cubin"
    log = compile_cubin(ROOT / "python_tests" / "cuda" / "mma_gemm.cu", request.param, cubin, "MMA_GEMM_MAIN")
    return request.param, cubin, log


@needs_nvcc
def test_mma_gemm_sass(mma_gemm):
    arch, cubin, _ = mma_gemm
    kernels = sass_kernels(cubin)
    assert sorted(k.name.split("(")[0] for k in kernels) == ["void gemm_kernel<false, __nv_bfloat16>",
                                                              "void gemm_kernel<true, __half>"]
    assert {k.arch for k in kernels} == {arch}
    for k in kernels:
        assert {"HMMA", "LDSM", "LDGSTS"} <= k.opcodes, f"{arch} {k.name}: {sorted(k.opcodes)}"
    assert not local_memory_users(kernels)
    assert not declaration_problems(kernels, {"tensor_core": {"gemm_kernel"}, "pipelined": {"gemm_kernel"}})


@needs_nvcc
def test_mma_gemm_no_spills(mma_gemm):
    """ptxas' own count: 94 registers on sm_80 and 76 on sm_90 hold the 2x4 fp32 accumulator tiles (32 floats)
    plus the fragments with room to spare, so any spill or stack frame is a regression of the source."""
    arch, _, log = mma_gemm
    usages = parse_report(log, "mma_gemm.cu")
    assert len(usages) == 2 and all("gemm_kernel" in u.kernel and u.arch == arch for u in usages), log
    bad = [u for u in usages if u.stack or u.spill_stores or u.spill_loads]
    assert not bad, f"{arch}: {bad}"


@pytest.fixture(scope="module")
def extension_kernels():
    archs = peft_kernels.build_info()["cuda_archs"]
    if not archs:
        pytest.skip("peft_kernels was built without CUDA kernels (build_info()['cuda_archs'] is empty)")
    kernels = sass_kernels(pathlib.Path(peft_kernels.__file__).parent / "_C.so")
    # Each arch of the build has its own cubin; a dump missing one would leave that arch unchecked.
    assert {k.arch for k in kernels} == {f"sm_{a.replace('.', '')}" for a in archs}
    return kernels


def test_extension_declared_traits(extension_kernels):
    problems = declaration_problems(extension_kernels, DECLARED)
    assert not problems, "\n".join(problems)


def test_extension_no_local_memory(extension_kernels):
    """Local memory is per-thread DRAM behind L1: a spilled register or a data-indexed array costs a memory round
    trip per access. test_ptxas checks the ptxas report of each source; this checks the binary that ships."""
    users = local_memory_users(extension_kernels)
    assert not users, "\n".join(users)


@needs_nvcc
def test_checks_can_fail(tmp_path):
    """A scalar FMA loop has neither HMMA nor LDGSTS, so declaring it fails both traits; a stale name fails; a
    1 KiB per-thread array indexed by data (256 floats, too many and too dynamic for registers) goes to LDL/STL."""
    source = tmp_path / "scalar.cu"
    source.write_text(
        "__global__ void fma_kernel(const float* x, float* y, int n) {\n"
        "  float acc = 0.0f;\n"
        "  for (int i = threadIdx.x; i < n; i += blockDim.x) acc = fmaf(x[i], acc, 1.0f);\n"
        "  y[threadIdx.x] = acc;\n"
        "}\n"
        "__global__ void local_kernel(const int* i, float* o) {\n"
        "  float t[256];\n"
        "  t[0] = o[0];\n"
        "  for (int j = 1; j < 256; ++j) t[j] = t[j - 1] + o[j];\n"
        "  o[threadIdx.x] = t[i[threadIdx.x] & 255];\n"
        "}\n"
    )
    compile_cubin(source, "sm_80", tmp_path / "scalar.cubin")
    kernels = sass_kernels(tmp_path / "scalar.cubin")
    fma = next(k for k in kernels if k.name.startswith("fma_kernel("))
    assert "FFMA" in fma.opcodes and not fma.opcodes & {"HMMA", "LDGSTS"}, sorted(fma.opcodes)
    problems = declaration_problems(kernels, {"tensor_core": {"fma_kernel"}, "pipelined": {"fma_kernel", "gone"}})
    assert problems == ["tensor_core 'fma_kernel': sm_80 fma_kernel(float const*, float*, int) has no HMMA",
                        "pipelined 'fma_kernel': sm_80 fma_kernel(float const*, float*, int) has no LDGSTS",
                        "pipelined 'gone': matches no kernel (renamed or removed? update DECLARED)"]
    assert local_memory_users(kernels) == ["sm_80 local_kernel(int const*, float*): ['LDL', 'STL']"]
    # its loads are 4 bytes wide: LDG.E, never LDG.E.128
    assert declaration_problems(kernels, {"vector16_load": {"fma_kernel"}}) == [
        "vector16_load 'fma_kernel': sm_80 fma_kernel(float const*, float*, int) has no LDG.E.128"]
