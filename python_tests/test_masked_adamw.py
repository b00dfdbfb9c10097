"""masked_adamw_step_ / masked_sgd_step_: sparse optimizer steps on k selected entries, on every backend (CPU
kernels, the CUDA kernels through the CPU executor, CUDA when present).

* Against peft_kernels.reference (torch's AdamW over the dense parameter with the gradient masked, the state
  scattered to dense tensors): bit for bit over 50 steps, weight decay and bias correction included (on a GPU,
  where torch's CUDA ops may fuse differently, within a few ulps: see assert_same).
* Against torch.optim.AdamW itself on the dense parameter with ``grad *= mask``: the selected entries within
  a few ulps (torch's fp32 CPU sqrt is not correctly rounded, ours is), and against torch.optim.SGD bit for bit.
* Entries outside the selection never change, bit for bit; the fp32 master copy of bf16 params; Child-Tuning_F's
  in-kernel Bernoulli mask; opcheck; bad input.
"""

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R

SHAPE = (37, 53)  # 1961 entries: odd, not a multiple of any vector width or of the 256-thread CUDA block
NUMEL = SHAPE[0] * SHAPE[1]
# Selection sizes against the CUDA kernel's layout (4 consecutive entries per thread, 128 per warp, 1024 per block):
# 1 and 1961 leave a 1-entry tail, 703 a 3-entry tail, 700 none.


def selection(k: int, seed: int, numel: int = NUMEL, dtype=torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:k].sort().values.to(dtype)


def grads(steps: int, seed: int, shape=SHAPE, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(steps)]


def assert_same(got, want, backend, steps=50, lr=1e-2):
    """Bit for bit on the CPU and through the CPU executor. On a GPU, torch's own CUDA ops (the reference, torch's
    optimizers) may fuse multiply-adds differently from their CPU versions, so there: within the bound of
    :func:`bound`."""
    if backend.name == "cuda":
        assert ((got.float() - want.float()).abs() <= bound(want.float(), steps, lr)).all()
    else:
        assert torch.equal(got, want)


def bound(want, steps, lr):
    """Two ulps of the value plus four ulps of each step's update (at most lr) accumulated over the steps."""
    eps = torch.finfo(torch.float32).eps
    return 2 * eps * want.abs() + steps * lr * 4 * eps


class AdamWState:
    """The compact state of one selection, run by an op namespace or by peft_kernels.reference."""

    def __init__(self, param, indices, master=False):
        self.param, self.indices = param, indices
        k = indices.numel()
        self.exp_avg = torch.zeros(k, device=param.device)
        self.exp_avg_sq = torch.zeros(k, device=param.device)
        self.master = param.reshape(-1)[indices.long()].float() if master else None

    def step(self, fn, grad, step, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, wd=0.1, child_p=1.0, seed=0):
        fn(self.param, grad, self.indices, self.exp_avg, self.exp_avg_sq, self.master, step, lr, betas[0], betas[1], eps,
           wd, child_p, seed)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("grad_layout", ["dense", "compact"])
@pytest.mark.parametrize("k", [1, 700, 703, NUMEL])
def test_adamw_matches_reference_50_steps(backend, k, grad_layout, index_dtype):
    idx = selection(k, seed=k).to(backend.device, index_dtype)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(backend.device)
    ours, ref = AdamWState(start.clone(), idx), AdamWState(start.clone(), idx)
    for step, g in enumerate(grads(50, seed=2), start=1):
        g = g.to(backend.device)
        if grad_layout == "compact":
            g = g.reshape(-1)[idx.long()].contiguous()
        ours.step(backend.ops.masked_adamw_step_, g, step)
        ref.step(R.masked_adamw_step_, g, step)
    assert_same(ours.param, ref.param, backend)
    assert_same(ours.exp_avg, ref.exp_avg, backend)
    assert_same(ours.exp_avg_sq, ref.exp_avg_sq, backend)
    outside = torch.ones(NUMEL, dtype=torch.bool, device=backend.device)
    outside[idx.long()] = False
    assert torch.equal(ours.param.reshape(-1)[outside], start.reshape(-1)[outside])  # bit for bit
    assert not torch.equal(ours.param.reshape(-1)[idx.long()], start.reshape(-1)[idx.long()])


