"""Movement storms at scale (issue 12 item 4): a rolling restart, a crash and a scale-out under a live room.

    python -m loadtest.bench_roll [--scenario roll|crash|scale-out ...] [--sockets 9900]
        [--members 100] [--rate 10] [--drain 10] [--out DIR]

Both scenarios run the same fleet: 3 replicas behind the local cluster's HAProxy (round robin,
no affinity), `--sockets` idle `chorus.client` rooms held by generator processes (so their
reconnect work does not sit on the event loop that times the live room), and in this process a
live room: one publisher sending `--rate` messages/s, `--members` resuming `chorus.client`
members recording every message id and its delivery latency (send wall time carried in the
text, same host clock). A sampler records every 0.5 s: sockets per replica (`/metrics`),
`/readyz` of every live replica, Redis CPU (/proc of redis-server, both user and system), the
CPU of each group of processes (replicas, generators, proxies, Redis, this process) and how busy
the machine's cores were (/proc/stat), so a figure says whose CPU set the pace,
connects and 1012 closes the clients saw.

* roll: a Deployment with maxSurge 1 / maxUnavailable 0. For each old replica: start the new one
  (a fourth port slot), wait ready and proxied, SIGTERM the old one (drain window `--drain`).
* crash: SIGKILL the replica holding the most sockets; no replacement.
* scale-out: the sockets join 2 replicas, then a third starts; time until every replica is
  within 10 % of the mean after it is ready, and the 1012 moves against the minimum (what the
  two held above the mean). `--settle` and `--rebalance-rate` set the rebalancing for the run.

Each generator process binds its own loopback source address (127.0.0.2, .3, ...) and goes
through its own HAProxy (round robin over every replica, like every node's proxy in front of
a Service): one HAProxy carries about 9,000 sockets under this machine's 20,000-descriptor
hard limit, which even root cannot raise here.

Every loop is bounded by a count and a deadline; only processes started here are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import statistics
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import uvloop

from chorus.client import Message, NotConnected, Presence, Reconnect, Room, SendUnconfirmed, connect
from chorus.client.errors import ChorusError
from chorus.devcluster import LocalCluster

from .bench_procs import process_tree
from .bench_storm import _cpu_seconds

TOLERANCE = 0.1  # CHORUS_REBALANCE_TOLERANCE for the scale-out, and its convergence test
SAMPLE_S = 0.5
CPU_GROUPS = ("replicas", "generators", "proxies", "redis", "bench")
POLICY = Reconnect(base=0.5, cap=5.0)


# -- generator process: idle resuming sockets, progress as JSON lines --------------------------
async def generator(url: str, count: int, seconds: float, concurrency: int, tag: str, source: str) -> None:
    """Hold `count` chorus.client rooms through `url` for at most `seconds`; print progress lines."""
    rooms: list[Room] = []
    failed = 0
    slots = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + seconds
    async with AsyncExitStack() as stack:

        async def join(i: int) -> None:
            nonlocal failed
            async with slots:
                try:
                    room = await stack.enter_async_context(
                        connect(url, f"idle-{i % 100}", username=f"{tag}-{i}", history=0,
                                reconnect=POLICY, receive=False, open_timeout=30, local_addr=(source, 0))
                    )  # fmt: skip
                except (ChorusError, TimeoutError, OSError):
                    failed += 1
                    return
                rooms.append(room)

        joining = asyncio.ensure_future(asyncio.gather(*(join(i) for i in range(count))))
        stopping = asyncio.create_task(_stdin_closed())
        lag_max = 0.0  # the generator's own event-loop stall: its sockets wait on it, not the fleet
        while time.monotonic() < deadline and not stopping.done():
            print(
                json.dumps(_progress(rooms, failed, joining.done()) | {"loop_lag_max_s": lag_max}), flush=True
            )
            slept = time.monotonic()
            await asyncio.sleep(SAMPLE_S)
            lag_max = max(lag_max, round(time.monotonic() - slept - SAMPLE_S, 2))
        joining.cancel()
        stopping.cancel()
        print(
            json.dumps(_progress(rooms, failed, True) | {"final": True, "loop_lag_max_s": lag_max}),
            flush=True,
        )
        # Leave without goodbyes: thousands of closes at once would be a wave of their own,
        # and the cluster is torn down next anyway.
        os._exit(0)


async def _stdin_closed() -> None:
    await asyncio.to_thread(sys.stdin.read)


def _progress(rooms: list[Room], failed: int, joined: bool) -> dict[str, Any]:
    return {
        "t": time.time(),
        "rooms": len(rooms),
        "failed": failed,
        "joined": joined,
        "connected": sum(room.connected for room in rooms),
        "ended": sum(room.ended for room in rooms),  # rooms that gave up: they never come back
        "connects": sum(room.stats.connects for room in rooms),
        "closes_1012": sum(room.stats.close_codes[1012] for room in rooms),
        "closes_1006": sum(room.stats.close_codes[1006] for room in rooms),
        "refused_503": sum(room.stats.refused[503] for room in rooms),
        # A proxy's own 408/500/502/504 (a room used to end on 408 and 500).
        "refused_other": sum(
            n for room in rooms for status, n in room.stats.refused.items() if status != 503
        ),
        "unreachable": sum(room.stats.unreachable for room in rooms),
        "refused_by_status": dict(sum((room.stats.refused for room in rooms), Counter())),
        "resumes": sum(room.stats.resumes for room in rooms),
    }


# -- the fleet as the sampler sees it ----------------------------------------------------------
def _machine_ticks() -> tuple[int, int]:
    """(busy, all) jiffies of every core since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _cpu_between(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """CPU-s each group spent from `start` to `end` (wall times), and the machine's mean busy share."""
    inside = [s for s in samples if start <= s["t"] <= end and "cpu_total" in s]
    if len(inside) < 2:
        return {}
    first, last = inside[0]["cpu_total"], inside[-1]["cpu_total"]
    spent = {group: round(last[group] - first[group], 1) for group in CPU_GROUPS}
    busy = statistics.fmean(s["machine_busy"] for s in inside[1:])
    return {
        "cpu_s": spent,
        "replica_share": round(spent["replicas"] / max(0.1, sum(spent.values())), 2),
        "machine_busy": round(busy, 2),
        "seconds": round(inside[-1]["t"] - inside[0]["t"], 1),
    }


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _replica_sample(cluster: LocalCluster, index: int) -> dict[str, Any]:
    if not cluster.replicas[index].alive():
        return {"alive": False}
    base = cluster.replica_url(index)
    try:
        ready = httpx.get(f"{base}/readyz", timeout=2).status_code
        text = httpx.get(f"{base}/metrics", timeout=2).text
    except httpx.HTTPError as exc:
        return {"alive": True, "ready": None, "error": type(exc).__name__}
    return {
        "alive": True,
        "ready": ready,
        "sockets": int(_metric(text, "chorus_connections ")),
        "shed_503": int(_metric(text, "chorus_rejections_total{")),
    }


class Fleet:
    """Generators, live room and sampler around one LocalCluster with a spare (surge) slot."""

    def __init__(self, cluster: LocalCluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.generators: list[asyncio.subprocess.Process] = []
        self.progress: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.sent: list[tuple[str, float]] = []  # (acked id, send wall time)
        self.send_failed = 0
        self.seen: list[list[tuple[str, float]]] = []  # per member: (id, latency s)
        self.presence_online: list[int] = []
        self.members: list[Room] = []
        self.marks: list[tuple[float, str]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # readers and collectors, kept alive
        self._redis_pid = cluster.redis.process.pid if cluster.redis.process else 0
        self._pid_cpu: dict[int, float] = {}  # CPU-s per process at the last sample
        self.cpu_total: dict[str, float] = dict.fromkeys(CPU_GROUPS, 0.0)  # CPU-s since the start
        self._machine = _machine_ticks()

    def _group_pids(self) -> dict[str, list[int]]:
        cluster = self.cluster
        return {
            "replicas": [pid for r in cluster.replicas if r.alive() for pid in process_tree(r.pid)],
            "generators": [proc.pid for proc in self.generators if proc.returncode is None],
            "proxies": [proxy.pid for proxy in cluster.proxies if proxy.alive()],
            "redis": [self._redis_pid],
            "bench": [os.getpid()],
        }

    def _cpu_sample(self, elapsed: float) -> dict[str, Any]:
        """Cores each group used since the last sample, their running totals, and the machine's busy share."""
        cores: dict[str, float] = {}
        for group, pids in self._group_pids().items():
            spent = 0.0
            for pid in pids:
                try:
                    now = _cpu_seconds(pid)
                except (OSError, IndexError, ValueError):  # exited between the listing and the read
                    continue
                spent += now - self._pid_cpu.get(pid, now)  # a new process counts from its first sample
                self._pid_cpu[pid] = now
            self.cpu_total[group] += spent
            cores[group] = round(spent / elapsed, 2)
        machine = _machine_ticks()
        busy = (machine[0] - self._machine[0]) / max(1, machine[1] - self._machine[1])
        self._machine = machine
        return {"cpu_cores": cores, "cpu_total": dict(self.cpu_total), "machine_busy": round(busy, 3)}

    def mark(self, what: str) -> None:
        self.marks.append((time.time(), what))
        print(f"  {time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)

    async def start_generators(self) -> None:
        per = self.args.sockets // self.args.generators
        for j in range(self.args.generators):
            url = self.cluster.proxy_ws_url(j % len(self.cluster.proxies))
            argv = [sys.executable, "-m", "loadtest.bench_roll", "--generator", str(per),
                    "--url", url, "--seconds", str(self.args.max_seconds),
                    "--concurrency", str(self.args.concurrency), "--tag", f"g{j}",
                    "--source", f"127.0.0.{2 + j}"]  # fmt: skip
            self.generators.append(
                await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
                )
            )
        self.progress = [{} for _ in self.generators]
        for j, proc in enumerate(self.generators):
            self._tasks.add(asyncio.create_task(self._read(j, proc)))

    async def _read(self, j: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self.progress[j] = json.loads(line)

    def totals(self) -> dict[str, int]:
        keys = ("rooms", "failed", "connected", "ended", "connects", "closes_1012", "closes_1006",
                "refused_503", "refused_other", "unreachable", "resumes")  # fmt: skip
        total = {k: sum(int(p.get(k, 0)) for p in self.progress) for k in keys}
        total["connected"] += sum(m.connected for m in self.members)
        total["connects"] += sum(m.stats.connects for m in self.members)
        total["closes_1012"] += sum(m.stats.close_codes[1012] for m in self.members)
        total["refused_503"] += sum(m.stats.refused[503] for m in self.members)
        return total

    async def wait_joined(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.progress and all(p.get("joined") for p in self.progress):
                return
            if any(proc.returncode is not None for proc in self.generators):
                # Fail now: waiting out the timeout invites an outer `timeout` to SIGTERM this
                # process, and the cluster's `with` never gets to stop its replicas.
                raise RuntimeError("a generator process exited before its sockets joined")
            await asyncio.sleep(0.5)
        raise TimeoutError("the generators did not finish joining")

    async def sampler(self) -> None:
        start = time.monotonic()
        last_cpu = _cpu_seconds(self._redis_pid)
        last_t = time.monotonic()
        while time.monotonic() - start < self.args.max_seconds:
            await asyncio.sleep(SAMPLE_S)
            replicas = await asyncio.to_thread(
                lambda: [_replica_sample(self.cluster, i) for i in range(len(self.cluster.replicas))]
            )
            cpu, now = _cpu_seconds(self._redis_pid), time.monotonic()
            self.samples.append({
                "t": time.time(),
                "replicas": replicas,
                "redis_cpu_percent": round(100 * (cpu - last_cpu) / (now - last_t), 1),
                **self._cpu_sample(now - last_t),
                **self.totals(),
            })  # fmt: skip
            last_cpu, last_t = cpu, now

    async def live_room(self, stack: AsyncExitStack) -> None:
        slots = asyncio.Semaphore(20)

        async def join(i: int) -> Room:
            async with slots:
                return await stack.enter_async_context(
                    connect(self.cluster.ws_url, "live", username=f"live-{i}", history=0, reconnect=POLICY)
                )

        self.members = list(await asyncio.gather(*(join(i) for i in range(self.args.members))))
        self.seen = [[] for _ in self.members]
        for i, member in enumerate(self.members):
            self._tasks.add(asyncio.create_task(self._collect(i, member)))

    async def _collect(self, index: int, member: Room) -> None:
        with contextlib.suppress(ChorusError):
            async for event in member:
                if isinstance(event, Message):
                    sent = float(event.text.split()[1])
                    self.seen[index].append((event.id, time.time() - sent))
                elif isinstance(event, Presence) and index == 0:
                    self.presence_online.append(event.online)

    async def publish(self, stop: asyncio.Event) -> None:
        async with connect(
            self.cluster.ws_url, "live", username="publisher", history=0, reconnect=POLICY, receive=False
        ) as sender:
            n = 0
            period = 1 / self.args.rate
            next_at = time.monotonic()
            while not stop.is_set() and n < self.args.rate * self.args.max_seconds:
                n += 1
                sent = time.time()
                try:
                    ack = await sender.send(f"m{n} {sent:.6f}")
                    self.sent.append((ack.id, sent))
                except (NotConnected, SendUnconfirmed, TimeoutError, ChorusError):
                    self.send_failed += 1
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def all_back(self, expected: int, timeout: float) -> float | None:
        """Seconds until every socket (generators and members) is connected again, or None."""
        start, since = time.monotonic(), time.time() + SAMPLE_S
        while time.monotonic() - start < timeout:
            fresh = all(p.get("t", 0) > since for p in self.progress)  # seen after the event
            if fresh and self.totals()["connected"] >= expected:
                return round(time.monotonic() - start, 1)
            await asyncio.sleep(0.2)
        return None

    async def stop_generators(self) -> None:
        for proc in self.generators:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.generators:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if len(values) < 2:
        return {"p50_ms": None, "p99_ms": None, "n": len(values)}
    q = statistics.quantiles(values, n=100)
    return {"p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1), "n": len(values)}


def _latency(fleet: Fleet, start: float, end: float) -> dict[str, float | None]:
    sent_at = dict(fleet.sent)
    values = [lat for seen in fleet.seen for mid, lat in seen if start <= sent_at.get(mid, 0) < end]
    return _percentiles(values)


def _integrity(fleet: Fleet) -> dict[str, int]:
    acked = [mid for mid, _ in fleet.sent]
    lost = dup = 0
    for seen in fleet.seen:
        ids = [mid for mid, _ in seen]
        counts = Counter(ids)
        dup += sum(c - 1 for c in counts.values())
        lost += sum(1 for mid in acked if mid not in counts)
    return {"acked": len(acked), "send_failed": fleet.send_failed, "members": len(fleet.seen),
            "lost": lost, "duplicated": dup}  # fmt: skip


def _per_second(samples: list[dict[str, Any]], key: str, t0: float) -> list[tuple[float, float]]:
    rows = []
    for a, b in pairwise(samples):
        rows.append((round(b["t"] - t0, 1), round((b[key] - a[key]) / (b["t"] - a["t"]), 1)))
    return rows


async def scenario(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "CHORUS_MAX_CONNECTIONS": "0",
        "CHORUS_MAX_CONNECTIONS_PER_USER": "0",
        "CHORUS_LOG_LEVEL": "warning",
        "CHORUS_PRESENCE_HEARTBEAT_SECONDS": "1",
        "CHORUS_DRAIN_SECONDS": str(args.drain),
        **dict(kv.split("=", 1) for kv in args.env),
    }
    if kind == "scale-out":
        env |= {
            "CHORUS_REBALANCE_SETTLE_SECONDS": str(args.settle),
            "CHORUS_REBALANCE_RATE": str(args.rebalance_rate),
            "CHORUS_REBALANCE_TOLERANCE": str(TOLERANCE),
        }
    # Four port slots: three serving, one for the surge (a roll's new replica); a scale-out
    # starts on two and brings up the third. One HAProxy per generator (each carries at most
    # PROXY_MAXCONN under the 20,000 descriptor limit), every one balancing over every replica.
    with LocalCluster(4, env=env, proxies=args.generators, proxy_retry_503=args.proxy_retry_503) as cluster:
        cluster.stop_replica(3)
        if kind == "scale-out":
            cluster.stop_replica(2)
        cluster.wait_proxy_sees(2 if kind == "scale-out" else 3)
        fleet = Fleet(cluster, args)
        expected = args.sockets // args.generators * args.generators + args.members
        result: dict[str, Any] = {"scenario": kind, "env": env, "sockets": expected}
        result["proxy_retries_503"] = args.proxy_retry_503
        sampling = asyncio.create_task(fleet.sampler())
        stop = asyncio.Event()
        async with AsyncExitStack() as stack:
            t_join = time.monotonic()
            await fleet.live_room(stack)
            await fleet.start_generators()
            await fleet.wait_joined(600)
            result["join_s"] = round(time.monotonic() - t_join, 1)
            result["joined"] = fleet.totals()
            publishing = asyncio.create_task(fleet.publish(stop))
            fleet.mark("steady")
            await asyncio.sleep(args.baseline)
            t0 = time.time()
            steps = []
            if kind == "roll":
                slots = [3, 0, 1, 2]  # new replica in slot k+1's predecessor's place
                for step, old in enumerate([0, 1, 2]):
                    new = slots[step]
                    fleet.mark(f"start new replica in slot {new}")
                    await asyncio.to_thread(cluster.start_replica, new)
                    fleet.mark(f"SIGTERM replica {old}")
                    t_term = time.monotonic()
                    sigterm_at = time.time()
                    await asyncio.to_thread(cluster.replicas[old].stop, args.drain + 20)
                    exited = round(time.monotonic() - t_term, 1)
                    back = await fleet.all_back(expected, 120)
                    total = None if back is None else round(exited + back, 1)
                    steps.append(
                        {
                            "old": old,
                            "new": new,
                            "sigterm_at": sigterm_at,
                            "old_exited_s": exited,
                            "all_back_s_after_exit": back,
                            "all_back_s_after_sigterm": total,
                            # Whose CPU the step cost, and how busy the machine was meanwhile.
                            "cpu": _cpu_between(fleet.samples, sigterm_at, time.time()),
                        }
                    )
                    fleet.mark(f"step {step}: old exited after {exited}s, all back {back}s later")
            elif kind == "scale-out":
                steps.append(await _scale_out(fleet, expected))
            else:
                counts = [s.get("sockets", 0) for s in fleet.samples[-1]["replicas"][:3]]
                victim = counts.index(max(counts))
                result["victim"], result["victim_sockets"] = victim, counts[victim]
                result["sockets_before"] = counts
                fleet.mark(f"SIGKILL replica {victim} holding {counts[victim]}")
                t_kill = time.monotonic()
                cluster.replicas[victim].signal(signal.SIGKILL)
                back = await fleet.all_back(expected, 120)
                steps.append({"victim": victim, "all_back_s_after_kill": back,
                              "kill_at": time.time() - (time.monotonic() - t_kill)})  # fmt: skip
                fleet.mark(f"all back after {back}s")
            t1 = time.time()
            await asyncio.sleep(args.after)
            stop.set()
            await publishing
            await asyncio.sleep(3)  # the last deliveries and presence diffs
            fleet.mark("done")
            result["steps"] = steps
            result["live_room"] = {
                "rate_per_s": args.rate,
                "before": _latency(fleet, t0 - args.baseline, t0),
                "during": _latency(fleet, t0, t1),
                "after": _latency(fleet, t1, time.time()),
                **_integrity(fleet),
                "member_reconnects": sum(m.stats.reconnects for m in fleet.members),
                "member_resumes": sum(m.stats.resumes for m in fleet.members),
                "member_duplicates_dropped": sum(m.stats.duplicates_dropped for m in fleet.members),
                "member_resyncs": sum(m.stats.resyncs for m in fleet.members),
            }
            hlen = cluster.redis.cli("HLEN", "chorus:online:{live}")
            result["presence"] = {
                "online_hash_live": int(hlen or 0),
                "expected_live": args.members,
                "last_online_seen_by_member": fleet.presence_online[-1] if fleet.presence_online else None,
            }
            sampling.cancel()
            await fleet.stop_generators()
        samples = fleet.samples
        t_base = samples[0]["t"] if samples else time.time()
        reconnects = _per_second(samples, "connects", t_base)
        closes = _per_second(samples, "closes_1012", t_base)
        during = [s for s in samples if t0 <= s["t"] <= t1 + 5]
        result["peak_reconnects_per_s"] = max((r for t, r in reconnects if t >= t0 - t_base), default=0)
        result["redis_cpu_percent"] = {
            "before_peak": max((s["redis_cpu_percent"] for s in samples if s["t"] < t0), default=None),
            "peak": max((s["redis_cpu_percent"] for s in during), default=None),
            "run_peak": max((s["redis_cpu_percent"] for s in samples), default=None),
        }
        result["cpu_during"] = _cpu_between(samples, t0, t1)
        result["closes_1012"] = fleet.totals()["closes_1012"]
        result["closes_1012_per_s"] = [(t, r) for t, r in closes if r > 0]
        result["refused_503_clients"] = fleet.totals()["refused_503"]
        # In a roll the draining replica is meant to answer 503; in a crash no survivor should.
        result["not_ready_samples"] = sum(
            1
            for s in during
            for i, r in enumerate(s["replicas"])
            if r.get("alive") and r.get("ready") != 200 and i != result.get("victim")
        )
        result["shed_503_server"] = max(
            (sum(r.get("shed_503", 0) for r in s["replicas"] if r.get("alive")) for s in samples), default=0
        )
        result["final"] = fleet.totals()
        # Per generator: refusals by status and the longest stall of its own event loop.
        result["generators"] = [
            {key: p.get(key) for key in ("refused_by_status", "loop_lag_max_s", "ended")}
            for p in fleet.progress
        ]
        result["marks"] = [(round(t - t_base, 1), what) for t, what in fleet.marks]
        result["timeline"] = [
            {"t": round(s["t"] - t_base, 1), "sockets": [r.get("sockets") for r in s["replicas"]],
             "ready": [r.get("ready") for r in s["replicas"]], "redis_cpu_percent": s["redis_cpu_percent"],
             "connects": s["connects"], "closes_1012": s["closes_1012"], "connected": s["connected"],
             "cpu_cores": s.get("cpu_cores"), "machine_busy": s.get("machine_busy")}
            for s in samples
        ]  # fmt: skip
        sent_at = dict(fleet.sent)
        result["latency_timeline"] = _latency_series(fleet, sent_at, t_base)
    return result


async def _scale_out(fleet: Fleet, expected: int) -> dict[str, Any]:
    """Start the third replica; time until every replica is within TOLERANCE of the mean, moves."""
    cluster = fleet.cluster
    before = [fleet.samples[-1]["replicas"][i].get("sockets", 0) for i in range(2)]
    closes_before = fleet.totals()["closes_1012"]
    fleet.mark("start replica 2")
    await asyncio.to_thread(cluster.start_replica, 2)
    ready, ready_at = time.monotonic(), time.time()
    fleet.mark("replica 2 ready and proxied")
    converged: float | None = None
    counts: list[int] = []
    while time.monotonic() - ready < 240:
        await asyncio.sleep(SAMPLE_S)
        latest = fleet.samples[-1]
        if latest["t"] <= ready_at:
            continue
        counts = [latest["replicas"][i].get("sockets", 0) for i in range(3)]
        mean = expected / 3
        if fleet.totals()["connected"] >= expected and max(abs(c - mean) for c in counts) <= TOLERANCE * mean:
            converged = round(time.monotonic() - ready, 1)
            break
    fleet.mark(f"converged {converged}s after ready: {counts}")
    await asyncio.sleep(5)  # any last moves (a beat in progress) are counted too
    moves = fleet.totals()["closes_1012"] - closes_before
    minimum = sum(max(0.0, c - expected / 3) for c in before)
    return {
        "before": before,
        "converged_s_after_ready": converged,
        "counts_at_convergence": counts,
        "moves": moves,
        "minimum_moves": round(minimum),
        "moves_over_minimum": round(moves / minimum, 2) if minimum else None,
    }


def _latency_series(fleet: Fleet, sent_at: dict[str, float], t_base: float) -> list[dict[str, Any]]:
    """p50/p99 per second of send time, over every member's deliveries."""
    buckets: dict[int, list[float]] = {}
    for seen in fleet.seen:
        for mid, lat in seen:
            if mid in sent_at:
                buckets.setdefault(int(sent_at[mid] - t_base), []).append(lat)
    return [{"t": t, **_percentiles(v)} for t, v in sorted(buckets.items())]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for kind in args.scenario:
        print(f"{kind}: {args.sockets} sockets + {args.members} live members", file=sys.stderr, flush=True)
        report[kind] = await scenario(kind, args)
    return report


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=["roll", "crash", "scale-out"], default=[])
    parser.add_argument(
        "--sockets", type=int, default=9900, help="idle sockets (the live room's members come on top)"
    )
    parser.add_argument("--generators", type=int, default=3, help="processes, one loopback source each")
    parser.add_argument("--members", type=int, default=100, help="live-room members (resuming, counted)")
    parser.add_argument("--rate", type=float, default=10.0, help="live-room messages per second")
    parser.add_argument("--drain", type=float, default=10.0, help="CHORUS_DRAIN_SECONDS")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="CHORUS_REBALANCE_SETTLE_SECONDS (scale-out)"
    )
    parser.add_argument(
        "--rebalance-rate", type=float, default=100.0, help="CHORUS_REBALANCE_RATE (scale-out)"
    )
    parser.add_argument(
        "--proxy-retry-503", action="store_true", help="HAProxy sends a refused handshake to the next replica"
    )
    parser.add_argument("--baseline", type=float, default=20.0, help="seconds of steady state before")
    parser.add_argument("--after", type=float, default=10.0, help="seconds after everyone is back")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard bound on every loop")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the replicas")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    parser.add_argument("--generator", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="g", help=argparse.SUPPRESS)
    parser.add_argument("--source", default="127.0.0.2", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.scenario = args.scenario or ["roll", "crash", "scale-out"]
    return args


if __name__ == "__main__":
    args = parse()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.generator:
        uvloop.run(generator(args.url, args.generator, args.seconds, args.concurrency, args.tag, args.source))
        os._exit(0)  # the rooms' sockets die with the process; no goodbye wave
    result = uvloop.run(main(args))
    args.out.mkdir(parents=True, exist_ok=True)
    from .plot_storm import plot_storm

    for kind, data in result.items():
        path = args.out / f"{kind}-{data['sockets']}.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        plot_storm(data, path.with_suffix(".png"), f"Chorus {kind}: {data['sockets']} sockets, 3 replicas")
        print(path, file=sys.stderr)
    print(json.dumps({k: {x: y for x, y in v.items() if x not in ("timeline", "latency_timeline")}
                      for k, v in result.items()}, indent=1))  # fmt: skip
