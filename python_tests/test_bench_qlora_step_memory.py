"""Smoke test of bench/qlora_step_memory.py at SmolLM2-135M's shapes, 1 and 2 layers, 4 x 32 tokens (about 30 s):
the script runs the full recipe's flags end to end and its table adds up."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "qlora_step_memory.py"


def table_rows(text: str) -> dict[str, list[float]]:
    """{label: [value per run]} of the first markdown table after "1 layer;" (the 1-layer table)."""
    rows = {}
    block = text.split("\n1 layer;", 1)[1].split("\n\n")[1]
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = [float(c) for c in cells[1:-1]]
    return rows


def test_small_recipe_runs_and_adds_up():
    out = subprocess.run([sys.executable, "-P", str(SCRIPT), "--small", "--extrapolate", "--batch", "4", "--seq", "32",
                          "--rank", "8", "--alpha", "16", "--checkpointing", "--micro-batch-tokens", "32",
                          "--fused-loss", "--compare-baseline"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    rows = table_rows(text)
    assert set(rows["NF4 codes"]) == {rows["NF4 codes"][0]} and rows["NF4 codes"][0] > 0  # the same NF4 bytes
    rest = ["NF4 codes", "quantization scales (absmax, nested absmax, maps)", "embeddings, head, norms",
            "adapters (fp32)", "optimizer state (after step 1)"]
    for col in range(3):  # ours, ours HF+AdamW, bnb+peft
        assert sum(rows[k][col] for k in rest) == pytest.approx(rows["**at rest**"][col], abs=0.3)
        phases = [v[col] for k, v in rows.items() if k.startswith("peak in ")]
        assert len(phases) == 5 and max(phases) == rows["**second-step peak above at rest**"][col]
    loss = rows["loss path (head, loss, backward) above that"]
    assert loss[0] < loss[1]  # the fused loss holds less than HF's at 128 tokens x 49152
    # ours recomputes a layer over micro-batches of 1 of the 4 sequences, the HF-checkpointed baseline over all 4
    recompute = rows["decoder backward above its start (a layer's recompute)"]
    assert recompute[0] < 0.5 * recompute[1]
    assert re.search(r"step time, ours \(fused loss, torch AdamW\) / ours \(HF loss, torch AdamW\): \d+\.\d+", text)
    assert "linear extrapolation to 30 layers" in text
    assert re.search(r"\| ours \| \*\*at rest \+ peak, GB\*\* \| [\d.]+ \| [\d.]+ \| [-\d.]+ \| [\d.]+ \|", text)
