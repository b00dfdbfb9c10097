"""kron_linear: values and gradients against the float64 reference (torch.kron, then a matmul) on every backend
(CPU kernels, the CUDA kernels through the CPU executor, CUDA when present), the Philox dropout mask, what is
saved for backward, gradcheck, opcheck, torch.compile, and bad input.

Tolerance rule: our error against the float64 reference is at most twice the error of the reference itself
run in the same low dtype, plus a small atol.
"""

from pathlib import Path

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R
from tiny_models import assert_tolerance, on_thread_counts, saved_tensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}

# (a_out, a_in, b_out, b_in): in = a_in * b_in, out = a_out * b_out.
SHAPES = {
    "768": (24, 24, 32, 32),        # 768 = 24 * 32, balanced like a BERT-base layer
    "rect": (5, 3, 7, 11),          # 33 -> 35: every factor dimension different
    "a1x1": (1, 1, 6, 4),           # A a scalar: the Kronecker product is a scaled B
    "b1x1": (3, 4, 1, 1),           # B a scalar
}
# LLaMA-7B widths, CPU kernels only: the executor runs one fiber per CUDA thread, and these reductions have
# 4096-11008 blocks of 256 threads each (minutes per case).
LARGE = {"4096": (64, 64, 64, 64), "4096->11008": (172, 64, 64, 64)}


def make(lead, shape, dtype, device="cpu", weight=True, seed=0):
    """Random operands; A, B and the base layer all non-zero so every path of the gradient is exercised."""
    a_out, a_in, b_out, b_in = shape
    n_in, n_out = a_in * b_in, a_out * b_out
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    return dict(
        x=t(*lead, n_in).requires_grad_(),
        A=t(a_out, a_in, scale=a_in**-0.5).requires_grad_(),
        B=t(b_out, b_in, scale=b_in**-0.5).requires_grad_(),
        weight=t(n_out, n_in, scale=n_in**-0.5) if weight else None,
        bias=t(n_out).requires_grad_() if weight else None,
    )


def grads_of(fn, args, dy):
    y = fn(**args)
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return [y, *torch.autograd.grad(y, leaves, dy)]


def as_f64(args):
    return {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for k, v in args.items()}


def run_ours(ops, scaling, p, seed):
    fwd = ops.kron_linear_fwd
    return lambda **a: fwd(a["x"], a["weight"], a["bias"], a["A"], a["B"], scaling, p, torch.tensor(seed))


def run_ref(scaling, p, seed):
    return lambda **a: R.kron_linear(a["x"], a["A"], a["B"], scaling, a["weight"], a["bias"], p, seed)


GRAD_NAMES = ["y", "dx", "dA", "dB", "dbias"]


def assert_matches_reference(ours, args, dy, scaling, p, seed, dtype):
    """The tolerance rule for y and every gradient of `ours` (grads_of output on `args`, `dy`)."""
    low = grads_of(run_ref(scaling, p, seed), args, dy)
    exact = grads_of(run_ref(scaling, p, seed), as_f64(args), dy.double())
    for name, o, lo, ex in zip(GRAD_NAMES, ours, low, exact):
        assert lo.dtype == dtype, name
        assert_tolerance(o, lo, ex, ATOL[dtype], name)


