"""Replica CPU of one connection-lease renewal, as `RedisUserLimiter` does it every lease / 3.

    python -m loadtest.bench_leases [--users 2000]

`make bench` runs with the per-user cap off, so it never renews a lease; a default deployment
does, every 10 s, for every user with a socket on the replica. This starts a Redis, acquires
one lease per user, then times (process CPU and wall, median of 3) `renew()` against the
pipeline Chorus used before it (a ZADD and a PEXPIRE per user, copied here as the `before`
case). Wrap it in `flock /tmp/chorus-bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import uvloop

from chorus import keys
from chorus.broker import create_broker
from chorus.config import Settings
from chorus.devcluster import RedisServer
from chorus.limits import RedisUserLimiter

LEASE_SECONDS = 30.0


async def measure(redis_url: str, users: int) -> dict[str, tuple[float, float]]:
    settings = Settings(
        redis_url=redis_url, connection_lease_seconds=LEASE_SECONDS, max_connections_per_user=20
    )
    broker = create_broker(settings)
    await broker.start()
    commands = broker.commands
    assert commands is not None
    limiter = RedisUserLimiter(settings, commands)
    try:
        for index in range(users):
            await limiter.acquire(f"user{index}", f"bench.{index}")
        held = {f"user{index}": [f"bench.{index}"] for index in range(users)}

        async def pipelined() -> None:
            expiry = time.time() + LEASE_SECONDS
            async with commands.client.pipeline(transaction=False) as pipe:
                for user, tags in held.items():
                    pipe.zadd(keys.connections(user), dict.fromkeys(tags, expiry))
                    pipe.pexpire(keys.connections(user), int(LEASE_SECONDS * 1000))
                await commands.call(pipe.execute())

        cases: dict[str, Callable[[], Awaitable[None]]] = {
            "before: ZADD + PEXPIRE per user, pipelined": pipelined,
            "after: RENEW script per 500 users": limiter.renew,
        }
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(3):
            for name, renew in cases.items():
                cpu, wall = time.process_time(), time.perf_counter()
                await renew()
                samples[name].append((time.process_time() - cpu, time.perf_counter() - wall))
        return {
            name: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
            for name, runs in samples.items()
        }
    finally:
        await broker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_leases", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--users", type=int, default=2000)
    args = parser.parse_args(argv)
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="chorus-leases-")))
    redis.start()
    try:
        results = uvloop.run(measure(redis.url, args.users))
    finally:
        redis.stop()
    print(f"| renewal of {args.users:,} users | replica CPU ms | wall ms |\n| --- | --- | --- |")
    for name, (cpu, wall) in results.items():
        print(f"| {name} | {cpu * 1000:.1f} | {wall * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
