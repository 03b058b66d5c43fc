"""`make bench-cluster`: Chorus on Redis Cluster, 1 shard against 3, with one standalone Redis beside.

    python -m loadtest.bench_cluster [--smoke] [--out docs/perf/cluster]

Starts three setups side by side, each with 2 Chorus replicas: a standalone Redis (the
reference `make bench` measures), a Redis Cluster of one master holding all 16,384 slots, and
one of three masters (no cluster replicas: failover is not what this measures). Each setup gets
the same load: 1,000 rooms of 2 receivers (the second member on the other replica, so every
room is subscribed on both) and one publisher per room, at a fixed message rate well below
what the machine carries. Rounds alternate the setups step by step so a noisy machine treats
them alike.

The machine has 2 cores shared by everything, so this measures cost, not a ceiling: Chorus
CPU per 1,000 deliveries and each Redis process's CPU (`INFO cpu`) per 1,000 published
messages, over the same window. With 3 shards each master should carry about a third of the
messages and so spend about a third of the CPU per 1,000 messages of the whole run.

Writes cluster.md and cluster.json under --out. Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from chorus.devcluster import RedisCluster, RedisServer

from .bench import _brief, _quiet, _with_load, log
from .bench_load import Load, StepResult
from .bench_procs import Target
from .bench_report import _f

MODES = {"standalone": 0, "cluster-1": 1, "cluster-3": 3}  # mode -> shards (0: no cluster)
# The generator closes its sockets before stopping the replicas: nothing is left to drain.
QUICK_STOP = {"CHORUS_DRAIN_SECONDS": "1"}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; `smoke` only proves the machinery works."""

    replicas: int = 2
    rooms: int = 1000
    members: int = 2  # receivers per room: with 2 replicas, round robin puts one on each
    msgs_per_s: int = 400
    step_seconds: float = 5.0
    rounds: int = 3
    idle_seconds: float = 3.0
    modes: tuple[str, ...] = tuple(MODES)
    # A control: the one shard at a third of the rate, i.e. at the per-shard rate of three
    # shards, to tell a cluster's overhead from a Redis doing less per wake-up.
    control_divisor: int = 3


FULL = Plan()
SMOKE = Plan(rooms=6, msgs_per_s=60, step_seconds=0.5, rounds=1, idle_seconds=0.3)


class ShardedTarget(Target):
    """Chorus replicas on a Redis Cluster: `redis_cpu` sums every shard."""

    def __init__(self, replicas: int, workdir: Path, shards: int) -> None:
        self.shards = RedisCluster(workdir / f"shards-{shards}", masters=shards)
        env = {**QUICK_STOP, "CHORUS_REDIS_URL": self.shards.url}
        super().__init__("chorus", replicas, workdir / f"cluster-{shards}", env=env)
        self.redis = self.shards.nodes[0]

    def start(self) -> ShardedTarget:
        self.shards.start()
        self.start_replicas()
        return self

    def redis_cpu(self) -> float:
        return sum(node_reading(node)[0] for node in self.shards.nodes)

    def stop(self) -> None:
        for process in self.replicas:
            process.stop()
        self.shards.stop()


def node_reading(node: RedisServer) -> tuple[float, int]:
    """(CPU seconds, messages published) of one Redis process so far.

    Commands a script runs count in `INFO commandstats`, so the append script's `PUBLISH` or
    `SPUBLISH` tallies the messages this node carried.
    """
    info = dict(
        line.split(":", 1) for line in node.cli("INFO", "cpu", "commandstats").splitlines() if ":" in line
    )
    cpu = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    published = 0
    for command in ("cmdstat_publish", "cmdstat_spublish"):
        if command in info:
            stats = dict(item.split("=", 1) for item in info[command].split(","))
            published += int(stats["calls"])
    return cpu, published


@dataclass
class Setup:
    mode: str
    target: Target
    nodes: list[RedisServer]
    load: Load | None = None
    idle: list[float] = field(default_factory=list)  # each node's cores with no messages flowing


