"""adamw8bit_step_ and peft_kernels.optim.AdamW8bit: AdamW with both moments in 8 bits, on every backend (the CPU
kernel, the CUDA kernel through the CPU executor, CUDA when present).

* Against peft_kernels.reference (decode, torch's single-tensor AdamW in fp32, re-encode): param, codes and scales
  bit for bit over several steps, at sizes around the CUDA kernel's layout, fp32/bf16/fp16, and through its
  element-wise path (a parameter view 4 bytes off 16-byte alignment). The kernels pin every rounding (masked_adamw.h),
  so the GPU's results equal the CPU reference too.
* The maps are bitsandbytes' (when installed); the state is <= 0.27x fp32 AdamW's; training follows
  torch.optim.AdamW; a resumed run continues bit for bit; a state dict of another optimizer is refused and changes
  nothing; opcheck; bad input.
"""

import copy
import io

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R
from peft_kernels.optim import AdamW8bit

# Sizes against the CUDA kernel's layout (512 elements per warp and step, 4096 per 256-thread block, absmax blocks of
# 256): a single element; one element short of / past a block; a partial span; 5420 = a full thread block, two full
# spans and a partial one holding a whole absmax block and 44 elements of another.
SIZES = [1, 255, 257, 1000, 5420]
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1


def maps(device):
    return pk.dynamic_map(device, signed=True), pk.dynamic_map(device, signed=False)


