"""The broker in process, against the session's real redis-server and in memory: the one door.

Each test says which promise of the broker (`chorus.broker` and its implementations in
`chorus.redis_broker` and `chorus.memory_broker`) broke: ids and order, live delivery through
`subscribe`, a `Gap` after the pub/sub connection was lost, history reads.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import orjson
import pytest

from chorus import backend, keys
from chorus.broker import (
    Broker,
    BrokerUnavailable,
    Change,
    Gap,
    Message,
    Subscription,
)
from chorus.config import Settings
from chorus.devcluster import RedisServer
from chorus.memory_broker import MemoryBroker
from chorus.protocol import TYPE_DELETE, ZERO_ID, StreamId, change_tail, decode_published
from chorus.redis_broker import RedisBroker
from tests.chat import poll

pytestmark = pytest.mark.anyio

TAIL = b'{"ts":1.5,"room":"r","user":"u","text":"hi","replica":"t"}'


@pytest.fixture(params=["redis", "memory"])
async def broker(request: pytest.FixtureRequest, redis: RedisServer) -> AsyncIterator[Broker]:
    """A started broker of each kind; Redis is the session's, flushed."""
    if request.param == "redis":
        made: Broker = RedisBroker(Settings(redis_url=redis.url, history_size=5))
    else:
        made = MemoryBroker(Settings(history_size=5))
    await made.start()
    try:
        yield made
    finally:
        await asyncio.wait_for(made.stop(), 5)  # bounded as the lifespan bounds it


async def next_message(subscription: Subscription) -> bytes:
    event = await subscription.get()
    assert isinstance(event, Message), f"expected a message, got {event!r}"
    return event.payload


async def test_append_publishes_to_subscribers_in_stream_order(broker: Broker) -> None:
    async with broker.subscribe("r") as subscription:
        await subscription.live()
        ids = [await broker.append("r", TAIL, b"s.1") for _ in range(3)]
        published = [decode_published(await next_message(subscription)) for _ in ids]
    assert [p.id for p in published] == [StreamId.parse(i) for i in ids], "pub/sub order is not stream order"
    assert all(p.sender == b"s.1" for p in published)
    assert published[0].frame.startswith('{"type":"message","id":"')
    assert sorted(ids) == ids and len(set(ids)) == 3, "ids do not increase"


async def test_history_reads_recent_and_after_and_report_a_trimmed_anchor(broker: Broker) -> None:
    assert await broker.last_id("r") == ZERO_ID
    ids = [StreamId.parse(await broker.append("r", TAIL, b"s.1")) for _ in range(8)]
    assert await broker.last_id("r") == ids[-1]
    assert [e.id for e in await broker.recent("r", 3)] == ids[-3:]
    after = await broker.read_after("r", ids[-3], 10)
    assert after is not None and [e.id for e in after] == ids[-2:]
    # history_size is 5 (MAXLEN ~ may keep a few more in Redis): the first id is gone.
    assert await broker.read_after("r", StreamId((1, 0)), 10) is None, "a missing anchor is not a gap"


async def react(broker: Broker, target: bytes, user: str) -> Change:
    tail = change_tail(ts=1.5, target=target.decode(), room="r", user=user, emoji="+1", on=True)
    return await broker.react(
        "r", tail, b"s.1", target=target.decode(), user=user, emoji="+1", on=True, limit=20
    )


async def delete(broker: Broker, target: bytes) -> Change:
    tail = change_tail(ts=1.5, target=target.decode(), room="r", user="u")
    return await broker.append_change(
        "r", TYPE_DELETE, tail, b"s.1", target=target.decode(), author="u", moderator=False
    )


async def state_targets(broker: Broker) -> set[str]:
    """The targets the room's change state still holds anything for (Redis: hash and index)."""
    if isinstance(broker, RedisBroker):
        client = broker.commands.client
        fields = [*await client.hkeys(keys.state("r")), *await client.zrange(keys.state_index("r"), 0, -1)]
        return {field.decode().split(":")[1] for field in fields if isinstance(field, bytes)}
    assert isinstance(broker, MemoryBroker)
    held = {target for _, target in broker._deleted} | {target for _, target in broker._reactions}
    return held | {target for _, target in broker._changed.get("r", [])}


