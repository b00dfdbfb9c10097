"""Sparse fine-tuning optimizer step on one 4096x4096 fp32 weight, at density 1% and 100%:

* ``dense``: torch.optim.AdamW on the whole weight after ``grad *= mask`` (the usual way; the baseline);
* ``naive``: plain torch gather / scatter: the k selected gradients gathered, torch.optim.AdamW on a k-entry
  tensor, the k new values scattered back;
* ``ours``: ``peft_kernels.ops.masked_adamw_step_`` (reads the k selected entries of the dense grad, state [k]).

    python bench/bench_sparse.py [--quick] [--device cpu|cuda] [--dtype fp32,bf16] [--repeats N] [--out DIR]

The issue's targets, as ratios to ``dense`` measured side by side: at 1% ours <= 0.03x in time and in
optimizer-state bytes; at 100% ours <= 1.3x in time. The memory column is each provider's optimizer state
(what it keeps between steps; ours counts its int32 indices too); the dense provider's mask (16.8 MB as bool)
is not counted. Every provider's result is checked against ``peft_kernels.reference`` once before timing.
With ``--dtype bf16`` the weight and gradient are bf16: torch's AdamW then keeps bf16 state, ours an fp32
master copy of the selected entries besides its fp32 state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# `python -P` leaves the script's directory off sys.path; add bench/ alone, so the source tree's peft_kernels/
# never shadows the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from peft_kernels import ops, reference  # noqa: E402

SHAPE = (4096, 4096)
DENSITIES = (0.01, 1.0)
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def cases(args) -> list[harness.Case]:
    shape = (1024, 1024) if args.quick else SHAPE
    names = {dtype: name for name, dtype in harness.DTYPES.items()}
    return [harness.Case(f"{shape[0]}x{shape[1]} {names[dtype]} density {d:g}",
                         dict(shape=shape, density=d, dtype=dtype, device=args.device))
            for dtype in args.dtypes for d in DENSITIES]


def inputs(case: harness.Case):
    shape, density, device, dtype = (case.params[k] for k in ("shape", "density", "device", "dtype"))
    numel = shape[0] * shape[1]
    g = torch.Generator().manual_seed(0)
    k = round(density * numel)
    idx = torch.randperm(numel, generator=g)[:k].sort().values if k < numel else torch.arange(numel)
    weight = torch.randn(shape, generator=g).to(device, dtype)
    grad = torch.randn(shape, generator=g).to(device, dtype)
    return weight, grad, idx.to(device)


def dense_provider(weight, grad, idx):
    param = weight.clone().requires_grad_()
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[idx] = True
    mask = mask.view_as(weight)
    param.grad = grad.clone()
    opt = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def step():
        param.grad.mul_(mask)
        opt.step()
        state = opt.state[param]
        return state["exp_avg"], state["exp_avg_sq"]

    return step


def naive_provider(weight, grad, idx):
    param = weight.clone()
    selected = param.view(-1)[idx].clone().requires_grad_()
    opt = torch.optim.AdamW([selected], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def step():
        selected.grad = grad.view(-1)[idx]
        opt.step()
        param.view(-1)[idx] = selected.detach()
        state = opt.state[selected]
        return state["exp_avg"], state["exp_avg_sq"], idx

    return step


def ours_provider(weight, grad, idx):
    param = weight.clone()
    indices = idx.to(torch.int32)  # 4096 * 4096 < 2^31: int32 halves the index bytes
    exp_avg = torch.zeros(idx.numel(), device=weight.device)
    exp_avg_sq = torch.zeros_like(exp_avg)
    master = param.view(-1)[idx].float() if param.dtype != torch.float32 else None
    count = [0]

    def step():
        count[0] += 1
        ops.masked_adamw_step_(param, grad, indices, exp_avg, exp_avg_sq, step=count[0], lr=LR, beta1=BETAS[0],
                               beta2=BETAS[1], eps=EPS, weight_decay=WD, master=master)
        return exp_avg, exp_avg_sq, indices, master

    return step


def check(weight, grad, idx) -> None:
    """Three steps of ours against the reference, bit for bit, on a 64-row slice (the reference is dense)."""
    rows = weight[:64].contiguous()
    sel = idx[idx < rows.numel()]
    ours = rows.clone()
    ref = rows.clone()
    state = [torch.zeros(sel.numel(), device=weight.device) for _ in range(4)]
    masters = [rows.view(-1)[sel].float() if rows.dtype != torch.float32 else None for _ in range(2)]
    for step in (1, 2, 3):
        ops.masked_adamw_step_(ours, grad[:64].contiguous(), sel, state[0], state[1], step=step, lr=LR,
                               beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD, master=masters[0])
        reference.masked_adamw_step_(ref, grad[:64].contiguous(), sel, state[2], state[3], masters[1], step, LR,
                                     BETAS[0], BETAS[1], EPS, WD)
    assert torch.equal(ours, ref), "masked_adamw_step_ differs from peft_kernels.reference"


def providers(case: harness.Case, mode: str) -> dict:
    weight, grad, idx = inputs(case)
    check(weight, grad, idx)
    return {"dense": dense_provider(weight, grad, idx), "naive": naive_provider(weight, grad, idx),
            "ours": ours_provider(weight, grad, idx)}


def summary(rows: list[harness.Row]) -> None:
    print("\n| case | naive / dense time | ours / dense time | ours / dense state bytes |")
    print("|---|--:|--:|--:|")
    by = {(r.case, r.provider): r for r in rows}
    for case in dict.fromkeys(r.case for r in rows):
        dense, naive, ours = by[case, "dense"], by[case, "naive"], by[case, "ours"]
        print(f"| {case} | {naive.ratio:.3f} | {ours.ratio:.3f} | {ours.mem_bytes / dense.mem_bytes:.4f} |")


if __name__ == "__main__":
    _, result = harness.main("sparse", cases, providers, modes=("step",), baseline="dense", default_dtypes="fp32")
    summary(result)
