"""`make bench`: Chorus, the seed's naive design and Node.js Socket.IO, side by side, in one run.

    python -m loadtest.bench [--smoke] [--out loadtest/results] [--rooms 100 --receivers 400]

Starts a Redis and R replicas per implementation (clients connect straight to the replicas,
round robin), then measures, alternating the implementations step by step so that a noisy
machine treats them alike:

1. the main curve: 2 replicas, one room of 100 receivers, 10 publishers, open-loop steps of
   rising rate until each implementation fails twice (loss, duplicates or p99 > 50 ms);
2. many small rooms: 100 rooms of 4 members (`--rooms`, `--receivers`), one member of each
   room publishing, members of each room on every replica; steps of 500, 1,000, 2,000
   messages/s and up until each fails twice; reports server CPU per message;
3. a rooms sweep: 1, 10, 100, 1,000 rooms of 2 receivers each, same total message rate, so
   only the number of rooms (subscriptions, channels) changes;
4. a replicas sweep (1, 2, 3) on the main room at a fixed delivery rate;
5. idle cost, on fresh replicas: RSS growth of one replica per idle joined WebSocket at 2,000
   connections, then the replica's CPU over a fixed idle window (60 s: three keepalive rounds
   of uvicorn's 20 s pings, two or three of Socket.IO's 25 s ones; the pings answered in the
   window are reported beside the CPU).

Writes bench.md, bench.json and bench.png under --out. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from chorus.devcluster import HarnessError, wait_until

from .bench_load import Load, StepResult
from .bench_procs import FLOOR, IMPLS, Target, ensure_baseline_venv, ensure_socketio_modules
from .bench_report import write_report
from .bench_wire import Tally, framing_for, open_socket


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run; `smoke` only proves the machinery works."""

    replicas: int = 2
    receivers: int = 100
    publishers: int = 10
    step_seconds: float = 3.0
    rates_dps: tuple[int, ...] = (
        5_000, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 120_000, 150_000, 200_000,
        250_000, 300_000, 400_000,
    )  # fmt: skip  # run 8: Chorus passed 200,000 (generator 0.44 core), so the ladder goes on
    max_failures: int = 2
    small_rooms: int = 100
    small_receivers: int = 400  # members in all; one of each room's members publishes
    small_rates: tuple[int, ...] = (500, 1_000, 2_000, 3_000, 4_000, 6_000, 8_000, 12_000, 16_000)
    sweep_rooms: tuple[int, ...] = (1, 10, 100, 1000)
    sweep_members: int = 2  # receivers per room: fixed, so only the number of rooms changes
    sweep_rooms_msgs: int = 500
    sweep_replicas: tuple[int, ...] = (1, 2, 3)
    sweep_replicas_dps: int = 30_000
    idle_connections: int = 2000
    idle_seconds: float = 60.0  # Chorus (uvicorn) pings every 20 s, Socket.IO every 25 s


FULL = Plan()
SMOKE = Plan(
    replicas=1, receivers=4, publishers=2, step_seconds=0.5, rates_dps=(100, 200), max_failures=2,
    small_rooms=2, small_receivers=8, small_rates=(20, 40),
    sweep_rooms=(1, 2), sweep_members=2, sweep_rooms_msgs=50, sweep_replicas=(1, 2),
    sweep_replicas_dps=100, idle_connections=20, idle_seconds=1.0,
)  # fmt: skip


@dataclass
class Results:
    plan: Plan
    main: list[StepResult] = field(default_factory=list)
    small: list[StepResult] = field(default_factory=list)
    rooms: list[StepResult] = field(default_factory=list)
    replicas: list[StepResult] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    retried: list[StepResult] = field(default_factory=list)  # first tries that failed
    started: float = field(default_factory=time.time)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _brief(step: StepResult) -> str:
    flag = "ok" if step.passed() else "FAIL"
    if step.client_bound:
        flag += " client-bound"
    return (
        f"{step.impl:8} {step.scenario:8} rooms={step.rooms:<4} R={step.replicas} "
        f"msgs={step.offered_msgs_s:>6.0f}/s offered={step.offered_dps:>7.0f}/s "
        f"delivered={step.delivered_dps:>7.0f}/s loss={step.loss} p99={step.p99_ms:.1f}ms "
        f"cpu/1k={step.server_cpu_per_1k:.4f}s cpu/msg={step.server_cpu_ms_per_msg:.3f}ms "
        f"gen={step.generator_cores:.2f} {flag}"
    )


