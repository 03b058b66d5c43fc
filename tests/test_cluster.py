"""Redis Cluster: sharded pub/sub per room, slot migration and shard failover under traffic."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest
import redis as redis_sync
from redis.crc import key_slot

from chorus.devcluster import HarnessError, LocalCluster, RedisCluster, RedisServer, wait_until
from tests.chat import Chat, poll, texts

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def client(node: RedisServer) -> redis_sync.Redis:
    return redis_sync.Redis(port=node.port, protocol=2, socket_timeout=2)


def owner(cluster: RedisCluster, slot: int) -> RedisServer:
    """The master serving `slot`, as the cluster itself says."""
    with client(cluster.alive()[0]) as conn:
        for start, end, master, *_ in conn.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(node for node in cluster.nodes if node.port == int(master[1]))
    raise HarnessError(f"slot {slot} is not served")


def shard_channels(node: RedisServer) -> set[str]:
    with client(node) as conn:
        return {c.decode() for c in conn.execute_command("PUBSUB", "SHARDCHANNELS")}


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    # Three masters with a replica each, node timeout 1 s: enough for the failover test.
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3, replicas_per_master=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def chorus(
    redis_cluster: RedisCluster, tmp_path_factory: pytest.TempPathFactory, unthrottled: dict[str, str]
) -> Iterator[LocalCluster]:
    env = {"CHORUS_REDIS_URL": redis_cluster.url, **unthrottled}
    cluster = LocalCluster(
        2, redis=redis_cluster.nodes[0], env=env, workdir=tmp_path_factory.mktemp("chorus")
    )
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def channel(room: str) -> str:
    return f"chorus:msg:{{{room}}}"


async def join_all(base: str, rooms: list[str], prefix: str) -> list[Chat]:
    """Join every room, 50 handshakes at a time: 200 at once on this 2-core machine, next to
    six Redis nodes, can outlast the 5 s a join waits for its room's subscription (1011)."""
    chats: list[Chat] = []
    for start in range(0, len(rooms), 50):
        batch = rooms[start : start + 50]
        joined = await asyncio.gather(
            *(Chat.join(base, room, username=f"{prefix}{room}", history=0) for room in batch),
            return_exceptions=True,
        )
        chats += [chat for chat in joined if isinstance(chat, Chat)]
        failed = [error for error in joined if isinstance(error, BaseException)]
        if failed:
            await asyncio.gather(*(chat.close() for chat in chats))
            raise failed[0]
    return chats


async def test_200_rooms_on_every_shard_once_in_order_and_unsubscribed_after(
    redis_cluster: RedisCluster, chorus: LocalCluster
) -> None:
    rooms = [f"r{i}" for i in range(200)]
    owners = {room: owner(redis_cluster, key_slot(channel(room).encode())).port for room in rooms}
    assert len(set(owners.values())) == 3, "the rooms span every shard"
    left = await join_all(chorus.replica_ws_url(0), rooms, "a")
    right: list[Chat] = []
    try:
        right = await join_all(chorus.replica_ws_url(1), rooms, "b")
        for i in range(3):
            for a, b in zip(left, right, strict=True):
                await a.send(f"a{i}")
                await b.send(f"b{i}")
        for chat in left + right:
            # A burst of 400 sends in a healthy cluster must queue for Redis, never be refused.
            replies = [
                await chat.wait_for(lambda f: f["type"] in ("ack", "error"), timeout=20) for _ in range(3)
            ]
            assert [reply["type"] for reply in replies] == ["ack"] * 3, (chat.welcome, replies)
        for chats, other in ((left, "b"), (right, "a")):
            for chat in chats:
                got = await chat.collect(3, timeout=20)
                assert texts(got) == [f"{other}{i}" for i in range(3)], chat.welcome
        # Each shard carries exactly its own rooms, subscribed once per Chorus replica.
        for master in redis_cluster.masters():
            subscribed = {c for c in shard_channels(master) if c.startswith("chorus:msg:")}
            assert subscribed == {channel(room) for room in rooms if owners[room] == master.port}
            with client(master) as conn:
                counts = conn.execute_command("PUBSUB", "SHARDNUMSUB", *sorted(subscribed)[:5])
            assert all(int(count) == 2 for count in counts[1::2])
    finally:
        # Closed even when an assertion fails: 400 open sockets would fail later tests too.
        await asyncio.gather(*(chat.close() for chat in left + right))

    def rooms_left() -> set[str]:
        return {
            c for node in redis_cluster.masters() for c in shard_channels(node)
            if c.startswith("chorus:msg:")
        }  # fmt: skip

    await poll(lambda: not rooms_left(), 10, "every room to be unsubscribed after its last member left")


