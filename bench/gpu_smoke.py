"""Every CUDA kernel once, on small odd shapes, for compute-sanitizer (memcheck, racecheck) on a GPU machine:

    compute-sanitizer --tool memcheck python -P bench/gpu_smoke.py
    python -P bench/gpu_smoke.py cpu      # the same script on the CPU kernels (checks the script itself)

Values are checked against the reference too, so a sanitizer-clean but wrong kernel still fails (exit 1).
"""

import sys

import torch

import peft_kernels as pk
from peft_kernels import reference as R


def close(name, got, want, tol):
    err = (got.float() - want.float()).abs().max().item()
    print(f"{name}: max |error| {err:.3g}")
    if not err <= tol:
        raise SystemExit(f"{name}: error {err} above {tol}")


def main() -> None:
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke: no CUDA device")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 67 * 2, generator=g) * 0.1).to(dev)
    q = pk.nf4_quantize(w, 64, True)
    # NF4's widest gap between levels is 0.30 of a block's absmax: half of it bounds the rounding error.
    close("nf4 round trip", q.dequantize(), w, 0.16 * w.abs().max().item())
    # in 134: the GEMV (3 rows) and the tiled path (40); in 160: the tensor-core GEMM and dx (40 rows, 3 stages)
    for rows, cols in ((3, 134), (40, 134), (40, 160)):
        x = torch.randn(rows, cols, generator=g).to(dev, torch.bfloat16).requires_grad_()
        qb = pk.nf4_quantize((torch.randn(96, cols, generator=g) * 0.1).to(dev, torch.bfloat16), 64, True)
        y = pk.nf4_linear(x, qb)
        y.float().sum().backward()
        close(f"nf4_linear rows={rows} in={cols}", y, R.nf4_linear(x.detach().float(), qb), 0.05)
        want_dx = torch.ones(rows, 96, device=dev) @ pk.nf4_dequantize(qb).float()
        close(f"nf4_linear dx rows={rows} in={cols}", x.grad, want_dx, 0.05 * want_dx.abs().max().item())
    x = torch.randn(37, 67, generator=g).to(dev).requires_grad_()
    weight = torch.randn(45, 67, generator=g).to(dev) * 0.1
    a = (torch.randn(5, 67, generator=g) * 0.1).to(dev).requires_grad_()
    b = (torch.randn(45, 5, generator=g) * 0.1).to(dev).requires_grad_()
    y = pk.lora_linear(x, weight, None, a, b, 0.5, 0.3, seed=7)
    y.sum().backward()
    want = R.lora_linear(x.detach().cpu(), weight.cpu(), None, a.detach().cpu(), b.detach().cpu(), 0.5, 0.3, 7)
    close("lora_linear p=0.3", y.cpu(), want, 1e-4)
    # bf16 at 130 x 200, r = 24: the tensor-core LoRA kernels' cp.async paths, partial tiles and two dA row splits
    x3 = torch.randn(130, 200, generator=g).to(dev, torch.bfloat16).requires_grad_()
    w3 = (torch.randn(45, 200, generator=g) * 0.05).to(dev, torch.bfloat16)
    a3 = (torch.randn(24, 200, generator=g) * 0.1).to(dev, torch.bfloat16).requires_grad_()
    b3 = (torch.randn(45, 24, generator=g) * 0.1).to(dev, torch.bfloat16).requires_grad_()
    y = pk.lora_linear(x3, w3, None, a3, b3, 0.5, 0.3, seed=7)
    y.float().sum().backward()
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x3, a3, b3)]
    want = R.lora_linear(leaves[0], w3.cpu().double(), None, leaves[1], leaves[2], 0.5, 0.3, 7)
    want.sum().backward()
    close("lora_linear bf16 p=0.3", y.cpu(), want.detach(), 0.05)
    for name, got, ref in zip(("dx", "dA", "dB"), (x3.grad, a3.grad, b3.grad), leaves):
        close(f"lora_linear bf16 {name}", got.cpu(), ref.grad, 0.03 * ref.grad.abs().max().item())
    # KronA: bf16 37 rows x (13x3 (x) 24x40), the tensor-core kernels (partial tiles, both halves of a 16-row slice,
    # 37 row splits); fp32 the CUDA-core ones
    for dtype, tol in ((torch.bfloat16, 0.05), (torch.float32, 1e-4)):
        xk = torch.randn(37, 120, generator=g).to(dev, dtype).requires_grad_()
        ak = (torch.randn(13, 3, generator=g) * 0.5).to(dev, dtype).requires_grad_()
        bk = (torch.randn(24, 40, generator=g) * 0.2).to(dev, dtype).requires_grad_()
        y = pk.kron_linear(xk, ak, bk, scaling=0.8, dropout_p=0.3, seed=7)
        y.float().sum().backward()
        leaves = [t.detach().cpu().double().requires_grad_() for t in (xk, ak, bk)]
        want = R.kron_linear(leaves[0], leaves[1], leaves[2], 0.8, dropout_p=0.3, seed=7)
        want.sum().backward()
        label = f"kron_linear {str(dtype).removeprefix('torch.')}"
        close(label, y.cpu(), want.detach(), tol * want.abs().max().item())
        for name, got, ref in zip(("dx", "dA", "dB"), (xk.grad, ak.grad, bk.grad), leaves):
            close(f"{label} {name}", got.cpu(), ref.grad, tol * ref.grad.abs().max().item())
    qw = pk.nf4_quantize(torch.randn(45, 64, generator=g).to(dev) * 0.1, 64, True)
    x2 = torch.randn(37, 64, generator=g).to(dev).requires_grad_()
    a2 = (torch.randn(5, 64, generator=g) * 0.1).to(dev).requires_grad_()
    y = pk.qlora_linear(x2, qw, None, a2, b, 0.5, 0.3, seed=7)
    y.sum().backward()
    close("qlora_linear p=0.3", y, R.qlora_linear(x2.detach(), qw, None, a2.detach(), b.detach(), 0.5, 0.3, 7).to(dev), 1e-4)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("gpu_smoke: all kernels ran and matched the reference")


if __name__ == "__main__":
    sys.exit(main())