async def _with_load(
    target: Target,
    scenario: str,
    rooms: int,
    receivers: int,
    publishers_per_room: int,
    *,
    publisher_is_member: bool = False,
) -> Load:
    load = Load(
        target, scenario=scenario, rooms=rooms, receivers=receivers, publishers_per_room=publishers_per_room,
        publisher_is_member=publisher_is_member,
    )  # fmt: skip
    await load.connect()
    # A short unmeasured step warms both ends (first frames, lazy imports, subscriptions).
    await load.step(max(1.0, 200 / max(1, receivers // rooms)), 0.3)
    await _quiet(target)
    return load


async def _quiet(target: Target, *, cores: float = 0.05, within: float = 20.0) -> None:
    """Wait (bounded) until the replicas idle: the previous load's leaves and unsubscribes, or
    this one's joins, must not be billed to the step that follows."""
    for _ in range(round(within / 0.5)):
        before = target.server_cpu()
        await asyncio.sleep(0.5)
        if target.server_cpu() - before <= cores * 0.5 * len(target.ports):
            return
    log(f"{target.impl}: replicas still busy after {within:.0f}s; measuring anyway")


async def main_curve(plan: Plan, targets: dict[str, Target], results: Results) -> None:
    loads = {
        impl: await _with_load(t, "main", 1, plan.receivers, plan.publishers) for impl, t in targets.items()
    }
    rates = [dps / plan.receivers for dps in plan.rates_dps]
    await _curve(plan, loads, rates, results.main, results)


async def small_rooms_curve(plan: Plan, targets: dict[str, Target], results: Results) -> None:
    """Rooms of a few members, where a message reaches three others: the per-message path."""
    loads = {
        impl: await _with_load(
            t, "small", plan.small_rooms, plan.small_receivers, 1, publisher_is_member=True
        )
        for impl, t in targets.items()
    }
    await _curve(plan, loads, list(plan.small_rates), results.small, results)


async def _curve(
    plan: Plan, loads: dict[str, Load], rates: list[float], steps: list[StepResult], results: Results
) -> None:
    """Rising open-loop steps (messages/s), implementations in turn, until each fails twice."""
    failures = dict.fromkeys(loads, 0)
    try:
        for msgs_per_s in rates:
            for impl, load in loads.items():
                if failures[impl] >= plan.max_failures:
                    continue
                step = await load.step(msgs_per_s, plan.step_seconds)
                log(_brief(step))
                if not step.passed():
                    # The machine is shared: a step fails only if a second try fails too.
                    results.retried.append(step)
                    step = await load.step(msgs_per_s, plan.step_seconds)
                    step.attempt = 2
                    log(_brief(step) + " (second try)")
                steps.append(step)
                if not step.passed():
                    failures[impl] += 1
            if all(count >= plan.max_failures for count in failures.values()):
                break
    finally:
        for load in loads.values():
            load.close()


async def fixed_step(
    target: Target, scenario: str, rooms: int, receivers: int, msgs_per_s: float, plan: Plan
) -> StepResult:
    per_room = max(1, plan.publishers // rooms)
    load = await _with_load(target, scenario, rooms, receivers, per_room)
    try:
        step = await load.step(msgs_per_s, plan.step_seconds)
    finally:
        load.close()
    log(_brief(step))
    return step


async def idle_memory(target: Target, connections: int, idle_seconds: float) -> dict[str, Any]:
    """RSS growth of the replica per idle joined WebSocket (in a few rooms, history off), then
    the replica's CPU while they idle (pings answered by the generator)."""
    tally = Tally()
    framing = framing_for(target.impl)
    before = _settled_rss(target)
    gate = asyncio.Semaphore(64)

    async def one(index: int) -> Any:
        path = framing.path(f"idle-{index % 20}", "idle")
        async with gate:
            return await open_socket(target.ports[0], path, tally, receiver=True, framing=framing)

    clients = await asyncio.gather(*(one(i) for i in range(connections)))
    try:
        after = _settled_rss(target)
        await _quiet(target)  # the joins' own work is not idle cost
        cpu0, pings0 = target.server_cpu(), tally.pings
        await asyncio.sleep(idle_seconds)
        idle_cpu, pings = target.server_cpu() - cpu0, tally.pings - pings0
        target.check_alive()
        # A stack that dropped idle sockets (a pong the generator failed to send) measured less.
        closed = sum(tally.closed.values())
    finally:
        for client in clients:
            client.close()
    per_conn = (after - before) / connections
    # Percent of one core per 1,000 idle sockets (/proc counts in 10 ms ticks: 60 s resolves 0.02 %).
    pct_per_1k = idle_cpu / idle_seconds * 100 / (connections / 1000)
    result = {"impl": target.impl, "connections": connections, "rss_before_kib": before,
              "rss_after_kib": after, "kib_per_connection": per_conn, "idle_seconds": idle_seconds,
              "idle_cpu_s": idle_cpu, "idle_cpu_pct_per_1k": pct_per_1k, "idle_pings": pings,
              "idle_closed": closed}  # fmt: skip
    log(
        f"{target.impl:8} idle: {per_conn:.1f} KiB per connection ({before} -> {after} KiB), "
        f"{idle_cpu:.2f} CPU-s in {idle_seconds:g} s = {pct_per_1k:.3f} % of a core per 1,000 sockets, "
        f"{pings} pings answered, {closed} closed by the server"
    )
    return result


def _settled_rss(target: Target) -> int:
    """RSS once two readings 0.3 s apart agree within 1% (bounded)."""
    readings = [target.server_rss_kib()]

    def settled() -> bool:
        readings.append(target.server_rss_kib())
        return abs(readings[-1] - readings[-2]) <= readings[-1] * 0.01

    with contextlib.suppress(HarnessError):  # still moving after 10 s: report the last reading
        wait_until(settled, 10, "replica RSS to settle", interval=0.3)
    return readings[-1]


def _start(impls: Sequence[str], replicas: int, workdir: Path) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    try:
        for impl in impls:
            targets[impl] = Target(impl, replicas, workdir / f"r{replicas}").start()
    except BaseException:
        _stop(targets)
        raise
    return targets


def _stop(targets: dict[str, Target]) -> None:
    for target in targets.values():
        target.stop()


async def run(plan: Plan, impls: Sequence[str], workdir: Path) -> Results:
    # SIGTERM cancels the run, so the finally blocks below stop every process we started.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results = Results(plan)
    replica_counts = sorted({plan.replicas, *plan.sweep_replicas})
    for replicas in replica_counts:
        log(f"starting {replicas} replica(s) of {', '.join(impls)}")
        targets = _start(impls, replicas, workdir)
        try:
            if replicas == 1:
                # First, on fresh processes: a garbage-collected runtime (node) hands back memory
                # that earlier loads left, which would make its growth per socket look negative.
                for target in targets.values():
                    results.memory.append(await idle_memory(target, plan.idle_connections, plan.idle_seconds))
                if "baseline" in impls:
                    floor = _start([FLOOR], 1, workdir)
                    try:
                        results.memory.append(
                            await idle_memory(floor[FLOOR], plan.idle_connections, plan.idle_seconds)
                        )
                    finally:
                        _stop(floor)
            if replicas == plan.replicas:
                await main_curve(plan, targets, results)
                await small_rooms_curve(plan, targets, results)
                for rooms in plan.sweep_rooms:
                    receivers = rooms * plan.sweep_members
                    for target in targets.values():
                        step = await fixed_step(
                            target, "rooms", rooms, receivers, plan.sweep_rooms_msgs, plan
                        )
                        results.rooms.append(step)
            if replicas in plan.sweep_replicas:
                for target in targets.values():
                    msgs = plan.sweep_replicas_dps / plan.receivers
                    results.replicas.append(
                        await fixed_step(target, "replicas", 1, plan.receivers, msgs, plan)
                    )
        finally:
            _stop(targets)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: prove the benchmark runs end to end"
    )
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    parser.add_argument("--impl", choices=IMPLS, action="append", help="default: all three")
    parser.add_argument("--step-seconds", type=float, default=None)
    parser.add_argument("--rooms", type=int, default=None, help="many small rooms: how many (default 100)")
    parser.add_argument(
        "--receivers", type=int, default=None, help="many small rooms: members in all (default 400)"
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    overrides = {
        "step_seconds": args.step_seconds,
        "small_rooms": args.rooms,
        "small_receivers": args.receivers,
    }
    plan = Plan(**{**plan.__dict__, **{key: value for key, value in overrides.items() if value}})
    if plan.small_receivers < 2 * plan.small_rooms:
        parser.error("--receivers must be at least twice --rooms (a publisher and someone to hear it)")
    impls = args.impl or list(IMPLS)
    if "baseline" in impls:
        log("preparing the baseline's venv (first run only)")
        ensure_baseline_venv()
    if "socketio" in impls:
        log("preparing the Socket.IO baseline's node_modules (first run only)")
        ensure_socketio_modules()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as workdir:
        results = uvloop.run(run(plan, impls, Path(workdir)))
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_report(results, args.out, smoke=args.smoke)
    log(f"done in {time.monotonic() - started:.0f}s: {', '.join(str(path) for path in paths)}")
    return 0


def results_json(results: Results) -> str:
    return json.dumps(
        {
            "plan": results.plan.__dict__,
            "started": results.started,
            "main": [step.as_dict() for step in results.main],
            "small": [step.as_dict() for step in results.small],
            "rooms": [step.as_dict() for step in results.rooms],
            "replicas": [step.as_dict() for step in results.replicas],
            "memory": results.memory,
            "retried": [step.as_dict() for step in results.retried],
        },
        indent=1,
    )


if __name__ == "__main__":
    sys.exit(main())
