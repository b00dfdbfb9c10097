"""The CUDA kernels under ThreadSanitizer and AddressSanitizer, and mutants of them that the suite must catch.

csrc/sim/kernel_driver.cpp runs the launchers of csrc/cuda/*.cu (NF4, LoRA dropout, kron_linear and sparse AdamW
kernels) through the CPU executor on files written here; built with -fsanitize=thread or =address and run
with CUDASIM_MODE=threads (every CUDA thread an OS thread) on tiny grids. Outputs are compared with
peft_kernels.reference.

The mutants are the real kernel sources with one deliberate bug each, written to a temporary directory and
never part of the build: each must be caught — by a sanitizer report, a crash, or a wrong output. A
mutant that survives means these tests cannot see that class of bug.

Run only these: ``pytest -m sanitize``.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

import peft_kernels as pk
from peft_kernels import reference as R

pytestmark = pytest.mark.sanitize

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_INCLUDE = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
NUMEL, BLOCKSIZE, NUMEL8 = 704, 64, 300  # 11 NF4 blocks (2 thread blocks), 8-bit: one full block + a partial
LORA_SEED, LORA_P, LORA_SCALING = 2024, 0.3, 0.5
# LoRA dropout kernels (dtype, M, in, r). fp32 (CUDA-core kernels): 130 rows make two dA splits (128 rows and 2), in 67
# makes rows that are not 16-byte multiples (element-wise loads; chunks straddle Philox groups). bf16 (tensor cores):
# 130 x 200 x 24 takes the cp.async paths with partial tiles everywhere (9 down blocks of 16 rows; dx column tiles of
# 128 and 72; 7 dA slices of 32 columns, the last of 8, in two splits; 24 ranks: a partial 16-rank step); 37 x 67 x 5
# the element-wise staging.
LORA_CASES = [("f32", 130, 67, 5), ("bf16", 130, 200, 24), ("bf16", 37, 67, 5)]
# tensor-core GEMM and dx: M rows (a partial 128-row tile), in 288 (5 pipeline stages of 64, the last one half
# full; 4.5 NF4 blocks of 64 per row, so blocks straddle rows), out 136 (a partial 128-column tile), bf16
TC_M, TC_IN, TC_OUT = 37, 288, 136
# NF4 GEMV cases (m rows of x, out; the weight [out, NUMEL / out]; x SHIFT floats into its buffer): in = 22 and 11
# take the element-wise path (rows straddle the 64-element blocks; odd rows start on a low nibble at in = 11);
# in = 64 (one lane pair per row) and 352 (11 chunks: the last pair is half) take the 16-byte path, m = 1, 3, 5 in
# its row buckets 1, 4, 8; in = 64 with x 4 bytes off 16-byte alignment falls back to the element-wise path.
GEMV_CASES = [(3, 32, 0), (5, 64, 0), (3, 11, 0), (1, 11, 0), (5, 2, 0), (3, 11, 1)]
# A wider GEMV of its own weight (blocksize 32): 129 chunks per row, so all 4 warps splitting K of a row group
# hold partial sums and one of them takes a second step, ending on half a pair; 3 rows of a group of 4.
WIDE_GEMV = dict(m=5, in_=4128, out=3, blocksize=32)
# kron_linear: M rows, A [AO, AI], B [BO, BI] (in 10, out 12; 6 and 20 dA/dB blocks of 256 threads), fp32 (the
# CUDA-core kernels); KRON_TC: bf16 on tensor cores, every 16-wide tile partial (a_out 13: both 8-row halves of a
# slice, a_in 3, b_in 40), y's 32-column chunk partial (b_out 24), 37 rows (37 row blocks and 37 splits of one row)
KRON_M, KRON_AO, KRON_AI, KRON_BO, KRON_BI, KRON_SEED, KRON_P, KRON_SCALING = 7, 3, 2, 4, 5, 77, 0.3, 0.8
KRON_TC = (37, 13, 3, 24, 40)
# Sparse AdamW: 1531 of 4999 entries, 11 warps of 128 and a partial 123 (two 256-thread blocks). The
# first 76 indices are, by groups of 4: 16 runs of consecutive indices from a multiple of 4 (one 16-byte vector
# of the param), one from a multiple of 4 with a gap (64, 65, 66, 68), one consecutive from 70, one more run.
ADAMW_NUMEL, ADAMW_K, ADAMW_SEED, ADAMW_P = 4999, 1531, 77, 0.6
ADAMW_HEAD = list(range(64)) + [64, 65, 66, 68] + [70, 71, 72, 73] + [76, 77, 78, 79]
# 8-bit AdamW: 5420 elements are two 256-thread blocks (8 warps of 512 elements, then 2 full spans and a partial
# one of 300: a whole absmax block and 44 elements of a 22nd), 3 steps from zero moments; gradients spread over
# four decades so the moments use much of the dynamic maps
ADAMW8_NUMEL, ADAMW8_STEPS = 5420, 3

if not (CUDA_INCLUDE / "cuda_runtime.h").is_file() or shutil.which("g++") is None:
    pytest.skip(f"needs g++ and the CUDA headers under {CUDA_INCLUDE} (set CUDA_HOME)", allow_module_level=True)


def build(out_dir: pathlib.Path, sanitizer: str | None, replace: dict[str, str] | None = None) -> pathlib.Path:
    """Compile the driver; `replace` maps a csrc/cuda file name to the text that stands in for it. The mutated
    sources are a copy of csrc/cuda in out_dir: a header such as launch.h is found by the .cu files that include
    it (a quoted include looks in the including file's directory first)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda_dir = CSRC / "cuda"
    if replace:
        cuda_dir = out_dir / "cuda"
        shutil.copytree(CSRC / "cuda", cuda_dir, dirs_exist_ok=True)
        for name, text in replace.items():
            (cuda_dir / name).write_text(text)
    includes = [f"-I{cuda_dir}", f"-I{CSRC / 'include'}", f"-I{CSRC / 'sim'}", f"-I{CUDA_INCLUDE}"]
    exe = out_dir / "kernel_driver"
    flags = ["-std=c++20", "-O1", "-g", "-ffp-contract=off", "-DPEFT_KERNELS_CUDASIM"]
    if sanitizer:
        flags.append(f"-fsanitize={sanitizer}")
    cmd = ["g++", *flags, *includes, str(CSRC / "sim" / "kernel_driver.cpp"), str(CSRC / "sim" / "cudasim_rt.cpp"),
           "-lpthread", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def write(path: pathlib.Path, t: torch.Tensor) -> None:
    t.contiguous().cpu().numpy().tofile(path)


def read(path: pathlib.Path, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=dtype)


class Case:
    """Inputs for every kernel of nf4.cu, and the reference outputs."""

    def __init__(self, work: pathlib.Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(7)
        self.weight = torch.randn(NUMEL, generator=g) * torch.linspace(0.1, 3, NUMEL)
        self.code = pk.dynamic_map()
        self.x8 = torch.randn(NUMEL8, generator=g)
        self.ref = R.nf4_quantize(self.weight, BLOCKSIZE, self.code)
        self.ref_plain = R.nf4_quantize(self.weight, BLOCKSIZE, None)
        self.gemv_bias = torch.randn(67, generator=g)
        self.lora = {}  # (m, in, r) -> x, A, dxa, dx
        for _, m, n_in, r in LORA_CASES:
            lg = torch.Generator().manual_seed(m * n_in + r)
            self.lora[m, n_in, r] = tuple(torch.randn(*shape, generator=lg) for shape in ((m, n_in), (r, n_in), (m, r), (m, n_in)))
        self.kron = {}  # dtype -> x, a, b, y, dy, dx
        for dtype, (m, ao, ai, bo, bi) in (("f32", (KRON_M, KRON_AO, KRON_AI, KRON_BO, KRON_BI)), ("bf16", KRON_TC)):
            self.kron[dtype] = {
                "x": torch.randn(m, ai * bi, generator=g),
                "a": torch.randn(ao, ai, generator=g),
                "b": torch.randn(bo, bi, generator=g),
                "y": torch.randn(m, ao * bo, generator=g),
                "dy": torch.randn(m, ao * bo, generator=g),
                "dx": torch.randn(m, ai * bi, generator=g),
            }
        self.adamw_param = torch.randn(ADAMW_NUMEL, generator=g)
        self.adamw_grad = torch.randn(ADAMW_NUMEL, generator=g)
        rest = 80 + torch.randperm(ADAMW_NUMEL - 80, generator=g)[:ADAMW_K - len(ADAMW_HEAD)].sort().values
        self.adamw_idx = torch.cat([torch.tensor(ADAMW_HEAD), rest])
        self.adamw8_param = torch.randn(ADAMW8_NUMEL, generator=g)
        self.adamw8_grad = torch.randn(ADAMW8_STEPS, ADAMW8_NUMEL, generator=g) * 10 ** torch.empty(
            ADAMW8_STEPS, ADAMW8_NUMEL).uniform_(-4, 0, generator=g)
        self.wide_x = torch.randn(WIDE_GEMV["m"], WIDE_GEMV["in_"], generator=g)
        self.wide_weight = torch.randn(WIDE_GEMV["out"] * WIDE_GEMV["in_"], generator=g)
        write(work / "weight.f32", self.weight)
        write(work / "code.f32", self.code)

    def run(self, exe: pathlib.Path, kernel: str, *args) -> subprocess.CompletedProcess:
        env = dict(os.environ, CUDASIM_MODE="threads", TSAN_OPTIONS="halt_on_error=1 exitcode=66",
                   ASAN_OPTIONS="detect_leaks=0 exitcode=67")
        return subprocess.run([str(exe), kernel, str(self.work), *map(str, args)], env=env, capture_output=True,
                              text=True, timeout=300)

    def gemv(self, step, compare, name, m, n_out, blocksize, w, shift):
        """Runs the GEMV kernel against the dequantized weight w [out, in] (codes.u8 and absmax.f32 written):
        y = x w^T + bias, x the first m rows and in columns of wide_x."""
        n_in = w.shape[1]
        x, bias = self.wide_x[:m, :n_in], self.gemv_bias[:n_out]
        write(self.work / "x.f32", x.contiguous())
        write(self.work / "bias.f32", bias.contiguous())
        if step("gemv", m, n_in, n_out, blocksize, shift):
            compare(name, read(self.work / "y.f32", torch.float32), x.double() @ w.t() + bias.double(), 1e-5)

    def failures(self, exe: pathlib.Path, source: str | None = None) -> list[str]:
        """Runs every kernel, or those of one csrc/cuda file (a mutant's: the others are built from the same text as
        in the clean runs); returns what went wrong (sanitizer reports, crashes, wrong outputs)."""
        problems = []

        def step(kernel, *args):
            if source is not None and kernel not in KERNELS_OF[source]:
                return False
            r = self.run(exe, kernel, *args)
            if r.returncode != 0 or "Sanitizer" in r.stderr:
                reports = [line for line in r.stderr.splitlines() if "Sanitizer:" in line]
                problems.append(f"{kernel}: exit {r.returncode}: {reports[0] if reports else r.stderr[-2000:]}")
                return False
            return True

        def compare(name, got, want, tol=0.0, mag=None):
            """|got - want| <= tol (1 + |want| + mag): mag, where given, is the sum of the absolute values of the
            terms (the bound of an intermediate rounding inside the sum)."""
            got, want = got.double().reshape(-1), want.double().reshape(-1)
            scale = 1 + want.abs() + (0 if mag is None else mag.double().reshape(-1))
            # written as "not within" so that NaN (poison that a kernel read or never overwrote) counts as wrong
            bad = (~((got - want).abs() <= tol * scale)).sum().item()
            if bad:
                problems.append(f"{name}: {bad} of {want.numel()} elements differ")

        if step("encode", NUMEL, BLOCKSIZE):
            compare("encode codes", read(self.work / "codes.u8", torch.uint8), self.ref_plain[0])
            compare("encode absmax", read(self.work / "absmax.f32", torch.float32), self.ref_plain[1])
        write(self.work / "x.f32", self.x8)
        if step("quantize8", NUMEL8):
            q, absmax = R.quantize_blockwise_8bit(self.x8, self.code, 256)
            compare("quantize8 q", read(self.work / "q.u8", torch.uint8), q)
            compare("quantize8 absmax", read(self.work / "absmax.f32", torch.float32), absmax)
        codes, qabsmax, nested, offset = self.ref
        write(self.work / "codes.u8", codes)
        write(self.work / "absmax.f32", self.ref_plain[1])
        want = R.nf4_dequantize(codes, self.ref_plain[1], None, None, None, BLOCKSIZE, torch.float32)
        if step("decode", NUMEL, BLOCKSIZE):
            compare("decode", read(self.work / "out.f32", torch.float32), want)
        if step("decode", NUMEL, BLOCKSIZE, 1):  # out 4 bytes off 16-byte alignment: the byte-per-thread path
            compare("decode out+1", read(self.work / "out.f32", torch.float32), want)
        write(self.work / "q.u8", qabsmax)
        write(self.work / "nested.f32", nested)
        write(self.work / "offset.f32", offset.reshape(1))
        if step("decode8", NUMEL, BLOCKSIZE):
            want = R.nf4_dequantize(codes, qabsmax, nested, self.code, offset, BLOCKSIZE, torch.float32)
            compare("decode8", read(self.work / "out.f32", torch.float32), want)
        # NF4 GEMV against the plain-absmax weight as [out, NUMEL / out] (GEMV_CASES), then WIDE_GEMV
        w = R.nf4_dequantize(codes, self.ref_plain[1], None, None, None, BLOCKSIZE, torch.float32).double()
        for m, gemv_out, shift in GEMV_CASES:
            gemv_in = NUMEL // gemv_out
            self.gemv(step, compare, f"gemv m={m} in={gemv_in}" + (f" x+{shift}" if shift else ""), m, gemv_out,
                      BLOCKSIZE, w.reshape(gemv_out, gemv_in), shift)
        wide = WIDE_GEMV
        wide_codes, wide_absmax = R.nf4_quantize(self.wide_weight, wide["blocksize"], None)[:2]
        write(self.work / "codes.u8", wide_codes)
        write(self.work / "absmax.f32", wide_absmax)
        w = R.nf4_dequantize(wide_codes, wide_absmax, None, None, None, wide["blocksize"], torch.float32).double()
        self.gemv(step, compare, f"gemv m={wide['m']} in={wide['in_']}", wide["m"], wide["out"], wide["blocksize"],
                  w.reshape(wide["out"], wide["in_"]), 0)
        # Tensor-core NF4 GEMM and dx (bf16, double-quantized weight): against the bf16-rounded inputs and the
        # weight as the reference decodes it, in float64; the kernels accumulate in fp32 and round once to bf16.
        tc_w = torch.randn(TC_OUT, TC_IN, generator=torch.Generator().manual_seed(11)) * torch.linspace(0.2, 2, TC_IN)
        tc = R.nf4_quantize(tc_w.reshape(-1), BLOCKSIZE, self.code)
        tc_dense = R.nf4_dequantize(*tc[:2], tc[2], self.code, tc[3], BLOCKSIZE, torch.float32).reshape(TC_OUT, TC_IN)
        tc_dense = tc_dense.to(torch.bfloat16).double()
        tc_x = torch.randn(TC_M, TC_IN, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
        tc_dy = torch.randn(TC_M, TC_OUT, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
        tc_bias = torch.randn(TC_OUT, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
        for name, t in (("codes.u8", tc[0]), ("q.u8", tc[1]), ("nested.f32", tc[2]), ("offset.f32", tc[3].reshape(1)),
                        ("x.f32", tc_x.float()), ("dy.f32", tc_dy.float()), ("bias.f32", tc_bias.float())):
            write(self.work / name, t)
        bf16_ulp = 2.0**-7  # one rounding to bf16 (relative), plus fp32 accumulation noise far below it
        if step("gemm", TC_M, TC_IN, TC_OUT, BLOCKSIZE):
            want = (tc_x.double() @ tc_dense.t() + tc_bias.double()).to(torch.bfloat16)
            compare("gemm y", read(self.work / "y.f32", torch.float32), want, bf16_ulp)
        if step("dx", TC_M, TC_IN, TC_OUT, BLOCKSIZE):
            want = (tc_dy.double() @ tc_dense).to(torch.bfloat16)
            compare("dx", read(self.work / "dx.f32", torch.float32), want, bf16_ulp)
        # LoRA dropout kernels against the float64 reference: fp32 accumulation (a tolerance, not equality); bf16
        # against the bf16-rounded inputs, one rounding to bf16 at the end
        for dtype, m, n_in, r in LORA_CASES:
            x, a, dxa, dx = self.lora[m, n_in, r]
            if dtype == "bf16":
                x, a, dxa, dx = (t.to(torch.bfloat16).float() for t in (x, a, dxa, dx))
            rounded = (lambda t: t.to(torch.bfloat16)) if dtype == "bf16" else (lambda t: t)  # noqa: E731
            tol = 2.0**-7 if dtype == "bf16" else 1e-5
            keep = R.dropout_keep((m, n_in), LORA_P, LORA_SEED).double() / (1 - LORA_P)
            xd = x.double() * keep
            for name, t in (("x.f32", x), ("a.f32", a), ("dxa.f32", dxa), ("dx.f32", dx)):
                write(self.work / name, t)
            label = f"{dtype} {m}x{n_in}x{r}"
            if step("lora_down", m, n_in, r, LORA_SEED, LORA_P, dtype):
                compare(f"lora_down {label}", read(self.work / "xa.f32", torch.float32), rounded(xd @ a.double().t()), tol)
            if step("lora_bwd", m, n_in, r, LORA_SEED, LORA_P, LORA_SCALING, dtype):
                d = dxa.double() * LORA_SCALING
                compare(f"lora_bwd dx {label}", read(self.work / "dx.f32", torch.float32),
                        rounded(dx.double() + keep * (d @ a.double())), tol)
                compare(f"lora_bwd da {label}", read(self.work / "da.f32", torch.float32), rounded(d.t() @ xd), tol)
        # kron_linear kernels against the float64 torch.kron reference (y and dx accumulate onto given values); bf16
        # against the bf16-rounded inputs: the intermediate U = A X (G = dY B) is rounded to bf16 before the second
        # product, an error within 2^-9 of the sum of the terms' absolute values (the same products on |inputs|),
        # and y, dx, dA, dB are rounded once to bf16
        for dtype, sizes in (("f32", (KRON_M, KRON_AO, KRON_AI, KRON_BO, KRON_BI)), ("bf16", KRON_TC)):
            t = self.kron[dtype]
            if dtype == "bf16":
                t = {k: v.to(torch.bfloat16).float() for k, v in t.items()}
            for name, v in t.items():
                write(self.work / f"{name}.f32", v)

            def products(f):
                x, a, b = (f(t[k]).double().requires_grad_() for k in ("x", "a", "b"))
                y = R.kron_linear(x, a, b, KRON_SCALING, dropout_p=KRON_P, seed=KRON_SEED)
                return [y.detach(), *torch.autograd.grad(y, [x, a, b], f(t["dy"]).double())]

            want = products(lambda v: v)
            mag = products(torch.abs) if dtype == "bf16" else [None] * 4
            tol = 2.0**-7 if dtype == "bf16" else 1e-5
            args = (*sizes, KRON_SEED, KRON_P, KRON_SCALING, dtype)
            label = f"{dtype} " + "x".join(map(str, sizes))
            if step("kron_fwd", *args):
                compare(f"kron_fwd y {label}", read(self.work / "y.f32", torch.float32), t["y"].double() + want[0], tol,
                        mag[0])
            write(self.work / "dx.f32", t["dx"])
            if step("kron_bwd", *args):
                compare(f"kron_bwd dx {label}", read(self.work / "dx.f32", torch.float32), t["dx"].double() + want[1],
                        tol, mag[1])
                compare(f"kron_bwd da {label}", read(self.work / "da.f32", torch.float32), want[2], tol, mag[2])
                compare(f"kron_bwd db {label}", read(self.work / "db.f32", torch.float32), want[3], tol, mag[3])
        # Sparse AdamW with the Child-Tuning_F mask, two steps, against the reference bit for bit: the 16-byte path
        # (int64 indices, dense fp32 grad), the int32 / compact bf16 grad / bf16 param with master path, and the
        # lane-strided path of unaligned state
        idx = self.adamw_idx
        write(self.work / "idx.i64", idx)
        for variant in ("i64-dense-f32", "i32-compact-bf16", "unaligned"):
            bf16 = variant == "i32-compact-bf16"
            param = self.adamw_param.to(torch.bfloat16) if bf16 else self.adamw_param.clone()
            grad = self.adamw_grad[idx].to(torch.bfloat16) if bf16 else self.adamw_grad
            master = param[idx].float() if bf16 else None
            write(self.work / "param.f32", param.float())
            write(self.work / "grad.f32", grad.float())
            if step("masked_adamw", ADAMW_NUMEL, ADAMW_K, ADAMW_SEED, ADAMW_P, variant):
                m, v = torch.zeros(ADAMW_K), torch.zeros(ADAMW_K)
                for s in (1, 2):
                    R.masked_adamw_step_(param, grad, idx, m, v, master, s, 1e-2, 0.9, 0.999, 1e-8, 0.1, ADAMW_P,
                                         ADAMW_SEED)
                compare(f"masked_adamw {variant} param", read(self.work / "param.f32", torch.float32), param)
                compare(f"masked_adamw {variant} m", read(self.work / "m.f32", torch.float32), m)
                compare(f"masked_adamw {variant} v", read(self.work / "v.f32", torch.float32), v)
                if bf16:
                    compare(f"masked_adamw {variant} master", read(self.work / "master.f32", torch.float32), master)
        # 8-bit AdamW against the reference bit for bit: fp32 and bf16 params through the 16-byte path, an fp32
        # param 4 bytes off alignment through the element-wise path
        signed, unsigned = pk.dynamic_map(signed=True), pk.dynamic_map(signed=False)
        write(self.work / "signed.f32", signed)
        write(self.work / "unsigned.f32", unsigned)
        for variant in ("f32", "bf16", "unaligned"):
            dtype = torch.bfloat16 if variant == "bf16" else torch.float32
            param = self.adamw8_param.to(dtype)
            grads = self.adamw8_grad.to(dtype)
            write(self.work / "param.f32", param.float())
            write(self.work / "grad.f32", grads.float())
            if step("adamw8bit", ADAMW8_NUMEL, ADAMW8_STEPS, variant):
                n, blocks = ADAMW8_NUMEL, -(-ADAMW8_NUMEL // 256)
                state = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(blocks),
                         torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks)]
                for s in range(ADAMW8_STEPS):
                    R.adamw8bit_step_(param, grads[s], *state, signed, unsigned, s + 1, 1e-2, 0.9, 0.999, 1e-8, 0.1)
                compare(f"adamw8bit {variant} param", read(self.work / "param.f32", torch.float32), param.float())
                for name, got, want in (("m.u8", torch.uint8, state[0]), ("m_absmax.f32", torch.float32, state[1]),
                                        ("v.u8", torch.uint8, state[2]), ("v_absmax.f32", torch.float32, state[3])):
                    compare(f"adamw8bit {variant} {name}", read(self.work / name, got), want)
        return problems


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cudasim")


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_kernels_clean_under_sanitizer(work, sanitizer):
    exe = build(work / f"clean-{sanitizer}", sanitizer)
    assert Case(work / f"run-{sanitizer}").failures(exe) == []


# The driver's kernels by source file
KERNELS_OF = {"nf4.cu": {"encode", "quantize8", "decode", "decode8", "gemv"}, "nf4_gemm.cu": {"gemm", "dx"},
              "lora_linear.cu": {"lora_down", "lora_bwd"}, "kron_linear.cu": {"kron_fwd", "kron_bwd"},
              "masked_adamw.cu": {"masked_adamw"}, "adamw8bit.cu": {"adamw8bit"},
              "launch.h": {"encode", "quantize8", "adamw8bit"}}
SOURCES = {name: (CSRC / "cuda" / name).read_text() for name in KERNELS_OF}

# (id, file, text to replace, replacement, sanitizer the mutant is built with, a regex for how it must be caught)
MUTANTS = [
    # quantize8: warp 0 reads the other warps' partial maxima with no barrier after they are written
    ("missing-barrier", "nf4.cu", "    __syncthreads();\n    if (warp == 0) {", "    if (warp == 0) {", "thread",
     r"^quantize8: exit 66: WARNING: ThreadSanitizer: data race"),
    # the warps' absmax reduction (launch.h) skips the lanes 16 apart: half of each warp's maximum is lost
    ("short-reduction", "launch.h", "for (int offset = 16; offset > 0; offset >>= 1) m =", "for (int offset = 8; offset > 0; offset >>= 1) m =", None,
     r"^(encode absmax: \d+ of 11|adamw8bit f32 m_absmax.f32: \d+ of 22)"),
    # the 16-byte decode stores the pair past the last chunk: one 64-element group past the end of out
    ("off-by-one", "nf4.cu", "if (2 * d + q / 2 < chunks) {", "if (2 * d + q / 2 <= chunks) {", "address",
     r"^decode: exit 67: ==\d+==ERROR: AddressSanitizer: heap-buffer-overflow"),
    # the 16-byte decode writes the low nibble's value first
    ("nibble-order", "nf4.cu", "mul_rn(level[s * U + t], pc.scale[q / 2])", "mul_rn(level[(s * U + t) ^ 1], pc.scale[q / 2])",
     None, r"^decode: \d+ of 704 elements differ"),
    # the GEMV's halving reduction starts at lanes 8 apart: lanes 16 apart never meet
    ("gemv-short-reduction", "nf4.cu", "halving_sum<V, 16>(a, lane);", "halving_sum<V, 8>(a, lane);", None,
     r"^gemv m=3 in=64: \d+ of \d+ elements differ"),
    # the 16-byte GEMV pairs each x with the other nibble of its byte
    ("gemv-nibble-order", "nf4.cu", "dot += xv[j / U][j % U] * level[r][j];", "dot += xv[j / U][j % U] * level[r][j ^ 1];",
     None, r"^gemv m=3 in=64: \d+ of \d+ elements differ"),
    # the 16-byte GEMV forgets the block scale
    ("gemv-missing-scale", "nf4.cu", "a[i * R + r] += dot * pc[r].scale[q / 2];", "a[i * R + r] += dot;", None,
     r"^gemv m=5 in=352: \d+ of \d+ elements differ"),
    # the K-split partials of a row group: the last warp's are dropped (only WIDE_GEMV gives every warp work)
    ("gemv-lost-split", "nf4.cu", "for (int s = 0; s < kGemvSplit; ++s) sum +=", "for (int s = 0; s < kGemvSplit - 1; ++s) sum +=",
     None, r"^gemv m=5 in=4128: \d+ of 15 elements differ"),
    # the pair swap hands lane 1 its own chunk's first words instead of its partner's
    ("gemv-swap", "nf4.cu", "pc.word[0] = h ? got0 : keep0", "pc.word[0] = keep0", None,
     r"^gemv m=5 in=352: \d+ of \d+ elements differ"),
    # the GEMM multiplies the stage after the one that has landed (a wrong pipeline stage index)
    ("gemm-stage-index", "nf4_gemm.cu", "compute(stages[kt % kStages]);", "compute(stages[(kt + 1) % kStages]);", None,
     r"^gemm y: \d+ of 5032"),
    # the GEMM decodes the low nibble as the even element
    ("gemm-nibble-order", "nf4_gemm.cu", "pack2<T>(mul_rn(lut[byte >> 4], scale), mul_rn(lut[byte & 15u], scale))",
     "pack2<T>(mul_rn(lut[byte & 15u], scale), mul_rn(lut[byte >> 4], scale))", None, r"^gemm y: \d+ of 5032"),
    # the GEMM's warps multiply a stage as soon as their own copies landed, not everyone's (poison: NaN)
    ("gemm-missing-barrier", "nf4_gemm.cu", "cp_async_wait<kStages - 2>();\n    __syncthreads();\n    if (pending",
     "cp_async_wait<kStages - 2>();\n    if (pending", None, r"^gemm y: \d+ of 5032"),
    # dx leaves the NF4 block scale out of its B fragments
    ("dx-missing-scale", "nf4_gemm.cu", "const float scale = s.scales[row * 4 + warp_chunk];",
     "const float scale = 1.0f;", None, r"^dx: \d+ of 10656"),
    # dx takes column 4g + 1's nibble for column 4g
    ("dx-nibble-order", "nf4_gemm.cu", "lo[r][0] = mul_rn(lut[(codes >> 4) & 15u], scale);",
     "lo[r][0] = mul_rn(lut[codes & 15u], scale);", None, r"^dx: \d+ of 10656"),
    # the tensor-core dx applies the mask of the neighbouring element (a mask offset off by one)
    ("shifted-mask", "lora_linear.cu", "keep_bits<8>(p.drop, uint64_t(row * K + col))",
     "keep_bits<8>(p.drop, uint64_t(row * K + col + 1))", None, r"^lora_bwd dx bf16 130x200x24: \d+ of 26000"),
    # the tensor-core down projection reads rows 8-15 of its x slice where rows 0-7 at k 8-15 belong (a wrong fragment row)
    ("lora-down-fragment-row", "lora_linear.cu",
     "offset128(slice * 16 + (mat & 1) * 8 + (lane & 7), ks * 2 + (mat >> 1))",
     "offset128(slice * 16 + (mat >> 1) * 8 + (lane & 7), ks * 2 + (mat >> 1))", None,
     r"^lora_down bf16 130x200x24: \d+ of 3120"),
    # the tensor-core dA's x fragments read rows 0-7 of the step twice and never rows 8-15
    ("lora-da-fragment-row", "lora_linear.cu", "offset32(warp * 16 + (mat & 1) * 8 + (lane & 7)",
     "offset32(warp * 16 + (lane & 7)", None, r"^lora_bwd da bf16 130x200x24: \d+ of 4800"),
    # dA's reduction leaves out the last split-M partial (bf16 and fp32 share it)
    ("lora-da-missing-split", "lora_linear.cu", "for (int64_t sp = 0; sp < splits; ++sp)",
     "for (int64_t sp = 0; sp < splits - 1; ++sp)", None, r"^lora_bwd da f32 130x67x5: \d+ of 335"),
    # the fp32 down projection pairs x at column k ^ 1 with A at column k
    ("lora-f32-down-column", "lora_linear.cu", "acc[i] += xs[rows0 + i][k] * av;", "acc[i] += xs[rows0 + i][k ^ 1] * av;",
     None, r"^lora_down f32 130x67x5: \d+ of 650"),
    # the fp32 dx applies the mask of the neighbouring element
    ("lora-f32-shifted-mask", "lora_linear.cu", "keep_bits<4>(p.drop, uint64_t(i * K + k0))",
     "keep_bits<4>(p.drop, uint64_t(i * K + k0 + 1))", None, r"^lora_bwd dx f32 130x67x5: \d+ of 8710"),
    # the fp32 dA skips the last row of every 32-row tile
    ("lora-f32-da-short-tile", "lora_linear.cu", "for (int row = 0; row < 32; ++row)", "for (int row = 0; row < 31; ++row)",
     None, r"^lora_bwd da f32 130x67x5: \d+ of 335"),
    # kron_linear's block reduction: thread 0 sums the warps' partials before the other warps have written them
    ("kron-missing-barrier", "kron_linear.cu", "partial[threadIdx.x >> 5] = v;\n  __syncthreads();",
     "partial[threadIdx.x >> 5] = v;", "thread", r"^kron_bwd: exit 66: WARNING: ThreadSanitizer: data race"),
    # kron_linear's u kernel reads x[r, j, i] instead of x[r, i, j]: the Kronecker index map transposed
    ("kron-transposed-index", "kron_linear.cu", "kron::x_at(d, i, pj.inner)", "i + pj.inner * d.a_in", None,
     r"^kron_fwd y f32 7x3x2x4x5: \d+ of 84"),
    # the tensor-core fragments' rows 8-15 read rows 0-7 again (a wrong fragment row: A's slice in the forward)
    ("kron-tc-fragment-row", "kron_linear.cu", "return tile + (row0 + (lane & 15)) * stride",
     "return tile + (row0 + (lane & 7)) * stride", None, r"^kron_fwd y bf16 37x13x3x24x40: \d+ of 11544"),
    # the tensor-core dx applies the mask of the neighbouring element (a mask offset off by one)
    ("kron-tc-shifted-mask", "kron_linear.cu", "keep_bits<8>(p.drop, uint64_t(r * in + e))",
     "keep_bits<8>(p.drop, uint64_t(r * in + e + 1))", None, r"^kron_bwd dx bf16 37x13x3x24x40: \d+ of 4440"),
    # dA/dB's reduction leaves out the last split-M partial (one row of 37: dB's sums over 13 rows of dY per row show
    # it beyond the rounding bound; dA's, over 40 columns that mostly cancel, stay within it)
    ("kron-tc-missing-split", "kron_linear.cu", "for (int64_t sp = 0; sp < splits; ++sp)",
     "for (int64_t sp = 0; sp < splits - 1; ++sp)", None, r"^kron_bwd db bf16 37x13x3x24x40: \d+ of 960"),
    # the 16-byte path also takes the last, partial 128 entries: past the end of the indices and the state
    ("adamw-off-by-one", "masked_adamw.cu", "if (base + 32 * kVec <= k) {", "if (base < k) {", "address",
     r"^masked_adamw: exit 67: ==\d+==ERROR: AddressSanitizer: heap-buffer-overflow"),
    # the partial last 128 entries: lane 26 (which holds the selection's last entry) stops one short
    ("adamw-tail-drop", "masked_adamw.cu", "(k - first + 31) / 32", "(k - first + 30) / 32", None,
     r"^masked_adamw i64-dense-f32 param: \d+ of 4999"),
    # lanes 1 entry apart instead of 4: slots overlap and most entries are never updated (with int64 indices the
    # exchange then reads before the buffer and crashes)
    ("adamw-lane-offset", "masked_adamw.cu", "{base + kVec * lane, kVec}", "{base + lane, kVec}", None,
     r"^masked_adamw i32-compact-bf16 param: \d+ of 4999"),
    # the lane-strided path (unaligned state) takes lanes 16 entries apart
    ("adamw-strided-offset", "masked_adamw.cu", "L == Layout::kStrided ? 32 * i : i", "L == Layout::kStrided ? 16 * i : i",
     None, r"^masked_adamw unaligned param: \d+ of 4999"),
    # a run of 4 indices with one gap is taken for consecutive: the param vector at 64..67 instead of 64, 65, 66, 68
    ("adamw-run-gap", "masked_adamw.cu", "e[kVec - 1] - e[0] == kVec - 1", "e[kVec - 1] - e[0] <= kVec", None,
     r"^masked_adamw i64-dense-f32 param: \d+ of 4999"),
    # the int64 index exchange: lane 16 takes its chunks from the first loads (lanes 0 and 1's, again)
    ("adamw-index-exchange", "masked_adamw.cu", "e[2 * h] = lane < 16 ? a0 : b0;", "e[2 * h] = lane <= 16 ? a0 : b0;",
     None, r"^masked_adamw i64-dense-f32 param: \d+ of 4999"),
    # the 8-byte vector of a 16-bit compact grad read with its halves swapped
    ("adamw-half-order", "masked_adamw.cu", "for (int i = 0; i < kVec; ++i) v[i] = load_f32(h, i);",
     "for (int i = 0; i < kVec; ++i) v[i] = load_f32(h, i ^ 1);", None,
     r"^masked_adamw i32-compact-bf16 param: \d+ of 4999"),
    # the dense gradient is read at the entry's position in the selection instead of its flat index
    ("adamw-grad-position", "masked_adamw.cu", "g[i] = load_f32(grad, e[i]);", "g[i] = load_f32(grad, slot.at(i));",
     None, r"^masked_adamw i64-dense-f32 param: \d+ of 4999"),
    # Child-Tuning_F's mask keyed by the position in the selection instead of the element
    # 8-bit AdamW: the warp's span also taken whole when it runs past the parameter's end
    ("adamw8bit-off-by-one", "adamw8bit.cu", "if (kAligned && base + kSpan <= p.n)", "if (kAligned && base < p.n)",
     "address", r"^adamw8bit: exit 67: ==\d+==ERROR: AddressSanitizer: heap-buffer-overflow"),
    # the codes read back in their loaded order (lane L's 16) instead of the parameter's order
    ("adamw8bit-code-order", "adamw8bit.cu", "load_codes(staged[s] + O::element(a, lane, 0), q[s][a]);",
     "load_codes(staged[s] + 16 * lane + a * W, q[s][a]);", None, r"^adamw8bit f32 param: \d+ of 5420"),
    # lanes read the staged new codes back in the global order before the others have written theirs (the barrier
    # before that read; the one before the writes is also ordered by warp_absmax's shuffles in the executor)
    ("adamw8bit-missing-syncwarp", "adamw8bit.cu",
     "      for (int a = 0; a < A; ++a) store_codes(staged[s] + O::element(a, lane, 0), q[s][a]);\n    __syncwarp();",
     "      for (int a = 0; a < A; ++a) store_codes(staged[s] + O::element(a, lane, 0), q[s][a]);", "thread",
     r"^adamw8bit: exit 66: WARNING: ThreadSanitizer: data race"),
    ("adamw-child-key", "masked_adamw.cu", "sparse::child_scale(p.child, e[i])", "sparse::child_scale(p.child, slot.at(i))",
     None, r"^masked_adamw i64-dense-f32 param: \d+ of 4999"),
]


@pytest.mark.parametrize("name,source,old,new,sanitizer,caught_by", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(work, name, source, old, new, sanitizer, caught_by):
    assert SOURCES[source].count(old) == 1, f"mutation site of {name!r} not found once in {source}: update MUTANTS"
    exe = build(work / f"mutant-{name}", sanitizer, {source: SOURCES[source].replace(old, new)})
    problems = Case(work / f"mutant-run-{name}").failures(exe, source)
    assert any(re.search(caught_by, p) for p in problems), f"mutant {name!r} not caught as expected: {problems}"
