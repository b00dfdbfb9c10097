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
    ``torch_built`` / ``torch_runtime`` and ``cuda_built`` / ``cuda_runtime`` versions, and ``cpu_isa``: the
    instruction set the CPU kernels pick on this machine now (``"scalar"``, ``"avx2"``, ``"avx512"``,
    ``"avx512_bf16"`` or ``"amx"``; ``PEFT_KERNELS_CPU_ISA`` caps it).
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
        "cpu_isa": torch.ops.peft_kernels._cpu_isa(),
    }


def _same_device(op: str, first: torch.Tensor, /, **tensors) -> None:
    """The fakes' copy of the C++ device check. Without it a call mixing meta and real tensors ran the fake as
    the Meta kernel and returned an uninitialized real tensor (x.new_empty) instead of an error."""
    for name, t in tensors.items():
        if t is not None and t.device != first.device:
            raise ValueError(f"{op}: argument '{name}' must be on {first.device} like the other inputs, got a tensor on "
                             f"{t.device}")


def _register_fakes(namespace: str) -> None:
    """Fake (meta) kernels of the NF4 ops, for torch.compile and opcheck."""
    @torch.library.register_fake(f"{namespace}::nf4_quantize")
    def _(weight, blocksize, nested_code):
        _same_device("nf4_quantize", weight, nested_code=nested_code)
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
        _same_device("nf4_dequantize", codes, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code,
                     offset=offset)
        return codes.new_empty((2 * codes.numel(),), dtype=dtype)