async def traffic(sender: Chat, prefix: str, count: int, outcomes: dict[str, str]) -> None:
    """Send `count` messages one after another; record each one's ack id or error code."""
    for i in range(count):
        cid = f"{prefix}{i}"
        await sender.send(cid, client_id=cid)
        frame = await sender.wait_for(
            lambda f: f.get("client_id") == cid and f.get("type") in ("ack", "error"),  # noqa: B023 - awaited here
            timeout=10,
        )
        outcomes[cid] = frame["id"] if frame["type"] == "ack" else "error:" + frame["code"]
        await asyncio.sleep(0.02)


def check_delivery(receiver: Chat, outcomes: dict[str, str]) -> None:
    """Once each and in order; an acked message missing is only allowed after a resync."""
    got = texts(receiver.of("message"))
    assert len(got) == len(set(got)), "no duplicates"
    acked = [cid for cid, outcome in outcomes.items() if not outcome.startswith("error:")]
    assert got == [cid for cid in acked if cid in got], "in order, and nothing that was refused"
    if set(acked) - set(got):
        assert receiver.of("resync"), "a lost message must lead to resync, not a silent gap"


async def test_slot_migration_and_shard_failover_under_traffic(
    redis_cluster: RedisCluster, chorus: LocalCluster
) -> None:
    sender = await Chat.join(chorus.replica_ws_url(0), "mv", username="s", history=0)
    receiver = await Chat.join(chorus.replica_ws_url(1), "mv", username="r", history=0)
    slot = key_slot(channel("mv").encode())
    outcomes: dict[str, str] = {}

    # 1. Move the room's slot to another shard while messages flow.
    source = owner(redis_cluster, slot)
    target = next(node for node in redis_cluster.masters() if node.port != source.port)
    source_id, target_id = redis_cluster.myid(source), redis_cluster.myid(target)
    flow = asyncio.create_task(traffic(sender, "m", 60, outcomes))
    await poll(lambda: len(outcomes) >= 15, 10, "traffic before the migration")
    target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
    source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
    for key in source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split():
        source.cli("MIGRATE", "127.0.0.1", str(target.port), key, "0", "5000")
    for node in (target, source, *redis_cluster.masters()):
        node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
    await flow
    await poll(lambda: target.port == owner(redis_cluster, slot).port, 10, "the slot to move")
    await receiver.collect(len(outcomes), timeout=20)
    check_delivery(receiver, outcomes)
    assert not receiver.of("resync"), "nothing was lost: the migration is back-filled"
    assert channel("mv") in shard_channels(target)
    assert channel("mv") not in shard_channels(source)

    # 2. A planned failover (CLUSTER FAILOVER on the shard's replica), then a SIGKILLed master.
    flow = asyncio.create_task(traffic(sender, "f", 150, outcomes))
    replica = next(
        node for node in redis_cluster.alive()
        if f"master_port:{target.port}" in node.cli("INFO", "replication")
    )  # fmt: skip
    replica.cli("CLUSTER", "FAILOVER")
    await poll(lambda: owner(redis_cluster, slot).port == replica.port, 15, "the replica to take over")
    await asyncio.sleep(0.5)  # traffic on the new master before it dies too
    assert replica.process is not None
    replica.process.signal(signal.SIGKILL)
    await poll(
        lambda: owner(redis_cluster, slot).port == target.port, 20, "the old master to be promoted back"
    )
    await flow
    tail = {cid: outcome for cid, outcome in outcomes.items() if cid.startswith("f")}
    refused = sorted(cid for cid, outcome in tail.items() if outcome.startswith("error:"))
    print(f"during the failovers {len(refused)} of {len(tail)} sends were refused with unavailable")
    assert {outcome for outcome in tail.values() if outcome.startswith("error:")} <= {"error:unavailable"}
    await traffic(sender, "z", 5, outcomes)
    await receiver.wait_for(lambda f: f.get("text") == "z4", timeout=20)
    check_delivery(receiver, outcomes)
    assert all(process.alive() for process in chorus.replicas), "no process exits"
    for chat in (sender, receiver):
        await chat.close()
    # Leave the Redis cluster whole for whoever comes next in this module.
    replica.process.stop()  # reaped already; closes its log
    replica.start()
    wait_until(redis_cluster.healthy, 30, "the Redis Cluster to heal")