def assert_near_torch_adamw(got, want, steps, lr):
    limit = bound(want, steps, lr)
    assert ((got - want).abs() <= limit).all(), ((got - want).abs() / limit).max()
    assert (got != want).any()  # the bound is not vacuous: the two do differ in the last bits


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.99)], ids=["b1-0.9", "b1-0.3"])
def test_adamw_matches_torch_dense_adamw_with_mask(backend, betas):
    """The issue's equivalence: torch.optim.AdamW on the whole parameter with grad *= mask gives the selected
    entries the same 50-step trajectory (its weight decay also shrinks the unselected entries, ours never touch
    them). torch's CPU sqrt is off by an ulp for ~20% of inputs, which changes an update (at most lr = 1e-2) by a
    few of its ulps; over 50 steps that adds up to at most 50 * lr * 4 eps absolutely, on top of the final
    rounding of the weight. The exact comparisons are with the reference."""
    idx = selection(600, seed=3).to(backend.device)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)).to(backend.device)
    mask = torch.zeros(NUMEL, dtype=torch.bool, device=backend.device)
    mask[idx] = True
    ours = AdamWState(start.clone(), idx)
    dense = start.clone().requires_grad_()
    opt = torch.optim.AdamW([dense], lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.1, foreach=False)
    for step, g in enumerate(grads(50, seed=5), start=1):
        g = g.to(backend.device)
        ours.step(backend.ops.masked_adamw_step_, g, step, betas=betas)
        dense.grad = g * mask.reshape(SHAPE)
        opt.step()
    assert_near_torch_adamw(ours.param.reshape(-1)[idx], dense.detach().reshape(-1)[idx], steps=50, lr=1e-2)
    assert torch.allclose(ours.exp_avg_sq, opt.state[dense]["exp_avg_sq"].reshape(-1)[idx], rtol=1e-5, atol=0)


def test_reference_is_torch_adamw_with_the_mask():
    """What the bit-exact comparisons rest on: with every entry selected the reference is torch.optim.AdamW
    except for its correctly rounded square root."""
    start = torch.randn(SHAPE)
    ref = AdamWState(start.clone(), torch.arange(NUMEL))
    dense = start.clone().requires_grad_()
    opt = torch.optim.AdamW([dense], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    for step, g in enumerate(grads(10, seed=6), start=1):
        ref.step(R.masked_adamw_step_, g, step)
        dense.grad = g
        opt.step()
    assert torch.equal(ref.exp_avg, opt.state[dense]["exp_avg"].reshape(-1))
    assert torch.equal(ref.exp_avg_sq, opt.state[dense]["exp_avg_sq"].reshape(-1))
    assert_near_torch_adamw(ref.param.reshape(-1), dense.detach().reshape(-1), steps=10, lr=1e-2)


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.01)], ids=["plain", "momentum-wd"])
def test_sgd_matches_torch_sgd(backend, momentum, wd):
    idx = selection(501, seed=7).to(backend.device)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8)).to(backend.device)
    param = start.clone()
    buf = torch.zeros(501, device=backend.device) if momentum else None
    sub = start.reshape(-1)[idx].clone().requires_grad_()
    opt = torch.optim.SGD([sub], lr=0.05, momentum=momentum, weight_decay=wd, foreach=False)
    ref, ref_buf = start.clone(), None if buf is None else buf.clone()
    for step, g in enumerate(grads(20, seed=9), start=1):
        g = g.to(backend.device)
        backend.ops.masked_sgd_step_(param, g, idx, buf, None, step, 0.05, momentum, wd, 1.0, 0)
        R.masked_sgd_step_(ref, g, idx, ref_buf, None, step, 0.05, momentum, wd)
        sub.grad = g.reshape(-1)[idx]
        opt.step()
    assert_same(param.reshape(-1)[idx], sub.detach(), backend, steps=20, lr=0.05)
    assert_same(param, ref, backend, steps=20, lr=0.05)
    outside = torch.ones(NUMEL, dtype=torch.bool, device=backend.device)
    outside[idx] = False
    assert torch.equal(param.reshape(-1)[outside], start.reshape(-1)[outside])


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("grad_layout", ["dense", "compact"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_param_with_fp32_master(backend, dtype, grad_layout, index_dtype):
    """A 16-bit param keeps an fp32 master copy of its k selected entries: the trajectory is the fp32 one,
    the param its round-to-nearest image after every step. k = 403: a 3-entry tail after the 4-entry vectors."""
    idx = selection(403, seed=10).to(backend.device, index_dtype)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11)).to(dtype).to(backend.device)
    ours, ref = AdamWState(start.clone(), idx, master=True), AdamWState(start.clone(), idx, master=True)
    fp32 = AdamWState(start.float(), idx)
    for step, g in enumerate(grads(30, seed=12, dtype=dtype), start=1):
        g = g.to(backend.device)
        if grad_layout == "compact":
            g = g.reshape(-1)[idx.long()].contiguous()
        ours.step(backend.ops.masked_adamw_step_, g, step)
        ref.step(R.masked_adamw_step_, g, step)
        fp32.step(R.masked_adamw_step_, g.float(), step)
    assert_same(ours.master, ref.master, backend, steps=30)
    assert_same(ours.param, ref.param, backend, steps=30)
    assert_same(ours.master, fp32.param.reshape(-1)[idx.long()], backend, steps=30)
    assert torch.equal(ours.param.reshape(-1)[idx.long()], ours.master.to(dtype))


