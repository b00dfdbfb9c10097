"""A bad-input table for every public op and module: a wrong dtype, device, rank or shape, an empty tensor,
NaN/Inf where they are not allowed, a wrong argument type -> a Python exception naming the argument, what was
expected and what came; never a crash, never a silently wrong output. (Per-op tables of shape errors are also
in test_lora_linear.py / test_nf4_linear.py / test_qlora_linear.py; NaN/Inf in activations, which propagate
as in nn.Linear, in test_fuzz.py.)

Devices: on a CPU-only machine the "other device" is meta; mixing it with real tensors used to run the op's
fake kernel and return an uninitialized real tensor.
"""

import dataclasses

import pytest
import torch
from torch import nn

import peft_kernels as pk

g = torch.Generator().manual_seed(0)
X, W, B = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
LA, LB = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)
Q = pk.nf4_quantize(torch.randn(6, 64, generator=g))
XQ, QA, QB = torch.randn(4, 64, generator=g), torch.randn(2, 64, generator=g), torch.randn(6, 2, generator=g)
META = torch.device("meta")


def lora(**change):
    args = dict(x=X, weight=W, bias=B, lora_A=LA, lora_B=LB, scaling=1.0, dropout_p=0.1, seed=1)
    args.update(change)
    return lambda: pk.lora_linear(**args)


def qlora(**change):
    args = dict(x=XQ, q=Q, bias=None, lora_A=QA, lora_B=QB, scaling=1.0, dropout_p=0.1, seed=1)
    args.update(change)
    return lambda: pk.qlora_linear(**args)


def nf4_linear(**change):
    args = dict(x=XQ, q=Q, bias=None)
    args.update(change)
    return lambda: pk.nf4_linear(**args)


def replaced(**change):
    return dataclasses.replace(Q, **change)


