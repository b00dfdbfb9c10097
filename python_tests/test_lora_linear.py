"""lora_linear: values and gradients against the float64 reference on every backend (CPU kernels, the CUDA
kernels through the CPU executor, CUDA when present), the Philox dropout mask, what is saved for backward,
gradcheck, opcheck, torch.compile, and bad input.

Tolerance rule: our error against the float64 reference is at most twice the error of the reference itself
run in the same low dtype, plus a small atol.
"""

import itertools
from pathlib import Path

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R
from tiny_models import assert_tolerance, on_thread_counts, saved_tensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make(lead, n_in, n_out, r, dtype, device="cpu", bias=True, seed=0):
    """Random operands (A and B both non-zero so every path of the gradient is exercised)."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    return dict(
        x=t(*lead, n_in).requires_grad_(),
        weight=t(n_out, n_in, scale=n_in**-0.5),
        bias=t(n_out).requires_grad_() if bias else None,
        lora_A=t(r, n_in, scale=n_in**-0.5).requires_grad_(),
        lora_B=t(n_out, r, scale=r**-0.5).requires_grad_(),
    )


def grads_of(fn, args, dy):
    y = fn(**args)
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return [y, *torch.autograd.grad(y, leaves, dy)]


def as_f64(args):
    return {k: None if v is None else v.detach().double().requires_grad_(v.requires_grad) for k, v in args.items()}


def run_ours(ops, scaling, p, seed):
    fwd = ops.lora_linear_fwd
    return lambda **a: fwd(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], scaling, p, torch.tensor(seed))[0]


def run_ref(scaling, p, seed):
    return lambda **a: R.lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], scaling, p, seed)


GRAD_NAMES = ["y", "dx", "dbias", "dA", "dB"]


def assert_matches_reference(ours, args, dy, scaling, p, seed, dtype):
    """The tolerance rule for y and every gradient of `ours` (grads_of output on `args`, `dy`)."""
    low = grads_of(run_ref(scaling, p, seed), args, dy)
    exact = grads_of(run_ref(scaling, p, seed), as_f64(args), dy.double())
    for name, o, lo, ex in zip(GRAD_NAMES, ours, low, exact):
        assert lo.dtype == dtype, name
        assert_tolerance(o, lo, ex, ATOL[dtype], name)


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p25"])
@pytest.mark.parametrize("r", [1, 7, 16, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_values_and_grads(backend, dtype, r, p):
    if backend.name == "cudasim" and r == 128 and dtype != torch.float32:
        pytest.skip("r=128 through the CPU executor once (fp32) is enough: the kernels are dtype-generic")
    args = make((3, 13), 67, 45, r, dtype, backend.device, seed=r)
    dy = torch.randn(3, 13, 45, generator=torch.Generator().manual_seed(1)).to(dtype).to(backend.device)
    assert_matches_reference(grads_of(run_ours(backend.ops, 0.7, p, seed=99), args, dy), args, dy, 0.7, p, 99, dtype)


# Shapes for the GPU kernels' tiles (lead dims, in, r): 1 row (one partial 16-row down block, one dA stage); 37 rows of
# in = 67 (rows not 16-byte multiples: the element-wise staging; Philox groups straddle rows); 130 rows of in = 200
# (16-byte rows: cp.async; dx tiles of 128 and 72 columns; two dA splits of 128 rows and 2; 24 ranks, a partial
# 16-rank step); 2 x 65 rows with r = 70 (two rank chunks of 64 and 6 in every kernel); 8449 rows (the 32-row down
# blocks from 8448 rows on, the last with one row; 67 dA splits).
TC_SHAPES = [((1,), 200, 24), ((37,), 67, 5), ((130,), 200, 24), ((2, 65), 136, 70), ((8449,), 40, 24)]


@pytest.mark.parametrize("shape", TC_SHAPES, ids=["m1", "m37-in67", "m130-in200", "m130-r70", "m8449"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_kernel_shapes(backend, dtype, shape):
    """The dropout kernels at shapes that make every tile of the GPU kernels partial (tensor cores for bf16/fp16,
    CUDA cores for fp32): y and every gradient within the tolerance rule."""
    if backend.name == "cpu":
        pytest.skip("the CPU kernels are covered by test_cpu_dropout_paths")
    lead, n_in, r = shape
    args = make(lead, n_in, 45, r, dtype, backend.device, seed=n_in + r)
    dy = torch.randn(*lead, 45, generator=torch.Generator().manual_seed(4)).to(dtype).to(backend.device)
    assert_matches_reference(grads_of(run_ours(backend.ops, 0.7, 0.25, seed=11), args, dy), args, dy, 0.7, 0.25, 11,
                             dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_backward_in_waves_matches_reference_whatever_the_threads(dtype):
    """The CPU dropout backward sums dA in waves of row blocks (16 blocks of 16 rows at in=4096, r=64): 600 rows
    take three waves, the last one partial. Every output must match the float64 reference, and dA be bit-identical
    on 1 and 2 threads (per-thread partial sums would not be). The other outputs go through oneDNN's GEMMs (the base
    layer, the rank-r update of y, dB), whose sums vary with the thread count on an AMX Xeon: y differed there.
    bf16 runs the pair products where the CPU has them."""
    args = make((600,), 4096, 33, 64, dtype, seed=5)
    dy = torch.randn(600, 33, generator=torch.Generator().manual_seed(2)).to(dtype)
    one, two = on_thread_counts(lambda: grads_of(run_ours(torch.ops.peft_kernels, 0.5, 0.3, seed=4), args, dy))
    one_da, two_da = (grads[GRAD_NAMES.index("dA")] for grads in (one, two))
    assert torch.equal(one_da, two_da), "dA differs between 1 and 2 threads"
    assert_matches_reference(one, args, dy, 0.5, 0.3, 4, dtype)


HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
CPU_FLAGS = Path("/proc/cpuinfo").read_text()
HAS_AVX512_BF16 = HAS_AVX512 and "avx512_bf16" in CPU_FLAGS
HAS_AMX = HAS_AVX512_BF16 and "amx_bf16" in CPU_FLAGS and "amx_tile" in CPU_FLAGS


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ["amx", "avx512_bf16", "avx512", "avx2"], ids=["amx", "bf16-pairs", "tiles", "blas"])
def test_cpu_dropout_paths(isa, dtype, monkeypatch):
    """Every CPU path of the dropout kernels: the AVX-512 register tiles (fp32/bf16/fp16 on an AVX-512 CPU), their
    bf16 pair-product form (bf16 with even in and r, on an AVX512-BF16 CPU), its AMX tile products (r a multiple of
    16, in and out of 32, on an AMX CPU) and the BLAS path (other CPUs, fp64, PEFT_KERNELS_CPU_ISA below avx512).
    in = 67, r = 19 and in = 66, r = 18 give every tile a tail, 55 rows an odd block (a row paired with zeros; on
    AMX 48 rows of tiles and 7 of pair products; r = 16 pads dx's k, r = 32 does not; in = 1024 makes blocks of 64
    rows, whose dA is a tile product, and a last block of 16 on pair products); out = 46 lets the bf16 pair path
    compute dy B itself, out = 45 makes it take dy B from the BLAS; then the mask, bit for bit, on row lengths
    (37, 38) that start rows mid-group."""
    available = {"amx": HAS_AMX, "avx512_bf16": HAS_AVX512_BF16, "avx512": HAS_AVX512, "avx2": True}
    if not available[isa]:
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("PEFT_KERNELS_CPU_ISA", isa)
    shapes = [(67, 19, 45, (5, 11)), (66, 18, 45, (5, 11)), (66, 18, 46, (5, 11))]
    if isa == "amx":  # in = 1024: blocks of 64 rows, dA's tile product on the first, pair products on the last 16
        shapes += [(96, 32, 64, (5, 11)), (64, 16, 96, (5, 11)), (1024, 16, 64, (2, 40))]
    for (n_in, r, out, lead), frozen in itertools.product(shapes, [(), ("lora_A",), ("lora_A", "lora_B")]):
        args = make(lead, n_in, out, r, dtype, seed=r)
        for name in frozen:  # LoRA-FA, and dx alone: the kernels skip dA (and the whole adapter gradient)
            args[name].requires_grad_(False)
        dy = torch.randn(*lead, out, generator=torch.Generator().manual_seed(3)).to(dtype)
        assert_matches_reference(grads_of(run_ours(torch.ops.peft_kernels, 0.7, 0.25, seed=6), args, dy), args, dy,
                                 0.7, 0.25, 6, dtype)
    for n in (37, 38):  # 38: the bf16 pair path's mask
        x = torch.ones(5, 11, n, dtype=dtype)
        _, xa = torch.ops.peft_kernels.lora_linear_fwd(x, torch.zeros(3, n, dtype=dtype), None,
                                                       torch.eye(n, dtype=dtype), torch.zeros(3, n, dtype=dtype), 1.0,
                                                       0.3, torch.tensor(9))
        assert torch.equal(xa != 0, R.dropout_keep(x.shape, 0.3, 9)), n


def test_philox_known_answer():
    """Random123's known-answer vector for Philox4x32-10 with counter 0 and key 0; dropout's 16-bit draws are its
    words' halves, low first."""
    words = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert R.philox_draws(0, torch.arange(4)).tolist() == words
    assert R.dropout_draws(0, torch.arange(8)).tolist() == [h for w in words for h in (w & 0xFFFF, w >> 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_threshold_rounds_half_up(backend, dtype):
    """p is rounded to a multiple of 2**-16, half up, by the kernels as by the reference: an element whose draw is d
    is kept at p = (d - 0.5) / 2**16 (threshold d) and dropped at p = (d + 0.5) / 2**16 (threshold d + 1)."""
    n = 38
    draws = R.dropout_draws(4, torch.arange(5 * n))
    e = int(torch.nonzero((draws > 0) & (draws < 0xFFFF))[0])
    d = int(draws[e])
    x = torch.ones(5, n, dtype=dtype, device=backend.device)
    eye = torch.eye(n, dtype=dtype, device=backend.device)
    zeros = torch.zeros(3, n, dtype=dtype, device=backend.device)
    for p, kept in (((d - 0.5) / 65536, True), ((d + 0.5) / 65536, False)):
        _, xa = backend.ops.lora_linear_fwd(x, zeros, None, eye, zeros, 1.0, p, torch.tensor(4))
        assert bool(xa.reshape(-1)[e] != 0) == kept, (p, d)
        assert torch.equal((xa != 0).cpu(), R.dropout_keep(x.shape, p, 4)), p


@pytest.mark.parametrize("n", [37, 40], ids=["in37", "in40"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("seed", [0, 12345, -7])
def test_dropout_mask_matches_reference(backend, seed, dtype, n):
    """With x = 1 and A = I, x A^T is the scaled keep mask itself: it must be the reference's, bit for bit. in = 37 and
    40: the GPU kernels' element-wise and 16-byte (one Philox call per 8 or 4 elements) paths."""
    x = torch.ones(5, 11, n, dtype=dtype, device=backend.device)
    eye = torch.eye(n, dtype=dtype, device=backend.device)
    zeros = torch.zeros(3, n, dtype=dtype, device=backend.device)
    _, xa = backend.ops.lora_linear_fwd(x, zeros, None, eye, zeros, 1.0, 0.3, torch.tensor(seed))
    keep = R.dropout_keep(x.shape, 0.3, seed, backend.device)
    assert torch.equal(xa != 0, keep)
    assert torch.equal(xa[keep], torch.full_like(xa[keep], 1 / 0.7))


def test_keep_rate_and_seeds_differ():
    keep = R.dropout_keep((1000, 1000), 0.1, 42)
    assert abs(keep.float().mean().item() - 0.9) < 0.002  # 1e6 Bernoulli(0.9): sd 3e-4
    assert (keep != R.dropout_keep((1000, 1000), 0.1, 43)).float().mean().item() > 0.15


@pytest.mark.parametrize("n_in", [33, 40], ids=["in33", "in40"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dx_passes_through_the_forward_mask(backend, dtype, n_in):
    """With W = 0, dx is the LoRA branch's alone: zero exactly where forward dropped x (in = 40: the tensor-core dx's
    16-byte epilogue, one Philox call per 8 columns)."""
    args = make((4, 9), n_in, 21, 6, dtype, backend.device, bias=False)
    args["weight"] = torch.zeros_like(args["weight"])
    y = run_ours(backend.ops, 1.0, 0.5, seed=5)(**args)
    (dx,) = torch.autograd.grad(y, [args["x"]], torch.ones_like(y))
    assert torch.equal(dx != 0, R.dropout_keep(args["x"].shape, 0.5, 5, backend.device))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    args = make((2, 3), 11, 7, 4, torch.float64)
    fn = run_ours(torch.ops.peft_kernels, 0.9, p, seed=3)
    assert torch.autograd.gradcheck(lambda x, b, a_, b_: fn(x=x, weight=args["weight"], bias=b, lora_A=a_, lora_B=b_),
                                    (args["x"], args["bias"], args["lora_A"], args["lora_B"]))


@pytest.mark.parametrize("train_a", [True, False], ids=["lora", "lora-fa"])
def test_saved_for_backward(train_a):
    """Activations saved: x (only if A trains) and x A^T [..., r] — never a mask or the dropped x."""
    args = make((8, 16), 96, 80, 4, torch.float32)
    args["lora_A"].requires_grad_(train_a)
    _, saved = saved_tensors(lambda: pk.lora_linear(**args, scaling=1.0, dropout_p=0.2, seed=1))
    params = {args[k].data_ptr() for k in ("weight", "lora_A", "lora_B")}
    activations = [t for t in saved if t is not None and t.data_ptr() not in params and t.numel() > 1]
    shapes = sorted(tuple(t.shape) for t in activations)
    assert shapes == sorted([(8, 16, 4)] + ([(8, 16, 96)] if train_a else [])), shapes
    if train_a:
        assert any(t.data_ptr() == args["x"].data_ptr() for t in activations), "x must be saved, not a copy"


def test_lora_fa_and_truncated_rank():
    """A frozen (LoRA-FA) gives no dA; a DyLoRA-style rank truncation passes views A[:b], B[:, :b]."""
    args = make((5,), 40, 30, 8, torch.float32)
    b = 3
    args["lora_A"] = args["lora_A"].detach()[:b]
    lora_B = args["lora_B"]
    args["lora_B"] = lora_B[:, :b]
    y = pk.lora_linear(**args, scaling=2.0)
    y.sum().backward()
    ref = R.lora_linear(args["x"], args["weight"], args["bias"], args["lora_A"], args["lora_B"], 2.0)
    assert torch.allclose(y, ref, atol=1e-5)
    assert lora_B.grad[:, b:].abs().sum() == 0 and lora_B.grad[:, :b].abs().sum() > 0


def test_frozen_weight_is_enforced():
    args = make((4,), 8, 6, 2, torch.float32)
    args["weight"].requires_grad_(True)
    with pytest.raises(ValueError, match="'weight' is the frozen base weight"):
        pk.lora_linear(**args, scaling=1.0)


BAD = [
    (dict(lora_A=torch.randn(3, 9)), ValueError, r"'lora_A' must be \[r, in=8\]"),
    (dict(lora_B=torch.randn(6, 4)), ValueError, r"'lora_B' must be \[out=6, r=3\]"),
    (dict(lora_A=torch.randn(0, 8)), ValueError, "r >= 1"),
    (dict(x=torch.randn(4, 7)), ValueError, "'x' must have last dimension in=8"),
    (dict(bias=torch.randn(5)), ValueError, "'bias' must have 6 elements"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "'weight' must have dtype Float"),
    (dict(x=torch.randint(0, 3, (4, 8))), TypeError, "'x' must be torch.float32"),
    (dict(dropout_p=1.0), ValueError, r"'dropout_p' must be in \[0, 1\)"),
    (dict(seed=torch.tensor(1.5)), ValueError, "'seed' must be a one-element int64 tensor"),
]


@pytest.mark.parametrize("change,exc,message", BAD, ids=["A-in", "B-shape", "r0", "x-in", "bias", "dtype-mix", "int-x", "p1", "seed"])
def test_bad_input(backend, change, exc, message):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_A=torch.randn(3, 8),
                lora_B=torch.randn(6, 3), scaling=1.0, dropout_p=0.1, seed=torch.tensor(0))
    args.update(change)
    args = {k: v.to(backend.device) if isinstance(v, torch.Tensor) and k != "seed" else v for k, v in args.items()}
    with pytest.raises(exc, match=message):
        backend.ops.lora_linear_fwd(*args.values())


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(backend, p):
    args = make((3, 5), 24, 20, 4, torch.float32, backend.device)
    torch.library.opcheck(backend.ops.lora_linear_fwd.default, (*args.values(), 0.5, p, torch.tensor(7)))
    x, weight, bias, lora_A, lora_B = (v.detach() for v in args.values())
    xa = x @ lora_A.t()
    dy = torch.randn(3, 5, 20, device=backend.device)
    torch.library.opcheck(backend.ops.lora_linear_bwd.default,
                          (dy, x, weight, lora_A, lora_B, xa, 0.5, p, torch.tensor(7), True, True, True, True))


def test_compile_fullgraph():
    module = pk.nn.LoRALinear.from_linear(torch.nn.Linear(32, 24), r=4, dropout=0.0)
    torch.nn.init.normal_(module.lora_B)
    x = torch.randn(2, 7, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    y_eager, y_compiled = module(x), compiled(x)
    assert torch.allclose(y_eager, y_compiled, atol=1e-6)
    g_eager = torch.autograd.grad(y_eager.sum(), [x, module.lora_A])
    g_compiled = torch.autograd.grad(y_compiled.sum(), [x, module.lora_A])
    for a, b in zip(g_eager, g_compiled):
        assert torch.allclose(a, b, atol=1e-5)


# ---- LoRALinear --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_wraps_linear_without_copy(dtype):
    linear = torch.nn.Linear(40, 24).to(dtype)
    module = pk.nn.LoRALinear.from_linear(linear, r=4, alpha=8, dropout=0.1)
    assert module.weight.data_ptr() == linear.weight.data_ptr() and not module.weight.requires_grad
    assert module.lora_A.dtype == dtype and module.scaling == 2.0
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    x = torch.randn(2, 3, 5, 40).to(dtype)
    module.eval()
    assert torch.equal(module(x), linear(x))  # B = 0: a fresh adapter is the base layer


def test_module_train_eval_and_merge():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 32)
    w0 = linear.weight.detach().clone()
    module = pk.nn.LoRALinear.from_linear(linear, r=8, alpha=16, dropout=0.5, use_rslora=True)
    assert module.scaling == 16 / 8**0.5
    torch.nn.init.normal_(module.lora_B)
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


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'r' must be an int >= 1, got 0"):
        pk.nn.LoRALinear(8, 8, r=0)
    with pytest.raises(ValueError, match=r"'dropout' must be in \[0, 1\), got 1.5"):
        pk.nn.LoRALinear(8, 8, dropout=1.5)
    with pytest.raises(TypeError, match="must be an nn.Linear, got Conv1d"):
        pk.nn.LoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_delta_lora_moves_the_frozen_weight_by_the_adapter_change():
    torch.manual_seed(0)
    module = pk.nn.LoRALinear.from_linear(torch.nn.Linear(16, 12), r=4, alpha=4)
    torch.nn.init.normal_(module.lora_B)
    optimizer = torch.optim.SGD([module.lora_A, module.lora_B], lr=0.1)
    handles = pk.nn.enable_delta_lora(optimizer, [module], update_ratio=0.5)
    w0, d0 = module.weight.detach().clone(), module.delta_weight()
    module(torch.randn(5, 16)).square().sum().backward()
    optimizer.step()
    assert torch.allclose(module.weight, w0 + 0.5 * (module.delta_weight() - d0), atol=1e-6)
    assert not torch.equal(module.weight, w0)
    for h in handles:
        h.remove()
    w1 = module.weight.detach().clone()
    module(torch.randn(5, 16)).sum().backward()
    optimizer.step()
    assert torch.equal(module.weight, w1)
    with pytest.raises(TypeError, match="non-empty list of LoRALinear"):
        pk.nn.enable_delta_lora(optimizer, [torch.nn.Linear(2, 2)])
