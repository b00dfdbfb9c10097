"""The executor as an instrument: a tensor-core GEMM runs right, its bugs are caught, and the counters are right.

python_tests/cuda/mma_gemm.cu is written as our tensor-core kernels are (3-stage cp.async pipeline, ldmatrix,
mma.m16n8k16): it must match the float64 product of its 16-bit inputs within twice fp32 matmul's own error,
and each mutant (one deliberate bug of the kinds these kernels get wrong) must be caught. Counters are checked
on kernels whose costs are known in advance (python_tests/cuda/counters_textbook.cu) and on the GEMM, whose
mma count, traffic and conflicts follow from its tiling. Sampled counters must equal exact ones within 2%, and
a 4096x4096 layer at M = 2048 must be counted in under 60 s.

The primitives' fragment layouts against a NumPy model are test_executor_primitives.py.
"""

import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest
import torch

from peft_kernels import sim

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_INCLUDE = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
GEMM = ROOT / "python_tests" / "cuda" / "mma_gemm.cu"
TEXTBOOK = ROOT / "python_tests" / "cuda" / "counters_textbook.cu"
FLAGS = ["-std=c++20", "-O1", "-DPEFT_KERNELS_CUDASIM", f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'sim'}",
         f"-I{CUDA_INCLUDE}"]
COUNTED = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]

if not (CUDA_INCLUDE / "cuda_runtime.h").is_file() or shutil.which("g++") is None:
    pytest.skip(f"needs g++ and the CUDA headers under {CUDA_INCLUDE} (set CUDA_HOME)", allow_module_level=True)


