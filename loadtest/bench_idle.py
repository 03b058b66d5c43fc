"""Idle cost only: memory and CPU per idle joined WebSocket, A/B against another tree, and where it goes.

    python -m loadtest.bench_idle [--ref ../main/service] [--socketio] [--rounds 2]
    python -m loadtest.bench_idle --trace [--ref ../main/service]

Without `--trace`: `make bench`'s idle measurement (`loadtest.bench.idle_memory`: RSS growth of
one fresh replica per joined socket, then its CPU over an idle window) for this tree's Chorus
(`A`), the tree given as `--ref` (`B`, first on the replicas' PYTHONPATH) and, with
`--socketio`, the Socket.IO baseline; each round measures them one after the other on fresh
processes, and the table shows medians. With `--trace`: each tree's replica under tracemalloc
(`loadtest.idle_probe`), snapshots before and after the sockets join, the growth per socket
grouped by the kind of object that holds it (docs/perf/idle.md). Wrap it in
`flock /tmp/chorus-bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from chorus.devcluster import RedisServer, free_port, http_status, wait_until

from .bench import _quiet, idle_memory, log
from .bench_procs import CHORUS_BENCH_ENV, ROOT, Target, ensure_socketio_modules
from .bench_wire import Tally, WsClient, open_socket

ROOMS = 20  # as make bench: the idle sockets spread over 20 rooms, history off

# Where an allocation's innermost Python frame is, and what that says holds it.
KINDS: tuple[tuple[str, str], ...] = (
    ("uvicorn/protocols/websockets/", "uvicorn WebSocket protocol, ASGI scope, task"),
    ("websockets/", "websockets state (parser, handshake request/response)"),
    ("asyncio/queues.py", "uvicorn receive queue and writable event"),
    ("asyncio/locks.py", "uvicorn receive queue and writable event"),
    ("asyncio/runners.py", "uvloop transport and timers (C)"),
    ("uvicorn/", "uvicorn other (addresses, proxy-headers frame, HTTP protocol)"),
    ("starlette/", "Starlette/FastAPI (WebSocket object, middleware frames)"),
    ("fastapi/", "Starlette/FastAPI (WebSocket object, middleware frames)"),
    ("chorus/session.py", "Chorus session coroutines and their locals"),
    ("chorus/app.py", "Chorus session coroutines and their locals"),
    ("chorus/", "Chorus per-socket state (Connection, hub and presence entries, keepalive)"),
)


def kind_of(filename: str) -> str:
    for marker, kind in KINDS:
        if marker in filename:
            return kind
    return "other"


def breakdown(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, sockets: int) -> dict[str, float]:
    """Bytes per socket by kind, from two snapshots of one replica."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "filename")
    kinds: Counter[str] = Counter()
    for stat in stats:
        kinds[kind_of(stat.traceback[0].filename)] += stat.size_diff
    return {kind: size / sockets for kind, size in kinds.items()}


async def _open(port: int, connections: int, tally: Tally) -> list[WsClient]:
    gate = asyncio.Semaphore(64)

    async def one(index: int) -> WsClient:
        async with gate:
            path = f"/ws/idle-{index % ROOMS}?username=idle&history=0"
            return await open_socket(port, path, tally, receiver=True)

    return list(await asyncio.gather(*(one(i) for i in range(connections))))


def trace(tree: Path | None, connections: int, workdir: Path) -> dict[str, float]:
    """One replica of `tree` (None: this checkout) under tracemalloc: bytes per socket by kind."""
    out = workdir / "snapshots"
    out.mkdir(parents=True)
    redis = RedisServer(workdir)
    redis.start()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHORUS_")}
    env.update(CHORUS_BENCH_ENV, CHORUS_REDIS_URL=redis.url, CHORUS_LOG_LEVEL="warning")
    if tree is not None:
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{ROOT}"
    argv = [sys.executable, "-m", "loadtest.idle_probe", "--port", str(port), "--out", str(out)]
    # Its log goes to a file: under tracemalloc the replica is slow, and the goodbyes of a
    # thousand sockets at the end time out against the broker (warnings, not figures).
    log_file = (workdir / "probe.log").open("ab")
    probe = subprocess.Popen(
        argv, env=env, cwd=ROOT, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT
    )

    def snapshot(index: int) -> tracemalloc.Snapshot:
        probe.send_signal(signal.SIGUSR1)
        wait_until(lambda: (out / f"done-{index}").exists(), 300, "the probe's snapshot")
        return tracemalloc.Snapshot.load(str(out / f"snap-{index}.tracemalloc"))

    async def run() -> dict[str, float]:
        tally = Tally()
        # A few sockets first, so what the first join creates once (a room, imports) is not counted.
        warm = await _open(port, ROOMS * 2, tally)
        await asyncio.sleep(2)
        before = snapshot(0)
        clients = await _open(port, connections, tally)
        await asyncio.sleep(3)
        after = snapshot(1)
        for client in [*clients, *warm]:
            client.close()
        return breakdown(before, after, connections)

    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/readyz") == 200, 60, "the probe replica")
        return uvloop.run(run())
    finally:
        probe.kill()  # our own child, by its handle: no drain needed for a measurement
        probe.wait(10)
        log_file.close()
        redis.stop()


