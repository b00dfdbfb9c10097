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
    """Fake (meta) kernels of the NF4 ops, for torch.compile and opcheck."""
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


def _register_lora(namespace: str) -> None:
    """Fakes of the LoRA ops and the autograd formula of lora_linear_fwd (backward = lora_linear_bwd)."""
    @torch.library.register_fake(f"{namespace}::lora_linear_fwd")
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        torch._check(x.shape[-1] == weight.shape[1], lambda: f"lora_linear: x {tuple(x.shape)} vs weight {tuple(weight.shape)}")
        return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((*x.shape[:-1], lora_A.shape[0]))

    @torch.library.register_fake(f"{namespace}::lora_linear_bwd")
    def _(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx, need_dA, need_dB, need_dbias):
        empty = dy.new_empty((0,))
        return (
            dy.new_empty((*dy.shape[:-1], weight.shape[1])) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dA else empty,
            lora_B.new_empty(lora_B.shape) if need_dB else empty,
            dy.new_empty((weight.shape[0],)) if need_dbias else empty,
        )

    ops = getattr(torch.ops, namespace)

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
        if weight.requires_grad:
            raise ValueError(
                "lora_linear: argument 'weight' is the frozen base weight and gets no gradient, but it has "
                "requires_grad=True; call weight.requires_grad_(False) (LoRALinear does)"
            )
        # x is needed only for lora_A's gradient: LoRA-FA (A frozen) saves just xa [..., r].
        ctx.save_for_backward(x if lora_A.requires_grad else None, weight, lora_A, lora_B, output[1], seed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p

    def backward(ctx, dy, _dxa):
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        # needs_input_grad is False for a None bias, so need_bias also says that a bias exists.
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx, da, db, dbias = ops.lora_linear_bwd(
            dy, x, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p, seed, need_x, need_a, need_b, need_bias
        )
        pick = lambda needed, grad: grad if needed else None  # noqa: E731
        return pick(need_x, dx), None, pick(need_bias, dbias), pick(need_a, da), pick(need_b, db), None, None, None

    torch.library.register_autograd(f"{namespace}::lora_linear_fwd", backward, setup_context=setup_context)


def _register_sparse(namespace: str) -> None:
    """Fakes of the in-place sparse optimizer steps: they return nothing and write only their (a!) arguments."""
    @torch.library.register_fake(f"{namespace}::masked_adamw_step_")
    def _(param, grad, indices, exp_avg, exp_avg_sq, master, step, lr, beta1, beta2, eps, weight_decay, child_p, seed):
        return None

    @torch.library.register_fake(f"{namespace}::masked_sgd_step_")
    def _(param, grad, indices, momentum_buffer, master, step, lr, momentum, weight_decay, child_p, seed):
        return None


for _namespace in ["peft_kernels"] + (["peft_kernels_sim"] if _sim_path is not None else []):
    _register_fakes(_namespace)
    _register_lora(_namespace)
    _register_sparse(_namespace)