def runs_and_gaps() -> torch.Tensor:
    """Indices whose groups of 4 (positions 4q..4q+3, as the CUDA kernel takes them) are, in turn: 16 runs of
    consecutive indices from a multiple of 4 (read as one vector of the param), one that starts on a multiple of 4
    but skips an entry (64, 65, 66, 68), one that is consecutive but starts off a multiple of 4 (70..73), one more
    run (76..79), then a sparse sorted rest of odd length (a 3-entry tail)."""
    head = torch.tensor(list(range(64)) + [64, 65, 66, 68] + [70, 71, 72, 73] + [76, 77, 78, 79])
    rest = 80 + selection(503, seed=18, numel=NUMEL - 80)
    return torch.cat([head, rest])


@pytest.mark.parametrize("grad_layout", ["dense", "compact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_runs_of_consecutive_indices(backend, dtype, grad_layout):
    idx = runs_and_gaps().to(backend.device)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(19)).to(dtype).to(backend.device)
    master = dtype != torch.float32
    ours, ref = AdamWState(start.clone(), idx, master), AdamWState(start.clone(), idx, master)
    for step, g in enumerate(grads(5, seed=20, dtype=dtype), start=1):
        g = g.to(backend.device)
        if grad_layout == "compact":
            g = g.reshape(-1)[idx].contiguous()
        ours.step(backend.ops.masked_adamw_step_, g, step)
        ref.step(R.masked_adamw_step_, g, step)
    assert_same(ours.param, ref.param, backend, steps=5)
    assert_same(ours.exp_avg_sq, ref.exp_avg_sq, backend, steps=5)


def unaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t that starts one element past a 16-byte boundary (a view into a larger buffer)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:]
    view.copy_(t)
    return view


@pytest.mark.parametrize("which", ["indices", "state", "master", "grad"])
def test_unaligned_streams(backend, which):
    """A compact stream that is not 16-byte aligned sends the CUDA kernel down its 4-byte path (lane-strided
    entries): same results."""
    idx = selection(703, seed=21).to(backend.device)
    dtype = torch.bfloat16 if which == "master" else torch.float32
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(22)).to(dtype).to(backend.device)
    master = dtype != torch.float32
    ours, ref = AdamWState(start.clone(), idx, master), AdamWState(start.clone(), idx, master)
    if which == "indices":
        ours.indices = unaligned(idx)
    elif which == "state":
        ours.exp_avg, ours.exp_avg_sq = unaligned(ours.exp_avg), unaligned(ours.exp_avg_sq)
    elif which == "master":
        ours.master = unaligned(ours.master)
    for step, g in enumerate(grads(5, seed=23, dtype=dtype), start=1):
        g = g.to(backend.device).reshape(-1)[idx].contiguous()
        ours.step(backend.ops.masked_adamw_step_, unaligned(g) if which == "grad" else g, step)
        ref.step(R.masked_adamw_step_, g, step)
    assert_same(ours.param, ref.param, backend, steps=5)
    assert_same(ours.exp_avg, ref.exp_avg, backend, steps=5)
    assert_same(ours.exp_avg_sq, ref.exp_avg_sq, backend, steps=5)
    if master:
        assert_same(ours.master, ref.master, backend, steps=5)