def _register_nf4_linear(namespace: str) -> None:
    """Fakes of the NF4 linear ops and the autograd formula of nf4_linear (dx = nf4_linear_dx, dbias = sum)."""
    @torch.library.register_fake(f"{namespace}::nf4_linear")
    def _(x, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias):
        _same_device("nf4_linear", x, codes=codes, absmax=absmax, nested_absmax=nested_absmax,
                     nested_code=nested_code, offset=offset, bias=bias)
        in_features = 2 * codes.numel() // out_features
        torch._check(x.shape[-1] == in_features, lambda: f"nf4_linear: x {tuple(x.shape)} vs weight [{out_features}, {in_features}]")
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake(f"{namespace}::nf4_linear_dx")
    def _(dy, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features):
        _same_device("nf4_linear_dx", dy, codes=codes, absmax=absmax, nested_absmax=nested_absmax,
                     nested_code=nested_code, offset=offset)
        return dy.new_empty((*dy.shape[:-1], 2 * codes.numel() // out_features))

    ops = getattr(torch.ops, namespace)

    def setup_context(ctx, inputs, output):
        x, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias = inputs
        ctx.save_for_backward(codes, absmax, nested_absmax, nested_code, offset)
        ctx.blocksize, ctx.out_features = blocksize, out_features

    def backward(ctx, dy):
        codes, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[8]
        dx = ops.nf4_linear_dx(dy, codes, absmax, nested_absmax, nested_code, offset, ctx.blocksize,
                               ctx.out_features) if need_x else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if need_bias else None
        return dx, None, None, None, None, None, None, None, dbias

    torch.library.register_autograd(f"{namespace}::nf4_linear", backward, setup_context=setup_context)


def _register_lora(namespace: str) -> None:
    """Fakes of the LoRA ops and the autograd formula of lora_linear_fwd (backward = lora_linear_bwd)."""
    @torch.library.register_fake(f"{namespace}::lora_linear_fwd")
    def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        _same_device("lora_linear", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
        torch._check(x.shape[-1] == weight.shape[1], lambda: f"lora_linear: x {tuple(x.shape)} vs weight {tuple(weight.shape)}")
        return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((*x.shape[:-1], lora_A.shape[0]))

    @torch.library.register_fake(f"{namespace}::lora_linear_bwd")
    def _(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx, need_dA, need_dB, need_dbias):
        _same_device("lora_linear", dy, x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, xa=xa)
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


def _register_qlora(namespace: str) -> None:
    """Fakes of the QLoRA ops and the autograd formula of qlora_linear_fwd (backward = qlora_linear_bwd)."""
    @torch.library.register_fake(f"{namespace}::qlora_linear_fwd")
    def _(x, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias, lora_A, lora_B,
          scaling, dropout_p, seed):
        _same_device("qlora_linear", x, codes=codes, absmax=absmax, nested_absmax=nested_absmax,
                     nested_code=nested_code, offset=offset, bias=bias, lora_A=lora_A, lora_B=lora_B)
        torch._check(x.shape[-1] == lora_A.shape[1], lambda: f"qlora_linear: x {tuple(x.shape)} vs lora_A {tuple(lora_A.shape)}")
        return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((*x.shape[:-1], lora_A.shape[0]))

    @torch.library.register_fake(f"{namespace}::qlora_linear_bwd")
    def _(dy, x, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features, lora_A, lora_B, xa,
          scaling, dropout_p, seed, need_dx, need_dA, need_dB, need_dbias):
        _same_device("qlora_linear", dy, x=x, codes=codes, absmax=absmax, nested_absmax=nested_absmax,
                     nested_code=nested_code, offset=offset, lora_A=lora_A, lora_B=lora_B, xa=xa)
        empty = dy.new_empty((0,))
        return (
            dy.new_empty((*dy.shape[:-1], lora_A.shape[1])) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dA else empty,
            lora_B.new_empty(lora_B.shape) if need_dB else empty,
            dy.new_empty((out_features,)) if need_dbias else empty,
        )

    ops = getattr(torch.ops, namespace)

    def setup_context(ctx, inputs, output):
        (x, codes, absmax, nested_absmax, nested_code, offset, blocksize, out_features, bias, lora_A, lora_B, scaling,
         dropout_p, seed) = inputs
        # As lora_linear: x only while lora_A trains (else LoRA-FA keeps just xa [..., r]); the packed weight is
        # referenced, not copied.
        ctx.save_for_backward(x if lora_A.requires_grad else None, codes, absmax, nested_absmax, nested_code, offset,
                              lora_A, lora_B, output[1], seed)
        ctx.blocksize, ctx.out_features, ctx.scaling, ctx.dropout_p = blocksize, out_features, scaling, dropout_p

    def backward(ctx, dy, _dxa):
        x, codes, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, xa, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_bias, need_a, need_b = need[0], need[8], need[9], need[10]
        dx, da, db, dbias = ops.qlora_linear_bwd(
            dy, x, codes, absmax, nested_absmax, nested_code, offset, ctx.blocksize, ctx.out_features, lora_A, lora_B,
            xa, ctx.scaling, ctx.dropout_p, seed, need_x, need_a, need_b, need_bias)
        pick = lambda needed, grad: grad if needed else None  # noqa: E731
        return (pick(need_x, dx), None, None, None, None, None, None, None, pick(need_bias, dbias), pick(need_a, da),
                pick(need_b, db), None, None, None)

    torch.library.register_autograd(f"{namespace}::qlora_linear_fwd", backward, setup_context=setup_context)


def _register_kron(namespace: str) -> None:
    """Fakes of the kron_linear ops and the autograd formula of kron_linear_fwd (backward = kron_linear_bwd)."""
    @torch.library.register_fake(f"{namespace}::kron_linear_fwd")
    def _(x, weight, bias, A, B, scaling, dropout_p, seed):
        n_in = A.shape[1] * B.shape[1]
        torch._check(x.shape[-1] == n_in, lambda: f"kron_linear: x {tuple(x.shape)} vs A {tuple(A.shape)}, B {tuple(B.shape)}")
        return x.new_empty((*x.shape[:-1], A.shape[0] * B.shape[0]))

    @torch.library.register_fake(f"{namespace}::kron_linear_bwd")
    def _(dy, x, weight, A, B, scaling, dropout_p, seed, need_dx, need_dA, need_dB, need_dbias):
        empty = dy.new_empty((0,))
        return (
            dy.new_empty((*dy.shape[:-1], A.shape[1] * B.shape[1])) if need_dx else empty,
            A.new_empty(A.shape) if need_dA else empty,
            B.new_empty(B.shape) if need_dB else empty,
            dy.new_empty((A.shape[0] * B.shape[0],)) if need_dbias else empty,
        )

    ops = getattr(torch.ops, namespace)

    def setup_context(ctx, inputs, output):
        x, weight, bias, A, B, scaling, dropout_p, seed = inputs
        if weight is not None and weight.requires_grad:
            raise ValueError(
                "kron_linear: argument 'weight' is the frozen base weight and gets no gradient, but it has "
                "requires_grad=True; call weight.requires_grad_(False) (KronALinear does)"
            )
        # x is the only activation kept, and only for the factors' gradients: the mask is redrawn from seed.
        ctx.save_for_backward(x if A.requires_grad or B.requires_grad else None, weight, A, B, seed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p

    def backward(ctx, dy):
        x, weight, A, B, seed = ctx.saved_tensors
        # needs_input_grad is False for a None bias, so need_bias also says that a bias exists.
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dx, da, db, dbias = ops.kron_linear_bwd(
            dy, x, weight, A, B, ctx.scaling, ctx.dropout_p, seed, need_x, need_a, need_b, need_bias
        )
        pick = lambda needed, grad: grad if needed else None  # noqa: E731
        return pick(need_x, dx), None, pick(need_bias, dbias), pick(need_a, da), pick(need_b, db), None, None, None

    torch.library.register_autograd(f"{namespace}::kron_linear_fwd", backward, setup_context=setup_context)


def _register_sparse(namespace: str) -> None:
    """Fakes of the in-place optimizer steps (sparse and 8-bit): they return nothing and write only their (a!)
    arguments."""
    @torch.library.register_fake(f"{namespace}::masked_adamw_step_")
    def _(param, grad, indices, exp_avg, exp_avg_sq, master, step, lr, beta1, beta2, eps, weight_decay, child_p, seed):
        return None

    @torch.library.register_fake(f"{namespace}::masked_sgd_step_")
    def _(param, grad, indices, momentum_buffer, master, step, lr, momentum, weight_decay, child_p, seed):
        return None

    @torch.library.register_fake(f"{namespace}::adamw8bit_step_")
    def _(param, grad, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, signed_map, unsigned_map, step, lr,
          beta1, beta2, eps, weight_decay):
        return None


for _namespace in ["peft_kernels"] + (["peft_kernels_sim"] if _sim_path is not None else []):
    _register_fakes(_namespace)
    _register_nf4_linear(_namespace)
    _register_lora(_namespace)
    _register_qlora(_namespace)
    _register_kron(_namespace)
    _register_sparse(_namespace)
