"""What the installed build says about itself, the README/CI contract, and a missing-library failure."""

import pathlib
import shutil
import subprocess
import sys

import torch

import peft_kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_build_info():
    info = peft_kernels.build_info()
    assert info["cpu"] is True
    assert info["torch_built"] == torch.__version__.split("+")[0]
    assert isinstance(info["cudasim"], bool)
    assert info["cpu_isa"] in ("scalar", "avx2", "avx512", "avx512_bf16", "amx")
    if info["cuda_built"] is None:
        assert info["cuda_archs"] == [] and info["cuda_ptx"] == []
    else:
        assert info["cuda_built"] == torch.version.cuda
        assert info["cuda_archs"] and set(info["cuda_ptx"]) <= set(info["cuda_archs"])
        assert hasattr(torch.ops.peft_kernels.nf4_quantize, "default")


def test_cpu_isa_is_capped_by_the_environment(monkeypatch):
    """build_info's cpu_isa is what the kernels pick: the CPU's best, lowered by PEFT_KERNELS_CPU_ISA, never raised."""
    order = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]
    best = peft_kernels.build_info()["cpu_isa"]
    for cap in order:
        monkeypatch.setenv("PEFT_KERNELS_CPU_ISA", cap)
        assert peft_kernels.build_info()["cpu_isa"] == order[min(order.index(cap), order.index(best))]


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = readme.split("```bash\n")[1:3]
    commands = [b.split("```")[0].strip() for b in blocks]
    assert len(commands) == 2, "README.md must open with exactly two bash blocks: set-up, tests"
    for command in commands:
        assert command in ci, f".ci/run does not run the README's command:\n{command}"


def test_missing_library_is_a_clear_import_error(tmp_path):
    package = tmp_path / "peft_kernels"
    shutil.copytree(pathlib.Path(peft_kernels.__file__).parent, package, ignore=shutil.ignore_patterns("*.so"))
    result = subprocess.run([sys.executable, "-P", "-c", "import peft_kernels"], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert "ImportError: peft_kernels: the compiled library" in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr
