"""`make bench` in smoke mode: the benchmark runs end to end for Chorus and the baseline.

Proves the machinery (processes, load generator, tallies, outputs); asserts nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_produces_table_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # First use creates the baseline's own venv (pip), hence the generous bound.
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((out / "bench.json").read_text())
    for impl in ("chorus", "baseline"):
        steps = [step for step in results["main"] if step["impl"] == impl]
        assert steps, f"no main-curve step for {impl}"
        # Every message offered reached every receiver of its room, once.
        assert all(step["loss"] == 0 and step["duplicates"] == 0 for step in steps), steps
        assert all(step["delivered"] == step["expected"] > 0 for step in steps), steps
        assert {step["rooms"] for step in results["rooms"] if step["impl"] == impl} == {1, 2}
        assert {step["replicas"] for step in results["replicas"] if step["impl"] == impl} == {1, 2}
    assert {m["impl"] for m in results["memory"]} == {"chorus", "baseline", "floor"}

    table = (out / "bench.md").read_text()
    assert "server CPU-s per 1,000 deliveries" in table
    assert "| chorus |" in table and "| baseline |" in table
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")