CASES = {
    # lora_linear
    "lora-x-int": (lora(x=X.long()), TypeError, r"lora_linear: argument 'x' must be torch.float32, .* got Long"),
    "lora-x-complex": (lora(x=X.to(torch.complex64)), TypeError, "argument 'x' must be torch.float32"),
    "lora-x-list": (lora(x=X.tolist()), RuntimeError, "Expected a value of type 'Tensor' for argument 'x'"),
    "lora-weight-f64": (lora(weight=W.double()), TypeError, "argument 'weight' must have dtype Float, got a Double"),
    "lora-bias-f16": (lora(bias=B.half()), TypeError, "argument 'bias' must have dtype Float, got a Half"),
    "lora-x-meta": (lora(x=X.to(META)), ValueError, "argument 'weight' must be on meta like the other inputs, got a tensor on cpu"),
    "lora-A-meta": (lora(lora_A=LA.to(META)), ValueError, "argument 'lora_A' must be on cpu like the other inputs, got a tensor on meta"),
    "lora-weight-1d": (lora(weight=W.flatten()), ValueError, r"argument 'weight' must be 2-D \[out, in\]"),
    "lora-x-0d": (lora(x=torch.tensor(1.0)), ValueError, "argument 'x' must have last dimension in=8"),
    "lora-x-in": (lora(x=X[:, :7]), ValueError, "argument 'x' must have last dimension in=8"),
    "lora-in-0": (lora(x=X[:, :0], weight=W[:, :0], lora_A=LA[:, :0]), ValueError, "with out >= 1 and in >= 1, got a Float tensor of shape \\[6, 0\\]"),
    "lora-out-0": (lora(weight=W[:0], bias=None, lora_B=LB[:0]), ValueError, "with out >= 1 and in >= 1"),
    "lora-r-0": (lora(lora_A=LA[:0], lora_B=LB[:, :0]), ValueError, r"argument 'lora_A' must be \[r, in=8\] with r >= 1"),
    "lora-B-shape": (lora(lora_B=LB.t()), ValueError, r"argument 'lora_B' must be \[out=6, r=3\]"),
    "lora-bias-2d": (lora(bias=B.reshape(2, 3)), ValueError, "argument 'bias' must have 6 elements in one dimension, got a Float tensor of shape \\[2, 3\\]"),
    "lora-p-nan": (lora(dropout_p=float("nan")), ValueError, r"argument 'dropout_p' must be in \[0, 1\), got nan"),
    "lora-p-1": (lora(dropout_p=1.0), ValueError, r"argument 'dropout_p' must be in \[0, 1\), got 1"),
    "lora-seed-range": (lora(seed=2**64), ValueError, r"lora_linear: argument 'seed' must be an int64 .* got 18446744073709551616"),
    "lora-seed-float": (lora(seed=torch.tensor([1.5])), ValueError, "argument 'seed' must be a one-element int64 tensor"),
    "lora-weight-trains": (lora(weight=W.clone().requires_grad_()), ValueError, "'weight' is the frozen base weight"),
    # nf4_quantize
    "quantize-empty": (lambda: pk.nf4_quantize(torch.empty(0, 64)), ValueError, "argument 'weight' must not be empty"),
    "quantize-nan": (lambda: pk.nf4_quantize(torch.full((128,), float("nan"))), ValueError, r"argument 'weight' must be finite, but block 0"),
    "quantize-inf": (lambda: pk.nf4_quantize(torch.cat([torch.ones(64), torch.full((64,), float("inf"))])), ValueError, r"must be finite, but block 1 \(elements from 64\)"),
    "quantize-noncontiguous": (lambda: pk.nf4_quantize(torch.randn(64, 64).t()), ValueError, "argument 'weight' must be contiguous"),
    "quantize-blocksize": (lambda: pk.nf4_quantize(torch.randn(96), 48), ValueError, "argument 'blocksize' must be a power of two in \\[32, 4096\\].*got 48"),
    "quantize-numel": (lambda: pk.nf4_quantize(torch.randn(100)), ValueError, "divisible by blocksize=64, got 100 elements"),
    "quantize-f64": (lambda: pk.nf4_quantize(torch.randn(64).double()), TypeError, "argument 'weight' must be torch.float32, .* got Double"),
    "quantize-int": (lambda: pk.nf4_quantize(torch.ones(64, dtype=torch.int32)), TypeError, "got Int"),
    "quantize-not-tensor": (lambda: pk.nf4_quantize([1.0] * 64), TypeError, "argument 'weight' must be a torch.Tensor, got list"),
    # nf4_dequantize
    "dequantize-not-nf4": (lambda: pk.nf4_dequantize(W), TypeError, "argument 'q' must be an NF4Weight, got Tensor"),
    "dequantize-codes-float": (lambda: pk.nf4_dequantize(replaced(codes=Q.codes.float())), TypeError, "argument 'codes' must have dtype Byte"),
    "dequantize-codes-strided": (lambda: pk.nf4_dequantize(replaced(codes=Q.codes.repeat_interleave(2)[::2])), ValueError, "argument 'codes' must be contiguous"),
    "dequantize-absmax-short": (lambda: pk.nf4_dequantize(replaced(absmax=Q.absmax[:-1])), ValueError, "argument 'absmax' must have 6 elements"),
    "dequantize-shape": (lambda: pk.nf4_dequantize(replaced(shape=torch.Size([5, 64]))), ValueError, r"argument 'q' has shape \[5, 64\] \(320 elements\) but holds 192 bytes"),
    "dequantize-partial-dq": (lambda: pk.nf4_dequantize(replaced(offset=None)), ValueError, "must be given together"),
    "dequantize-meta": (lambda: pk.nf4_dequantize(replaced(codes=Q.codes.to(META))), ValueError, "argument 'absmax' must be on meta"),
    # nf4_linear
    "nf4-x-in": (nf4_linear(x=XQ[:, :60]), ValueError, r"argument 'x' must be \[\.\.\., in=64\]"),
    "nf4-x-int": (nf4_linear(x=XQ.int()), TypeError, "argument 'x' must be torch.float32"),
    "nf4-x-meta": (nf4_linear(x=XQ.to(META)), ValueError, "argument 'codes' must be on meta like the other inputs"),
    "nf4-bias-2d": (nf4_linear(bias=torch.zeros(1, 6)), ValueError, "argument 'bias' must have 6 elements in one dimension"),
    "nf4-q-3d": (nf4_linear(q=pk.nf4_quantize(torch.randn(2, 3, 64))), ValueError, "argument 'q' must hold a 2-D weight"),
    "nf4-q-tensor": (nf4_linear(q=W), TypeError, "argument 'q' must be an NF4Weight, got Tensor"),
    # qlora_linear
    "qlora-A-dtype": (qlora(lora_A=QA.half()), TypeError, "argument 'lora_A' must have dtype Float, got a Half"),
    "qlora-A-meta": (qlora(lora_A=QA.to(META)), ValueError, "argument 'lora_A' must be on cpu like the other inputs"),
    "qlora-B-shape": (qlora(lora_B=QB[:5]), ValueError, r"argument 'lora_B' must be \[out=6, r=2\]"),
    "qlora-x-in": (qlora(x=XQ[:, 1:]), ValueError, "argument 'x' must have last dimension in=64"),
    "qlora-bias": (qlora(bias=torch.zeros(7)), ValueError, "argument 'bias' must have 6 elements"),
    "qlora-q-shape": (qlora(q=replaced(shape=torch.Size([12, 64]))), ValueError, r"argument 'q' has shape \[12, 64\]"),
    "qlora-seed-range": (qlora(seed=-(2**63) - 1), ValueError, "qlora_linear: argument 'seed' must be an int64"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_op_input(name):
    call, exc, message = CASES[name]
    with pytest.raises(exc, match=message):
        call()


def modules():
    torch.manual_seed(0)
    return {
        "LoRALinear": pk.nn.LoRALinear.from_linear(nn.Linear(64, 6), r=2, dropout=0.1),
        "NF4Linear": pk.nn.NF4Linear.from_linear(nn.Linear(64, 6), compute_dtype=torch.float32),
        "QLoRALinear": pk.nn.QLoRALinear.from_linear(nn.Linear(64, 6), r=2, dropout=0.1, compute_dtype=torch.float32),
    }


MODULE_CASES = {
    "x-in": (XQ[:, :60], ValueError, "argument 'x' must (have last dimension in=64|be \\[\\.\\.\\., in=64\\])"),
    "x-int": (XQ.long(), TypeError, "input 'x' must (have the layer's dtype torch.float32 \\(or run under torch.autocast\\)|be a floating-point "
                         "tensor), got torch.int64"),
    "x-meta": (XQ.to(META), ValueError, "must be on meta like the other inputs"),
    "x-0d": (torch.tensor(1.0), ValueError, "argument 'x' must"),
}


@pytest.mark.parametrize("case", MODULE_CASES)
@pytest.mark.parametrize("kind", ["LoRALinear", "NF4Linear", "QLoRALinear"])
def test_bad_module_input(kind, case):
    x, exc, message = MODULE_CASES[case]
    with pytest.raises(exc, match=message):
        modules()[kind](x)


def test_lora_module_dtype_mismatch_outside_autocast():
    """A bf16 activation into an fp32 LoRALinear outside autocast is refused (no silent change of the layer's
    precision); under autocast it is the documented bf16 product (test_training_stacks.py)."""
    with pytest.raises(TypeError, match=r"LoRALinear: input 'x' must have the layer's dtype torch.float32 \(or run "
                                        r"under torch.autocast\), got torch.bfloat16"):
        modules()["LoRALinear"](XQ.bfloat16())


@pytest.mark.parametrize("kind", ["LoRALinear", "NF4Linear", "QLoRALinear"])
def test_empty_batch_is_an_empty_result(kind):
    """Zero rows are a valid batch (as for nn.Linear): an empty output, and zero gradients for the adapter."""
    module = modules()[kind].train()
    x = torch.empty(0, 7, 64, requires_grad=True)
    y = module(x)
    assert y.shape == (0, 7, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in module.parameters():
        assert p.grad is None or not p.grad.any()


def test_bad_module_construction():
    with pytest.raises(ValueError, match=r"NF4Linear: the NF4 weight must be 2-D \[out, in\], got shape \[2, 3, 64\]"):
        pk.nn.NF4Linear(pk.nf4_quantize(torch.randn(2, 3, 64)), None)
    with pytest.raises(TypeError, match="argument 'compute_dtype' must be torch.float32, torch.float16 or torch.bfloat16, got torch.int8"):
        pk.nn.NF4Linear(Q, None, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="QLoRALinear: argument 'r' must be an int >= 1, got 0"):
        pk.nn.QLoRALinear(Q, None, r=0)
    with pytest.raises(ValueError, match=r"QLoRALinear: argument 'dropout' must be in \[0, 1\), got -0.5"):
        pk.nn.QLoRALinear(Q, None, dropout=-0.5)
    with pytest.raises(TypeError, match="QLoRALinear.from_linear: argument 'linear' must be an nn.Linear, got Embedding"):
        pk.nn.QLoRALinear.from_linear(nn.Embedding(4, 64))
