"""Fixtures: a real redis-server per session, local clusters behind a real HAProxy."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chorus.devcluster import LocalCluster, Process, RedisServer, free_port, http_status, wait_until


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; fault tests may stop and restart it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, running and empty."""
    if not redis_server.ping():
        redis_server.start()
    redis_server.cli("FLUSHALL")
    return redis_server


@pytest.fixture(scope="session")
def unthrottled() -> dict[str, str]:
    """The environment that lifts the per-socket rate limit for replicas under test.

    Tests send in bursts far above a person's typing speed; the rate limit has its own tests
    (which set CHORUS_RATE_* themselves, over this).
    """
    return {"CHORUS_RATE_LIMIT": "5000", "CHORUS_RATE_BURST": "5000"}


@pytest.fixture
def make_cluster(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory, unthrottled: dict[str, str]
) -> Iterator[Callable[..., LocalCluster]]:
    """Start local clusters (replicas + HAProxy) on the session Redis; all stopped afterwards."""
    started: list[LocalCluster] = []

    def make(replicas: int = 3, **kwargs: object) -> LocalCluster:
        extra = kwargs.pop("env", {})
        assert isinstance(extra, dict)
        kwargs["env"] = {**unthrottled, **extra}
        cluster = LocalCluster(
            replicas,
            redis=redis,
            workdir=tmp_path_factory.mktemp("cluster"),
            **kwargs,  # type: ignore[arg-type]
        )
        started.append(cluster)
        return cluster.start()

    yield make
    for cluster in started:
        cluster.stop()


@dataclass
class MemoryReplica:
    url: str
    process: Process


@pytest.fixture
def memory_replica(tmp_path: Path) -> Iterator[MemoryReplica]:
    """One replica on the in-process memory broker (no CHORUS_REDIS_URL): the `make run` mode."""
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CHORUS_REPLICA_NAME": "solo",
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "chorus", "serve", "--host", "127.0.0.1", "--port", str(port)]
    replica = Process("solo", argv, tmp_path / "solo.log", env)
    replica.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(url + "/readyz") == 200, 30, "the memory-broker replica")
        yield MemoryReplica(url, replica)
    finally:
        replica.stop()


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    """Three replicas behind a round-robin proxy."""
    return make_cluster(3)


def pytest_configure(config: pytest.Config) -> None:
    Path("artifacts").mkdir(exist_ok=True)
