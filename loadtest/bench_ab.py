"""A/B two copies of the Chorus service in one run: is a change faster, slower, or noise?

    python -m loadtest.bench_ab --ref /path/to/other/checkout/service [--rounds 3]
    python -m loadtest.bench_ab --socketio [--rounds 3]

`A` is the installed Chorus, `B` the service tree given as `--ref` (put first on the replicas'
PYTHONPATH, so the same venv runs the other code). Each has its own Redis and two replicas;
at every offered rate the two are measured one after the other, and the whole ladder is
repeated `--rounds` times, so a noisy machine treats both alike. Two loads: one room of 100
(CPU per 1,000 deliveries, what a big room pays, and p50/p99) and 100 rooms of 4 (CPU-ms per
message, what direct messages and small groups pay, and p99). Prints a table of medians and
the ratio B/A. With `--socketio`, B is the Node.js Socket.IO baseline instead (issue 15's
targets are ratios against it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import uvloop

from .bench import _quiet, _with_load, log
from .bench_load import Load, StepResult
from .bench_procs import Target, ensure_socketio_modules

BIG_ROOM_DPS = (5_000, 20_000, 80_000)  # deliveries/s into one room of 100
SMALL_ROOMS_MSGS = (500, 1_000, 2_000)  # messages/s over 100 rooms of 4


async def _ladder(
    loads: dict[str, Load], rates: Sequence[float], seconds: float
) -> dict[str, list[StepResult]]:
    steps: dict[str, list[StepResult]] = {name: [] for name in loads}
    for rate in rates:
        for name, load in loads.items():
            await _quiet(load.target)
            steps[name].append(await load.step(rate, seconds))
    return steps


def _row(label: str, a: list[float], b: list[float], unit: str) -> str:
    ma, mb = statistics.median(a), statistics.median(b)
    return f"| {label} | {ma:.4f} | {mb:.4f} | {mb / ma:.2f}x | {unit} |"


async def run(
    ref: Path | None,
    rounds: int,
    seconds: float,
    big_dps: Sequence[int] = BIG_ROOM_DPS,
    small_msgs: Sequence[int] = SMALL_ROOMS_MSGS,
    a_env: dict[str, str] | None = None,
    b_env: dict[str, str] | None = None,
) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="chorus-ab-"))
    targets = {
        "A": Target("chorus", 2, workdir / "a", env=a_env),
        "B": Target("chorus", 2, workdir / "b", env={"PYTHONPATH": str(ref), **(b_env or {})})
        if ref is not None
        else Target("socketio", 2, workdir / "b"),
    }
    for target in targets.values():
        target.start()
    rows = ["| load | A | B | B/A | unit |", "| --- | --- | --- | --- | --- |"]
    try:
        big = {n: await _with_load(t, "main", 1, 100, 10) for n, t in targets.items()}
        small = {
            n: await _with_load(t, "small", 100, 400, 1, publisher_is_member=True) for n, t in targets.items()
        } if small_msgs else {}  # fmt: skip
        big_steps: dict[str, list[list[StepResult]]] = {"A": [], "B": []}
        small_steps: dict[str, list[list[StepResult]]] = {"A": [], "B": []}
        for round_ in range(rounds):
            log(f"A/B round {round_ + 1} of {rounds}")
            for name, steps in (await _ladder(big, [d / 100 for d in big_dps], seconds)).items():
                big_steps[name].append(steps)
            for name, steps in (await _ladder(small, small_msgs, seconds) if small else {}).items():
                small_steps[name].append(steps)
        for index, dps in enumerate(big_dps):
            a = [r[index] for r in big_steps["A"]]
            b = [r[index] for r in big_steps["B"]]
            rows.append(_row(f"1 room of 100, {dps:,}/s", [s.server_cpu_per_1k for s in a],
                             [s.server_cpu_per_1k for s in b], "CPU-s per 1,000 deliveries"))  # fmt: skip
            rows.append(
                _row(f"1 room of 100, {dps:,}/s", [s.p50_ms for s in a], [s.p50_ms for s in b], "p50 ms")
            )
            rows.append(
                _row(f"1 room of 100, {dps:,}/s", [s.p99_ms for s in a], [s.p99_ms for s in b], "p99 ms")
            )
        for index, msgs in enumerate(small_msgs):
            a = [r[index] for r in small_steps["A"]]
            b = [r[index] for r in small_steps["B"]]
            rows.append(_row(f"100 rooms of 4, {msgs:,} msg/s", [s.server_cpu_ms_per_msg for s in a],
                             [s.server_cpu_ms_per_msg for s in b], "CPU-ms per message"))  # fmt: skip
            rows.append(_row(f"100 rooms of 4, {msgs:,} msg/s", [s.p99_ms for s in a], [s.p99_ms for s in b],
                             "p99 ms"))  # fmt: skip
        lost = sum(
            s.loss + s.duplicates for r in (*big_steps.values(), *small_steps.values()) for x in r for s in x
        )
        rows.append(f"\nlost or doubled deliveries in all steps: {lost}")
        for load in [*big.values(), *small.values()]:
            load.close()
    finally:
        for target in targets.values():
            target.stop()
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_ab", description=(__doc__ or "").split("\n")[0]
    )
    against = parser.add_mutually_exclusive_group(required=True)
    against.add_argument("--ref", type=Path, help="the other checkout's service/ folder")
    against.add_argument("--socketio", action="store_true", help="B is the Socket.IO baseline")
    parser.add_argument(
        "--a-env", action="append", default=[], metavar="NAME=VALUE",
        help="a setting for A's replicas only, e.g. CHORUS_COALESCE_SECONDS=0.002 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--b-env", action="append", default=[], metavar="NAME=VALUE",
        help="a setting for B's replicas only (with --ref; repeatable)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=3.0)
    parser.add_argument(
        "--big-rates", type=lambda v: [int(x) for x in v.split(",") if x], default=list(BIG_ROOM_DPS),
        help="deliveries/s into the room of 100, comma-separated (default %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--small-rates", type=lambda v: [int(x) for x in v.split(",") if x], default=list(SMALL_ROOMS_MSGS),
        help="messages/s over the 100 rooms of 4, comma-separated (default %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.ref is not None and not (args.ref / "chorus" / "__init__.py").exists():
        parser.error(f"{args.ref} holds no chorus package (give the checkout's service/ folder)")
    if args.socketio:
        ensure_socketio_modules()
    ref = args.ref.resolve() if args.ref is not None else None
    a_env = dict(item.split("=", 1) for item in args.a_env)
    b_env = dict(item.split("=", 1) for item in args.b_env)
    rates = (args.big_rates, args.small_rates)
    print(uvloop.run(run(ref, args.rounds, args.step_seconds, *rates, a_env, b_env)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