async def test_change_state_is_dropped_with_the_targets_the_stream_trims(broker: Broker) -> None:
    old_reacted, old_deleted = [await broker.append("r", TAIL, b"s.1") for _ in range(2)]
    assert (await react(broker, old_reacted, "a")).outcome == "ok"
    assert (await react(broker, old_reacted, "b")).outcome == "ok"
    assert (await delete(broker, old_deleted)).outcome == "ok"
    # history_size 5; Redis's MAXLEN ~ trims whole stream nodes (100 entries), so append on.
    for _ in range(400):
        if await broker.read_after("r", StreamId.parse(old_deleted), 1) is None:
            break
        await broker.append("r", TAIL, b"s.1")
    assert await broker.read_after("r", StreamId.parse(old_reacted), 1) is None, "the stream never trimmed"
    assert await state_targets(broker) == {old_reacted.decode(), old_deleted.decode()}

    live, live_deleted = await broker.append("r", TAIL, b"s.1"), await broker.append("r", TAIL, b"s.1")
    assert (await react(broker, live, "a")).outcome == "ok"  # this change prunes the trimmed ones
    assert (await delete(broker, live_deleted)).outcome == "ok"

    assert await state_targets(broker) == {live.decode(), live_deleted.decode()}
    assert (await react(broker, old_reacted, "c")).outcome == "not_found"
    assert (await react(broker, live, "a")).outcome == "same", "a live reaction was forgotten"
    assert (await delete(broker, live_deleted)).outcome == "not_found", "a live deletion was forgotten"
    latest = [orjson.loads(frame) for frame in await broker.latest("r", 2)]
    assert [(m["id"], m.get("reactions"), m.get("deleted")) for m in latest] == [
        (live.decode(), {"+1": ["a"]}, None),
        (live_deleted.decode(), None, True),
    ]


async def test_probe_and_announce_reach_only_their_channel(broker: Broker) -> None:
    async with broker.subscribe_probe("me:1") as probe, broker.subscribe("r") as room:
        await probe.live()
        await room.live()
        await broker.publish_probe("me:1", b"nonce")
        await broker.announce("r", b"s.1 event")
        assert await next_message(probe) == b"nonce"
        assert await next_message(room) == b"s.1 event"


async def test_a_lost_pubsub_connection_yields_a_gap_then_messages(redis: RedisServer) -> None:
    broker = RedisBroker(Settings(redis_url=redis.url))
    await broker.start()
    try:
        async with broker.subscribe("r") as subscription:
            await subscription.live()
            redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
            assert isinstance(await subscription.get(), Gap), "no Gap after the subscription was remade"
            await subscription.live()
            msg_id = await broker.append("r", TAIL, b"s.1")
            assert decode_published(await next_message(subscription)).id == StreamId.parse(msg_id)
        assert broker.reconnects == 1
    finally:
        await broker.stop()