def trace_table(columns: dict[str, dict[str, float]]) -> str:
    names = list(columns)
    kinds = sorted({kind for column in columns.values() for kind in column},
                   key=lambda kind: -max(column.get(kind, 0.0) for column in columns.values()))  # fmt: skip
    rows = [f"| what holds it | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for kind in kinds:
        cells = " | ".join(f"{columns[name].get(kind, 0.0) / 1024:.2f}" for name in names)
        rows.append(f"| {kind} | {cells} |")
    totals = " | ".join(f"**{sum(columns[name].values()) / 1024:.2f}**" for name in names)
    rows.append(f"| total (KiB per socket) | {totals} |")
    return "\n".join(rows)


async def _idle_round(
    targets: dict[str, Target], connections: int, seconds: float
) -> dict[str, dict[str, Any]]:
    measured: dict[str, dict[str, Any]] = {}
    for name, target in targets.items():
        target.start()
        try:
            await _quiet(target)
            measured[name] = await idle_memory(target, connections, seconds)
        finally:
            target.stop()
    return measured


def idle_table(rounds: list[dict[str, dict[str, Any]]]) -> str:
    names = list(rounds[0])
    rows = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in (("kib_per_connection", "KiB per joined idle socket (RSS growth)"),
                       ("idle_cpu_pct_per_1k", "idle CPU, % of a core per 1,000 sockets")):  # fmt: skip
        values = {name: statistics.median(r[name][key] for r in rounds) for name in names}
        rows.append(f"| {label} | " + " | ".join(f"{values[name]:.3f}" for name in names) + " |")
        first = names[0]
        for name in names[1:]:
            rows.append(
                f"| {label}: {first} / {name} | {values[first] / values[name]:.2f}x |"
                + " |" * (len(names) - 1)
            )

    def each(name: str) -> str:
        return ", ".join(
            f"{r[name]['kib_per_connection']:.1f} KiB / {r[name]['idle_cpu_pct_per_1k']:.3f} %"
            for r in rounds
        )

    rows.append(
        "| each round (fresh processes, one after the other) | " + " | ".join(map(each, names)) + " |"
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_idle", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--ref", type=Path, help="another checkout's service/ folder, measured as B")
    parser.add_argument("--socketio", action="store_true", help="measure the Socket.IO baseline too")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0, help="the idle CPU window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trace", action="store_true", help="tracemalloc breakdown by kind instead")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    if args.ref is not None and not (args.ref / "chorus" / "__init__.py").exists():
        parser.error(f"{args.ref} holds no chorus package (give the checkout's service/ folder)")
    workdir = Path(tempfile.mkdtemp(prefix="chorus-idle-"))
    trees: dict[str, Path | None] = {"A (this tree)": None}
    if args.ref is not None:
        trees["B (--ref)"] = args.ref.resolve()
    if args.trace:
        columns = {
            name: trace(tree, args.connections, workdir / f"t{i}")
            for i, (name, tree) in enumerate(trees.items())
        }
        print(trace_table(columns))
        raw: Any = columns
    else:
        if args.socketio:
            ensure_socketio_modules()
        rounds = []
        for index in range(args.rounds):
            log(f"idle round {index + 1} of {args.rounds}")
            targets = {
                name: Target(
                    "chorus", 1, workdir / f"r{index}-{n}", env={"PYTHONPATH": str(tree)} if tree else None
                )
                for n, (name, tree) in enumerate(trees.items())
            }
            if args.socketio:
                targets["Socket.IO"] = Target("socketio", 1, workdir / f"r{index}-sio")
            rounds.append(uvloop.run(_idle_round(targets, args.connections, args.seconds)))
        print(idle_table(rounds))
        raw = rounds
    if args.json is not None:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