@dataclass
class ModeStep:
    """One measured step of one setup, with each Redis process's share."""

    mode: str
    shards: int
    round: int
    step: StepResult
    node_ports: list[int]
    node_cpu_s: list[float]
    node_published: list[int]

    def node_ms_per_1k(self) -> list[float]:
        """Each Redis process's CPU-ms per 1,000 messages published in the whole run."""
        return [cpu / self.step.sent * 1e6 if self.step.sent else math.nan for cpu in self.node_cpu_s]

    def node_ms_per_1k_own(self) -> list[float]:
        """Each Redis process's CPU-ms per 1,000 of the messages it carried itself."""
        return [cpu / count * 1e6 if count else math.nan
                for cpu, count in zip(self.node_cpu_s, self.node_published, strict=True)]  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "shards": self.shards, "round": self.round, "step": self.step.as_dict(),
            "nodes": [
                {"port": port, "cpu_s": cpu, "published": count, "cpu_ms_per_1k_msgs": per_1k,
                 "cpu_ms_per_1k_own_msgs": own}
                for port, cpu, count, per_1k, own in zip(
                    self.node_ports, self.node_cpu_s, self.node_published, self.node_ms_per_1k(),
                    self.node_ms_per_1k_own(), strict=True)
            ],
        }  # fmt: skip


def _setup(mode: str, plan: Plan, workdir: Path) -> Setup:
    shards = MODES[mode]
    target = (
        ShardedTarget(plan.replicas, workdir, shards)
        if shards
        else Target("chorus", plan.replicas, workdir / mode, env=QUICK_STOP)
    )
    try:
        target.start()
    except BaseException:
        target.stop()  # whatever did start, Redis included
        raise
    nodes = target.shards.nodes if isinstance(target, ShardedTarget) else [target.redis]
    return Setup(mode, target, nodes)


async def _idle_cores(setup: Setup, seconds: float) -> list[float]:
    """Each Redis process's CPU with every socket connected and nothing sent (cron, cluster bus)."""
    before = [node_reading(node)[0] for node in setup.nodes]
    await asyncio.sleep(seconds)
    return [(node_reading(node)[0] - b) / seconds for node, b in zip(setup.nodes, before, strict=True)]


def control_label(plan: Plan) -> str:
    return f"cluster-1 at 1/{plan.control_divisor} rate"


async def _measure(setup: Setup, plan: Plan, round_: int, *, control: bool = False) -> ModeStep:
    assert setup.load is not None
    rate = plan.msgs_per_s / plan.control_divisor if control else plan.msgs_per_s
    before = [node_reading(node) for node in setup.nodes]
    step = await setup.load.step(rate, plan.step_seconds)
    after = [node_reading(node) for node in setup.nodes]
    result = ModeStep(
        mode=control_label(plan) if control else setup.mode, shards=MODES[setup.mode], round=round_,
        step=step,
        node_ports=[node.port for node in setup.nodes],
        node_cpu_s=[a[0] - b[0] for a, b in zip(after, before, strict=True)],
        node_published=[a[1] - b[1] for a, b in zip(after, before, strict=True)],
    )  # fmt: skip
    shares = " ".join(f"{v:.1f}" for v in result.node_ms_per_1k())
    log(f"{result.mode:10} {_brief(step)} redis ms/1k msgs per node: {shares}")
    return result


