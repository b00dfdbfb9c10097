"""Property-based tests (hypothesis) of every op against peft_kernels.reference, on the CPU kernels and on the
CUDA kernels run by the CPU executor: shapes (empty batches included), dtypes, ranks, block sizes, dropout,
seeds over all of int64, with and without bias and double quantization, and non-contiguous operands.

Tolerance rule (as the other op tests): our error against the float64 reference is at most twice the error of
the reference run in the same low dtype, plus a small atol, here scaled by the output's magnitude (when above
1): on a few large elements the low-dtype reference can round luckily close (found: a one-element fp16 dx of
14.36, reference 0.3 ulp off, ours 1.3 ulp). NF4 quantization and dequantization are exact.

Examples are derandomized (the same ones every CI run; a failure prints its reproduction); sized so the file
runs in ~30 s on 2 cores. HYPOTHESIS_PROFILE=explore draws fresh random examples, 10x as many.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peft_kernels as pk
from peft_kernels import reference as R

from conftest import INFO
from tiny_models import assert_tolerance

settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", database=None, deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
EXAMPLES = 500 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else 40

NAMESPACES = {"cpu": torch.ops.peft_kernels}
if INFO["cudasim"]:
    NAMESPACES["cudasim"] = torch.ops.peft_kernels_sim
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def check(ours, low, exact, dtype, what):
    assert_tolerance(ours, low, exact, ATOL[dtype] * max(1.0, exact.abs().max().item() if exact.numel() else 0.0), what)


def operand(draw, shape, dtype, g, scale=1.0):
    """A random tensor of ``shape``, contiguous or not: the transpose of a contiguous one, or every other
    column of one twice as wide."""
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if len(shape) < 2 or layout == "contiguous":
        return (torch.randn(shape, generator=g) * scale).to(dtype)
    if layout == "transposed":
        return (torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g) * scale).to(dtype).transpose(-1, -2)
    return (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * scale).to(dtype)[..., ::2]


def results(fn, leaves, dy):
    """y and the gradients of every leaf, for ``fn`` run on copies of ``leaves`` (None stays None)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in leaves]
    y = fn(*leaves)
    needed = [t for t in leaves if t is not None]
    return [y, *torch.autograd.grad(y, needed, dy.to(y.dtype))]


def as_f64(leaves):
    return [None if t is None else t.detach().double() for t in leaves]


