"""`make bench` in smoke mode: the benchmark runs end to end for Chorus and both baselines
(the naive design and Node.js Socket.IO).

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
    # First use creates the naive baseline's venv (pip) and the Socket.IO one's node_modules
    # (npm ci), hence the generous bound.
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((out / "bench.json").read_text())
    for impl in ("chorus", "baseline", "socketio"):
        for curve in ("main", "small"):
            steps = [step for step in results[curve] if step["impl"] == impl]
            assert steps, f"no {curve} step for {impl}"
            # Every message offered reached every other member of its room, once: a server
            # that delivers nothing (or the generator misreading its frames) fails here.
            assert all(step["loss"] == 0 and step["duplicates"] == 0 for step in steps), steps
            assert all(step["delivered"] == step["expected"] > 0 for step in steps), steps
        assert {step["rooms"] for step in results["rooms"] if step["impl"] == impl} == {1, 2}
        assert {step["replicas"] for step in results["replicas"] if step["impl"] == impl} == {1, 2}
    assert {m["impl"] for m in results["memory"]} == {"chorus", "baseline", "socketio", "floor"}
    assert all(m["idle_cpu_s"] >= 0 and m["idle_closed"] == 0 for m in results["memory"]), results["memory"]

    table = (out / "bench.md").read_text()
    assert "server CPU-s per 1,000 deliveries" in table
    assert "server CPU-ms/msg" in table
    assert "| Chorus |" in table and "| naive |" in table and "| Socket.IO |" in table
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")
