"""Every CUDA kernel compiles for every arch of the build with no register spills and no local memory."""

import shutil

import pytest

import peft_kernels
from ptxas_report import DEFAULT_ARCHS, report

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CPU-only toolchain)")


def test_no_spills_no_local_memory():
    archs = peft_kernels.build_info()["cuda_archs"] or DEFAULT_ARCHS
    usages = report(archs)
    assert {u.arch for u in usages} == {f"sm_{a.replace('.', '')}" for a in archs}
    kernels = {u.kernel for u in usages}
    assert any("encode_kernel" in k for k in kernels) and any("decode_kernel" in k for k in kernels), kernels
    bad = [u for u in usages if u.spill_stores or u.spill_loads or u.stack]
    assert not bad, "spills or local memory:\n" + "\n".join(map(str, bad))


def test_report_sees_local_memory(tmp_path):
    """The check itself can fail: a 1 KiB per-thread array indexed at run time lives in local memory."""
    from ptxas_report import compile_report

    source = tmp_path / "local.cu"
    source.write_text(
        "__global__ void k(const int* i, float* o) {\n"
        "  float t[256];\n"
        "  t[0] = o[0];\n"
        "  for (int j = 1; j < 256; ++j) t[j] = t[j - 1] + o[j];\n"
        "  o[threadIdx.x] = t[i[threadIdx.x] & 255];\n"
        "}\n"
    )
    (usage,) = compile_report(source, ["9.0"])
    assert usage.kernel.startswith("k(") and usage.stack == 1024