async def test_the_reader_hands_messages_and_gaps_on_without_broadcasters_listener(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chorus.relay: the pub/sub reader fills the subscriptions' queues itself (no listener-task
    hop per read), in order, Gap included; and the broadcaster internal it relies on is there."""
    broker = RedisBroker(Settings(redis_url=redis.url))

    async def never() -> None:  # broadcaster 0.3.1's listener hop: starved here
        await asyncio.Event().wait()

    monkeypatch.setattr(broker._backend, "next_published", never)
    await broker.start()
    try:
        async with broker.subscribe("r") as subscription:
            await subscription.live()
            ids = [StreamId.parse(await broker.append("r", TAIL, b"s.1")) for _ in range(3)]
            got = [decode_published(await asyncio.wait_for(next_message(subscription), 5)).id for _ in ids]
            assert got == ids
            redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
            gap = await asyncio.wait_for(subscription.get(), 5)
            assert isinstance(gap, Gap), "no Gap after the subscription was remade"
            await subscription.live()
            msg_id = await broker.append("r", TAIL, b"s.1")
            assert decode_published(await next_message(subscription)).id == StreamId.parse(msg_id)
    finally:
        await broker.stop()


async def test_the_command_client_is_public_only_with_redis(redis: RedisServer) -> None:
    assert MemoryBroker(Settings()).commands is None
    broker = RedisBroker(Settings(redis_url=redis.url))
    await broker.start()
    try:
        assert broker.commands is not None
        assert await broker.commands.call(broker.commands.client.ping()) is True
    finally:
        await broker.stop()


def reads_processed(redis: RedisServer) -> int:
    """Reads Redis has done on client sockets (INFO stats): one per batch of commands it received."""
    for line in redis.cli("INFO", "stats").splitlines():
        if line.startswith("total_reads_processed:"):
            return int(line.split(":")[1])
    raise AssertionError("INFO stats has no total_reads_processed")


async def test_appends_of_one_loop_turn_share_a_write_keep_their_order_and_ids(redis: RedisServer) -> None:
    broker = RedisBroker(Settings(redis_url=redis.url, history_size=1000))
    await broker.start()
    try:
        first = await broker.append("r", TAIL, b"s.0")  # the pipelined connection is made
        tails = [b'{"ts":1.5,"room":"r","user":"u","text":"m%d"}' % i for i in range(50)]
        before = reads_processed(redis)
        ids = await asyncio.gather(*(broker.append("r", tail, b"s.%d" % i) for i, tail in enumerate(tails)))
        reads = reads_processed(redis) - before
        assert reads < 10, f"50 appends of one turn took {reads} reads: not pipelined"
        parsed = [StreamId.parse(msg_id) for msg_id in ids]
        assert sorted(parsed) == parsed and len(set(ids)) == 50, (
            "the appends ran out of the order they were made"
        )
        entries = await broker.read_after("r", StreamId.parse(first), 100)
        assert entries is not None
        assert [(e.raw_id, e.tail, e.sender) for e in entries] == [
            (msg_id, tail, b"s.%d" % i) for i, (msg_id, tail) in enumerate(zip(ids, tails, strict=True))
        ], "an append was answered with another one's id"
    finally:
        await broker.stop()


async def test_redis_dying_mid_pipeline_fails_every_call_in_it_then_the_next_reconnects(
    redis: RedisServer,
) -> None:
    broker = RedisBroker(Settings(redis_url=redis.url, broker_timeout_seconds=10))
    await broker.start()
    try:
        await broker.append("r", TAIL, b"s.0")
        assert redis.process is not None
        redis.process.signal(signal.SIGSTOP)  # the appends below are written and not answered
        calls = [asyncio.ensure_future(broker.append("r", TAIL, b"s.%d" % i)) for i in range(20)]
        for _ in range(3):  # the calls start, then their turn's write goes out
            await asyncio.sleep(0)
        redis.kill()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert all(isinstance(result, BrokerUnavailable) for result in results), results
        redis.start()
        assert StreamId.parse(await broker.append("r", TAIL, b"s.1")) > ZERO_ID
    finally:
        await broker.stop()


async def test_a_silent_pubsub_connection_is_given_up_after_the_keepalive(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis stops answering without closing anything (SIGSTOP, like a partition): after the
    # keepalive's silence and its PING's silence the connection is made again, with a Gap.
    monkeypatch.setattr(backend, "KEEPALIVE_SECONDS", 0.2)
    broker = RedisBroker(Settings(redis_url=redis.url))
    await broker.start()
    assert redis.process is not None
    try:
        async with broker.subscribe("r") as subscription:
            await subscription.live()
            redis.process.signal(signal.SIGSTOP)
            try:
                await poll(lambda: broker.reconnects >= 1, 10, "the silent connection to be given up")
            finally:
                redis.process.signal(signal.SIGCONT)
            assert isinstance(await asyncio.wait_for(subscription.get(), 10), Gap)
            await subscription.live()
            msg_id = await broker.append("r", TAIL, b"s.1")
            assert decode_published(await next_message(subscription)).id == StreamId.parse(msg_id)
    finally:
        await broker.stop()