@dataclass
class Results:
    plan: Plan
    steps: list[ModeStep] = field(default_factory=list)
    idle: dict[str, list[float]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


async def run(plan: Plan, workdir: Path) -> Results:
    # SIGTERM cancels the run, so the finally block below stops every process we started.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results = Results(plan)
    setups: list[Setup] = []
    try:
        for mode in plan.modes:
            log(f"starting {mode}: {MODES[mode] or 'standalone'} Redis, {plan.replicas} replicas")
            setups.append(_setup(mode, plan, workdir))
            setup = setups[-1]
            setup.load = await _with_load(setup.target, "cluster", plan.rooms, plan.rooms * plan.members, 1)
            results.idle[mode] = await _idle_cores(setup, plan.idle_seconds)
            log(f"{mode:10} idle Redis cores per node: {', '.join(f'{c:.4f}' for c in results.idle[mode])}")
        for round_ in range(plan.rounds):
            # Rotate who goes first, so no setup always follows the same neighbour.
            order = setups[round_ % len(setups) :] + setups[: round_ % len(setups)]
            for setup in order:
                await _quiet(setup.target)
                results.steps.append(await _measure(setup, plan, round_))
                if setup.mode == "cluster-1" and plan.control_divisor > 1:
                    await _quiet(setup.target)
                    results.steps.append(await _measure(setup, plan, round_, control=True))
    finally:
        for setup in setups:
            if setup.load is not None:
                setup.load.close()
            setup.target.stop()
    return results


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def summary(results: Results) -> list[dict[str, Any]]:
    """Per setup: medians over the rounds (the machine is shared; one noisy step should not count)."""
    rows = []
    labels = [*results.plan.modes, control_label(results.plan)]
    for mode in labels:
        steps = [s for s in results.steps if s.mode == mode]
        if not steps:
            continue
        per_node = [_median([s.node_ms_per_1k()[i] for s in steps]) for i in range(len(steps[0].node_ports))]
        own = [_median([s.node_ms_per_1k_own()[i] for s in steps]) for i in range(len(steps[0].node_ports))]
        share = [_median([s.node_published[i] / s.step.sent for s in steps if s.step.sent])
                 for i in range(len(steps[0].node_ports))]  # fmt: skip
        rows.append({
            "mode": mode,
            "shards": steps[0].shards,
            "msgs_per_s": _median([s.step.offered_msgs_s for s in steps]),
            "steps": len(steps),
            "all_passed": all(s.step.passed() for s in steps),
            "loss": sum(s.step.loss for s in steps),
            "duplicates": sum(s.step.duplicates for s in steps),
            "deliveries_per_s": _median([s.step.delivered_dps for s in steps]),
            "p99_ms": _median([s.step.p99_ms for s in steps]),
            "chorus_cpu_s_per_1k_deliveries": _median([s.step.server_cpu_per_1k for s in steps]),
            "redis_cpu_ms_per_1k_msgs_per_process": per_node,
            "redis_cpu_ms_per_1k_own_msgs_per_process": own,
            "message_share_per_process": share,
            "redis_cpu_ms_per_1k_msgs_all_processes": _median([sum(s.node_ms_per_1k()) for s in steps]),
            # The control runs on the cluster-1 setup: same processes, same idle reading.
            "idle_redis_cores_per_process": results.idle.get(mode, results.idle.get("cluster-1", [])),
        })  # fmt: skip
    return rows


def _list(values: Sequence[float], digits: int = 1) -> str:
    return " / ".join(_f(v, digits) for v in values)


def markdown(results: Results, *, smoke: bool) -> str:
    plan = results.plan
    rows = summary(results)
    by_mode = {row["mode"]: row for row in rows}
    lines = [
        "# Chorus on Redis Cluster: 1 shard against 3"
        + (" (smoke mode: sizes mean nothing)" if smoke else ""),
        "",
        f"{plan.replicas} Chorus replicas per setup, {plan.rooms:,} rooms of {plan.members} receivers (one "
        f"on each replica) and one publisher per room, {plan.msgs_per_s:,} messages/s "
        f"({plan.msgs_per_s * plan.members:,} deliveries/s) in {plan.step_seconds:g} s open-loop steps, "
        f"{plan.rounds} rounds alternating the setups; medians over the rounds. All setups share one "
        "2-core machine with the load generator, so the rate is fixed well below saturation and the "
        "figures are costs, not ceilings. Redis CPU from `INFO cpu` of each process, messages per "
        "process from its `INFO commandstats` (`PUBLISH`/`SPUBLISH` calls, the append script's).",
        "",
        "| setup | messages/s | deliveries/s | loss / dup | p99 ms | Chorus CPU-s per 1k deliveries "
        "| Redis CPU-ms per 1k messages, each process | all Redis processes | share of messages, "
        "each process | CPU-ms per 1k of its own messages | idle Redis cores, each process |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {_f(row['msgs_per_s'], 0)} | {_f(row['deliveries_per_s'], 0)} "
            f"| {row['loss']} / {row['duplicates']} "
            f"| {_f(row['p99_ms'])} | {_f(row['chorus_cpu_s_per_1k_deliveries'], 4)} "
            f"| {_list(row['redis_cpu_ms_per_1k_msgs_per_process'])} "
            f"| {_f(row['redis_cpu_ms_per_1k_msgs_all_processes'])} "
            f"| {_list(row['message_share_per_process'], 2)} "
            f"| {_list(row['redis_cpu_ms_per_1k_own_msgs_per_process'])} "
            f"| {_list(row['idle_redis_cores_per_process'], 4)} |"
        )
    lines += ["", *_verdict(by_mode, control_label(plan))]
    lines += ["", "## Steps", "",
              "| setup | round | delivered/s | loss | dup | p99 ms | Chorus CPU-s/1k | Chorus cores "
              "| Redis CPU-ms per 1k msgs, each process | messages, each process | generator cores |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in results.steps:
        st = s.step
        lines.append(
            f"| {s.mode} | {s.round + 1} | {_f(st.delivered_dps, 0)} | {st.loss} | {st.duplicates} "
            f"| {_f(st.p99_ms)} | {_f(st.server_cpu_per_1k, 4)} | {_f(st.server_cores, 2)} "
            f"| {_list(s.node_ms_per_1k())} | {' / '.join(map(str, s.node_published))} "
            f"| {_f(st.generator_cores, 2)} |"
        )
    return "\n".join(lines) + "\n"


def _verdict(by_mode: dict[str, dict[str, Any]], control: str) -> list[str]:
    """One paragraph: does per-shard Redis CPU fall with the shard count, and why not exactly."""
    one, three = by_mode.get("cluster-1"), by_mode.get("cluster-3")
    if not one or not three:
        return []
    single = one["redis_cpu_ms_per_1k_msgs_per_process"][0]
    shards = three["redis_cpu_ms_per_1k_msgs_per_process"]
    if not single or math.isnan(single):
        return []
    lines = [
        f"Per-shard Redis CPU per 1,000 messages of the run: {_f(single)} ms on one shard, "
        f"{_list(shards)} ms on each of three: the busiest is {max(shards) / single:.2f}x the single "
        f"shard (an even split would be 0.33x). All shards together: {_f(single)} -> "
        f"{_f(three['redis_cpu_ms_per_1k_msgs_all_processes'])} ms."
    ]
    if control in by_mode:
        own = by_mode[control]["redis_cpu_ms_per_1k_own_msgs_per_process"][0]
        lines.append(
            f"The one shard at a third of the rate (the rate each of three shards sees) spends {_f(own)} ms "
            f"per 1,000 of its messages, against {_list(three['redis_cpu_ms_per_1k_own_msgs_per_process'])}"
            " on the three shards."
        )
    return [" ".join(lines)]


def results_json(results: Results) -> str:
    return json.dumps(
        {
            "plan": asdict(results.plan),
            "started": results.started,
            "summary": summary(results),
            "steps": [step.as_dict() for step in results.steps],
            "idle_redis_cores": results.idle,
        },
        indent=1,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_cluster", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: prove the run works end to end")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results"))
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chorus-bench-cluster-") as workdir:
        results = uvloop.run(run(plan, Path(workdir)))
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / "cluster.md", args.out / "cluster.json"]
    paths[0].write_text(markdown(results, smoke=args.smoke))
    paths[1].write_text(results_json(results))
    log(f"done in {time.monotonic() - started:.0f}s: {', '.join(str(path) for path in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