def test_sgd_momentum_buffer_unaligned(backend):
    idx = selection(301, seed=24).to(backend.device)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(25)).to(backend.device)
    ours, ref = start.clone(), start.clone()
    buf, ref_buf = unaligned(torch.zeros(301, device=backend.device)), torch.zeros(301, device=backend.device)
    for step, g in enumerate(grads(5, seed=26), start=1):
        g = g.to(backend.device)
        backend.ops.masked_sgd_step_(ours, g, idx, buf, None, step, 0.05, 0.9, 0.01, 1.0, 0)
        R.masked_sgd_step_(ref, g, idx, ref_buf, None, step, 0.05, 0.9, 0.01)
    assert_same(ours, ref, backend, steps=5, lr=0.05)
    assert_same(buf, ref_buf, backend, steps=5, lr=0.05)


@pytest.mark.parametrize("bits,compact,dtype", [(64, 0, "f32"), (32, 1, "bf16")], ids=["i64-dense-f32", "i32-compact-bf16"])
def test_executor_counts_whole_sectors_on_the_compact_streams(bits, compact, dtype):
    """The CUDA kernel's global traffic as the executor counts it, per buffer, at k = 4099 of 409,900 (1%, evenly
    spread as pk_simprof lays them out: 32 warps of 128 entries, then 3 more): every compact stream in whole
    sectors, one 16-byte request per lane for 4 entries (two for int64 indices), so one per warp, plus one for the
    last 3 entries, which 3 lanes take one each; the param is gathered, one 32-byte sector per entry. The previous
    one-entry-per-thread kernel made 129 requests per stream, 4 bytes a lane."""
    from peft_kernels import sim

    k = 4099
    (d,) = sim.profile("masked_adamw", 100 * k, k, bits, compact, dtype=dtype)
    by = {b["name"]: b for b in d["buffers"]}
    compact_streams = ["indices", "exp_avg", "exp_avg_sq"] + (["grad (compact)", "master"] if compact else [])
    assert sorted(by) == sorted(compact_streams + ["param"] + ([] if compact else ["grad (dense)"]))
    for name in compact_streams:
        b = by[name]
        assert b["load_sector_efficiency"] >= 0.95, name
        per_warp = 2 if name == "indices" and bits == 64 else 1
        assert b["load_requests"] == 32 * per_warp + 1, name
        if name in ("exp_avg", "exp_avg_sq", "master"):
            assert b["store_sector_efficiency"] >= 0.95 and b["store_requests"] == 32 + 1, name
    # the param: 4 stores of a sector per lane for each warp's 128 entries (32 lanes x size bytes in 32 sectors),
    # then one store by 3 lanes (3 x size bytes in 3 sectors)
    size = 4 if dtype == "f32" else 2
    assert by["param"]["store_sector_efficiency"] == pytest.approx((128 * size + 1) / (128 * 32 + 3))
    assert by["param"]["dram_bytes"] == (2 if dtype == "f32" else 1) * 32 * k  # written, and read without a master


def test_bf16_master_keeps_updates_that_rounding_loses():
    """Why the master copy: at lr 1e-4 an AdamW update (~1e-4) is below half a bf16 ulp of weights near 1
    (2^-8 = 0.0039), so a bf16 AdamW rounds every update away and never moves; the master copy accumulates
    100 updates (~0.01, more than two bf16 ulps)."""
    idx = torch.arange(64)
    start = torch.ones(64, dtype=torch.bfloat16)
    ours = AdamWState(start.clone(), idx, master=True)
    naive = start.clone().requires_grad_()
    opt = torch.optim.AdamW([naive], lr=1e-4, weight_decay=0.0, foreach=False)
    for step in range(1, 101):
        g = torch.ones(64, dtype=torch.bfloat16)
        ours.step(torch.ops.peft_kernels.masked_adamw_step_, g, step, lr=1e-4, wd=0.0)
        naive.grad = g
        opt.step()
    assert torch.equal(naive.detach(), start)
    assert (ours.param < 1).all() and torch.allclose(ours.master, torch.full((64,), 1 - 100e-4), rtol=1e-3)


