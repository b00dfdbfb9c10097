"""The CPU executor's pk::ptx primitives (mma.m16n8k16, ldmatrix, cp.async) against NumPy models of the PTX ISA.

python_tests/cuda/ptx_probe.cu runs one primitive per invocation through csrc/sim on inputs written here and
writes every lane's registers back. The models below are written from the fragment layouts documented in
../shared/GPU_DESIGN.md ("PTX fragment layouts"), not from the executor's code, and every register of every lane
is compared. Each layout check also shows that it can fail: the model with two registers (or the two halves of
a register) exchanged must disagree with the executor, so a test cannot pass vacuously.

Notation: lane L, g = L >> 2, t = L & 3; a 32-bit register holds two 16-bit elements, the lower-indexed one in
the low 16 bits.
"""

import itertools
import os
import pathlib
import re
import shutil
import signal
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
PROBE_SRC = ROOT / "python_tests" / "cuda" / "ptx_probe.cu"
CUDA_INCLUDE = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3
MMA_TOL = 4 * float(np.finfo(np.float32).eps)  # relative to sum |a*b| + |c|: a few fp32 ulps
CP_THREADS, CP_CHUNK = 128, 16
SHARED_FILL, POISON = 0x5A, 0xFF  # what the probe writes to shared memory first; the executor's in-flight poison

if shutil.which("g++") is None:
    pytest.skip("needs g++ to build python_tests/cuda/ptx_probe.cu with the CPU executor", allow_module_level=True)
if not (CUDA_INCLUDE / "cuda_runtime.h").is_file():
    pytest.skip(f"needs the CUDA headers: {CUDA_INCLUDE / 'cuda_runtime.h'} not found (set CUDA_HOME)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> pathlib.Path:
    """Built with the README's one-line standalone command (not test_executor.py's separate objects), so that
    the documented command is tested too."""
    out = tmp_path_factory.mktemp("ptx_probe")
    exe = out / "ptx_probe"
    cmd = ["g++", "-std=c++20", "-O1", "-DPEFT_KERNELS_CUDASIM", "-x", "c++", "-I", str(CSRC / "include"),
           "-I", str(CSRC / "sim"), "-I", str(CUDA_INCLUDE), str(PROBE_SRC),
           "-x", "none", str(CSRC / "sim" / "cudasim_rt.cpp"), "-lpthread", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"building the probe failed ({' '.join(cmd)}):\n{r.stderr[-6000:]}")
    return exe


def run(exe: pathlib.Path, *args, mode: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDASIM_MODE=mode) if mode else None
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def run_ok(exe: pathlib.Path, *args) -> None:
    r = run(exe, *args)
    assert r.returncode == 0, f"ptx_probe {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr[-4000:]}"


def read(path: pathlib.Path, dtype, shape) -> np.ndarray:
    return np.fromfile(path, dtype=dtype).reshape(shape)


# ---- 16-bit values ---------------------------------------------------------------------------------------------
def decode(bits: np.ndarray, half: bool) -> np.ndarray:
    """16-bit patterns (uint16) -> float64 values, f16 or bf16."""
    bits = np.asarray(bits, dtype=np.uint16)
    if half:
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def random_bits(rng: np.random.Generator, shape, half: bool) -> np.ndarray:
    """Bit patterns of finite random normals spread over a few binades, as f16 or bf16 (truncated)."""
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-3, 4, shape)
    if half:
        return x.astype(np.float16).view(np.uint16)
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def pack(elems: np.ndarray) -> np.ndarray:
    """[..., 2] uint16 -> [...] uint32 words, element 0 in the low half."""
    elems = elems.astype(np.uint32)
    return elems[..., 0] | (elems[..., 1] << 16)


def swap_halves(words: np.ndarray) -> np.ndarray:
    return ((words >> 16) | (words << 16)).astype(np.uint32)


