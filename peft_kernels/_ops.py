"""Loads the compiled library and registers what torch.library needs in Python: fake (meta) kernels.

The schemas live in C++ (csrc/include/peft_kernels/schemas.h). There is no pure-Python fallback: a missing
``_C`` is an import error, so tests cannot pass without exercising the kernels.
"""

from __future__ import annotations

import json
import pathlib

import torch

_HERE = pathlib.Path(__file__).resolve().parent


def _library_path(name: str) -> pathlib.Path | None:
    path = _HERE / f"{name}.so"
    return path if path.is_file() else None


_c_path = _library_path("_C")
if _c_path is None:
    raise ImportError(
        f"peft_kernels: the compiled library {_HERE / '_C.so'} is missing. Build and install the package "
        "with `pip install --no-build-isolation .` (see README.md); importing from a source checkout "
        "without building does not work."
    )
torch.ops.load_library(str(_c_path))

_sim_path = _library_path("_sim")
if _sim_path is not None:
    torch.ops.load_library(str(_sim_path))


def build_info() -> dict:
    """What the installed binary contains.

    Returns a dict with ``cpu`` (always True), ``cuda_archs`` (list of "major.minor" strings with compiled
    cubins, empty for a CPU-only build), ``cuda_ptx`` (archs that also carry PTX), ``cudasim`` (whether the
    test-only CPU-executor build of the CUDA kernels, ``torch.ops.peft_kernels_sim``, is installed),
    ``torch_built`` / ``torch_runtime`` and ``cuda_built`` / ``cuda_runtime`` versions.
    """
    raw = json.loads(torch.ops.peft_kernels._build_info())
    archs = [a for a in raw["cuda_arch_list"].split() if a]
    return {
        "cpu": True,
        "cuda_archs": [a.removesuffix("+PTX") for a in archs],
        "cuda_ptx": [a.removesuffix("+PTX") for a in archs if a.endswith("+PTX")],
        "cudasim": _sim_path is not None,
        "torch_built": raw["torch"],
        "torch_runtime": torch.__version__,
        "cuda_built": raw["cuda"],
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }


def _register_fakes(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::nf4_quantize")
    def _(weight, blocksize, nested_code):
        n = weight.numel()
        torch._check(n % blocksize == 0, lambda: f"nf4_quantize: numel {n} is not a multiple of blocksize {blocksize}")
        nblocks = n // blocksize
        codes = weight.new_empty((n // 2,), dtype=torch.uint8)
        offset = weight.new_empty((), dtype=torch.float32)
        if nested_code is None:
            return codes, weight.new_empty((nblocks,), dtype=torch.float32), weight.new_empty((0,), dtype=torch.float32), offset
        nested = weight.new_empty(((nblocks + 255) // 256,), dtype=torch.float32)
        return codes, weight.new_empty((nblocks,), dtype=torch.uint8), nested, offset

    @torch.library.register_fake(f"{namespace}::nf4_dequantize")
    def _(codes, absmax, nested_absmax, nested_code, offset, blocksize, dtype):
        return codes.new_empty((2 * codes.numel(),), dtype=dtype)


_register_fakes("peft_kernels")
if _sim_path is not None:
    _register_fakes("peft_kernels_sim")
