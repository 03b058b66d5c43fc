"""A join's Redis work in one round trip (chorus.joins), in process over a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chorus import joins
from chorus.config import Settings
from chorus.devcluster import RedisServer
from chorus.presence import Member, RedisPresence
from chorus.protocol import ZERO_ID, StreamId, message_tail
from chorus.redis_broker import RedisBroker

pytestmark = pytest.mark.anyio


@pytest.fixture
async def parts(redis: RedisServer) -> AsyncIterator[tuple[RedisBroker, RedisPresence]]:
    settings = Settings(redis_url=redis.url)
    broker = RedisBroker(settings)
    await broker.start()
    assert broker.commands is not None
    presence = RedisPresence(settings, broker.commands, owner="t0")
    try:
        yield broker, presence
    finally:
        await asyncio.wait_for(broker.stop(), 5)


async def post(broker: RedisBroker, room: str, n: int) -> list[str]:
    tails = (message_tail(room=room, user="x", text=f"m{i}", ts=0.0, replica="t") for i in range(n))
    return [(await broker.append(room, tail, b"t0.x")).decode() for tail in tails]


async def test_a_join_gets_presence_history_and_its_room_record(
    parts: tuple[RedisBroker, RedisPresence], redis: RedisServer
) -> None:
    broker, presence = parts
    ids = await post(broker, "lobby", 5)
    online, backlog = await joins.enter(
        broker, presence, Member("lobby", "Ann", "t0.1"), last_id=StreamId.parse(ids[-1]),
        since=None, resume=False, history=3, replay_limit=100,
    )  # fmt: skip
    assert online == 1
    assert backlog is not None and backlog.recent is not None
    assert [entry.raw_id.decode() for entry in backlog.recent][-3:] == ids[-3:]
    assert await presence.users("lobby") == ["Ann"]
    assert await broker.read_markers("ann") == {"lobby": ids[-1]}

    # A resume reads what came after `since`; Redis forgetting its scripts costs one reload.
    redis.cli("SCRIPT", "FLUSH")
    online, backlog = await joins.enter(
        broker, presence, Member("lobby", "bob", "t0.2"), last_id=ZERO_ID,
        since=StreamId.parse(ids[1]), resume=True, history=0, replay_limit=100,
    )  # fmt: skip
    assert online == 2
    assert backlog is not None and backlog.after is not None
    assert [entry.raw_id.decode() for entry in backlog.after] == ids[2:]


async def test_a_resume_past_history_is_read_again_by_the_hub(
    parts: tuple[RedisBroker, RedisPresence],
) -> None:
    broker, presence = parts
    await post(broker, "lobby", 2)
    _, backlog = await joins.enter(
        broker, presence, Member("lobby", "ann", "t0.1"), last_id=ZERO_ID,
        since=StreamId.parse("1-0"), resume=True, history=0, replay_limit=100,
    )  # fmt: skip
    assert backlog is not None and backlog.after is None, "not held: the hub sends resync"
