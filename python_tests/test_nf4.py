"""NF4 quantization with double quantization: exact agreement with the reference and with bitsandbytes on
every backend (CPU kernels, the CUDA kernels through the CPU executor, CUDA when present), interop with
bitsandbytes' QuantState, and clear errors on bad input.

The ops are exact (integer codes and single-rounding scales), so comparisons are torch.equal, not tolerances.
They are not differentiable (codes have no gradient), so there is no gradcheck here.
"""

import math

import bitsandbytes.functional as bnbf
import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def make_weight(nblocks: int, blocksize: int, dtype: torch.dtype, seed: int, device="cpu") -> torch.Tensor:
    """Random normal blocks with varied scales, one all-zero block and one block with a single non-zero."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(nblocks, 1, generator=g) * 2)
    w = torch.randn(nblocks, blocksize, generator=g) * scales
    w[nblocks // 2] = 0
    w[-1] = 0
    w[-1, blocksize // 3] = -3.5
    return w.to(dtype).to(device)


def run_quantize(backend, w, blocksize, double_quant):
    code = pk.dynamic_map(w.device) if double_quant else None
    return backend.ops.nf4_quantize(w, blocksize, code)


def test_tables_match_bitsandbytes():
    assert torch.equal(R.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(pk.dynamic_map(), bnbf.create_dynamic_map())


def test_decode_every_byte(backend):
    """All 256 byte values decode to the reference table's pair (catches a wrong table entry or nibble order)."""
    codes = torch.arange(256, dtype=torch.uint8, device=backend.device).repeat(2)
    absmax = torch.tensor([1.0, 2.0, -0.5, 3.0] * 8, device=backend.device)  # 32 blocks of 32
    out = backend.ops.nf4_dequantize(codes, absmax, None, None, None, 32, torch.float32)
    assert torch.equal(out, R.nf4_dequantize(codes, absmax, None, None, None, 32, torch.float32))
    assert out[2].item() == -1.0 and out[3].item() == R.NF4_CODE[1]  # byte 0x01: high nibble first


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ["avx512", "avx2"], ids=["avx512", "loop"])
def test_cpu_decode_paths(isa, dtype, monkeypatch):
    """Both CPU decode paths (AVX-512 whole blocks, and the portable loop that other CPUs and PEFT_KERNELS_CPU_ISA
    below avx512 run), bit for bit against the reference: every byte value at blocksizes 32, 64 and 4096, with
    scales from fp16-subnormal to fp16-overflowing levels (the 16-bit rounding of the levels)."""
    if isa == "avx512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("PEFT_KERNELS_CPU_ISA", isa)
    g = torch.Generator().manual_seed(11)
    for blocksize in (32, 64, 4096):
        codes = torch.randperm(256, generator=g).to(torch.uint8).repeat(48)  # 24576 values
        nblocks = 2 * codes.numel() // blocksize
        sign = torch.where(torch.rand(nblocks, generator=g) < 0.5, -1.0, 1.0)
        absmax = torch.exp(torch.randn(nblocks, generator=g) * 4) * sign
        absmax[0], absmax[-1] = 1e-6, 1e5
        out = torch.ops.peft_kernels.nf4_dequantize(codes, absmax, None, None, None, blocksize, dtype)
        assert torch.equal(out, R.nf4_dequantize(codes, absmax, None, None, None, blocksize, dtype)), blocksize


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("blocksize,nblocks", [(32, 7), (64, 301), (128, 37), (4096, 3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(backend, dtype, blocksize, nblocks, double_quant):
    w = make_weight(nblocks, blocksize, dtype, seed=blocksize + nblocks, device=backend.device)
    got = run_quantize(backend, w, blocksize, double_quant)
    want = R.nf4_quantize(w, blocksize, pk.dynamic_map(w.device) if double_quant else None)
    for name, a, b in zip(("codes", "absmax", "nested_absmax", "offset"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {a.numel()} differ"
    nested = (got[2], pk.dynamic_map(w.device), got[3]) if double_quant else (None, None, None)
    out = backend.ops.nf4_dequantize(got[0], got[1], *nested, blocksize, dtype)
    assert torch.equal(out, R.nf4_dequantize(got[0], got[1], *nested, blocksize, dtype))


def test_ties_go_to_the_lower_code(backend):
    """A scaled value exactly on a midpoint takes the lower code; the next float up takes the upper."""
    code = R.nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    above = torch.nextafter(mids, torch.tensor(2.0))
    # blocks of 32: [midpoints..., 1.0 padding] so absmax is exactly 1 and scaled values are the inputs
    w = torch.ones(2, 32)
    w[0, :15], w[1, :15] = mids, above
    codes = backend.ops.nf4_quantize(w.to(backend.device), 32, None)[0].cpu()
    q = torch.stack([codes >> 4, codes & 15], 1).reshape(2, 32)[:, :15]
    assert q[0].tolist() == list(range(15))
    assert q[1].tolist() == list(range(1, 16))


BNB_SHAPES = [(256, 320), (1024, 1024), (11, 4096)]


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("shape", BNB_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bytes_equal_bitsandbytes(backend, dtype, shape, double_quant):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape).to(dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    codes, absmax, nested_absmax, offset = run_quantize(backend, w.to(backend.device), 64, double_quant)
    assert torch.equal(codes.cpu(), packed.reshape(-1))
    assert torch.equal(absmax.cpu(), qs.absmax)
    if double_quant:
        assert torch.equal(nested_absmax.cpu(), qs.state2.absmax)
        assert torch.equal(offset.cpu(), qs.offset)
    nested = (nested_absmax, pk.dynamic_map(backend.device), offset) if double_quant else (None, None, None)
    out = backend.ops.nf4_dequantize(codes, absmax, *nested, 64, dtype)
    assert torch.equal(out.cpu().reshape(shape), bnbf.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("blocksize", [32, 128, 1024, 4096])
def test_blocksizes_equal_bitsandbytes(blocksize):
    torch.manual_seed(blocksize)
    w = torch.randn(64, 8192, dtype=torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    q = pk.nf4_quantize(w, blocksize)
    assert torch.equal(q.codes, packed.reshape(-1)) and torch.equal(q.absmax, qs.absmax)
    assert torch.equal(q.nested_absmax, qs.state2.absmax) and torch.equal(q.offset, qs.offset)
    assert torch.equal(q.dequantize(), bnbf.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_bnb_interop(double_quant):
    torch.manual_seed(0)
    w = torch.randn(96, 640, dtype=torch.float16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    for state in (qs, qs.as_dict(packed=True)):
        q = pk.NF4Weight.from_bnb(packed, state)
        assert q.shape == w.shape and q.dtype == w.dtype and q.double_quant == double_quant
        assert torch.equal(q.dequantize(), bnbf.dequantize_4bit(packed, qs))
    ours = pk.nf4_quantize(w, 64, double_quant)
    our_packed, our_state = ours.to_bnb()
    assert sorted(our_state) == sorted(qs.as_dict(packed=True))
    back = bnbf.QuantState.from_dict(our_state, device=torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(our_packed, back), ours.dequantize())


def test_from_bnb_rejects_other_formats():
    w = torch.randn(64, 64)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_state"):
        pk.NF4Weight.from_bnb(packed, qs)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="'packed' must hold 2048 bytes"):
        pk.NF4Weight.from_bnb(packed[:100], qs)


def test_nf4weight_container():
    w = torch.randn(4096, 4096, dtype=torch.bfloat16)
    q = pk.nf4_quantize(w)
    d = q.dequantize()
    assert d.shape == w.shape and d.dtype == torch.bfloat16
    # 4 bits + 8-bit absmax per 64 + fp32 per 64*256 (+ the 1 KiB map): 4.127 bits per weight, as bnb states
    bits = 8 * q.nbytes / w.numel()
    assert 4.125 < bits < 4.128, bits
    assert 8 * pk.nf4_quantize(w, double_quant=False).nbytes / w.numel() == 4.5
    # bitsandbytes' own test of NF4 at blocksize 64 on randn: mean |error| ~0.0728, relative ~0.203
    w32 = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    err = (pk.nf4_quantize(w32).dequantize() - w32).abs()
    assert math.isclose(err.mean().item(), 0.0728, rel_tol=0.02)
    assert math.isclose((err / w32.abs().clamp(min=1e-8)).median().item(), 0.0728 / 0.36, rel_tol=0.5)
    assert q.to("cpu").dequantize().equal(d)


BAD_WEIGHTS = [
    (lambda: torch.randn(65), ValueError, "divisible by blocksize=64"),
    (lambda: torch.randn(0, 64), ValueError, "must not be empty"),
    (lambda: torch.ones(64, dtype=torch.int32), TypeError, "'weight' must be torch.float32, torch.float16 or torch.bfloat16"),
    (lambda: torch.randn(64, dtype=torch.float64), TypeError, "got Double"),
    (lambda: torch.randn(64, 128).t(), ValueError, "'weight' must be contiguous"),
    (lambda: torch.randn(256).index_fill_(0, torch.tensor([130]), float("nan")), ValueError, r"block 2 \(elements from 128\)"),
    (lambda: torch.randn(256).index_fill_(0, torch.tensor([5]), float("-inf")), ValueError, "must be finite"),
]


@pytest.mark.parametrize("make,exc,message", BAD_WEIGHTS, ids=["numel", "empty", "int", "f64", "noncontig", "nan", "inf"])
def test_bad_weight(backend, make, exc, message):
    w = make().to(backend.device)
    with pytest.raises(exc, match=message):
        backend.ops.nf4_quantize(w, 64, pk.dynamic_map(backend.device))


@pytest.mark.parametrize("blocksize", [16, 48, 8192])
def test_bad_blocksize(backend, blocksize):
    with pytest.raises(ValueError, match=f"'blocksize' must be a power of two in \\[32, 4096\\].*got {blocksize}"):
        backend.ops.nf4_quantize(torch.randn(8192, device=backend.device), blocksize, None)


def test_bad_dequantize_arguments(backend):
    q = pk.nf4_quantize(torch.randn(4, 128)).to(backend.device)
    ops, code = backend.ops, q.nested_code
    with pytest.raises(TypeError, match="'codes' must have dtype Byte"):
        ops.nf4_dequantize(q.codes.float(), q.absmax, q.nested_absmax, code, q.offset, 64, torch.float32)
    with pytest.raises(ValueError, match="'absmax' must have 8 elements"):
        ops.nf4_dequantize(q.codes, q.absmax[:3], q.nested_absmax, code, q.offset, 64, torch.float32)
    with pytest.raises(ValueError, match="must be given together"):
        ops.nf4_dequantize(q.codes, q.absmax, q.nested_absmax, None, q.offset, 64, torch.float32)
    with pytest.raises(TypeError, match="'absmax' must have dtype Float"):
        ops.nf4_dequantize(q.codes, q.absmax, None, None, None, 64, torch.float32)
    with pytest.raises(TypeError, match="'dtype' must be torch.float32"):
        ops.nf4_dequantize(q.codes, q.absmax, q.nested_absmax, code, q.offset, 64, torch.int8)
    with pytest.raises(ValueError, match="'nested_code' must have 256 elements"):
        ops.nf4_dequantize(q.codes, q.absmax, q.nested_absmax, code[:16], q.offset, 64, torch.float32)


def test_python_wrappers_reject_wrong_types():
    with pytest.raises(TypeError, match="'weight' must be a torch.Tensor, got list"):
        pk.nf4_quantize([1.0] * 64)
    with pytest.raises(TypeError, match="'q' must be an NF4Weight, got Tensor"):
        pk.nf4_dequantize(torch.zeros(4))


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
def test_opcheck(backend, double_quant):
    w = make_weight(5, 64, torch.bfloat16, seed=3, device=backend.device)
    code = pk.dynamic_map(backend.device) if double_quant else None
    torch.library.opcheck(backend.ops.nf4_quantize.default, (w, 64, code))
    codes, absmax, nested_absmax, offset = backend.ops.nf4_quantize(w, 64, code)
    nested = (nested_absmax, code, offset) if double_quant else (None, None, None)
    torch.library.opcheck(backend.ops.nf4_dequantize.default, (codes, absmax, *nested, 64, torch.bfloat16))


def test_compile_fullgraph():
    w = make_weight(9, 64, torch.float32, seed=4)
    code = pk.dynamic_map()

    def roundtrip(w):
        codes, absmax, nested_absmax, offset = torch.ops.peft_kernels.nf4_quantize(w, 64, code)
        return torch.ops.peft_kernels.nf4_dequantize(codes, absmax, nested_absmax, code, offset, 64, w.dtype)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(roundtrip, fullgraph=True)(w), roundtrip(w))
