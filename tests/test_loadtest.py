"""A short headless locust run through `python -m loadtest` against a local cluster, judged."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from chorus.devcluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
REPLICAS = 3

pytestmark = pytest.mark.slow


def test_short_load_run_delivers_every_message_once_across_replicas(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = make_cluster(REPLICAS)
    results = tmp_path / "results"
    argv = [
        sys.executable, "-m", "loadtest", "--url", cluster.url, "--replicas", str(REPLICAS),
        *(f"--metrics-url={cluster.replica_url(i)}/metrics" for i in range(REPLICAS)),
        "--users", "30", "--spawn-rate", "30", "--room-size", "10", "--msg-rate", "1",
        "--run-time", "20", "--drain", "3",
        # Loose on purpose: this machine is shared; the bound proves the measurement, not capacity.
        "--max-p99-ms", "2000", "--cross-tolerance", "0.15",
        "--results", str(results),
    ]  # fmt: skip
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr + (results / "locust.log").read_text()
    assert "VERDICT: PASS" in run.stdout

    verdict = json.loads((results / "verdict.json").read_text())
    ledger = verdict["ledger"]
    assert ledger["users"] == 30 and ledger["replicas"] == [f"replica-{i}" for i in range(REPLICAS)]
    # Every member of every room got every message exactly once.
    assert ledger["sent"] > 100 and ledger["acked"] == ledger["sent"]
    assert ledger["delivered"] == ledger["expected_deliveries"] == ledger["sent"] * 9
    assert ledger["lost"] == 0 and ledger["duplicates"] == 0
    # Round robin put two thirds of each room on other replicas than the sender's.
    share = ledger["cross_replica"] / ledger["delivered"]
    assert abs(share - (REPLICAS - 1) / REPLICAS) <= 0.15
    # The replicas' own counters tell the same story as the clients.
    assert verdict["server"]["chorus_messages_published_total"] == ledger["sent"]
    assert verdict["server"]["chorus_messages_delivered_total"] == ledger["delivered"]
    for artefact in ("report.html", "locust_stats.csv", "locust_stats_history.csv", "run.png"):
        assert (results / artefact).stat().st_size > 0, artefact