# ---- mma.m16n8k16 ------------------------------------------------------------------------------------------------
def mma_model(a: np.ndarray, b: np.ndarray, c: np.ndarray, half: bool):
    """The documented layout: a [32][4] and b [32][2] uint32 words, c [32][4] floats -> (d [32][4] float64,
    bound [32][4] = sum |a*b| + |c| per element)."""
    A = np.full((16, 16), np.nan)
    B = np.full((16, 8), np.nan)
    C = np.full((16, 8), np.nan)
    lo, hi = decode(a & 0xFFFF, half), decode(a >> 16, half)
    for i in range(4):  # A reg i: row g + 8*(i&1), columns 2t + 8*(i>>1) (low half) and +1 (high half)
        row, col = G + 8 * (i & 1), 2 * T + 8 * (i >> 1)
        A[row, col], A[row, col + 1] = lo[:, i], hi[:, i]
    lo, hi = decode(b & 0xFFFF, half), decode(b >> 16, half)
    for i in range(2):  # B reg i: rows 2t + 8i (low half) and +1 (high half), column g
        k = 2 * T + 8 * i
        B[k, G], B[k + 1, G] = lo[:, i], hi[:, i]
    for i in range(4):  # C/D element i: row g + 8*(i>>1), column 2t + (i&1)
        C[G + 8 * (i >> 1), 2 * T + (i & 1)] = c[:, i]
    assert not (np.isnan(A).any() or np.isnan(B).any() or np.isnan(C).any()), "the layout leaves holes"
    D = A @ B + C
    bound = np.abs(A) @ np.abs(B) + np.abs(C)
    d, bnd = np.empty((32, 4)), np.empty((32, 4))
    for i in range(4):
        d[:, i] = D[G + 8 * (i >> 1), 2 * T + (i & 1)]
        bnd[:, i] = bound[G + 8 * (i >> 1), 2 * T + (i & 1)]
    return d, bnd


def mma_mismatches(got: np.ndarray, want: np.ndarray, bound: np.ndarray, tol: float = MMA_TOL) -> list[str]:
    bad = ~(np.abs(got.astype(np.float64) - want) <= tol * bound)
    return [f"lane {L} d[{i}]: got {got[L, i]!r}, model {want[L, i]!r}" for L, i in zip(*np.nonzero(bad))]


def run_mma(probe, work: pathlib.Path, a, b, c, half: bool):
    work.mkdir(parents=True, exist_ok=True)
    a.astype(np.uint32).tofile(work / "a.u32")
    b.astype(np.uint32).tofile(work / "b.u32")
    c.astype(np.float32).tofile(work / "c.f32")
    run_ok(probe, "mma", "f16" if half else "bf16", work)
    return read(work / "d.f32", np.float32, (32, 4)), read(work / "d_alias.f32", np.float32, (32, 4))


def random_mma_inputs(rng, half: bool):
    a = pack(random_bits(rng, (32, 4, 2), half))
    b = pack(random_bits(rng, (32, 2, 2), half))
    c = (rng.standard_normal((32, 4)) * 4).astype(np.float32)
    return a, b, c


def swapped(x: np.ndarray, i: int, j: int) -> np.ndarray:
    y = x.copy()
    y[:, [i, j]] = y[:, [j, i]]
    return y