def zero_state(n, device):
    blocks = -(-n // 256)
    return [torch.full((n,), 127, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device),
            torch.zeros(n, dtype=torch.uint8, device=device), torch.zeros(blocks, device=device)]


def gradients(steps, n, seed, dtype):
    """Gradients spread over four decades, so the moments use much of the dynamic maps' range."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * 10 ** torch.empty(n).uniform_(-4, 0, generator=g)).to(dtype)
            for _ in range(steps)]


def run_steps(step_fn, param, state, grads, signed, unsigned):
    for s, grad in enumerate(grads, start=1):
        step_fn(param, grad.to(param.device), *state, signed, unsigned, s, LR, *BETAS, EPS, WD)


def assert_same_as_reference(backend, param0, grads):
    device = backend.device
    param = param0.clone().to(device)
    state = zero_state(param.numel(), device)
    run_steps(backend.ops.adamw8bit_step_, param, state, grads, *maps(device))
    want, want_state = param0.clone(), zero_state(param0.numel(), "cpu")
    run_steps(R.adamw8bit_step_, want, want_state, grads, *maps("cpu"))
    assert torch.equal(param.cpu(), want)
    for name, got, ref in zip(("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"), state, want_state):
        assert torch.equal(got.cpu(), ref), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(backend, dtype, n):
    param0 = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    assert_same_as_reference(backend, param0, gradients(4, n, seed=n + 1, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_parameter_view(backend, dtype):
    """A contiguous view 1 element into its storage: not 16-byte aligned, so the CUDA kernel takes its element-wise
    path for every span."""
    n = 1000
    base = torch.randn(n + 1, generator=torch.Generator().manual_seed(3)).to(dtype)
    param = base.to(backend.device, copy=True)[1:]
    grads = gradients(3, n, seed=4, dtype=dtype)
    state = zero_state(n, backend.device)
    run_steps(backend.ops.adamw8bit_step_, param, state, grads, *maps(backend.device))
    want, want_state = base[1:].clone(), zero_state(n, "cpu")
    run_steps(R.adamw8bit_step_, want, want_state, grads, *maps("cpu"))
    assert torch.equal(param.cpu(), want)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(state, want_state))


def test_state_round_trips_the_moments():
    """After a step the stored moments decode to within half a map step of the fp32 ones: the codes are the
    nearest entries (checked against a brute-force search over the whole map)."""
    n = 5420
    param, grad = torch.randn(n), gradients(1, n, seed=9, dtype=torch.float32)[0]
    state = zero_state(n, "cpu")
    signed, unsigned = maps("cpu")
    torch.ops.peft_kernels.adamw8bit_step_(param, grad, *state, signed, unsigned, 1, LR, *BETAS, EPS, WD)
    m = (1 - BETAS[0]) * grad
    v = (1 - BETAS[1]) * grad * grad
    for moment, codes, absmax, code in ((m, state[0], state[1], signed), (v, state[2], state[3], unsigned)):
        blocks = torch.nn.functional.pad(moment, (0, 22 * 256 - n)).reshape(22, 256)
        assert torch.equal(absmax, blocks.abs().amax(dim=1))
        scaled = moment / absmax.repeat_interleave(256)[:n]
        brute = (code[None, :] - scaled[:, None]).abs().argmin(dim=1)  # first of equals: a tie keeps the lower
        assert (codes.long() - brute).abs().max() <= 1  # fp32 rounding of the scaled value may decide a near-tie
        assert (codes.long() == brute).float().mean() > 0.999


def test_maps_are_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    signed, unsigned = maps("cpu")
    assert torch.equal(F.create_dynamic_map(signed=True), signed)
    assert torch.equal(F.create_dynamic_map(signed=False), unsigned)


def test_opcheck(backend):
    n = 700
    param = torch.randn(n, device=backend.device)
    state = zero_state(n, backend.device)
    torch.library.opcheck(backend.ops.adamw8bit_step_.default,
                          (param, torch.randn(n, device=backend.device), *state, *maps(backend.device), 1, LR, *BETAS,
                           EPS, WD))
    bf16 = param.to(torch.bfloat16)
    torch.library.opcheck(backend.ops.adamw8bit_step_.default,
                          (bf16, torch.randn_like(bf16), *zero_state(n, backend.device), *maps(backend.device), 2, LR,
                           *BETAS, EPS, 0.0))


def step_args(**change):
    signed, unsigned = maps("cpu")
    args = dict(param=torch.randn(5, 70), grad=torch.randn(5, 70), exp_avg=torch.full((350,), 127, dtype=torch.uint8),
                exp_avg_absmax=torch.zeros(2), exp_avg_sq=torch.zeros(350, dtype=torch.uint8),
                exp_avg_sq_absmax=torch.zeros(2), signed_map=signed, unsigned_map=unsigned, step=1, lr=0.1, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0)
    args.update(change)
    return args


BAD = [
    (dict(exp_avg=torch.zeros(350)), TypeError, "adamw8bit_step_: argument 'exp_avg' must have dtype Byte, got a Float"),
    (dict(exp_avg_sq=torch.zeros(349, dtype=torch.uint8)), ValueError, "'exp_avg_sq' must have 350 elements, got"),
    (dict(exp_avg_absmax=torch.zeros(1)), ValueError, "'exp_avg_absmax' must have 2 elements"),
    (dict(exp_avg_sq_absmax=torch.zeros(2, dtype=torch.float64)), TypeError, "'exp_avg_sq_absmax' must have dtype Float"),
    (dict(signed_map=torch.zeros(255)), ValueError, "'signed_map' must have 256 elements"),
    (dict(grad=torch.randn(5, 70, dtype=torch.bfloat16)), TypeError, "'grad' must have dtype Float, got a BFloat16"),
    (dict(grad=torch.randn(351)), ValueError, "'grad' must have 350 elements"),
    (dict(param=torch.randn(70, 5).t(), grad=torch.randn(70, 5).t()), ValueError, "'param' must be contiguous"),
    (dict(param=torch.randn(5, 70, dtype=torch.float64), grad=torch.randn(5, 70, dtype=torch.float64)), TypeError,
     "'param' must be torch.float32, torch.float16 or torch.bfloat16, got Double"),
    (dict(step=0), ValueError, "'step' must be >= 1"),
    (dict(beta1=1.0), ValueError, r"'beta1' must be in \[0, 1\), got 1"),
    (dict(lr=-1.0), ValueError, "'lr' must be in"),
]
BAD_IDS = ["codes-dtype", "codes-len", "absmax-len", "absmax-dtype", "map-len", "grad-dtype", "grad-len", "strided",
           "fp64", "step0", "beta1", "lr"]


@pytest.mark.parametrize("change,exc,message", BAD, ids=BAD_IDS)
def test_bad_input_raises_and_writes_nothing(backend, change, exc, message):
    args = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v for k, v in step_args(**change).items()}
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=message):
        backend.ops.adamw8bit_step_(*args.values())
    for k, v in before.items():
        assert torch.equal(args[k], v), k


# ---- the optimizer -------------------------------------------------------------------------------------------------
def regression(seed=0, dtype=torch.float32):
    """A least-squares problem small enough for 200 steps: y = x W* + noise, fit W [64, 300] and a bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g)
    y = x @ torch.randn(64, 300, generator=g) + 0.1 * torch.randn(256, 300, generator=g)
    model = torch.nn.Linear(64, 300).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, x.to(dtype), y.to(dtype)


