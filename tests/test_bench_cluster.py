"""`make bench-cluster` in smoke mode: standalone, 1-shard and 3-shard Redis Cluster runs end to end.

Proves the machinery (cluster set-up, per-process Redis readings, outputs); asserts nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_cluster_smoke_reports_every_setup_and_redis_process(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench_cluster", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((out / "cluster.json").read_text())
    rows = {row["mode"]: row for row in results["summary"]}
    assert {"standalone", "cluster-1", "cluster-3"} <= rows.keys()
    for row in rows.values():
        # Every message reached both members of its room, once, whatever the Redis topology.
        assert row["all_passed"] and row["loss"] == 0 and row["duplicates"] == 0, row
        assert row["deliveries_per_s"] > 0, row
    assert len(rows["cluster-1"]["redis_cpu_ms_per_1k_msgs_per_process"]) == 1
    assert len(rows["cluster-3"]["redis_cpu_ms_per_1k_msgs_per_process"]) == 3
    for step in results["steps"]:
        # The shards together carried every message the publishers sent (the replicas'
        # readiness probes may add a few of their own).
        assert sum(node["published"] for node in step["nodes"]) >= step["step"]["sent"], step

    table = (out / "cluster.md").read_text()
    assert "| cluster-3 |" in table and "Redis CPU-ms per 1k messages" in table