@pytest.mark.parametrize("half", [False, True], ids=["bf16", "f16"])
def test_mma_matches_documented_layout(probe, tmp_path, half):
    rng = np.random.default_rng(1234 + half)
    for trial in range(3):
        a, b, c = random_mma_inputs(rng, half)
        d, d_alias = run_mma(probe, tmp_path / str(trial), a, b, c, half)
        want, bound = mma_model(a, b, c, half)
        bad = mma_mismatches(d, want, bound)
        assert not bad, f"{len(bad)} of 128 registers differ from the model:\n" + "\n".join(bad[:20])
        # d aliasing c (mma(acc, a, b, acc)): every lane's C is read before any D is written
        assert np.array_equal(d_alias.view(np.uint32), d.view(np.uint32)), \
            "mma(acc, a, b, acc) differs from mma(d, a, b, c)"

    # The comparison can fail: every exchange of two registers, or of a register's halves, changes the model.
    for i, j in itertools.combinations(range(4), 2):
        assert mma_mismatches(d, *mma_model(swapped(a, i, j), b, c, half)), f"A regs {i}, {j} swapped went unseen"
        assert mma_mismatches(d, *mma_model(a, b, swapped(c, i, j), half)), f"C regs {i}, {j} swapped went unseen"
        assert mma_mismatches(d, swapped(want, i, j), bound), f"D regs {i}, {j} swapped went unseen"
    assert mma_mismatches(d, *mma_model(a, swapped(b, 0, 1), c, half)), "B regs 0, 1 swapped went unseen"
    assert mma_mismatches(d, *mma_model(swap_halves(a), b, c, half)), "A halves swapped went unseen"
    assert mma_mismatches(d, *mma_model(a, swap_halves(b), c, half)), "B halves swapped went unseen"
    assert mma_mismatches(d, *mma_model(a[LANES ^ 4], b, c, half)), "A from lane L^4 (g+1) went unseen"
    assert mma_mismatches(d, *mma_model(a, b[LANES ^ 1], c, half)), "B from lane L^1 (t^1) went unseen"


@pytest.mark.parametrize("half", [False, True], ids=["bf16", "f16"])
def test_mma_exact_on_small_integers(probe, tmp_path, half):
    """Integer inputs whose products and sums are exact in fp32: D must equal A·B + C bit for bit (signs, zeros,
    and the accumulation of C included)."""
    rng = np.random.default_rng(99 + half)
    ints = rng.integers(-8, 9, (32, 6, 2)).astype(np.float32)
    bits = ints.astype(np.float16).view(np.uint16) if half else (ints.view(np.uint32) >> 16).astype(np.uint16)
    a, b = pack(bits[:, :4]), pack(bits[:, 4:])
    c = rng.integers(-1000, 1001, (32, 4)).astype(np.float32)
    d, d_alias = run_mma(probe, tmp_path, a, b, c, half)
    want, bound = mma_model(a, b, c, half)
    bad = mma_mismatches(d, want, bound, tol=0.0)
    assert not bad, f"{len(bad)} registers differ from the exact result:\n" + "\n".join(bad[:20])
    assert np.array_equal(d_alias, d)


# ---- ldmatrix ----------------------------------------------------------------------------------------------------
def ldmatrix_model(rows: np.ndarray, perm: np.ndarray, count: int, trans: bool) -> np.ndarray:
    """rows [64][8] uint16 (16-byte rows of shared memory); lane 8j + r gives the address of matrix j's row r.
    Non-trans: reg j of lane L = matrix j's (row g, cols 2t, 2t+1); trans: (row 2t, col g) low half and
    (row 2t+1, col g) high half."""
    r = np.empty((32, count), np.uint32)
    for j in range(count):
        M = rows[perm[8 * j: 8 * j + 8]].astype(np.uint32)  # [row][col]
        if trans:
            r[:, j] = M[2 * T, G] | (M[2 * T + 1, G] << 16)
        else:
            r[:, j] = M[G, 2 * T] | (M[G, 2 * T + 1] << 16)
    return r


def run_ldmatrix(probe, work: pathlib.Path, rows, perm, count: int, trans: bool) -> np.ndarray:
    work.mkdir(parents=True, exist_ok=True)
    rows.astype(np.uint16).tofile(work / "rows.u16")
    perm.astype(np.int32).tofile(work / "perm.i32")
    run_ok(probe, "ldmatrix", count, "trans" if trans else "notrans", work)
    return read(work / "r.u32", np.uint32, (32, count))


def ldmatrix_mismatches(got: np.ndarray, want: np.ndarray) -> list[str]:
    return [f"lane {L} r[{j}]: got {got[L, j]:#010x}, model {want[L, j]:#010x}"
            for L, j in zip(*np.nonzero(got != want))]


