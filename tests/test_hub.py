"""The hub in process, over a real broker: one subscription per room, fan-out, replay, back-fill."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from chorus.config import Settings
from chorus.connection import Connection
from chorus.devcluster import RedisServer
from chorus.hub import Hub
from chorus.protocol import message_tail
from chorus.redis_broker import RedisBroker
from tests.chat import poll

pytestmark = pytest.mark.anyio


class Member:
    """A Connection whose socket is a list of the frames it was sent."""

    def __init__(self, room: str, user: str, tag: bytes) -> None:
        self.frames: list[dict[str, object]] = []
        self.closed: list[int] = []

        async def send(frame: str) -> None:
            self.frames.append(orjson.loads(frame))

        async def close(code: int, reason: str) -> None:
            self.closed.append(code)

        self.conn = Connection(room=room, user=user, tag=tag, limit=64, send=send, close=close)

    def texts(self) -> list[object]:
        return [f.get("text") for f in self.frames if f.get("type") == "message"]


@pytest.fixture
async def hub(redis: RedisServer) -> AsyncIterator[Hub]:
    broker = RedisBroker(Settings(redis_url=redis.url))
    await broker.start()
    made = Hub(broker, join_timeout=5.0, replay_limit=100)
    try:
        yield made
    finally:
        # Bounded as the lifespan bounds them: a stop that hangs fails here, not the whole run.
        await asyncio.wait_for(made.close(), 5)
        await asyncio.wait_for(broker.stop(), 5)


async def post(hub: Hub, room: str, text: str, sender: bytes) -> None:
    tail = message_tail(room=room, user="x", text=text, ts=0.0, replica="t")
    await hub.broker.append(room, tail, sender)


async def join(hub: Hub, member: Member, history: int = 20) -> None:
    await hub.join(member.conn)
    await hub.replay(member.conn, since=None, resume=False, history=history)


async def test_one_subscription_per_room_and_no_echo_to_the_sender(hub: Hub) -> None:
    a, b = Member("r", "a", b"p.1"), Member("r", "b", b"p.2")
    await join(hub, a)
    await join(hub, b)
    assert list(hub.rooms) == ["r"] and len(hub.rooms["r"].members) == 2
    await post(hub, "r", "hello", sender=b"p.1")
    await poll(lambda: b.texts() == ["hello"], 5, "b to receive the message")
    await asyncio.sleep(0.1)
    assert a.texts() == [], "the sender got its own message back (it gets an ack instead)"


async def test_join_replays_history_then_goes_live_without_gap_or_duplicate(hub: Hub) -> None:
    for i in range(3):
        await post(hub, "r", f"old{i}", sender=b"q.1")
    late = Member("r", "late", b"p.3")
    await join(hub, late, history=2)
    await post(hub, "r", "new", sender=b"q.1")
    await poll(lambda: late.texts() == ["old1", "old2", "new"], 5, "replay then the live message")


async def test_a_pubsub_gap_is_back_filled_from_the_stream(hub: Hub, redis: RedisServer) -> None:
    member = Member("r", "m", b"p.4")
    await join(hub, member)
    redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
    await post(hub, "r", "during", sender=b"q.1")  # may be published while nobody listens
    await poll(lambda: member.texts() == ["during"], 10, "the message to arrive once, live or back-filled")
    await post(hub, "r", "after", sender=b"q.1")
    await poll(lambda: member.texts() == ["during", "after"], 10, "live delivery after the gap")


async def test_the_last_member_leaving_ends_the_room(hub: Hub) -> None:
    member = Member("r", "m", b"p.5")
    await join(hub, member)
    task = hub.rooms["r"].task
    hub.leave(member.conn)
    assert "r" not in hub.rooms
    assert task is not None
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