def train(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_follows_torch_adamw():
    ours, x, y = regression()
    theirs = copy.deepcopy(ours)
    kw = dict(lr=0.1, weight_decay=0.01)  # converges to the noise floor (0.1^2) in 200 steps
    a = train(ours, AdamW8bit(ours.parameters(), **kw), x, y, 200)
    b = train(theirs, torch.optim.AdamW(theirs.parameters(), **kw), x, y, 200)
    assert a[-1] < 0.02 * a[0]  # it trains
    assert abs(a[-1] - b[-1]) <= 0.05 * b[-1], (a[-1], b[-1])
    assert abs(sum(a[-20:]) - sum(b[-20:])) <= 0.05 * sum(b[-20:])


def test_state_bytes_at_most_0_27_of_adamw():
    sizes = [(4096, 64), (64, 4096), (11008, 64), (64, 11008), (300,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in sizes]
    ours, theirs = AdamW8bit(params), torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    ours.step()
    theirs.step()

    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
                   and t.numel() > 1)

    ratio = state_bytes(ours) / state_bytes(theirs)
    assert ratio <= 0.27, ratio
    assert ratio == pytest.approx((2 + 8 / 256) / 8, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_exact(dtype):
    model, x, y = regression(seed=1, dtype=dtype)
    opt = AdamW8bit(model.parameters(), lr=5e-3)
    train(model, opt, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    straight = train(model, opt, x, y, 4)

    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed_model, _, _ = regression(seed=99, dtype=dtype)
    resumed_model.load_state_dict(saved["model"])
    resumed_opt = AdamW8bit(resumed_model.parameters(), lr=5e-3)
    resumed_opt.load_state_dict(saved["opt"])
    for state in resumed_opt.state.values():
        assert state["exp_avg_absmax"].dtype == torch.float32 and state["exp_avg"].dtype == torch.uint8
    assert train(resumed_model, resumed_opt, x, y, 4) == straight
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed_opt.state[q][key])), key


def test_refuses_state_of_another_optimizer():
    model, x, y = regression()
    other = torch.optim.AdamW(model.parameters())
    train(model, other, x, y, 1)
    opt = AdamW8bit(model.parameters())
    train(model, opt, x, y, 1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \[300, 64\]\) needs exp_avg as a torch.uint8 tensor of "
                                         r"19200 elements, got torch.float32 tensor .*another optimizer"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    for pid, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][pid][key]))
    with pytest.raises(ValueError, match="the state dict holds 1 parameters, this optimizer has 2"):
        opt.load_state_dict(AdamW8bit([model.weight]).state_dict())


def test_optimizer_bad_input():
    model, _, _ = regression()
    with pytest.raises(ValueError, match="lr must be >= 0, got -1"):
        AdamW8bit(model.parameters(), lr=-1)
    with pytest.raises(ValueError, match=r"betas must be two values in \[0, 1\), got \(0.9, 1.0\)"):
        AdamW8bit(model.parameters(), betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="parameters must be float32, bfloat16 or float16, got torch.float64"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad_dtype = None  # torch refuses a gradient of another dtype unless told (mixed-precision code does this)
    p.grad = torch.zeros(4)
    with pytest.raises(TypeError, match="a gradient must have its parameter's dtype torch.bfloat16, got torch.float32"):
        AdamW8bit([p]).step()


def test_skips_parameters_without_gradients_and_takes_strided_gradients():
    a, b = torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(5))
    opt = AdamW8bit([a, b], lr=0.1)
    a.grad = torch.randn(20, 30).t()  # not contiguous
    before = b.detach().clone()
    opt.step()
    assert torch.equal(b, before) and b not in opt.state
    assert opt.state[a]["step"] == 1
