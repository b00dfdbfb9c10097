"""nf4_linear: y = x W^T + b with W a packed NF4 weight, on every backend (CPU, the CUDA kernels through the
CPU executor, CUDA when present). Every path is covered: the small-batch GEMV kernel (m <= 16 rows; on CUDA
m <= 8 when the tensor-core kernels take the call), CUDA's tensor-core GEMM (m > 8) and dx (any m) for bf16/f16
with in % 32 == 0 (dx also out % 8 == 0), and the tiled decode-into-workspace path (everything else), the latter
with a workspace a few rows long so tiles start in the middle of NF4 blocks. Values and gradients against the float64 reference (our error <= 2x the error of
the reference run in the same low dtype + atol), gradcheck, opcheck, bad input.
"""

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R
from tiny_models import assert_tolerance, saved_tensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float64: 1e-12}


def quantized(n_out, n_in, blocksize=64, double_quant=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) * n_in**-0.5
    return pk.nf4_quantize(w.to(device), blocksize, double_quant)


def call(ops, x, q, bias):
    return ops.nf4_linear(x, q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, q.shape[0], bias)


# (lead shape, in, out, blocksize): odd out; in not a multiple of the blocksize (rows straddle blocks, odd
# rows start on a low nibble when in is odd); 1 row, 16 rows (the GEMV limit), 17 rows (the tiled path).
# On CUDA: 130 rows = a full and a partial 128-row tile; in 288 = 4.5 pipeline stages of 64 and 4.5 blocks of
# 64 per row; out 136 and 100 = a partial column tile (100: dx takes the tiled path, out % 8 != 0); 3 rows of dx
# through the tensor-core kernel.
CASES = [((1,), 128, 45, 64), ((3, 5), 96, 37, 32), ((16,), 160, 20, 64), ((17,), 160, 20, 64),
         ((2, 21), 67, 64, 64), ((5,), 67, 64, 32), ((2, 65), 288, 136, 64), ((130,), 224, 100, 32),
         ((3,), 96, 40, 64)]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}to{c[2]}-bs{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_values_and_grads(backend, dtype, case, double_quant, monkeypatch):
    lead, n_in, n_out, bs = case
    # Three rows per tile: tile starts fall inside NF4 blocks whenever in is not a multiple of the blocksize.
    monkeypatch.setenv("PEFT_KERNELS_NF4_WORKSPACE_BYTES", str(3 * n_in * torch.finfo(dtype).bits // 8))
    q = quantized(n_out, n_in, bs, double_quant, seed=n_in + n_out)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, n_in, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(n_out, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(*lead, n_out, generator=g).to(dtype)
    results = []
    for fn, xx, bb, gy in [
        (lambda a, b: call(backend.ops, a.to(backend.device), q.to(backend.device), b.to(backend.device)), x, bias, dy),
        (lambda a, b: R.nf4_linear(a, q, b), x, bias, dy),
        (lambda a, b: R.nf4_linear(a, q, b), x.detach().double().requires_grad_(), bias.detach().double().requires_grad_(), dy.double()),
    ]:
        y = fn(xx, bb)
        results.append([y.cpu(), *[t.cpu() for t in torch.autograd.grad(y, [xx, bb], gy.to(y.device))]])
    for name, ours, low, exact in zip(["y", "dx", "dbias"], *results):
        assert_tolerance(ours, low, exact, ATOL[dtype], name)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_gemv_instruction_sets(isa, dtype, monkeypatch):
    """Every CPU GEMV path (the vectorized ones need in % 32 == 0; a path the CPU lacks falls back to the next
    one down) against the float64 reference: in = 96 with blocksize 64 starts odd rows mid-block, and 11 rows
    and 16 rows (in = 128, and in = 1120 whose odd rows start mid-block) exercise the two passes of 8 rows."""
    monkeypatch.setenv("PEFT_KERNELS_CPU_ISA", isa)
    for n_in, bs, rows in [(96, 64, 11), (128, 32, 16), (256, 128, 1), (64, 64, 3), (1120, 64, 16)]:
        q = quantized(24, n_in, bs, True, seed=n_in)
        x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(rows)).to(dtype)
        bias = torch.randn(24, generator=torch.Generator().manual_seed(2)).to(dtype)
        assert_tolerance(pk.nf4_linear(x, q, bias), R.nf4_linear(x, q, bias),
                         R.nf4_linear(x.double(), q, bias.double()), ATOL[dtype], f"{isa} in={n_in} bs={bs} rows={rows}")


def test_cpu_isa_setting_is_checked(monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_CPU_ISA", "sse9")
    expected = r"PEFT_KERNELS_CPU_ISA must be scalar, avx2, avx512, avx512_bf16 or amx, got 'sse9'"
    with pytest.raises(ValueError, match=expected):
        pk.nf4_linear(torch.randn(2, 64), quantized(8, 64))


def test_gemv_and_tiles_agree(backend):
    """The 16-row GEMV and the tiled path compute the same products: rows 0..15 of a 17-row batch."""
    q = quantized(33, 192, 64, True, seed=3).to(backend.device)
    x = torch.randn(17, 192, generator=torch.Generator().manual_seed(2)).to(backend.device)
    full = call(backend.ops, x, q, None)
    part = call(backend.ops, x[:16].contiguous(), q, None)
    assert torch.allclose(full[:16], part, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 40])
def test_gradcheck_float64(rows, monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_NF4_WORKSPACE_BYTES", str(5 * 67 * 8))
    q = quantized(32, 67, 32, True, seed=5)  # in = 67: rows straddle blocks, tiles start mid-block
    x = torch.randn(rows, 67, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: pk.nf4_linear(a, q, b), (x, bias))


@pytest.mark.parametrize("rows", [3, 20])
def test_opcheck(backend, rows):
    q = quantized(24, 64, 32, True).to(backend.device)
    x = torch.randn(rows, 64, device=backend.device, requires_grad=True)
    bias = torch.randn(24, device=backend.device, requires_grad=True)
    args = (x, q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, 24, bias)
    torch.library.opcheck(backend.ops.nf4_linear, args)
    dy = torch.randn(rows, 24, device=backend.device)
    torch.library.opcheck(backend.ops.nf4_linear_dx, (dy, *args[1:8]))


def test_weight_gets_no_gradient_and_nothing_large_is_saved():
    q = quantized(32, 64)
    x = torch.randn(20, 64, requires_grad=True)
    _, saved = saved_tensors(lambda: pk.nf4_linear(x, q).sum().backward())
    # Only the packed weight's own tensors: no activation, no dequantized weight.
    assert {t.data_ptr() for t in saved} <= {t.data_ptr() for t in (q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset)}
    assert x.grad is not None


def test_bad_input():
    q = quantized(32, 64)
    with pytest.raises(ValueError, match=r"nf4_linear: argument 'x' must be \[\.\.\., in=64\] \(the weight is \[32, 64\]\)"):
        pk.nf4_linear(torch.randn(3, 65), q)
    with pytest.raises(TypeError, match=r"nf4_linear: argument 'x' must be torch.float32, torch.float16 or torch.bfloat16 \(or torch.float64 on the CPU\), got Int"):
        pk.nf4_linear(torch.ones(3, 64, dtype=torch.int32), q)
    with pytest.raises(ValueError, match=r"nf4_linear: argument 'bias' must have 32 elements"):
        pk.nf4_linear(torch.randn(3, 64), q, torch.randn(31))
    with pytest.raises(ValueError, match=r"nf4_linear: argument 'out_features' must divide the 2048 weight elements, got 30"):
        torch.ops.peft_kernels.nf4_linear(torch.randn(3, 64), q.codes, q.absmax, q.nested_absmax, q.nested_code,
                                          q.offset, 64, 30, None)
    with pytest.raises(ValueError, match=r"nf4_linear: argument 'q' must hold a 2-D weight"):
        pk.nf4_linear(torch.randn(3, 64), pk.nf4_quantize(torch.randn(2, 4, 64)))
    with pytest.raises(TypeError, match=r"nf4_linear: argument 'q' must be an NF4Weight, got Tensor"):
        pk.nf4_linear(torch.randn(3, 64), torch.randn(32, 64))