@pytest.mark.parametrize("trans", [False, True], ids=["notrans", "trans"])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_ldmatrix_matches_documented_layout(probe, tmp_path, count, trans):
    rng = np.random.default_rng(100 * count + trans)
    rows = rng.integers(0, 1 << 16, (64, 8), dtype=np.uint16)
    perm = rng.permutation(64)[:32]  # 32 distinct rows, in random order: every lane's address matters
    got = run_ldmatrix(probe, tmp_path, rows, perm, count, trans)
    want = ldmatrix_model(rows, perm, count, trans)
    bad = ldmatrix_mismatches(got, want)
    assert not bad, f"{len(bad)} of {32 * count} registers differ from the model:\n" + "\n".join(bad[:20])
    # The comparison can fail.
    assert ldmatrix_mismatches(got, ldmatrix_model(rows, perm, count, not trans)), "trans/non-trans went unseen"
    assert ldmatrix_mismatches(got, swap_halves(want)), "a register's halves swapped went unseen"
    assert ldmatrix_mismatches(got, ldmatrix_model(rows, np.arange(32), count, trans)), "lane addresses unused"
    for i, j in itertools.combinations(range(count), 2):
        assert ldmatrix_mismatches(got, swapped(want, i, j)), f"regs {i}, {j} swapped went unseen"
    lane_rot = perm.copy()
    lane_rot[:8] = np.roll(perm[:8], 1)  # matrix 0's rows supplied one lane later
    assert ldmatrix_mismatches(got, ldmatrix_model(rows, lane_rot, count, trans)), "row order within a matrix unused"


@pytest.mark.parametrize("trans", [False, True], ids=["notrans", "trans"])
@pytest.mark.parametrize("count", [1, 2])
def test_ldmatrix_ignores_unused_lanes(probe, tmp_path, count, trans):
    """.x1 reads only lanes 0-7's addresses and .x2 lanes 0-15's: the others may be misaligned or global."""
    rng = np.random.default_rng(7 + 10 * count + trans)
    rows = rng.integers(0, 1 << 16, (64, 8), dtype=np.uint16)
    perm = rng.permutation(64)[:32]
    perm[8 * count:] = np.resize([-1, -2], 32 - 8 * count)  # -1: 8 bytes off a row, -2: a global address
    got = run_ldmatrix(probe, tmp_path, rows, perm, count, trans)
    bad = ldmatrix_mismatches(got, ldmatrix_model(rows, perm, count, trans))
    assert not bad, "\n".join(bad[:20])


# ---- cp.async ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cp_async(probe, tmp_path_factory):
    """Runs the three cp.async kernels once; returns (src, nbytes, outputs)."""
    work = tmp_path_factory.mktemp("cp_async")
    rng = np.random.default_rng(2025)
    n = CP_THREADS * CP_CHUNK
    src = rng.integers(1, 255, 2 * n, dtype=np.uint8)  # never 0x00 or 0xFF: zero fill and poison stand out
    src[src == SHARED_FILL] = SHARED_FILL + 1
    nbytes = rng.permutation(np.concatenate([np.arange(17), rng.integers(0, 17, CP_THREADS - 17)])).astype(np.int32)
    src.tofile(work / "src.u8")
    nbytes.tofile(work / "nbytes.i32")
    run_ok(probe, "cp_async", work)
    outs = {name: read(work / f"{name}.u8", np.uint8, (-1, CP_THREADS, CP_CHUNK))
            for name in ("out", "before", "after", "groups")}
    return src, nbytes, outs