def gxx(*args):
    r = subprocess.run(["g++", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> pathlib.Path:
    """The executor's runtime and the counters' hooks, compiled once, never instrumented."""
    out = tmp_path_factory.mktemp("runtime")
    gxx(*FLAGS, "-c", str(ROOT / "csrc" / "sim" / "cudasim_rt.cpp"), "-o", str(out / "rt.o"))
    gxx(*FLAGS, "-c", str(ROOT / "csrc" / "sim" / "cudasim_count.cpp"), "-o", str(out / "count.o"))
    return out


def build(runtime: pathlib.Path, source: pathlib.Path, exe: pathlib.Path, counted: bool, text: str | None = None):
    """Compiles a standalone kernel file (or `text` standing in for it) against the executor."""
    if text is not None:
        source = exe.with_suffix(".cu")
        source.write_text(text)
    obj = exe.with_suffix(".o")
    gxx(*FLAGS, *(COUNTED if counted else []), "-x", "c++", "-c", str(source), "-o", str(obj))
    gxx(str(obj), str(runtime / "rt.o"), *([str(runtime / "count.o")] if counted else []), "-lpthread", "-o", str(exe))
    return exe


@pytest.fixture(scope="module")
def gemm(runtime, tmp_path_factory):
    return build(runtime, GEMM, tmp_path_factory.mktemp("gemm") / "mma_gemm", counted=False)


@pytest.fixture(scope="module")
def gemm_counted(runtime, tmp_path_factory):
    return build(runtime, GEMM, tmp_path_factory.mktemp("gemm_counted") / "mma_gemm", counted=True)


def run_gemm(exe, work: pathlib.Path, m, n, k, dtype, seed=0):
    """Runs the GEMM on random inputs; returns (its output, the float64 product, fp32 matmul's error)."""
    work.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    a.view(torch.int16).numpy().tofile(work / "a.b16")
    b.view(torch.int16).numpy().tofile(work / "b.b16")
    (work / "c.f32").unlink(missing_ok=True)
    r = subprocess.run([str(exe), str(work), str(m), str(n), str(k), "f16" if dtype == torch.float16 else "bf16"],
                       capture_output=True, text=True, timeout=120)
    want = a.double() @ b.double()
    ref_err = ((a.float() @ b.float()).double() - want).abs().max().item()
    if r.returncode != 0:
        return r, want, ref_err
    got = torch.frombuffer(bytearray((work / "c.f32").read_bytes()), dtype=torch.float32).reshape(m, n)
    return got, want, ref_err


def agrees(got, want, ref_err) -> bool:
    """Within twice fp32 matmul's own error of the float64 product, plus a small atol; never NaN."""
    return bool(torch.isfinite(got).all()) and (got.double() - want).abs().max().item() <= 2 * ref_err + 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", [(64, 64, 64), (128, 192, 96)], ids=["64x64x64", "128x192x96"])
def test_gemm_matches_matmul(gemm, tmp_path, dtype, shape):
    got, want, ref_err = run_gemm(gemm, tmp_path, *shape, dtype)
    assert isinstance(got, torch.Tensor), got.stderr
    assert agrees(got, want, ref_err), (got.double() - want).abs().max().item()


SOURCE = GEMM.read_text()
# (id, text replaced, replacement): each a bug our tensor-core kernels can have
MUTANTS = [
    # the second n8 tile takes matrix 3 (its k 8..15 half) as its k 0..7 half: a wrong fragment index
    ("wrong-fragment-index", "b[j + 1][0] = r[2];", "b[j + 1][0] = r[3];"),
    # B is K-major in shared memory: without .trans each lane gets a row pair instead of a column pair
    ("ldmatrix-without-trans", "pk::ptx::ldmatrix_x4_trans(r,", "pk::ptx::ldmatrix_x4(r,"),
    # compute reads a stage whose copies were never waited on
    ("missing-cp-async-wait", "    pk::ptx::cp_async_wait<kStages - 2>();\n", ""),
    # each warp waits for its own copies only, then reads rows the other warps copied
    ("missing-barrier-after-wait", "    pk::ptx::cp_async_wait<kStages - 2>();\n    __syncthreads();\n",
     "    pk::ptx::cp_async_wait<kStages - 2>();\n"),
    # the stage read is the one being filled next
    ("stage-off-by-one", "const int st = kt % kStages;", "const int st = (kt + 1) % kStages;"),
]


@pytest.mark.parametrize("old,new", [m[1:] for m in MUTANTS], ids=[m[0] for m in MUTANTS])
def test_gemm_mutant_is_caught(runtime, tmp_path, old, new):
    assert SOURCE.count(old) == 1, f"mutation site {old!r} not found once in {GEMM.name}: update MUTANTS"
    exe = build(runtime, GEMM, tmp_path / "mutant", counted=False, text=SOURCE.replace(old, new))
    got, want, ref_err = run_gemm(exe, tmp_path / "run", 128, 128, 128, torch.bfloat16)
    assert not isinstance(got, torch.Tensor) or not agrees(got, want, ref_err), "mutant survived"


# ---- counters ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def textbook(runtime, tmp_path_factory):
    return build(runtime, TEXTBOOK, tmp_path_factory.mktemp("textbook") / "textbook", counted=True)


def one_launch(cmd, **kw) -> dict:
    (launch,) = sim.run_counted([str(c) for c in cmd], **kw)
    return sim.derived(launch)


def test_coalesced_float4_copy_is_fully_efficient(textbook):
    d = one_launch([textbook, "copy_float4"])
    assert d["global_load_sectors"] == 512 and d["load_sector_efficiency"] == 1.0  # 4096 floats, 16 B a lane
    assert d["store_sector_efficiency"] == 1.0 and d["dram_bytes"] == 2 * 4096 * 4


def test_stride_32_copy_uses_an_eighth_of_each_sector(textbook):
    d = one_launch([textbook, "copy_stride32"])
    assert d["load_sector_efficiency"] == 0.125 and d["store_sector_efficiency"] == 1.0


def test_counters_per_buffer(textbook):
    """Each named buffer's own traffic: the stride-32 copy's loads (all from `in`) use an eighth of each sector,
    its stores (all to `out`) whole sectors, and the two add up to the launch's totals."""
    d = one_launch([textbook, "copy_stride32"])
    by = {b["name"]: b for b in d["buffers"]}
    assert sorted(by) == ["in", "out"]
    src, dst = by["in"], by["out"]
    assert src["load_sectors"] == d["global_load_sectors"] == 4096 and src["store_requests"] == 0
    assert src["load_sector_efficiency"] == 0.125 and src["dram_bytes"] == 4096 * 32
    assert dst["store_sectors"] == d["global_store_sectors"] == 512 and dst["load_requests"] == 0
    assert dst["store_sector_efficiency"] == 1.0 and dst["dram_bytes"] == 4096 * 4
    assert src["bytes"] == 32 * 4096 * 4 and dst["bytes"] == 4096 * 4


def test_transpose_conflicts_vanish_with_padding(textbook):
    plain, padded = one_launch([textbook, "transpose"]), one_launch([textbook, "transpose_padded"])
    # 32 warps each store a row (conflict-free) and read a column: 32 words of one bank, 31 extra wavefronts
    assert plain["shared_requests"] == padded["shared_requests"] == 64
    assert plain["shared_wavefronts"] - plain["shared_min_wavefronts"] == 32 * 31
    assert padded["shared_wavefronts"] == padded["shared_min_wavefronts"] == 64


def test_broadcast_read_has_no_conflict(textbook):
    d = one_launch([textbook, "broadcast"])
    assert d["shared_wavefronts"] == d["shared_min_wavefronts"] > 0
    assert d["load_sector_efficiency"] == 1.0


def test_gemm_counters_follow_from_its_tiling(gemm_counted):
    m, n, k = 128, 192, 96
    d = one_launch([gemm_counted, "-", m, n, k, "bf16"])
    assert not d["sampled"] and d["blocks_run"] == d["blocks"] == (m // 64) * (n // 64)
    assert d["mma"] == m * n * k / (16 * 8 * 16) and d["tensor_flops"] == 2 * m * n * k
    # each block streams its 64-row slab of A and 64-column slab of B: N/64 and M/64 re-reads
    assert d["cp_async_bytes"] == 2 * (m * k * (n // 64) + k * n * (m // 64))
    assert d["load_sector_efficiency"] == 1.0
    assert d["dram_bytes"] == 2 * (m * k + k * n) + 4 * m * n  # every byte of A, B and C once
    # the padded tiles: ldmatrix conflict-free; cp.async's 16-byte stores 2 rows per quarter-warp, which the
    # 80-byte A rows make collide (1.5 wavefronts each on average)
    assert d["ldmatrix_wavefronts"] == d["ldmatrix_min_wavefronts"] == d["ldmatrix"] * 4
    assert d["shared_wavefronts"] == 1.5 * d["shared_min_wavefronts"]


def numeric(d: dict) -> dict:
    skip = {"blocks_run", "sampled", "host_seconds"}
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


def close(sampled: dict, exact: dict, rel=0.02) -> list[str]:
    return [f"{k}: sampled {sampled[k]} vs exact {v}" for k, v in numeric(exact).items()
            if abs(sampled[k] - v) > rel * abs(v) + 1e-9]


def test_sampled_counters_equal_exact_ones_on_a_medium_gemm(gemm_counted):
    cmd = [gemm_counted, "-", 512, 768, 256, "bf16"]  # 8x12 blocks: 36 on the edges, 60 inside
    exact, sampled = one_launch(cmd, sample="exact"), one_launch(cmd, sample=8, seed=3)
    assert sampled["sampled"] and sampled["blocks_run"] == 36 + 8 and not exact["sampled"]
    assert close(sampled, exact) == []


def test_sampled_counters_equal_exact_ones_on_a_scalar_kernel():
    """LoRA's fp32 backward kernels (dx: one thread per 4 elements, 256 blocks; dA: 32-column slices in 2 row splits,
    64 blocks; the split reduction), sampled against every block."""
    exact = sim.profile("lora_backward", 256, 1024, 16, dtype="f32", sample="exact")
    sampled = sim.profile("lora_backward", 256, 1024, 16, dtype="f32", sample=8, seed=1)
    assert [d["kernel"] for d in exact] == [d["kernel"] for d in sampled]
    for s, e in zip(sampled, exact):
        assert close(s, e) == [], s["kernel"]


def test_a_llama_layer_is_counted_in_under_a_minute(gemm_counted):
    """The 4096x4096 layer's GEMM at M = 2048: 2048 blocks, 188 on the edges, sampled."""
    start = time.perf_counter()
    d = one_launch([gemm_counted, "-", 2048, 4096, 4096, "bf16"])
    elapsed = time.perf_counter() - start
    assert d["sampled"] and d["blocks_run"] == 188 + 8
    assert d["mma"] == 2048 * 4096 * 4096 / 2048
    assert d["dram_bytes"] == 2 * (2048 * 4096 + 4096 * 4096) + 4 * 2048 * 4096
    assert elapsed < 60, f"{elapsed:.1f} s"


def test_profile_rejects_bad_input():
    with pytest.raises(ValueError, match=r"op: expected one of"):
        sim.profile("nf4_matmul", 1, 2, 3)
    with pytest.raises(ValueError, match=r"shape: nf4_gemv takes M IN OUT DTYPE, got 2 sizes"):
        sim.profile("nf4_gemv", 1, 4096)
    with pytest.raises(ValueError, match=r"dtype: expected"):
        sim.profile("nf4_gemv", 1, 64, 64, dtype="fp8")
    with pytest.raises(RuntimeError, match=re.escape("nf4_gemv needs 1 <= M <= 16")):
        sim.profile("nf4_gemv", 17, 64, 64)
    with pytest.raises(RuntimeError, match=re.escape("nf4_gemm needs M, IN, OUT >= 1 and IN*OUT % 64 == 0")):
        sim.profile("nf4_gemm", 1, 2, 3)
