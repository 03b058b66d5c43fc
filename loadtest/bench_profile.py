"""Flame graphs of one replica under a fixed load, for Chorus and the baseline.

    python -m loadtest.bench_profile [--out docs/perf] [--seconds 8]

Two loads: `fanout` (one room of 100 receivers, 20,000 deliveries/s: the per-delivery path)
and `publish` (100 rooms of 2 receivers, 300 messages/s: the per-message path). py-spy
(`pip install py-spy`) samples the replica's process from outside, so the replica runs the
same code as in the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import uvloop

from .bench_load import Load
from .bench_procs import Target, ensure_baseline_venv

IMPLS = ("chorus", "baseline")  # py-spy reads Python stacks: the Socket.IO baseline is not profiled here

LOADS = {
    # name: (rooms, receivers per room, messages/s)
    "fanout": (1, 100, 200.0),
    "publish": (100, 2, 300.0),
}


async def profile(impl: str, load_name: str, seconds: float, out: Path, py_spy: str) -> Path:
    rooms, members, msgs = LOADS[load_name]
    svg = out / f"{impl}-{load_name}.svg"
    with tempfile.TemporaryDirectory(prefix="chorus-profile-") as workdir:
        target = Target(impl, 1, Path(workdir)).start()
        try:
            load = Load(target, scenario=load_name, rooms=rooms, receivers=rooms * members,
                        publishers_per_room=max(1, 10 // rooms))  # fmt: skip
            await load.connect()
            await load.step(20, 0.5)
            spy = await asyncio.create_subprocess_exec(
                py_spy, "record", "--pid", str(target.replicas[0].pid), "--output", str(svg),
                "--duration", str(round(seconds)), "--rate", "200", "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                step = await load.step(msgs, seconds)
            finally:
                async with asyncio.timeout(seconds + 30):
                    _, err = await spy.communicate()
            load.close()
        finally:
            target.stop()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    print(
        f"{impl:8} {load_name:7} {step.delivered_dps:8.0f} deliveries/s, {step.server_cpu_per_1k:.4f} "
        f"CPU-s/1k, p99 {step.p99_ms:.1f} ms -> {svg}"
    )
    return svg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_profile", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("docs/perf"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--impl", choices=IMPLS, action="append", help="default: both")
    parser.add_argument("--load", choices=sorted(LOADS), action="append", help="default: all")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    impls = args.impl or list(IMPLS)
    if "baseline" in impls:
        ensure_baseline_venv()
    args.out.mkdir(parents=True, exist_ok=True)
    for impl in impls:
        for load_name in args.load or sorted(LOADS):
            uvloop.run(profile(impl, load_name, args.seconds, args.out, py_spy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