def expected_chunks(src: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """[128][16]: thread t's 16 bytes after the copy: src_bytes of data, then zeros."""
    want = src[: CP_THREADS * CP_CHUNK].reshape(CP_THREADS, CP_CHUNK).copy()
    want[np.arange(CP_CHUNK)[None, :] >= nbytes[:, None]] = 0
    return want


def chunk_mismatches(got: np.ndarray, want: np.ndarray, what: str) -> list[str]:
    return [f"{what}, {t}: got {got[t].tobytes().hex()}, want {want[t].tobytes().hex()}"
            for t in np.nonzero((got != want).any(axis=1))[0]]


def test_cp_async_zero_fill_and_barrier(cp_async):
    """src_bytes of 0..16 (each value used): exact bytes, then zeros; other threads see them after the barrier."""
    src, nbytes, outs = cp_async
    want = np.empty((CP_THREADS, CP_CHUNK), np.uint8)
    want[(5 * np.arange(CP_THREADS) + 3) % CP_THREADS] = expected_chunks(src, nbytes)  # thread t -> chunk (5t+3)%128
    bad = chunk_mismatches(outs["out"][0], want, "shared chunk")
    assert not bad, "\n".join(bad[:20])


def test_cp_async_poison_until_wait(cp_async):
    src, nbytes, outs = cp_async
    poison = np.full((CP_THREADS, CP_CHUNK), POISON, np.uint8)
    bad = chunk_mismatches(outs["before"][0], poison, "before the wait, thread")
    assert not bad, "a destination read after issue, before the wait, is not poisoned:\n" + "\n".join(bad[:10])
    bad = chunk_mismatches(outs["after"][0], expected_chunks(src, nbytes), "after wait<0>, thread")
    assert not bad, "\n".join(bad[:20])


def test_cp_async_wait_group_1(cp_async):
    """Two committed groups: wait<1> completes only the older; wait<0> the rest."""
    src, nbytes, outs = cp_async
    g = outs["groups"]
    n = CP_THREADS * CP_CHUNK
    first = expected_chunks(src, nbytes)
    second = src[n:].reshape(CP_THREADS, CP_CHUNK)
    nxt = (np.arange(CP_THREADS) + 1) % CP_THREADS
    problems = chunk_mismatches(g[0], first, "group 0 after wait<1>, thread")
    poison = np.full((CP_THREADS, CP_CHUNK), POISON, np.uint8)
    problems += chunk_mismatches(g[1], poison, "group 1 after wait<1> (poison), thread")
    problems += chunk_mismatches(g[2], first[nxt], "group 0 of thread t+1 after wait<1> + barrier, t")
    problems += chunk_mismatches(g[3], second[nxt], "group 1 of thread t+1 after wait<0> + barrier, t")
    assert not problems, "\n".join(problems[:20])


# ---- misuse: each must abort, naming the call site in ptx_probe.cu and the primitive ----------------------------
MISUSES = {
    "mma_half_warp": r"mma",
    "block_of_48": r"mma",
    "ldmatrix_unaligned": r"ldmatrix",
    "ldmatrix_global": r"ldmatrix",
    "cp_async_unaligned": r"cp\.async",
}


def marked_line(name: str) -> int:
    lines = [i for i, text in enumerate(PROBE_SRC.read_text().splitlines(), 1) if f"MISUSE({name})" in text]
    assert len(lines) == 1, f"ptx_probe.cu must mark exactly one line MISUSE({name})"
    return lines[0]


@pytest.fixture(scope="module")
def misuse_runs(probe):
    cache = {}

    def get(name: str) -> subprocess.CompletedProcess:
        if name not in cache:  # fiber mode: which check fires first must not depend on OS-thread timing
            cache[name] = run(probe, "misuse", name, mode="fiber")
        return cache[name]

    return get


def site_lines(stderr: str, name: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if re.search(rf"ptx_probe\.cu:{marked_line(name)}\b", ln)]


@pytest.mark.parametrize("name", list(MISUSES))
def test_misuse_aborts_at_call_site(misuse_runs, name):
    r = misuse_runs(name)
    assert r.returncode == -signal.SIGABRT, \
        f"misuse {name}: exit {r.returncode}, expected an abort:\n{r.stderr[-3000:]}"
    assert site_lines(r.stderr, name), \
        f"misuse {name}: stderr does not name ptx_probe.cu:{marked_line(name)}:\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("name", list(MISUSES))
def test_misuse_message_names_primitive(misuse_runs, name):
    r = misuse_runs(name)
    lines = site_lines(r.stderr, name)
    assert any(re.search(MISUSES[name], ln) for ln in lines), \
        f"misuse {name}: no stderr line names both ptx_probe.cu:{marked_line(name)} and /{MISUSES[name]}/:\n" \
        f"{r.stderr[-3000:]}"
