"""A PNG of a storm run (`bench_roll`): sockets per replica, reconnects/s, live-room latency, CPU."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def plot_storm(run: dict[str, Any], out: Path, title: str) -> None:
    rows = run["timeline"]
    t = [row["t"] for row in rows]
    fig, (sockets, rate, latency, cpu) = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    for slot in range(max((len(row["sockets"]) for row in rows), default=0)):
        sockets.plot(t, [row["sockets"][slot] for row in rows], label=f"port slot {slot}")
    sockets.set_ylabel("sockets per replica")
    reconnects = [0.0] + [(b["connects"] - a["connects"]) / (b["t"] - a["t"]) for a, b in pairwise(rows)]
    closes = [0.0] + [(b["closes_1012"] - a["closes_1012"]) / (b["t"] - a["t"]) for a, b in pairwise(rows)]
    rate.plot(t, reconnects, label="connects/s (clients welcomed)")
    rate.plot(t, closes, label="1012 closes/s")
    rate.set_ylabel("per second")
    points = run["latency_timeline"]
    for key in ("p50_ms", "p99_ms"):
        shown = [(p["t"], p[key]) for p in points if p[key] is not None]
        latency.plot([s[0] for s in shown], [s[1] for s in shown], label=key.replace("_ms", ""), marker=".")
    latency.set_ylabel("live-room delivery (ms)")
    latency.set_yscale("log")
    groups = next((row["cpu_cores"] for row in rows if row.get("cpu_cores")), None)
    if groups:  # runs since the sampler read every group's CPU: whose cores the storm used
        for group in groups:
            cpu.plot(t, [(row.get("cpu_cores") or {}).get(group) for row in rows], label=group)
        cpu.set_ylabel("CPU (cores)")
    else:
        cpu.plot(t, [row["redis_cpu_percent"] for row in rows], label="redis-server")
        cpu.set_ylabel("Redis CPU (% of a core)")
    cpu.set_xlabel("seconds into the run")
    for axis in (sockets, rate, latency, cpu):
        for at, _what in run.get("marks", []):
            axis.axvline(at, color="grey", alpha=0.3, linewidth=0.8)
        axis.legend(loc="upper left", fontsize="small")
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
