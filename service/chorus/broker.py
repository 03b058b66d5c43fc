"""The broker: the one way into the message layer (pub/sub and the per-room message stream).

This module holds the interface and its types; the two implementations live beside it.
Messages come from `Broker.subscribe(room)`: an async context manager yielding `Message`
(a payload as published, bytes) or `Gap` (the subscription was lost and made again: back-fill
from the stream). They are sent with `append` (stored and published in one step) and read back
with `read_after`/`recent` as `Entry`s. Nothing outside the broker modules (this one,
chorus.redis_broker and chorus.memory_broker) sees broadcaster or a pub/sub backend.

`create_broker` builds the process's one broker, once in `create_app`: `RedisBroker`
(chorus.redis_broker) when `CHORUS_REDIS_URL` is set, else `MemoryBroker`
(chorus.memory_broker) for a single replica.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import orjson
from broadcaster import Broadcast
from broadcaster._base import Subscriber

from . import keys
from .config import Settings
from .history import fold
from .protocol import TYPE_MESSAGE, StreamId, stream_frame

if TYPE_CHECKING:
    from .redis_broker import RedisCommands


@dataclass(frozen=True, slots=True)
class Change:
    """What an edit, delete or reaction came to: `ok` with the new entry's id, or why not."""

    outcome: str  # "ok", ERROR_NOT_FOUND, ERROR_FORBIDDEN, "same" (no change), "full" (emoji cap)
    id: bytes = b""


@dataclass(frozen=True, slots=True)
class Load:
    """One process's share of the fleet, as it reported it (chorus.rebalance)."""

    process: str
    sockets: int
    ready: bool
    ready_for: float  # seconds it has been ready (0 when it is not)
    at: float  # time.time() of the report

    def encode(self) -> bytes:
        return orjson.dumps([self.sockets, self.ready, self.ready_for, self.at])

    @classmethod
    def decode(cls, process: str, raw: bytes) -> Load:
        sockets, ready, ready_for, at = orjson.loads(raw)
        return cls(process, int(sockets), bool(ready), float(ready_for), float(at))


class BrokerUnavailable(Exception):
    """Redis could not take the message in time; the sender gets an `unavailable` error frame."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: a message, or a change to one (edit, delete, reaction)."""

    id: StreamId
    raw_id: bytes
    tail: bytes
    sender: bytes
    kind: str = TYPE_MESSAGE

    @property
    def frame(self) -> bytes:
        return stream_frame(self.kind, self.raw_id, self.tail)


@dataclass(frozen=True, slots=True)
class Message:
    """A payload published on the subscribed channel, as it was published (never decoded here)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Gap:
    """The subscription was lost and made again: messages published meanwhile were missed."""


GAP: Final = Gap()


class Subscription:
    """One channel's events in the order they were published; `Broker.subscribe` yields it."""

    __slots__ = ("_broker", "_subscriber", "channel")

    def __init__(self, broker: Broker, channel: str, subscriber: Subscriber) -> None:
        self._broker = broker
        self._subscriber = subscriber
        self.channel = channel

    async def get(self) -> Message | Gap:
        """The next event; waits for one."""
        message = (await self._subscriber.get()).message
        # Payloads are always bytes; the backends' only other event is their GAP_MARK (a str).
        return Message(message) if isinstance(message, bytes) else GAP

    async def live(self) -> None:
        """Return once messages published from now on will reach this subscription."""
        await self._broker._wait_live(self.channel)


