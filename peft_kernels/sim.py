"""What a CUDA kernel would cost, counted by the CPU executor (csrc/sim) — no GPU needed.

``profile(op, *shape)`` runs one op's CUDA kernels with synthetic inputs through the executor built with the
counters' instrumentation (the installed ``pk_simprof``) and returns one dict per kernel launch:

* ``global_load_sectors`` / ``global_load_min_sectors`` (and ``_store_``): 32-byte sectors the warps' global
  accesses touched, and the fewest that could hold the bytes they asked for; their ratio is the sector
  efficiency (1.0: coalesced; 0.125: a float per lane, lanes 128 bytes apart).
* ``dram_bytes``: distinct sectors touched over the launch × 32 (ignores L2 capacity: a lower bound).
* ``shared_wavefronts`` / ``shared_min_wavefronts`` and ``ldmatrix_wavefronts`` / ``ldmatrix_min_wavefronts``:
  bank-conflict cost as wavefronts (bank = (address >> 2) & 31; lanes reading one word do not conflict).
* ``mma``, ``tensor_flops`` (2·16·8·16 per m16n8k16), ``flops`` (CUDA-core FLOPs the kernel declares),
  ``cp_async_bytes``.
* ``buffers``: per cudaMalloc'd buffer the kernel touched, in address order: its ``name`` (given by the driver
  with ``cudasim::label_buffer``, else ""), ``bytes``, ``load_/store_requests``, ``_sectors``, ``_min_sectors``
  (a warp instruction is attributed to the buffer its first lane addresses), its ``dram_bytes``, and (from
  ``derived``) its ``load_/store_sector_efficiency``.
* ``sampled``, ``blocks``, ``blocks_run``: grids over 512 blocks run every edge block and 8 seeded random
  interior blocks, interior counters scaled by the grid (DRAM bytes per buffer capped by the span touched).

``derived(launch)`` adds the ratios and a **predicted** H100 SXM time: max(DRAM bytes / 3.35 TB/s, tensor
FLOPs / 989 TFLOPS, CUDA-core FLOPs / 67 TFLOPS) + 3 µs launch overhead. It is a roofline, not a
measurement: the executor knows nothing of real timings, L2 hits, occupancy or warp scheduling.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile

H100_DRAM_BYTES_PER_S = 3.35e12
H100_TENSOR_FLOPS = 989e12  # bf16/f16 dense
H100_FP32_FLOPS = 67e12
LAUNCH_OVERHEAD_S = 3e-6

OPS = {
    "nf4_gemv": "M IN OUT DTYPE",
    "nf4_decode": "IN OUT DTYPE",
    "nf4_gemm": "M IN OUT DTYPE",
    "nf4_linear_dx": "M IN OUT DTYPE",
    "lora_down": "M IN R DTYPE",
    "lora_backward": "M IN R DTYPE",
    "kron_forward": "M AO AI BO BI DTYPE",
    "kron_backward": "M AO AI BO BI DTYPE",
    "masked_adamw": "NUMEL K BITS COMPACT DTYPE",
    "adamw8bit": "NUMEL DTYPE",
}


def executable() -> pathlib.Path:
    """The installed counting executor (built with the package when the CUDA headers were found)."""
    path = pathlib.Path(__file__).with_name("pk_simprof")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the package was built without the cudasim executor (PEFT_KERNELS_CUDASIM=0 or "
            "no CUDA headers at build time); reinstall with the CUDA headers present")
    return path


def run_counted(cmd: list[str], sample: str | int = "auto", seed: int = 0, timeout: float = 600) -> list[dict]:
    """Runs a program built with the executor and its counters; returns one dict per kernel launch."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "launches.jsonl"
        env = dict(os.environ, CUDASIM_PROFILE=str(out), CUDASIM_SAMPLE=str(sample), CUDASIM_SEED=str(seed),
                   CUDASIM_MODE="fiber")
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
        return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def profile(op: str, *shape, dtype: str = "bf16", sample: str | int = "auto", seed: int = 0) -> list[dict]:
    """Counters of each kernel launch of `op` (one of OPS) at `shape`, e.g. ``profile("nf4_gemv", 1, 4096, 4096)``.

    sample: "auto" (sample grids over 512 blocks), "exact" (every block), or N (sample with N interior blocks).
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {sorted(OPS)}, got {op!r}")
    args = [str(int(s)) for s in shape]
    if OPS[op].endswith("DTYPE"):
        if dtype not in ("bf16", "f16", "f32"):
            raise ValueError(f"dtype: expected 'bf16', 'f16' or 'f32', got {dtype!r}")
        args.append(dtype)
    want = len(OPS[op].split())
    if len(args) != want:
        raise ValueError(f"shape: {op} takes {OPS[op]}, got {len(shape)} sizes {shape}")
    return [derived(launch) for launch in run_counted([str(executable()), op, *args], sample, seed)]


def derived(launch: dict) -> dict:
    """`launch` plus sector efficiency, extra shared wavefronts and the predicted H100 time in microseconds."""
    d = dict(launch)

    def ratio(a, b):
        return a / b if b else None

    d["load_sector_efficiency"] = ratio(launch["global_load_min_sectors"], launch["global_load_sectors"])
    d["store_sector_efficiency"] = ratio(launch["global_store_min_sectors"], launch["global_store_sectors"])
    sectors = launch["global_load_sectors"] + launch["global_store_sectors"]
    d["sector_efficiency"] = ratio(launch["global_load_min_sectors"] + launch["global_store_min_sectors"], sectors)
    d["global_bytes"] = 32.0 * sectors
    waves = launch["shared_wavefronts"] + launch["ldmatrix_wavefronts"]
    ideal = launch["shared_min_wavefronts"] + launch["ldmatrix_min_wavefronts"]
    d["bank_conflict_extra"] = ratio(waves - ideal, ideal) if ideal else 0.0
    d["buffers"] = [dict(b, load_sector_efficiency=ratio(b["load_min_sectors"], b["load_sectors"]),
                         store_sector_efficiency=ratio(b["store_min_sectors"], b["store_sectors"]))
                    for b in launch.get("buffers", [])]
    d["predicted_us"] = 1e6 * (max(launch["dram_bytes"] / H100_DRAM_BYTES_PER_S,
                                   launch["tensor_flops"] / H100_TENSOR_FLOPS,
                                   launch["flops"] / H100_FP32_FLOPS) + LAUNCH_OVERHEAD_S)
    return d
