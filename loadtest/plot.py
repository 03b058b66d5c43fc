"""A PNG of a load test run: fan-out latency percentiles and throughput per second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def plot_run(ledger: dict[str, Any], out: Path, title: str = "Chorus load test") -> None:
    rows = ledger["per_second"]
    seconds = [row["t"] - rows[0]["t"] for row in rows] if rows else []
    fig, (latency, rate) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, label in (("p50", "p50"), ("p99", "p99")):
        points = [(s, row[key] * 1000) for s, row in zip(seconds, rows, strict=True) if row[key] is not None]
        latency.plot([p[0] for p in points], [p[1] for p in points], label=label, marker=".")
    latency.set_ylabel("fan-out latency (ms)")
    latency.legend(loc="upper left")
    latency.grid(alpha=0.3)
    rate.plot(seconds, [row["sent"] for row in rows], label="sent/s", drawstyle="steps-mid")
    rate.plot(seconds, [row["delivered"] for row in rows], label="delivered/s", drawstyle="steps-mid")
    rate.set_ylabel("messages per second")
    rate.set_xlabel("seconds into the run")
    rate.legend(loc="upper left")
    rate.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
