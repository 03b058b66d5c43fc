"""Redis Sentinel: the master is SIGKILLed while two replicas chat; Chorus follows the promotion."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from chorus.devcluster import (
    LocalCluster,
    Process,
    RedisServer,
    find_binary,
    free_port,
    http_status,
    wait_until,
)
from tests.chat import Chat, poll, texts

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MASTER = "chorus"


class SentinelSetup:
    """One master, one replica, three sentinels with short timeouts, all on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.master = RedisServer(workdir)
        self.replica = RedisServer(workdir, extra_args=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[Process] = []
        self.workdir = workdir

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        wait_until(
            lambda: "master_link_status:up" in self.replica.cli("INFO", "replication"), 10, "replication"
        )
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 3000\n"
            )
            argv = [find_binary("redis-server"), str(conf), "--sentinel"]
            process = Process(f"sentinel-{port}", argv, self.workdir / f"sentinel-{port}.log")
            process.start()
            self.sentinels.append(process)
        # A failover needs a quorum that knows the replica and each other (hello messages).
        wait_until(self._sentinels_agree, 20, "three sentinels that know the replica and each other")

    def _sentinel(self, port: int) -> redis_sync.Redis:
        return redis_sync.Redis(port=port, socket_timeout=1, protocol=2)

    def _sentinels_agree(self) -> bool:
        try:
            for port in self.sentinel_ports:
                with self._sentinel(port) as client:
                    state = client.sentinel_master(MASTER)
                    if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                        return False
        except redis_sync.RedisError:
            return False
        return True

    def master_port(self) -> int | None:
        for port in self.sentinel_ports:
            try:
                with self._sentinel(port) as client:
                    address = client.sentinel_get_master_addr_by_name(MASTER)
                    return int(address[1]) if address else None
            except redis_sync.RedisError:
                continue
        return None

    def stop(self) -> None:
        for process in self.sentinels:
            process.stop()
        for server in (self.replica, self.master):
            if server.process is not None:
                server.process.signal(signal.SIGCONT)
                server.process.stop()


@pytest.fixture
def sentinel_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def ready_states(cluster: LocalCluster) -> list[int | None]:
    return [http_status(cluster.replica_url(i) + "/readyz") for i in range(len(cluster.replicas))]


async def test_master_sigkill_failover(
    sentinel_setup: SentinelSetup, tmp_path_factory: pytest.TempPathFactory, unthrottled: dict[str, str]
) -> None:
    setup = sentinel_setup
    env = {"CHORUS_REDIS_URL": setup.url, **unthrottled}
    cluster = LocalCluster(2, redis=setup.master, env=env, workdir=tmp_path_factory.mktemp("chorus"))
    try:
        cluster.start()
        a = await Chat.join(cluster.replica_ws_url(0), "fo", username="a")
        b = await Chat.join(cluster.replica_ws_url(1), "fo", username="b")
        await a.send("m0")
        await b.wait_for(lambda f: f.get("text") == "m0")

        # Make asynchronous replication lose the last messages for certain: the replica is
        # stopped and 32 MB of other writes queue ahead of them in the replication stream.
        assert setup.replica.process is not None
        setup.replica.process.signal(signal.SIGSTOP)
        with redis_sync.Redis(port=setup.master.port, protocol=2) as client:
            client.set("ballast", b"x" * 32_000_000)
        for i in range(1, 6):
            await a.send(f"m{i}")
        acks = await a.collect(6, kind="ack")
        await b.collect(6)
        setup.master.kill()
        setup.replica.process.signal(signal.SIGCONT)

        # No master: both replicas say so, and a sender hears `unavailable`, never silence.
        await poll(lambda: ready_states(cluster) == [503, 503], 5, "/readyz 503 on both replicas")
        await a.send("while-no-master", client_id="nm-1")
        err = await a.wait_for(lambda f: f.get("type") == "error", timeout=5)
        assert (err["code"], err["client_id"]) == ("unavailable", "nm-1")

        await poll(lambda: setup.master_port() == setup.replica.port, 30, "the sentinels to promote")
        promoted = time.monotonic()
        await poll(lambda: ready_states(cluster) == [200, 200], 30, "both replicas ready again")
        ready_after = time.monotonic() - promoted
        assert ready_after < 30
        print(f"ready {ready_after:.2f}s after the promotion")

        # What async replication lost is not on the new master, and each member hears `resync`.
        with redis_sync.Redis(port=setup.replica.port, protocol=2) as client:
            kept = {raw_id.decode() for raw_id, _ in client.xrange("chorus:stream:{fo}")}
        lost = [ack["id"] for ack in acks if ack["id"] not in kept]
        assert lost, "the replication loss was staged"
        for chat in (a, b):
            await chat.wait_for(lambda f: f.get("type") == "resync", timeout=10)

        await a.send("after")
        await b.wait_for(lambda f: f.get("text") == "after")
        await b.send("and back")
        await a.wait_for(lambda f: f.get("text") == "and back")
        assert texts(b.of("message")) == [f"m{i}" for i in range(6)] + ["after"]
        assert all(replica.alive() for replica in cluster.replicas), "no process exits"
        for chat in (a, b):
            await chat.close()
    finally:
        cluster.stop()