class Broker(ABC):
    """What the hub, the probe and presence need from the message layer."""

    def __init__(self, broadcast: Broadcast) -> None:
        self._broadcast = broadcast

    async def start(self) -> None:
        await self._broadcast.connect()

    async def stop(self) -> None:
        await self._broadcast.disconnect()

    @property
    def reconnects(self) -> int:
        return 0

    @property
    def commands(self) -> RedisCommands | None:
        """The process's Redis command client (presence, the limiter), None without Redis."""
        return None

    @asynccontextmanager
    async def subscribe(self, room: str) -> AsyncIterator[Subscription]:
        """Subscribe to `room`'s messages (and presence events) for the block's duration."""
        async with self._subscribe(keys.channel(room)) as subscription:
            yield subscription

    @asynccontextmanager
    async def subscribe_probe(self, name: str) -> AsyncIterator[Subscription]:
        """Subscribe to the readiness probe's own channel `name` (see `publish_probe`)."""
        async with self._subscribe(keys.probe(name)) as subscription:
            yield subscription

    @asynccontextmanager
    async def subscribe_control(self) -> AsyncIterator[Subscription]:
        """Subscribe to the fleet's control channel (see `publish_control`)."""
        async with self._subscribe(keys.control()) as subscription:
            yield subscription

    async def publish_control(self, payload: bytes) -> None:
        """Publish to every process's control subscription (disconnects, read markers)."""
        await self._publish(keys.control(), payload)

    @asynccontextmanager
    async def _subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        async with self._broadcast.subscribe(channel) as subscriber:
            yield Subscription(self, channel, subscriber)

    async def publish_probe(self, name: str, payload: bytes) -> None:
        """Publish `payload` on the probe channel `name`, outside any stream."""
        await self._publish(keys.probe(name), payload)

    async def announce(self, room: str, payload: bytes) -> None:
        """Publish an event to `room`'s subscribers outside its stream (presence, in one process)."""
        await self._publish(keys.channel(room), payload)

    async def forget_load(self, process: str) -> None:  # noqa: B027 - nothing to forget in one process
        """Leave the fleet's load table (a clean stop)."""

    async def _wait_live(self, channel: str) -> None:  # noqa: B027 - in-process brokers are live at once
        """Return once messages published to `channel` from now on will reach this process."""

    async def report_load(self, process: str, load: Load, *, ttl: float) -> list[Load]:
        """Publish this process's load and return every process's fresh one (its own included).

        A report older than `ttl` seconds is left out (its process died or stalled). In one
        process (no Redis) the fleet is this process alone.
        """
        return [load]

    @abstractmethod
    async def append(self, room: str, tail: bytes, sender: bytes) -> bytes:
        """Store and publish a message; return its id. Raises BrokerUnavailable."""

    @abstractmethod
    async def read_after(self, room: str, since: StreamId, limit: int) -> list[Entry] | None:
        """Messages after `since`, oldest first; None when `since` is no longer held (a gap)."""

    @abstractmethod
    async def recent(self, room: str, count: int) -> list[Entry]:
        """The newest `count` messages, oldest first."""

    @abstractmethod
    async def last_id(self, room: str) -> StreamId:
        """The id of the room's newest message, ZERO_ID when it has none."""

    @abstractmethod
    async def _publish(self, channel: str, payload: bytes) -> None:
        """Publish outside any stream."""

    @abstractmethod
    async def append_change(
        self, room: str, kind: str, tail: bytes, sender: bytes, *, target: str, author: str, moderator: bool
    ) -> Change:
        """Append an edit or delete of `target` by `author` (anyone's, for a moderator)."""

    @abstractmethod
    async def react(
        self,
        room: str,
        tail: bytes,
        sender: bytes,
        *,
        target: str,
        user: str,
        emoji: str,
        on: bool,
        limit: int,
    ) -> Change:
        """Append a reaction when it changes something (idempotent per user, emoji and message)."""

    @abstractmethod
    async def typing(self, room: str, user: str, payload: bytes, *, interval: float) -> bool:
        """Publish a typing event unless `user` had one in `room` within `interval` seconds."""

    @abstractmethod
    async def mark_read(self, user: str, room: str, msg_id: str) -> bool:
        """Move `user`'s read marker in `room` forward to `msg_id`; False when it was not behind."""

    @abstractmethod
    async def joined(self, user: str, room: str, last_id: StreamId) -> None:
        """Record that `user` joined `room` (its marker starts at `last_id` the first time)."""

    @abstractmethod
    async def read_markers(self, user: str) -> dict[str, str]:
        """The rooms `user` has joined and the marker in each."""

    @abstractmethod
    async def unread(self, room: str, after: str) -> int:
        """Messages in `room` after `after`, counted up to UNREAD_CAP (bounded work)."""

    async def latest(self, room: str, count: int) -> list[bytes]:
        """The newest `count` messages as frames in their latest form (edits, deletes, reactions folded)."""
        entries = await self.recent_with_changes(room, count)
        return fold(entries)[-count:] if count > 0 else []

    @abstractmethod
    async def recent_with_changes(self, room: str, count: int) -> list[Entry]:
        """Entries back to the `count`-th newest message (or the start), oldest first."""


def create_broker(
    settings: Settings, *, on_connection_change: Callable[[bool], None] | None = None
) -> Broker:
    """The process's broker: Redis when `CHORUS_REDIS_URL` is set, else the in-process one.

    `on_connection_change(up)` hears the pub/sub connection come and go (the readiness probe).
    """
    # Imported here: both implementations import this module for Broker and its types.
    from .memory_broker import MemoryBroker
    from .redis_broker import RedisBroker

    if settings.uses_redis:
        return RedisBroker(settings, on_connection_change=on_connection_change)
    return MemoryBroker(settings)
