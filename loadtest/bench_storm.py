"""`make bench-storm`: join waves against the local cluster (issue 12), bounded in count and time.

    python -m loadtest.bench_storm [--joins 2000] [--separate 2000] [--concurrency 200] [--history 0]
        [--rounds 1] [--compare-with /work/main/service] [--scale-out 600] [--out DIR]

1. one room: `--joins` sockets open into one room on one replica, at most `--concurrency`
   handshakes in flight; joins/s is sockets welcomed over the wall time of the wave. Every
   socket keeps reading (the presence frames a wave costs are read, not left in TCP buffers).
2. separate rooms: `--separate` sockets into as many rooms: handshakes/s per replica.
3. Redis commands per join, from INFO commandstats around a wave of 200 joins.

Sockets come from 127.0.0.2.. (a source address per 20,000 sockets) so ephemeral ports do
not cap them. `--hold` holds idle sockets on 2 replicas while a live room publishes;
`--scale-out` runs 2 -> 3 replicas in this process (bench_roll.py's `scale-out` does it at
10,000 with generator processes). `--compare-with DIR` runs the waves and the scale-out with
the replicas from another tree too (PYTHONPATH; rounds alternate), for a before/after in one
run. The rolling restart and the crash are in bench_roll.py; tests/test_storm.py runs all of
them at small scale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chorus.client import ChorusError, Message, Reconnect, Room
from chorus.client import connect as chorus_connect
from chorus.devcluster import LocalCluster, wait_until


async def _member(
    url: str, slots: asyncio.Semaphore, stop: asyncio.Event, welcomed: list[float], frames: list[int]
) -> None:
    """Join (holding a handshake slot until the welcome), then read everything until `stop`."""
    async with slots:
        ws = await connect(url, open_timeout=120, max_queue=None)
        async with asyncio.timeout(120):
            while b'"type":"welcome"' not in await ws.recv(decode=False):
                pass
        welcomed.append(time.monotonic())
    reader = asyncio.create_task(_drain(ws, frames))
    try:
        await stop.wait()
    finally:
        reader.cancel()
        await ws.close()


async def _drain(ws: ClientConnection, frames: list[int]) -> None:
    async for _ in ws:
        frames[0] += 1


async def wave(base: str, rooms: list[str], concurrency: int, history: int = 0) -> dict[str, Any]:
    """Open one socket per entry of `rooms`; joins/s and the presence frames read meanwhile."""
    stop = asyncio.Event()
    welcomed: list[float] = []
    frames = [0]
    slots = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    tasks = [
        asyncio.create_task(
            _member(f"{base}/ws/{room}?username=u{i}&history={history}", slots, stop, welcomed, frames)
        )
        for i, room in enumerate(rooms)
    ]
    deadline = start + 180
    while len(welcomed) + sum(t.done() for t in tasks) < len(rooms) and time.monotonic() < deadline:  # noqa: ASYNC110 - bounded poll
        await asyncio.sleep(0.05)
    elapsed = (max(welcomed) if welcomed else time.monotonic()) - start
    await asyncio.sleep(1.0)  # the last presence diffs
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "sockets": len(rooms),
        "welcomed": len(welcomed),
        "failed": sum(1 for r in results if isinstance(r, BaseException)),
        "seconds": round(elapsed, 2),
        "joins_per_s": round(len(welcomed) / elapsed, 1) if elapsed else None,
        "frames_after_welcome": frames[0],
    }


def _sockets(cluster: LocalCluster, index: int) -> int:
    for line in httpx.get(f"{cluster.replica_url(index)}/metrics", timeout=5).text.splitlines():
        if line.startswith("chorus_connections "):
            return int(float(line.split()[1]))
    return 0


async def scale_out(count: int, tolerance: float, rate: float, pythonpath: str = "") -> dict[str, Any]:
    """2 -> 3 replicas under `count` chorus.client sockets: time to converge, moves vs minimum.

    `pythonpath` runs the replicas from another tree (say main's `service/`) for a before/after.
    """
    env = {
        "CHORUS_MAX_CONNECTIONS": "0",
        "CHORUS_MAX_CONNECTIONS_PER_USER": "0",
        "CHORUS_LOG_LEVEL": "warning",
        "CHORUS_PRESENCE_HEARTBEAT_SECONDS": "1",
        "CHORUS_REBALANCE_SETTLE_SECONDS": "2",
        "CHORUS_REBALANCE_TOLERANCE": str(tolerance),
        "CHORUS_REBALANCE_RATE": str(rate),
        **({"PYTHONPATH": pythonpath} if pythonpath else {}),
    }
    with LocalCluster(3, env=env) as cluster:
        cluster.stop_replica(2)
        cluster.wait_proxy_sees(2)
        policy = Reconnect(base=0.1, cap=2.0)
        async with AsyncExitStack() as stack:
            slots = asyncio.Semaphore(100)

            async def join(i: int) -> Room:
                async with slots:
                    return await stack.enter_async_context(
                        chorus_connect(
                            cluster.ws_url,
                            f"s{i % 50}",
                            username=f"u{i}",
                            history=0,
                            reconnect=policy,
                            receive=False,
                        )
                    )

            rooms = await asyncio.gather(*(join(i) for i in range(count)))
            before = [_sockets(cluster, i) for i in range(2)]
            await asyncio.to_thread(cluster.start_replica, 2)
            ready = time.monotonic()
            timeline: list[tuple[float, list[int]]] = []
            converged_at = None
            while time.monotonic() - ready < 120:
                counts = await asyncio.to_thread(lambda: [_sockets(cluster, i) for i in range(3)])
                timeline.append((round(time.monotonic() - ready, 1), counts))
                mean = sum(counts) / 3
                if sum(counts) == count and max(abs(c - mean) for c in counts) <= tolerance * mean:
                    converged_at = time.monotonic() - ready
                    break
                await asyncio.sleep(0.5)
            moves = sum(room.stats.close_codes[1012] for room in rooms)
            refused = sum(room.stats.refused[503] for room in rooms)
        minimum = sum(max(0, c - count / 3) for c in before)
    return {
        "replicas_from": pythonpath or "this tree",
        "sockets": count,
        "refused_503_seen_by_clients": refused,
        "before": before,
        "converged_s_after_ready": None if converged_at is None else round(converged_at, 1),
        "moves": moves,
        "minimum_moves": round(minimum),
        "moves_over_minimum": round(moves / minimum, 2) if minimum else None,
        "timeline": timeline,
    }


async def generator(urls: list[str], count: int, source: str, hold: float, concurrency: int) -> None:
    """One load process: `count` idle joined sockets from `source`, spread over `urls`; print, hold."""
    slots = asyncio.Semaphore(concurrency)
    welcomed: list[float] = []
    sockets: list[ClientConnection] = []
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with slots:
            try:
                ws = await connect(
                    f"{urls[i % len(urls)]}/ws/hold-{i % 1000}?username={source}-{i}&history=0",
                    open_timeout=120,
                    local_addr=(source, 0),
                    max_queue=4,
                )
                async with asyncio.timeout(120):
                    while b'"type":"welcome"' not in await ws.recv(decode=False):
                        pass
            except (OSError, TimeoutError, InvalidStatus, ConnectionClosed):
                failed += 1
                return
            welcomed.append(time.monotonic())
            sockets.append(ws)

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = (max(welcomed) if welcomed else time.monotonic()) - start
    print(json.dumps({"welcomed": len(welcomed), "failed": failed, "seconds": round(elapsed, 2)}), flush=True)
    await asyncio.sleep(hold)  # idle: the replicas' keepalive pings are answered by websockets
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def live_room(url: str, members: int, rate: float, seconds: float) -> dict[str, Any]:
    """A room publishing `rate` messages/s for `seconds` to `members` resuming members.

    Delivery latency from the send wall time carried in the text (same host clock), and how
    many acked messages a member missed or saw twice.
    """
    policy = Reconnect(base=0.5, cap=5.0)
    seen: list[list[tuple[str, float]]] = [[] for _ in range(members)]
    sent: list[str] = []

    async def collect(index: int, room: Room) -> None:
        async for event in room:
            if isinstance(event, Message):
                seen[index].append((event.id, time.time() - float(event.text.split()[1])))

    async with AsyncExitStack() as stack:
        rooms = [
            await stack.enter_async_context(
                chorus_connect(url, "live", username=f"live-{i}", history=0, reconnect=policy)
            )
            for i in range(members)
        ]
        readers = [asyncio.create_task(collect(i, room)) for i, room in enumerate(rooms)]
        sender = await stack.enter_async_context(
            chorus_connect(url, "live", username="publisher", history=0, reconnect=policy, receive=False)
        )
        next_at = time.monotonic()
        for n in range(int(rate * seconds)):
            with contextlib.suppress(ChorusError, TimeoutError):
                sent.append((await sender.send(f"m{n} {time.time():.6f}")).id)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.sleep(2)  # the last deliveries
        for task in readers:
            task.cancel()
    latencies = sorted(lat for got in seen for _, lat in got)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "members": members,
        "rate_per_s": rate,
        "acked": len(sent),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "lost": sum(len(set(sent) - {mid for mid, _ in got}) for got in seen),
        "duplicated": sum(len(got) - len({mid for mid, _ in got}) for got in seen),
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def hold(count: int, idle: float, concurrency: int) -> dict[str, Any]:
    """2 replicas hold `count` idle joined sockets: RSS per socket, idle CPU, handshakes/s."""
    env = {"CHORUS_MAX_CONNECTIONS": "0", "CHORUS_LOG_LEVEL": "warning"}
    per_process = 9_000  # under the 20,000 fd hard limit with room, one source address each
    with LocalCluster(2, env=env) as cluster:
        urls = [cluster.replica_ws_url(i) for i in range(2)]
        rss_before = [r.rss_kib() for r in cluster.replicas]
        procs = []
        for j, start in enumerate(range(0, count, per_process)):
            n = min(per_process, count - start)
            argv = [sys.executable, "-m", "loadtest.bench_storm", "--generator", str(n), "--source",
                    f"127.0.0.{2 + j}", "--hold-seconds", str(2 * idle + 90), "--concurrency",
                    str(concurrency // 2 or 1), *[a for u in urls for a in ("--url", u)]]  # fmt: skip
            procs.append(await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE))
        opened = [json.loads(await asyncio.wait_for(p.stdout.readline(), 600)) for p in procs if p.stdout]
        held = sum(o["welcomed"] for o in opened)
        await asyncio.sleep(5)
        rss_after = [r.rss_kib() for r in cluster.replicas]
        cpu_before = [_cpu_seconds(r.pid) for r in cluster.replicas]
        await asyncio.sleep(idle)
        cpu_after = [_cpu_seconds(r.pid) for r in cluster.replicas]
        # Then a live room over the held sockets (HAProxy round robin spreads its members over
        # both replicas): its delivery latency and integrity while 20,000 sockets sit there.
        live = await live_room(cluster.ws_url, 50, 10.0, idle)
        for p in procs:
            p.terminate()
            await p.wait()
    per_replica = held / 2
    cpu = [round(a - b, 2) for a, b in zip(cpu_after, cpu_before, strict=True)]
    return {
        "sockets": held,
        "failed": sum(o["failed"] for o in opened),
        "generators": opened,
        "handshakes_per_s_per_replica": round(per_replica / max(o["seconds"] for o in opened), 1),
        "rss_kib": {"before": rss_before, "after": rss_after},
        "rss_kib_per_socket": round((sum(rss_after) - sum(rss_before)) / held, 1) if held else None,
        "live_room": live,
        "idle_window_s": idle,
        "idle_cpu_s": cpu,
        "idle_cpu_percent_per_1000": round(100 * sum(cpu) / idle / (held / 1000), 3) if held else None,
    }


def commandstats(cluster: LocalCluster) -> dict[str, int]:
    """Calls per command, and `reads`: the read events Redis served (about one per round trip:
    a pipeline's commands arrive in one read)."""
    stats: dict[str, int] = {}
    for line in cluster.redis.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            stats[name[len("cmdstat_") :]] = int(rest.split(",")[0].split("=")[1])
    for line in cluster.redis.cli("INFO", "stats").splitlines():
        if line.startswith("total_reads_processed:"):
            stats["reads"] = int(line.split(":")[1])
    return stats


def quiet(cluster: LocalCluster) -> dict[str, int]:
    """Command counts once Redis has been idle for a second (the last wave's leaves are done)."""
    last = commandstats(cluster)
    for _ in range(30):
        time.sleep(1.0)
        now = commandstats(cluster)
        busy = {
            k: v - last.get(k, 0) for k, v in now.items() if k not in ("info", "ping", "publish", "reads")
        }
        if not any(busy.values()):
            return now
        last = now
    return last


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.hold:
        return {"hold": await hold(args.hold, args.idle_seconds, args.concurrency)}
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    env = {
        "CHORUS_MAX_CONNECTIONS": "0",
        "CHORUS_MAX_CONNECTIONS_PER_USER": "0",
        "CHORUS_LOG_LEVEL": "warning",
        **dict(kv.split("=", 1) for kv in args.env),
    }
    report: dict[str, Any] = {"env": env}
    if args.joins or args.separate:
        # Rounds alternate the trees, so a noisy machine treats them alike.
        for round_ in range(args.rounds):
            for tree in args.compare_with:
                report[f"waves_{Path(tree).parent.name}_{round_}"] = await waves(
                    args, env | {"PYTHONPATH": tree}
                )
            report[f"waves_{round_}"] = await waves(args, env) | {"replicas_from": "this tree"}
    if args.scale_out:
        for tree in args.compare_with:
            report[f"scale_out_{Path(tree).parent.name}"] = await scale_out(
                args.scale_out, tolerance=0.1, rate=args.rebalance_rate, pythonpath=tree
            )
        report["scale_out"] = await scale_out(args.scale_out, tolerance=0.1, rate=args.rebalance_rate)
    return report


async def waves(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """The join waves on one replica, and Redis commands per join."""
    report: dict[str, Any] = {}
    # Admission would shed what the wave puts in flight beyond its bound (64 by default) with
    # 503s the raw sockets here do not retry: the waves measure joins, not the shedding.
    env = {"CHORUS_MAX_PENDING_HANDSHAKES": str(args.concurrency)} | env
    with LocalCluster(1, env=env) as cluster:
        base = cluster.replica_ws_url(0)
        report["one_room"] = await wave(base, ["big"] * args.joins, args.concurrency, args.history)
        emptied = lambda: cluster.redis.cli("HLEN", "chorus:online:{big}") in ("0", "")  # noqa: E731
        wait_until(emptied, 30, "the room to empty")
        rooms = [f"r{i}" for i in range(args.separate)]
        report["separate_rooms"] = await wave(base, rooms, args.concurrency, args.history)
        before = quiet(cluster)
        await wave(base, [f"c{i}" for i in range(200)], args.concurrency, args.history)
        after = quiet(cluster)
        per_join = {k: round((after.get(k, 0) - before.get(k, 0)) / 200, 2) for k in after}
        report["redis_commands_per_join_and_leave"] = {k: v for k, v in per_join.items() if v > 0}
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--joins", type=int, default=2000)
    parser.add_argument("--separate", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument(
        "--history", type=int, default=0, help="messages each join asks for (server default 20)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="join-wave rounds (with --compare-with, alternating)"
    )
    parser.add_argument(
        "--scale-out", type=int, default=600, help="sockets for the 2 -> 3 scale-out (0: skip)"
    )
    parser.add_argument("--rebalance-rate", type=float, default=20.0)
    parser.add_argument(
        "--compare-with", action="append", default=[], metavar="DIR",
        help="also run the waves and the scale-out with the replicas from DIR (PYTHONPATH, say main)",
    )  # fmt: skip
    parser.add_argument("--hold", type=int, default=0, help="only the hold: sockets on 2 replicas")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--generator", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--source", default="127.0.0.2", help=argparse.SUPPRESS)
    parser.add_argument("--hold-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--url", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the replicas")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.generator:
        asyncio.run(generator(args.url, args.generator, args.source, args.hold_seconds, args.concurrency))
        sys.exit(0)
    result = asyncio.run(main(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_storm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