def child_mask_of_kernel(ops, numel, p, seed, step, device):
    """The kernel's Child-Tuning_F mask read back through one SGD step: param 0, grad 1, lr 1 -> param = -mask/p."""
    param = torch.zeros(numel, device=device)
    ops.masked_sgd_step_(param, torch.ones(numel, device=device), torch.arange(numel, device=device), None, None, step,
                         1.0, 0.0, 0.0, p, seed)
    keep = param != 0
    assert torch.equal(param[keep], torch.full_like(param[keep], -1 / p))
    return keep


@pytest.mark.parametrize("seed,step", [(0, 1), (12345, 7), (-3, 2**40)])
def test_child_mask_matches_reference(backend, seed, step):
    keep = child_mask_of_kernel(backend.ops, 3001, 0.3, seed, step, backend.device)
    assert torch.equal(keep, R.child_keep(seed, step, torch.arange(3001, device=backend.device), 0.3))
    assert torch.equal(keep, child_mask_of_kernel(backend.ops, 3001, 0.3, seed, step, backend.device))


def test_child_mask_density_and_independence():
    """2e5 Bernoulli(0.3) draws: sd of the rate 0.001, so 0.005 is 5 sd. Steps and seeds draw independent masks:
    both kept at a rate p^2 = 0.09 (sd 0.0006)."""
    n, p = 200_000, 0.3
    ops = torch.ops.peft_kernels
    m1, m2 = child_mask_of_kernel(ops, n, p, 42, 1, "cpu"), child_mask_of_kernel(ops, n, p, 42, 2, "cpu")
    other_seed = child_mask_of_kernel(ops, n, p, 43, 1, "cpu")
    for m in (m1, m2, other_seed):
        assert abs(m.float().mean().item() - p) < 0.005
    for a, b in ((m1, m2), (m1, other_seed)):
        assert abs((a & b).float().mean().item() - p * p) < 0.003


def test_child_adamw_matches_reference(backend):
    idx = selection(900, seed=13).to(backend.device)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(14)).to(backend.device)
    ours, ref = AdamWState(start.clone(), idx), AdamWState(start.clone(), idx)
    for step, g in enumerate(grads(10, seed=15), start=1):
        g = g.to(backend.device)
        ours.step(backend.ops.masked_adamw_step_, g, step, child_p=0.4, seed=99)
        ref.step(R.masked_adamw_step_, g, step, child_p=0.4, seed=99)
    assert_same(ours.param, ref.param, backend, steps=10)
    assert_same(ours.exp_avg, ref.exp_avg, backend, steps=10)


def test_empty_selection_is_a_no_op(backend):
    param = torch.randn(SHAPE, device=backend.device)
    before = param.clone()
    empty = torch.zeros(0, device=backend.device)
    backend.ops.masked_adamw_step_(param, torch.randn(SHAPE, device=backend.device),
                                   torch.zeros(0, dtype=torch.int64, device=backend.device), empty, empty.clone(),
                                   None, 1, 0.1, 0.9, 0.999, 1e-8, 0.0, 1.0, 0)
    assert torch.equal(param, before)


def test_opcheck(backend):
    idx = selection(300, seed=16).to(backend.device)
    param = torch.randn(SHAPE, device=backend.device)
    grad = torch.randn(SHAPE, device=backend.device)
    state = lambda: torch.rand(300, device=backend.device)  # noqa: E731
    torch.library.opcheck(backend.ops.masked_adamw_step_.default,
                          (param, grad, idx, state(), state(), None, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.5, 7))
    bf16 = param.to(torch.bfloat16)
    torch.library.opcheck(backend.ops.masked_adamw_step_.default,
                          (bf16, grad.to(torch.bfloat16), idx, state(), state(), bf16.reshape(-1)[idx].float(), 1, 1e-3,
                           0.9, 0.999, 1e-8, 0.0, 1.0, 0))
    torch.library.opcheck(backend.ops.masked_sgd_step_.default,
                          (param, grad, idx, state(), None, 2, 1e-2, 0.9, 0.01, 1.0, 0))


def adamw_args(**change):
    args = dict(param=torch.randn(5, 7), grad=torch.randn(5, 7), indices=torch.tensor([0, 3, 9, 34]),
                exp_avg=torch.zeros(4), exp_avg_sq=torch.zeros(4), master=None, step=1, lr=0.1, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, child_p=1.0, seed=0)
    args.update(change)
    return args