@st.composite
def lora_cases(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    n_in, n_out, r = draw(st.integers(1, 70)), draw(st.integers(1, 40)), draw(st.integers(1, 12))
    x = operand(draw, (*lead, n_in), dtype, g)
    weight = operand(draw, (n_out, n_in), dtype, g, n_in**-0.5)
    bias = operand(draw, (n_out,), dtype, g) if draw(st.booleans()) else None
    lora_A = operand(draw, (r, n_in), dtype, g, n_in**-0.5)
    lora_B = operand(draw, (n_out, r), dtype, g, r**-0.5)
    dy = torch.randn(*lead, n_out, generator=g)
    p = draw(st.sampled_from([0.0, 0.1, 0.5]))
    return dict(dtype=dtype, x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, dy=dy, p=p,
                seed=draw(st.integers(-(2**63), 2**63 - 1)), scaling=draw(st.floats(0.1, 4.0)),
                backend=draw(st.sampled_from(sorted(NAMESPACES))))


@settings(max_examples=EXAMPLES)
@given(lora_cases())
def test_lora_linear(case):
    ops, w, p, seed, scaling = NAMESPACES[case["backend"]], case["weight"], case["p"], case["seed"], case["scaling"]
    leaves = [case["x"], case["bias"], case["lora_A"], case["lora_B"]]

    def ours(x, bias, a, b):
        return ops.lora_linear_fwd(x, w, bias, a, b, scaling, p, torch.tensor(seed))[0]

    def ref(x, bias, a, b):
        return R.lora_linear(x, w.to(x.dtype), bias, a, b, scaling, p, seed)

    names = ["y", "dx"] + (["dbias"] if case["bias"] is not None else []) + ["dA", "dB"]
    for name, o, lo, ex in zip(names, results(ours, leaves, case["dy"]), results(ref, leaves, case["dy"]),
                               results(ref, as_f64(leaves), case["dy"].double())):
        check(o, lo, ex, case["dtype"], name)


@st.composite
def nf4_weights(draw, max_numel=1 << 15):
    """A weight whose numel is a multiple of the block size, with blocks of very different magnitudes (1e-4 to
    1e4), some all zero, some constant (every value on the block's absmax)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    blocksize = 2 ** draw(st.integers(5, 12))
    nblocks = draw(st.integers(1, max(1, max_numel // blocksize)))
    blocks = torch.randn(nblocks, blocksize, generator=g)
    blocks *= 10.0 ** (torch.rand(nblocks, 1, generator=g) * 8 - 4)
    kind = torch.rand(nblocks, 1, generator=g)
    blocks = torch.where(kind < 0.05, 0.0, torch.where(kind < 0.1, blocks[:, :1], blocks))
    numel = nblocks * blocksize
    rows = draw(st.sampled_from([d for d in (1, 2, 3, 4, 8) if numel % d == 0]))
    dtype = draw(st.sampled_from(DTYPES))
    return blocks.reshape(rows, numel // rows).to(dtype), blocksize


@settings(max_examples=EXAMPLES)
@given(nf4_weights(), st.booleans(), st.sampled_from(sorted(NAMESPACES)))
def test_nf4_quantize_dequantize_exact(weight_and_blocksize, double_quant, backend):
    """Every byte of the quantized weight, and every element of its dequantization, equals the reference's."""
    weight, blocksize = weight_and_blocksize
    ops = NAMESPACES[backend]
    nested_code = pk.dynamic_map() if double_quant else None
    ours = ops.nf4_quantize(weight, blocksize, nested_code)
    want = R.nf4_quantize(weight, blocksize, nested_code)
    for name, o, w in zip(["codes", "absmax", "nested_absmax", "offset"], ours, want):
        if double_quant or name in ("codes", "absmax"):
            assert torch.equal(o, w), name
    codes, absmax, nested_absmax, offset = want
    parts = (codes, absmax, nested_absmax, nested_code, offset) if double_quant else (codes, absmax, None, None, None)
    assert torch.equal(ops.nf4_dequantize(*parts, blocksize, weight.dtype), R.nf4_dequantize(*parts, blocksize, weight.dtype))


@st.composite
def nf4_linear_cases(draw, lora):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    blocksize = 2 ** draw(st.integers(5, 8))
    n_in = draw(st.integers(1, 160))
    # out a multiple of blocksize / gcd(in, blocksize), so that out * in fills whole blocks.
    step = blocksize // math.gcd(n_in, blocksize)
    n_out = step * draw(st.integers(1, max(1, 48 // step)))
    w = torch.randn(n_out, n_in, generator=g) * n_in**-0.5
    q = pk.nf4_quantize(w, blocksize, draw(st.booleans()))
    rows = draw(st.sampled_from([0, 1, 5, 16, 17, 40]))  # GEMV up to 16 rows, tiled above
    lead = (rows,) if draw(st.booleans()) else (1, rows)
    case = dict(dtype=dtype, q=q, x=operand(draw, (*lead, n_in), dtype, g), dy=torch.randn(*lead, n_out, generator=g),
                bias=operand(draw, (n_out,), dtype, g) if draw(st.booleans()) else None,
                workspace_rows=draw(st.sampled_from([1, 3, 1000])), backend=draw(st.sampled_from(sorted(NAMESPACES))))
    if lora:
        r = draw(st.integers(1, 8))
        case.update(lora_A=operand(draw, (r, n_in), dtype, g, n_in**-0.5), lora_B=operand(draw, (n_out, r), dtype, g, r**-0.5),
                    p=draw(st.sampled_from([0.0, 0.25])), seed=draw(st.integers(-(2**63), 2**63 - 1)))
    return case


def with_workspace(case, fn):
    """Runs ``fn`` with a tile workspace of ``workspace_rows`` rows of W (1 or 3: tiles start mid-block)."""
    row_bytes = case["q"].shape[1] * torch.finfo(case["dtype"]).bits // 8
    os.environ["PEFT_KERNELS_NF4_WORKSPACE_BYTES"] = str(case["workspace_rows"] * row_bytes)
    try:
        return fn()
    finally:
        del os.environ["PEFT_KERNELS_NF4_WORKSPACE_BYTES"]


@settings(max_examples=EXAMPLES)
@given(nf4_linear_cases(lora=False))
def test_nf4_linear(case):
    ops, q = NAMESPACES[case["backend"]], case["q"]
    leaves = [case["x"], case["bias"]]

    def ours(x, bias):
        return ops.nf4_linear(x, q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, q.shape[0], bias)

    def ref(x, bias):
        return R.nf4_linear(x, q, bias)

    names = ["y", "dx"] + (["dbias"] if case["bias"] is not None else [])
    got = with_workspace(case, lambda: results(ours, leaves, case["dy"]))
    for name, o, lo, ex in zip(names, got, results(ref, leaves, case["dy"]),
                               results(ref, as_f64(leaves), case["dy"].double())):
        check(o, lo, ex, case["dtype"], name)


@settings(max_examples=EXAMPLES)
@given(nf4_linear_cases(lora=True))
def test_qlora_linear(case):
    ops, q, p, seed = NAMESPACES[case["backend"]], case["q"], case["p"], case["seed"]
    leaves = [case["x"], case["bias"], case["lora_A"], case["lora_B"]]

    def ours(x, bias, a, b):
        return ops.qlora_linear_fwd(x, q.codes, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize,
                                    q.shape[0], bias, a, b, 0.7, p, torch.tensor(seed))[0]

    def ref(x, bias, a, b):
        return R.qlora_linear(x, q, bias, a, b, 0.7, p, seed)

    names = ["y", "dx"] + (["dbias"] if case["bias"] is not None else []) + ["dA", "dB"]
    got = with_workspace(case, lambda: results(ours, leaves, case["dy"]))
    for name, o, lo, ex in zip(names, got, results(ref, leaves, case["dy"]),
                               results(ref, as_f64(leaves), case["dy"].double())):
        check(o, lo, ex, case["dtype"], name)


@pytest.mark.parametrize("op", ["lora", "nf4", "qlora"])
def test_nan_and_inf_propagate_like_the_reference(op):
    """NaN/Inf in x are not errors for the linear ops (nn.Linear's behaviour, and checking every activation
    would cost a pass over x): they reach exactly the output rows the reference's reach, and the other rows
    are the reference's values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 64, generator=g)
    x[3, 5], x[11, 0], x[17, 63] = float("nan"), float("inf"), -float("inf")
    q = pk.nf4_quantize(torch.randn(32, 64, generator=g) * 0.125)
    w, a, b = pk.nf4_dequantize(q), torch.randn(4, 64, generator=g) * 0.125, torch.randn(32, 4, generator=g) * 0.5
    ours, want = {
        "lora": (lambda: pk.lora_linear(x, w, None, a, b, 1.0, 0.2, seed=3), lambda: R.lora_linear(x, w, None, a, b, 1.0, 0.2, 3)),
        "nf4": (lambda: pk.nf4_linear(x, q), lambda: R.nf4_linear(x, q)),
        "qlora": (lambda: pk.qlora_linear(x, q, None, a, b, 1.0, 0.2, seed=3), lambda: R.qlora_linear(x, q, None, a, b, 1.0, 0.2, 3)),
    }[op]
    y, ref = ours(), want()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(y), finite) and not finite[[3, 11, 17]].any()
    assert torch.allclose(y[finite], ref[finite], atol=1e-5)


@st.composite
def kron_cases(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    a_out, a_in, b_out, b_in = (draw(st.integers(1, 7)) for _ in range(4))
    n_in, n_out = a_in * b_in, a_out * b_out
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    with_base = draw(st.booleans())
    return dict(dtype=dtype, x=operand(draw, (*lead, n_in), dtype, g),
                weight=operand(draw, (n_out, n_in), dtype, g, n_in**-0.5) if with_base else None,
                bias=operand(draw, (n_out,), dtype, g) if with_base and draw(st.booleans()) else None,
                A=operand(draw, (a_out, a_in), dtype, g, a_in**-0.5), B=operand(draw, (b_out, b_in), dtype, g, b_in**-0.5),
                dy=torch.randn(*lead, n_out, generator=g), p=draw(st.sampled_from([0.0, 0.1, 0.5])),
                seed=draw(st.integers(-(2**63), 2**63 - 1)), scaling=draw(st.floats(0.1, 4.0)),
                backend=draw(st.sampled_from(sorted(NAMESPACES))))


@settings(max_examples=EXAMPLES)
@given(kron_cases())
def test_kron_linear(case):
    ops, w, p, seed, scaling = NAMESPACES[case["backend"]], case["weight"], case["p"], case["seed"], case["scaling"]
    leaves = [case["x"], case["bias"], case["A"], case["B"]]

    def ours(x, bias, a, b):
        return ops.kron_linear_fwd(x, w, bias, a, b, scaling, p, torch.tensor(seed))

    def ref(x, bias, a, b):
        return R.kron_linear(x, a, b, scaling, None if w is None else w.to(x.dtype), bias, p, seed)

    names = ["y", "dx"] + (["dbias"] if case["bias"] is not None else []) + ["dA", "dB"]
    for name, o, lo, ex in zip(names, results(ours, leaves, case["dy"]), results(ref, leaves, case["dy"]),
                               results(ref, as_f64(leaves), case["dy"].double())):
        check(o, lo, ex, case["dtype"], name)


@st.composite
def sparse_step_cases(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    numel = draw(st.integers(1, 600))
    k = draw(st.integers(1, numel))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return dict(param=torch.randn(numel, generator=g), grads=torch.randn(3, numel, generator=g),
                indices=torch.randperm(numel, generator=g)[:k].sort().values.to(index_dtype),
                child_p=draw(st.sampled_from([1.0, 0.5])), seed=draw(st.integers(0, 2**63 - 1)),
                weight_decay=draw(st.sampled_from([0.0, 0.1])), backend=draw(st.sampled_from(sorted(NAMESPACES))))


@settings(max_examples=EXAMPLES)
@given(sparse_step_cases())
def test_masked_adamw_step(case):
    """Three fp32 steps: parameters and state equal the reference bit for bit, and entries outside the
    selection never change."""
    ops, idx = NAMESPACES[case["backend"]], case["indices"]
    ours, want = case["param"].clone(), case["param"].clone()
    k = idx.numel()
    m, v, m_ref, v_ref = torch.zeros(k), torch.zeros(k), torch.zeros(k), torch.zeros(k)
    for step, grad in enumerate(case["grads"], 1):
        ops.masked_adamw_step_(ours, grad, idx, m, v, None, step, 1e-2, 0.9, 0.999, 1e-8, case["weight_decay"],
                               case["child_p"], case["seed"])
        R.masked_adamw_step_(want, grad, idx.long(), m_ref, v_ref, None, step, 1e-2, 0.9, 0.999, 1e-8,
                             case["weight_decay"], case["child_p"], case["seed"])
    assert torch.equal(ours, want) and torch.equal(m, m_ref) and torch.equal(v, v_ref)
    outside = torch.ones_like(ours, dtype=torch.bool)
    outside[idx.long()] = False
    assert torch.equal(ours[outside], case["param"][outside])