def check_against_reference(ops, device, shape, dtype, p, weight, lead=(3, 13), frozen=()):
    args = make(lead, shape, dtype, device, weight=weight, seed=sum(shape))
    for name in frozen:
        args[name].requires_grad_(False)
    n_out = shape[0] * shape[2]
    dy = torch.randn(*lead, n_out, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    assert_matches_reference(grads_of(run_ours(ops, 0.7, p, seed=99), args, dy), args, dy, 0.7, p, 99, dtype)


@pytest.mark.parametrize("weight", [True, False], ids=["adapter", "bare"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p25"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_values_and_grads(backend, dtype, shape, p, weight):
    if backend.name == "cudasim" and shape == SHAPES["768"] and (dtype != torch.float32 or p == 0.0 or not weight):
        pytest.skip("768 through the CPU executor once (fp32, dropout, adapter; ~5 s): the kernels are shape-generic")
    check_against_reference(backend.ops, backend.device, shape, dtype, p, weight)


# The CUDA tensor-core kernels (bf16/f16, b_in and b_out multiples of 8, factor dimensions <= 128): every 16-wide
# tile partial (a_out 5 and 37, a_in 3 and 20, b_in 40 = 16 + 16 + 8), y's 32-column chunks partial (b_out 24), one
# and three 16-row slices of U per block (1 and 3 warps), rows M = 1, 37 and 130 (the row blocks' strided share and
# the dA/dB splits of 1 row).
TC_SHAPES = {"tc-small": (5, 3, 24, 40), "tc-wide": (37, 20, 8, 16)}


@pytest.mark.parametrize("lead", [(1,), (37,), (130,)], ids=["m1", "m37", "m130"])
@pytest.mark.parametrize("shape", list(TC_SHAPES.values()), ids=list(TC_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_tensor_core_shapes(backend, dtype, shape, lead):
    if backend.name == "cpu":
        pytest.skip("the CUDA kernels' shapes (the CPU kernels take them in test_values_and_grads' sizes)")
    check_against_reference(backend.ops, backend.device, shape, dtype, 0.25, True, lead=lead)
    if lead == (37,):
        for frozen in (("A",), ("B",), ("A", "B")):  # dB without dA, dA without dB, dx alone (x not staged)
            check_against_reference(backend.ops, backend.device, shape, dtype, 0.25, False, lead=lead, frozen=frozen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(LARGE.values()), ids=list(LARGE))
def test_llama_widths_cpu(dtype, shape):
    check_against_reference(torch.ops.peft_kernels, "cpu", shape, dtype, 0.1, weight=True, lead=(3,))


# Every tile of the AVX-512 CPU paths gets a tail: rows 8 + 1 or 8 + 2 (a_out), columns 32 + 5 / 32 + 6 (b_out)
# and 32 + 13 / 32 + 14 (b_in), dot tiles 4 + 2 (a_in) with k = 16 + 16 + 5 values (b_out; 16 + 3 pairs in bf16).
# The bf16 pair products need even factor dimensions: TAILS (odd) takes the fp32 tiles even in bf16.
TAILS = (9, 6, 37, 45)
EVEN_TAILS = (10, 6, 38, 46)
# The AMX tiles need every factor dimension a multiple of 32: a_out = 96 is a 32 + 32 + 32 row split with its
# last block of C one tile high, b_out = 64 two tile columns, a_in = b_in = 32 one tile's k (in = 1024, out = 6144).
AMX_SHAPE = (96, 32, 64, 32)
HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
CPU_FLAGS = Path("/proc/cpuinfo").read_text()
HAS_AVX512_BF16 = HAS_AVX512 and "avx512_bf16" in CPU_FLAGS
HAS_AMX = HAS_AVX512_BF16 and "amx_bf16" in CPU_FLAGS and "amx_tile" in CPU_FLAGS


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p25"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ["amx", "avx512_bf16", "avx512", "avx2"], ids=["amx", "bf16-pairs", "tiles", "blas"])
def test_cpu_paths(isa, dtype, p, monkeypatch):
    """Every CPU path against the float64 reference: the AVX-512 register tiles (fp32/bf16/fp16 with factors of at
    most 64K values, on an AVX-512 CPU), their bf16 pair-product form (bf16 with even factor dimensions, on an
    AVX512-BF16 CPU), the AMX tile products (bf16 with factor dimensions multiples of 32, on an AMX CPU: AMX_SHAPE)
    and the BLAS path (other CPUs, larger factors, fp64, and whenever PEFT_KERNELS_CPU_ISA caps the instruction set
    below avx512)."""
    available = {"amx": HAS_AMX, "avx512_bf16": HAS_AVX512_BF16, "avx512": HAS_AVX512, "avx2": True}
    if not available[isa]:
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("PEFT_KERNELS_CPU_ISA", isa)
    for shape in (TAILS, EVEN_TAILS) + ((AMX_SHAPE,) if isa == "amx" else ()):
        for weight in (True, False):
            check_against_reference(torch.ops.peft_kernels, "cpu", shape, dtype, p, weight, lead=(2, 7))
        for frozen in (("A",), ("B",), ("A", "B")):  # the kernels skip the frozen factor's gradient
            check_against_reference(torch.ops.peft_kernels, "cpu", shape, dtype, p, True, lead=(2, 7), frozen=frozen)


@pytest.mark.parametrize(
    "dtype, shape, m",
    [(torch.float32, (8, 8, 32, 32), 600), (torch.bfloat16, (8, 8, 32, 32), 600), (torch.bfloat16, (32,) * 4, 150)],
    ids=["fp32", "bf16", "bf16-amx"],
)
def test_tile_paths_are_the_same_whatever_the_threads(dtype, shape, m):
    """The AVX-512 and AMX paths sum dA and dB per block of rows, then block by block: 600 rows of in = 256, or 150
    rows of in = 1024 (32 x 32 factors: the AMX path where the CPU has it), are three blocks (the last partial), run
    on 1 and 2 threads with bit-identical results. No base weight: its GEMM is oneDNN's, whose sums at these shapes
    depend on the thread count on an AMX Xeon (y and dx differed there in the last bits)."""
    if shape == (32,) * 4 and not HAS_AMX:
        pytest.skip("this CPU has no AMX")
    args = make((m,), shape, dtype, weight=False, seed=2)
    dy = torch.randn(m, shape[0] * shape[2], generator=torch.Generator().manual_seed(4)).to(dtype)
    one, two = on_thread_counts(lambda: grads_of(run_ours(torch.ops.peft_kernels, 0.7, 0.2, seed=8), args, dy))
    for name, a, b in zip(GRAD_NAMES, one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
    assert_matches_reference(one, args, dy, 0.7, 0.2, 8, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("isa", ["avx512", "avx2"], ids=["tiles", "blas"])
def test_cpu_output_is_rounded_once_to_nearest_even(isa, dtype, monkeypatch):
    """With A = [[1]] and B = I, y = s * x is one exact fp32 product per element before the final rounding:
    s = 1 + 2^-8 puts many products exactly halfway between two bf16 values. The output must be bit-identical to
    torch's own round-to-nearest-even conversion of the fp32 product."""
    if isa == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("PEFT_KERNELS_CPU_ISA", isa)
    n, s = 37, 1 + 2**-8
    x = torch.randn(24, n, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = torch.ops.peft_kernels.kron_linear_fwd(x, None, None, torch.ones(1, 1, dtype=dtype),
                                               torch.eye(n, dtype=dtype), s, 0.0, torch.tensor(0))
    expected = (x.float() * torch.tensor(s, dtype=torch.float32)).to(dtype)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))


def test_weight_grads_in_waves_match_reference_whatever_the_threads():
    """The CPU backward sums dA and dB over row blocks in waves bounded by the partials' bytes: with A 2x2 and B
    1024x1024 a block's partials are 4 MiB, so a wave is 4 blocks of 32 rows and 300 rows take three waves, the last
    partial. Gradients must match the float64 reference, and the wave sums dA, dB be bit-identical on 1 and 2
    threads. dx is no sum over blocks: one BLAS GEMM per block, whose kernel choice on an AMX Xeon varies with the
    thread count (dx differed there by 3e-6), so it is held to the reference only."""
    shape = (2, 2, 1024, 1024)
    args = make((300,), shape, torch.float32, weight=False, seed=3)  # no oneDNN GEMM: see the test above
    dy = torch.randn(300, 2048, generator=torch.Generator().manual_seed(4))
    one, two = on_thread_counts(lambda: grads_of(run_ours(torch.ops.peft_kernels, 0.7, 0.2, seed=8), args, dy))
    for name, a, b in zip(GRAD_NAMES, one, two):
        assert name == "dx" or torch.equal(a, b), f"{name} differs between 1 and 2 threads"
    assert_matches_reference(one, args, dy, 0.7, 0.2, 8, torch.float32)


@pytest.mark.parametrize("seed", [0, 12345, -7])
def test_dropout_mask_matches_reference(backend, seed):
    """With A = [[1]] and B = I, x (A ⊗ B)^T is dropout(x) itself: with x = 1 it is the scaled keep mask, which
    must be the reference's bit for bit."""
    n = 37
    x = torch.ones(5, 11, n, device=backend.device)
    y = backend.ops.kron_linear_fwd(x, None, None, torch.ones(1, 1, device=backend.device),
                                    torch.eye(n, device=backend.device), 1.0, 0.3, torch.tensor(seed))
    keep = R.dropout_keep(x.shape, 0.3, seed, backend.device)
    assert torch.equal(y != 0, keep)
    assert torch.allclose(y[keep], torch.tensor(1 / 0.7))


def test_dx_passes_through_the_forward_mask(backend):
    """Without a base weight, dx is the Kronecker branch's alone: zero exactly where forward dropped x."""
    args = make((4, 9), SHAPES["rect"], torch.float32, backend.device, weight=False)
    y = run_ours(backend.ops, 1.0, 0.5, seed=5)(**args)
    (dx,) = torch.autograd.grad(y, [args["x"]], torch.ones_like(y))
    assert torch.equal(dx != 0, R.dropout_keep(args["x"].shape, 0.5, 5, backend.device))


@pytest.mark.parametrize("weight", [True, False], ids=["adapter", "bare"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p, weight):
    args = make((2, 3), (3, 2, 2, 5), torch.float64, weight=weight)
    fn = run_ours(torch.ops.peft_kernels, 0.9, p, seed=3)
    frozen = args["weight"]
    assert torch.autograd.gradcheck(lambda x, A, B: fn(x=x, weight=frozen, bias=args["bias"], A=A, B=B),
                                    (args["x"], args["A"], args["B"]))
    if weight:
        assert torch.autograd.gradcheck(lambda b: fn(x=args["x"], weight=frozen, bias=b, A=args["A"], B=args["B"]),
                                        (args["bias"],))


@pytest.mark.parametrize("train", ["both", "B", "none"])
def test_saved_for_backward(train):
    """The only activation saved is x itself (no copy, no mask, no A x or kron(A, B)), and none at all when
    neither factor trains."""
    args = make((8, 16), SHAPES["rect"], torch.float32)
    args["A"].requires_grad_(train == "both")
    args["B"].requires_grad_(train != "none")
    _, saved = saved_tensors(lambda: pk.kron_linear(args["x"], args["A"], args["B"], 0.5, args["weight"],
                                                    args["bias"], dropout_p=0.2, seed=1))
    params = {args[k].data_ptr() for k in ("weight", "A", "B")}
    activations = [t for t in saved if t is not None and t.data_ptr() not in params and t.numel() > 1]
    if train == "none":
        assert activations == []
    else:
        assert [t.data_ptr() for t in activations] == [args["x"].data_ptr()], [t.shape for t in activations]


def test_frozen_weight_is_enforced():
    args = make((4,), SHAPES["rect"], torch.float32)
    args["weight"].requires_grad_(True)
    with pytest.raises(ValueError, match="'weight' is the frozen base weight"):
        pk.kron_linear(args["x"], args["A"], args["B"], 1.0, args["weight"], args["bias"])


def test_empty_batch_and_strided_x(backend):
    args = make((0,), SHAPES["rect"], torch.float32, backend.device)
    y = run_ours(backend.ops, 1.0, 0.0, 0)(**args)
    assert y.shape == (0, 35)
    grads = torch.autograd.grad(y, [args["A"], args["B"]], torch.ones_like(y))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # A transposed activation (its rows are not contiguous) gives the same result as a contiguous copy.
    x = torch.randn(33, 6, device=backend.device).t()
    args = make((6,), SHAPES["rect"], torch.float32, backend.device)
    ours = backend.ops.kron_linear_fwd(x, args["weight"], None, args["A"].detach(), args["B"].detach(), 1.0, 0.0,
                                       torch.tensor(0))
    assert torch.allclose(ours, R.kron_linear(x, args["A"], args["B"], 1.0, args["weight"]), atol=1e-5)


BAD = [
    (dict(A=torch.randn(5, 4)), ValueError, r"'x' must have last dimension in = a_in \* b_in = 4 \* 11 = 44"),
    (dict(B=torch.randn(7, 10)), ValueError, r"'x' must have last dimension in = a_in \* b_in = 3 \* 10 = 30"),
    (dict(A=torch.randn(15)), ValueError, r"'A' must be a non-empty 2-D factor \[a_out, a_in\]"),
    (dict(B=torch.randn(0, 11)), ValueError, r"'B' must be a non-empty 2-D factor \[b_out, b_in\]"),
    (dict(weight=torch.randn(36, 33)), ValueError, r"'weight' must be \[out = a_out \* b_out = 35, in = a_in \* b_in = 33\]"),
    (dict(bias=torch.randn(34)), ValueError, "'bias' must have 35 elements"),
    (dict(A=torch.randn(5, 3, dtype=torch.float64)), TypeError, "'A' must have dtype Float"),
    (dict(weight=torch.randn(35, 33, dtype=torch.bfloat16)), TypeError, "'weight' must have dtype Float"),
    (dict(x=torch.randint(0, 3, (4, 33))), TypeError, "'x' must be torch.float32"),
    (dict(dropout_p=1.0), ValueError, r"'dropout_p' must be in \[0, 1\)"),
    (dict(seed=torch.tensor(1.5)), ValueError, "'seed' must be a one-element int64 tensor"),
]
BAD_IDS = ["A-in", "B-in", "A-1d", "B-empty", "weight", "bias", "A-dtype", "weight-dtype", "int-x", "p1", "seed"]


@pytest.mark.parametrize("change,exc,message", BAD, ids=BAD_IDS)
def test_bad_input(backend, change, exc, message):
    args = dict(x=torch.randn(4, 33), weight=torch.randn(35, 33), bias=torch.randn(35), A=torch.randn(5, 3),
                B=torch.randn(7, 11), scaling=1.0, dropout_p=0.1, seed=torch.tensor(0))
    args.update(change)
    args = {k: v.to(backend.device) if isinstance(v, torch.Tensor) and k != "seed" else v for k, v in args.items()}
    with pytest.raises(exc, match=message):
        backend.ops.kron_linear_fwd(*args.values())


def test_bad_backward_input(backend):
    dy, A, B = torch.randn(4, 35), torch.randn(5, 3), torch.randn(7, 11)
    with pytest.raises(ValueError, match=r"'dy' must have last dimension out = a_out \* b_out = 5 \* 7 = 35"):
        backend.ops.kron_linear_bwd(torch.randn(4, 34), None, None, A, B, 1.0, 0.0, torch.tensor(0),
                                    True, False, False, False)
    with pytest.raises(ValueError, match="'x' \\(saved input\\) must have 4 rows of in = 33"):
        backend.ops.kron_linear_bwd(dy, None, None, A, B, 1.0, 0.0, torch.tensor(0), False, True, False, False)


@pytest.mark.parametrize("weight", [True, False], ids=["adapter", "bare"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(backend, p, weight):
    args = make((3, 5), SHAPES["rect"], torch.float32, backend.device, weight=weight)
    x, A, B, w, b = args["x"], args["A"], args["B"], args["weight"], args["bias"]
    torch.library.opcheck(backend.ops.kron_linear_fwd.default, (x, w, b, A, B, 0.5, p, torch.tensor(7)))
    dy = torch.randn(3, 5, 35, device=backend.device)
    torch.library.opcheck(backend.ops.kron_linear_bwd.default,
                          (dy, x.detach(), w, A.detach(), B.detach(), 0.5, p, torch.tensor(7), True, True, True, weight))


def test_compile_fullgraph():
    module = pk.nn.KronALinear.from_linear(torch.nn.Linear(24, 35), a_shape=(5, 3))
    torch.nn.init.normal_(module.A)
    x = torch.randn(2, 7, 24, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    y_eager, y_compiled = module(x), compiled(x)
    assert torch.allclose(y_eager, y_compiled, atol=1e-6)
    g_eager = torch.autograd.grad(y_eager.sum(), [x, module.A, module.B])
    g_compiled = torch.autograd.grad(y_compiled.sum(), [x, module.A, module.B])
    for a, b in zip(g_eager, g_compiled):
        assert torch.allclose(a, b, atol=1e-5)


# ---- KronALinear -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_wraps_linear_without_copy(dtype):
    linear = torch.nn.Linear(768, 3072).to(dtype)
    module = pk.nn.KronALinear.from_linear(linear, scaling=2.0, dropout=0.1)
    assert module.weight.data_ptr() == linear.weight.data_ptr() and not module.weight.requires_grad
    assert (module.a_shape, module.b_shape) == ((48, 24), (64, 32))  # 3072 = 48 * 64, 768 = 24 * 32
    assert module.A.dtype == dtype and module.B.dtype == dtype
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {"A", "B"}
    x = torch.randn(2, 3, 768).to(dtype)
    module.eval()
    assert torch.equal(module(x), linear(x))  # A = 0: a fresh adapter is the base layer


def test_factor_shapes_follow_peft_lokr():
    """Our default factorization is PEFT LoKr's (so saved adapters map onto PEFT's layers), for any factor."""
    from peft.tuners.lokr.layer import factorization

    for dim in [1, 2, 12, 30, 64, 127, 768, 1024, 4096, 11008]:
        for factor in [-1, 2, 4, 5, 16, 64]:
            assert pk.nn.krona.factorize(dim, factor) == factorization(dim, factor), (dim, factor)


def test_module_factor_shapes_and_errors():
    shapes = lambda *a, **k: pk.nn.KronALinear(*a, **k, device="meta")  # noqa: E731
    assert (shapes(4096, 11008).a_shape, shapes(4096, 11008).b_shape) == ((86, 64), (128, 64))
    assert shapes(4096, 11008, a_shape=(172, 64)).b_shape == (64, 64)
    assert shapes(4096, 11008, b_shape=(64, 64)).a_shape == (172, 64)
    with pytest.raises(ValueError, match=r"a_shape \(5, 64\) does not divide the layer \(11008 x 4096\): a_out \* b_out "
                                         r"must be out_features=11008 \(a_out in \[1, 2, 4, "):
        shapes(4096, 11008, a_shape=(5, 64))
    with pytest.raises(ValueError, match=r"a_shape \(172, 64\) and b_shape \(64, 32\) do not multiply .* b_shape must "
                                         r"be \(64, 64\)"):
        shapes(4096, 11008, a_shape=(172, 64), b_shape=(64, 32))
    with pytest.raises(ValueError, match=r"cannot factor in_features=127 .*\(a_in in \[1, 127\]"):
        shapes(127, 64)
    assert shapes(127, 64, a_shape=(8, 1)).b_shape == (8, 127)
    with pytest.raises(ValueError, match=r"'b_shape' must be a pair of ints >= 1, got \(0, 4\)"):
        shapes(64, 64, b_shape=(0, 4))
    with pytest.raises(ValueError, match=r"residual=True .* in_features must equal out_features, got 64 -> 32"):
        shapes(64, 32, residual=True)
    with pytest.raises(ValueError, match=r"'dropout' must be in \[0, 1\), got 1.5"):
        shapes(64, 64, dropout=1.5)
    with pytest.raises(TypeError, match="must be an nn.Linear, got Conv1d"):
        pk.nn.KronALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_module_forward_is_the_reference():
    torch.manual_seed(0)
    module = pk.nn.KronALinear.from_linear(torch.nn.Linear(768, 768), scaling=0.5, residual=True)
    torch.nn.init.normal_(module.A)
    with torch.no_grad():
        module.res_scale.fill_(0.25)
    x = torch.randn(5, 768)
    want = R.kron_linear(x.double(), module.A.double(), module.B.double(), 0.5, module.weight.double(),
                         module.bias.double()) + 0.25 * x.double()
    assert torch.allclose(module(x).double(), want, atol=1e-4)
    (g,) = torch.autograd.grad(module(x).sum(), [module.res_scale])
    assert torch.allclose(g.double(), x.double().sum(), rtol=1e-4)


@pytest.mark.parametrize("residual", [False, True], ids=["krona", "krona-res"])
def test_module_train_eval_and_merge(residual):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 48)
    w0 = linear.weight.detach().clone()
    module = pk.nn.KronALinear.from_linear(linear, a_shape=(4, 6), scaling=0.5, dropout=0.5, residual=residual)
    torch.nn.init.normal_(module.A)
    if residual:
        torch.nn.init.normal_(module.res_scale)
    x = torch.randn(6, 48)
    assert not torch.equal(module(x), module(x))  # training: a fresh dropout mask per call
    module.eval()
    y = module(x)
    assert torch.equal(y, module(x))
    module.merge()
    assert module.merged and torch.allclose(module(x), y, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        module.merge()
    module.unmerge()
    assert (module.weight - w0).abs().max().item() <= 1e-6
    assert torch.allclose(module(x), y, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        module.unmerge()


# ---- PHMLinear: PHM and Compacter layers on kron_linear ----------------------------------------------------


@pytest.mark.parametrize("rank", [None, 2], ids=["phm", "compacter"])
def test_phm_values_and_grads_match_the_materialized_sum(rank):
    torch.manual_seed(0)
    layer = pk.nn.PHMLinear(24, 36, n=4, rank=rank).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    factors = [layer.B] if rank is None else [layer.s, layer.t]
    leaves = [x, layer.A, *factors, layer.bias]
    b = layer.B if rank is None else layer.s @ layer.t
    w = sum(torch.kron(layer.A[i], b[i]) for i in range(4))
    y, ref = layer(x), x @ w.t() + layer.bias
    assert torch.allclose(y, ref, atol=1e-12)
    dy = torch.randn_like(y)
    for name, g, g_ref in zip(["x", "A", *("B" if rank is None else "st"), "bias"],
                              torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        assert torch.allclose(g, g_ref, atol=1e-12), name
    assert torch.allclose(layer.weight().double(), w.detach(), atol=1e-6)


def test_compacter_shares_A_between_layers():
    shared = pk.nn.PHMLinear.shared_factors(4)
    down = pk.nn.PHMLinear(32, 8, n=4, rank=1, shared_A=shared)
    up = pk.nn.PHMLinear(8, 32, n=4, rank=1, shared_A=shared)
    adapter = torch.nn.Sequential(down, up)
    assert down.A is up.A is shared
    # A once (4^3), down s [4, 2, 1] t [4, 1, 8] bias 8, up s [4, 8, 1] t [4, 1, 2] bias 32
    assert sum(p.numel() for p in adapter.parameters()) == 64 + (8 + 32 + 8) + (32 + 8 + 32)
    x = torch.randn(3, 32)
    (g,) = torch.autograd.grad(adapter(x).square().sum(), [shared])
    assert g.abs().sum() > 0


def test_phm_bad_arguments():
    with pytest.raises(ValueError, match=r"'n' must divide in_features=24 and out_features=36 \(one of \[1, 2, 3, 4, 6, "
                                         r"12\]\), got 5"):
        pk.nn.PHMLinear(24, 36, n=5)
    with pytest.raises(ValueError, match=r"'shared_A' must be \[n, n, n\] = \[4, 4, 4\], got \[3, 3, 3\]"):
        pk.nn.PHMLinear(24, 36, n=4, shared_A=pk.nn.PHMLinear.shared_factors(3))
    with pytest.raises(ValueError, match="'rank' must be None"):
        pk.nn.PHMLinear(24, 36, n=4, rank=0)