BAD = [
    (dict(indices=torch.tensor([0, 9, 3, 34])), ValueError, r"'indices' must be sorted in increasing order, got "
                                                            r"indices\[1\] = 9 > indices\[2\] = 3"),
    (dict(indices=torch.tensor([0, 3, 3, 34])), ValueError, r"'indices' must not repeat an entry, got indices\[1\] = "
                                                            r"indices\[2\] = 3"),
    (dict(indices=torch.tensor([0, 3, 9, 35])), ValueError, r"'indices' must hold flat indices into 'param' in "
                                                            r"\[0, 35\), got indices\[3\] = 35"),
    (dict(indices=torch.tensor([-1, 3, 9, 34])), ValueError, r"in \[0, 35\), got indices\[0\] = -1"),
    (dict(indices=torch.tensor([0.0, 3, 9, 34])), TypeError, "'indices' must have dtype torch.int64 or torch.int32"),
    (dict(indices=torch.tensor([[0, 3], [9, 34]])), ValueError, "'indices' must be 1-D"),
    (dict(child_p=0.0), ValueError, r"'child_p' \(the Child-Tuning_F keep density\) must be in \(0, 1\], got 0"),
    (dict(child_p=1.5), ValueError, r"'child_p' .* must be in \(0, 1\], got 1.5"),
    (dict(grad=torch.randn(5, 7, dtype=torch.float64)), TypeError, "'grad' must have dtype Float, got a Double"),
    (dict(exp_avg=torch.zeros(4, dtype=torch.bfloat16)), TypeError, "'exp_avg' must have dtype Float"),
    (dict(exp_avg_sq=torch.zeros(5)), ValueError, "'exp_avg_sq' must have 4 elements, got a Float tensor of shape"),
    (dict(grad=torch.randn(6)), ValueError, r"'grad' must have param's 35 elements \(dense\) or one per index \(4\)"),
    (dict(param=torch.randn(5, 7, dtype=torch.bfloat16), grad=torch.randn(5, 7, dtype=torch.bfloat16)), ValueError,
     "'master' must be an fp32 copy"),
    (dict(master=torch.zeros(4)), ValueError, "'master' must be None for an fp32 param"),
    (dict(param=torch.randn(7, 5).t()), ValueError, "'param' must be contiguous"),
    (dict(step=0), ValueError, "'step' must be >= 1"),
    (dict(beta2=1.0), ValueError, r"'beta2' must be in \[0, 1\), got 1"),
    (dict(lr=float("nan")), ValueError, "'lr' must be in"),
]
BAD_IDS = ["unsorted", "duplicate", "past-end", "negative", "float-idx", "2d-idx", "p0", "p1.5", "grad-dtype",
           "state-dtype", "state-len", "grad-len", "bf16-no-master", "fp32-master", "strided", "step0", "beta2", "lr-nan"]


@pytest.mark.parametrize("change,exc,message", BAD, ids=BAD_IDS)
def test_bad_input_raises_and_writes_nothing(backend, change, exc, message):
    args = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v for k, v in adamw_args(**change).items()}
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=message):
        backend.ops.masked_adamw_step_(*args.values())
    for k, v in before.items():
        assert torch.equal(args[k], v), k


def test_sgd_bad_input(backend):
    param = torch.randn(10, device=backend.device)
    idx = torch.tensor([1, 5, 5], device=backend.device)
    with pytest.raises(ValueError, match="masked_sgd_step_: argument 'momentum_buffer' must be an fp32 tensor"):
        backend.ops.masked_sgd_step_(param, param, idx[:2], None, None, 1, 0.1, 0.9, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="'indices' must not repeat an entry"):
        backend.ops.masked_sgd_step_(param, param, idx, None, None, 1, 0.1, 0.0, 0.0, 1.0, 0)
    with pytest.raises(ValueError, match=r"'child_p' .* got -0.5"):
        backend.ops.masked_sgd_step_(param, param, idx[:2], None, None, 1, 0.1, 0.0, 0.0, -0.5, 0)


def test_typed_wrappers():
    param, idx = torch.randn(SHAPE), selection(50, seed=17)
    start = param.clone()
    m, v = torch.zeros(50), torch.zeros(50)
    pk.ops.masked_adamw_step_(param, torch.randn(SHAPE), idx, m, v, step=1, lr=1e-2)
    assert not torch.equal(param, start) and (m != 0).all()
    pk.ops.masked_sgd_step_(param, torch.randn(SHAPE), idx, step=1, lr=1e-2)
