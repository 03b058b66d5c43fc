"""The broker: the one way into the message layer (pub/sub and the per-room message stream).

Messages come from `Broker.subscribe(room)`: an async context manager yielding `Message`
(a payload as published, bytes) or `Gap` (the subscription was lost and made again: back-fill
from the stream). They are sent with `append` (stored and published in one step) and read back
with `read_after`/`recent`. Nothing outside this module sees broadcaster or a pub/sub backend.

Redis is touched here and only through what this module builds, once per process in
`create_app`: `RedisBroker` holds the pub/sub connection(s) (chorus.backend, or chorus.shards
for a Cluster) and `RedisCommands`, the one command client; presence and the per-user limiter
get that client from `Broker.commands` and run their own scripts on their own keys
(chorus.keys names every key).

`RedisBroker` appends to a Redis Stream and publishes in one Lua script, so pub/sub order is
stream order and every replica sees the same id. `MemoryBroker` does the same in process for
a single replica (`CHORUS_REDIS_URL` unset).
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import orjson
from broadcaster import Broadcast
from broadcaster._base import Subscriber
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from . import keys
from .backend import RedisPubSubBackend
from .config import Settings
from .history import fold
from .pipeline import ScriptPipeline
from .protocol import (
    ERROR_FORBIDDEN,
    ERROR_NOT_FOUND,
    TYPE_DELETE,
    TYPE_MESSAGE,
    TYPE_REACTION,
    UNREAD_CAP,
    ZERO_ID,
    StreamId,
    encode_published,
    stream_frame,
)
from .relay import relayed
from .scripts import APPEND_CHANGE, MARK_READ, REACT, STATE_PRUNE_BATCH, TYPING
from .shards import ShardedPubSubBackend
from .topology import SentinelResolver, Topology, command_client, sentinels

log = logging.getLogger("chorus.broker")

# XADD then PUBLISH in one script: nothing can publish between them, so every replica sees
# messages in stream order. The frame is spliced as protocol.message_frame does.
APPEND_AND_PUBLISH: Final = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[2], 's', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[3] .. ' {"type":"message","id":"' .. id .. '",' .. string.sub(ARGV[2], 2))
return id
"""


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


class RedisCommands:
    """The process's one door for commands and scripts (broker, presence, limits): a redis-py
    client, and `script`'s auto-pipelined connection (chorus.pipeline) outside a Cluster.

    Every call is bounded in time (`timeout`, waiting for a slot included) and in concurrency:
    at most `max_in_flight` commands at once, the rest wait their turn. redis-py's pools open
    a connection per concurrent command and, past their size, fail at once (the cluster
    client's `MaxConnectionsError`, seen when 200 sockets sent at once): a burst must queue,
    not be refused while Redis is healthy.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        timeout: float,
        max_in_flight: int,
        sentinel: Sentinel | None = None,
        resolve: SentinelResolver | None = None,
    ) -> None:
        self.timeout = timeout
        self.cluster = topology.cluster
        # A little headroom over the slots: the cluster client's own topology refreshes.
        self.client = command_client(
            topology,
            timeout=timeout,
            health_check_interval=10,
            max_connections=max_in_flight + 4,
            sentinel=sentinel,
        )
        self._slots = asyncio.Semaphore(max_in_flight)
        # The hot path's scripts, auto-pipelined (chorus.pipeline); a Cluster keeps redis-py's.
        self._pipeline = None if self.cluster else ScriptPipeline(topology, timeout=timeout, resolve=resolve)

    def register_script(self, source: str) -> AsyncScript:
        """A Lua script for this topology: in a Cluster a room's channel is a shard channel (its
        hash tag puts it on the room's shard), so the script's `PUBLISH` becomes `SPUBLISH`."""
        if self.cluster:
            source = source.replace("'PUBLISH'", "'SPUBLISH'")
        return self.client.register_script(source)

    async def script(self, script: AsyncScript, keys: list[str], args: list[bytes | str | int]) -> Any:
        """Run a registered script, pipelined with the others of this loop turn where it can be."""
        if self._pipeline is None:
            return await self.call(script(keys=keys, args=args))
        return await self.call(self._pipeline.run(script, keys, args), slots=self._pipeline.slots)

    async def call(self, call: Awaitable[Any], *, slots: asyncio.Semaphore | None = None) -> Any:
        """Await one command (or script, or pipeline); BrokerUnavailable when it fails or is late."""
        try:
            async with asyncio.timeout(self.timeout):
                async with slots or self._slots:
                    return await call
        except (RedisError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc
        except Exception as exc:
            # redis-py's async cluster client can fail with a bare AttributeError when a command
            # times out during a connect (seen at 400 simultaneous joins): for the caller that is
            # still "Redis did not answer", never an HTTP 500. The traceback stays in the log.
            log.warning("Redis client failed unexpectedly; treating it as unavailable", exc_info=True)
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if inspect.iscoroutine(call):
                call.close()  # never started when the deadline came during the wait for a slot

    async def aclose(self) -> None:
        if self._pipeline is not None:
            await self._pipeline.aclose()
        await self.client.aclose()


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


class RedisBroker(Broker):
    """The process's one Redis resource, built from the settings' one parsed Topology: the
    pub/sub backend (plain or sharded), the command client and, for Sentinel, one Sentinel."""

    def __init__(
        self, settings: Settings, *, on_connection_change: Callable[[bool], None] | None = None
    ) -> None:
        topology = settings.redis_topology
        timeout = settings.broker_timeout_seconds
        self._maxlen = str(settings.history_size)
        sentinel = sentinels(topology, timeout=timeout) if topology.mode == "sentinel" else None
        self._resolver = SentinelResolver(topology, sentinel) if sentinel is not None else None
        self._backend: RedisPubSubBackend | ShardedPubSubBackend
        if topology.cluster:
            self._backend = ShardedPubSubBackend(topology, on_connection_change=on_connection_change)
        else:
            self._backend = RedisPubSubBackend(
                topology, on_connection_change=on_connection_change, resolve=self._resolver
            )
        super().__init__(relayed(self._backend))  # no listener-task hop per read (chorus.relay)
        self._publish_command = "SPUBLISH" if topology.cluster else "PUBLISH"
        # Shared with presence and the connection limiter, which the lifespan stops first.
        self._commands = RedisCommands(
            topology,
            timeout=timeout,
            max_in_flight=settings.redis_max_connections,
            sentinel=sentinel,
            resolve=self._resolver,
        )
        self._redis = self._commands.client
        self._append = self._commands.register_script(APPEND_AND_PUBLISH)
        self._append_change = self._commands.register_script(APPEND_CHANGE)
        self._react = self._commands.register_script(REACT)
        self._typing = self._commands.register_script(TYPING)
        self._mark_read = self._commands.register_script(MARK_READ)
        self._history_size = settings.history_size

    @property
    def commands(self) -> RedisCommands:
        return self._commands

    async def stop(self) -> None:
        await super().stop()
        await self._commands.aclose()
        if self._resolver is not None:
            await self._resolver.aclose()

    @property
    def reconnects(self) -> int:
        return self._backend.reconnects

    @property
    def pubsub_connected(self) -> bool:
        return self._backend.connected

    async def _wait_live(self, channel: str) -> None:
        await self._backend.wait_live(channel)

    async def _call(self, coro: Awaitable[Any]) -> Any:
        return await self._commands.call(coro)

    async def append(self, room: str, tail: bytes, sender: bytes) -> bytes:
        room_keys = [keys.stream(room), keys.channel(room)]
        result: bytes = await self._commands.script(self._append, room_keys, [self._maxlen, tail, sender])
        return result

    async def read_after(self, room: str, since: StreamId, limit: int) -> list[Entry] | None:
        key = keys.stream(room)
        if since == ZERO_ID:
            return _entries(await self._call(self._redis.xrange(key, "-", "+", count=limit)))
        # One XRANGE from the anchor itself: atomic on every topology (a Cluster has no MULTI
        # across calls here); the anchor missing means history no longer holds `since`.
        start = str(since)
        rows = await self._call(self._redis.xrange(key, start, "+", count=limit + 1))
        if not rows or rows[0][0] != start.encode():
            return None
        return _entries(rows[1:])

    async def recent(self, room: str, count: int) -> list[Entry]:
        if count <= 0:
            return []
        rows = await self._call(self._redis.xrevrange(keys.stream(room), "+", "-", count=count))
        return _entries(rows[::-1])

    async def last_id(self, room: str) -> StreamId:
        rows = await self._call(self._redis.xrevrange(keys.stream(room), "+", "-", count=1))
        return StreamId.parse(rows[0][0]) if rows else ZERO_ID

    async def _publish(self, channel: str, payload: bytes) -> None:
        await self._call(self._redis.execute_command(self._publish_command, channel, payload))

    async def append_change(
        self, room: str, kind: str, tail: bytes, sender: bytes, *, target: str, author: str, moderator: bool
    ) -> Change:
        room_keys = _change_keys(room)
        args: list[bytes | str | int] = [
            self._maxlen,
            tail,
            sender,
            kind,
            target,
            author,
            "1" if moderator else "0",
        ]
        return _change(await self._commands.script(self._append_change, room_keys, args))

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
        room_keys = _change_keys(room)
        args: list[bytes | str | int] = [self._maxlen, tail, sender, TYPE_REACTION, target, user, emoji]
        args += ["1" if on else "0", limit]
        return _change(await self._commands.script(self._react, room_keys, args))

    async def typing(self, room: str, user: str, payload: bytes, *, interval: float) -> bool:
        room_keys = [keys.typing(room), keys.channel(room)]
        sent = await self._commands.script(self._typing, room_keys, [user, int(interval * 1000), payload])
        return bool(sent)

    async def mark_read(self, user: str, room: str, msg_id: str) -> bool:
        moved = await self._commands.script(self._mark_read, [keys.read_markers(user)], [room, msg_id])
        return bool(moved)

    async def joined(self, user: str, room: str, last_id: StreamId) -> None:
        await self._call(self._redis.hsetnx(keys.read_markers(user), room, str(last_id)))

    async def read_markers(self, user: str) -> dict[str, str]:
        markers: dict[bytes, bytes] = await self._call(self._redis.hgetall(keys.read_markers(user)))
        return {room.decode(): marker.decode() for room, marker in markers.items()}

    async def unread(self, room: str, after: str) -> int:
        rows = await self._call(self._redis.xrange(keys.stream(room), f"({after}", "+", count=UNREAD_CAP * 2))
        return min(UNREAD_CAP, sum(1 for e in _entries(rows) if e.kind == TYPE_MESSAGE))

    async def recent_with_changes(self, room: str, count: int) -> list[Entry]:
        if count <= 0:
            return []
        # Pages newest first until `count` messages are in hand; bounded by the stream's size.
        key, found, end, page = keys.stream(room), 0, "+", max(count * 2, 64)
        rows: list[tuple[bytes, dict[bytes, bytes]]] = []
        while found < count and len(rows) < self._history_size * 2:
            batch = await self._call(self._redis.xrevrange(key, end, "-", count=page))
            rows.extend(batch)
            found += sum(1 for _, fields in batch if b"k" not in fields)
            if len(batch) < page:
                break
            end = "(" + batch[-1][0].decode()
        return _entries(rows[::-1])

    async def report_load(self, process: str, load: Load, *, ttl: float) -> list[Load]:
        await self._call(self._redis.hset(keys.LOAD, process, load.encode()))
        raw: dict[bytes, bytes] = await self._call(self._redis.hgetall(keys.LOAD))
        fleet: list[Load] = []
        stale: list[bytes] = []
        for name, value in raw.items():
            try:
                entry = Load.decode(name.decode(), value)
            except (ValueError, TypeError, orjson.JSONDecodeError):
                stale.append(name)
                continue
            if load.at - entry.at > ttl:
                stale.append(name)  # a process that stopped reporting: no longer in the fleet
            else:
                fleet.append(entry)
        if stale:
            await self._call(self._redis.hdel(keys.LOAD, *stale))
        return fleet

    async def forget_load(self, process: str) -> None:
        """Leave the fleet's load table (a clean stop)."""
        await self._call(self._redis.hdel(keys.LOAD, process))


def _entries(rows: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Entry]:
    return [
        Entry(
            StreamId.parse(raw_id),
            raw_id,
            fields.get(b"d", b"{}"),
            fields.get(b"s", b""),
            fields[b"k"].decode() if b"k" in fields else TYPE_MESSAGE,
        )
        for raw_id, fields in rows
    ]


def _change_keys(room: str) -> list[str]:
    return [keys.stream(room), keys.channel(room), keys.state(room), keys.state_index(room)]


def _change(reply: list[bytes]) -> Change:
    outcome = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    return Change(outcome, reply[1] if len(reply) > 1 else b"")


class MemoryBroker(Broker):
    """One process, no Redis: broadcaster's memory backend plus an in-process history."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(Broadcast("memory://"))
        self._replica = settings.replica_name
        self._size = settings.history_size
        self._rooms: dict[str, deque[Entry]] = {}
        self._last = ZERO_ID
        self._deleted: set[tuple[str, str]] = set()
        self._reactions: dict[tuple[str, str], dict[str, set[str]]] = {}
        self._changed: dict[str, list[tuple[StreamId, str]]] = {}  # heap per room: targets with state
        self._typing: dict[tuple[str, str], float] = {}
        self._markers: dict[str, dict[str, str]] = {}

    async def start(self) -> None:
        log.warning(
            "CHORUS_REDIS_URL is not set: using the in-process memory broker; "
            "messages will not reach other replicas, run a single replica only"
        )
        await super().start()

    def _next_id(self) -> StreamId:
        ms = int(time.time() * 1000)
        last_ms, last_seq = self._last
        self._last = StreamId((ms, 0)) if ms > last_ms else StreamId((last_ms, last_seq + 1))
        return self._last

    async def append(self, room: str, tail: bytes, sender: bytes) -> bytes:
        return await self._append_entry(room, TYPE_MESSAGE, tail, sender)

    async def read_after(self, room: str, since: StreamId, limit: int) -> list[Entry] | None:
        entries = self._rooms.get(room, deque())
        if since == ZERO_ID:
            return list(itertools.islice(entries, limit))
        for index, entry in enumerate(entries):
            if entry.id == since:
                return list(itertools.islice(entries, index + 1, index + 1 + limit))
        return None

    async def recent(self, room: str, count: int) -> list[Entry]:
        entries = self._rooms.get(room)
        if not entries or count <= 0:
            return []
        return list(entries)[-count:]

    async def last_id(self, room: str) -> StreamId:
        entries = self._rooms.get(room)
        return entries[-1].id if entries else ZERO_ID

    async def _publish(self, channel: str, payload: bytes) -> None:
        await self._broadcast.publish(channel, payload)

    def _target(self, room: str, target: str) -> Entry | None:
        wanted = StreamId.parse(target)
        for entry in self._rooms.get(room, ()):
            if entry.id == wanted:
                deleted = (room, target) in self._deleted
                return entry if entry.kind == TYPE_MESSAGE and not deleted else None
        return None

    def _track(self, room: str, target: str) -> None:
        """Index `target` when it first gets state, so `_prune` finds it once trimmed."""
        if (room, target) not in self._deleted and (room, target) not in self._reactions:
            heapq.heappush(self._changed.setdefault(room, []), (StreamId.parse(target), target))

    def _prune(self, room: str) -> None:
        """Drop the state of up to STATE_PRUNE_BATCH trimmed targets, as the Redis scripts do."""
        heap, first = self._changed.get(room, []), self._rooms[room][0].id
        for _ in range(STATE_PRUNE_BATCH):
            if not heap or heap[0][0] >= first:
                return
            _, target = heapq.heappop(heap)
            self._deleted.discard((room, target))
            self._reactions.pop((room, target), None)

    async def _append_change_entry(self, room: str, kind: str, tail: bytes, sender: bytes) -> bytes:
        raw = await self._append_entry(room, kind, tail, sender)
        self._prune(room)
        return raw

    async def _append_entry(self, room: str, kind: str, tail: bytes, sender: bytes) -> bytes:
        msg_id = self._next_id()
        raw = str(msg_id).encode()
        entry = Entry(msg_id, raw, tail, sender, kind)
        self._rooms.setdefault(room, deque(maxlen=self._size)).append(entry)
        await self._broadcast.publish(keys.channel(room), encode_published(sender, entry.frame))
        return raw

    async def append_change(
        self, room: str, kind: str, tail: bytes, sender: bytes, *, target: str, author: str, moderator: bool
    ) -> Change:
        entry = self._target(room, target)
        if entry is None:
            return Change(ERROR_NOT_FOUND)
        if not moderator and orjson.loads(entry.tail).get("user") != author:
            return Change(ERROR_FORBIDDEN)
        if kind == TYPE_DELETE:
            self._track(room, target)
            self._deleted.add((room, target))
        return Change("ok", await self._append_change_entry(room, kind, tail, sender))

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
        if self._target(room, target) is None:
            return Change(ERROR_NOT_FOUND)
        self._track(room, target)
        emojis = self._reactions.setdefault((room, target), {})
        users = emojis.get(emoji, set())
        if (user in users) == on:
            return Change("same")
        if on:
            if emoji not in emojis and len(emojis) >= limit:
                return Change("full")
            emojis.setdefault(emoji, set()).add(user)
        else:
            users.discard(user)
            if not users:
                emojis.pop(emoji, None)
        return Change("ok", await self._append_change_entry(room, TYPE_REACTION, tail, sender))

    async def typing(self, room: str, user: str, payload: bytes, *, interval: float) -> bool:
        now = time.monotonic()
        if now - self._typing.get((room, user), -math.inf) < interval:
            return False
        self._typing[(room, user)] = now
        await self._broadcast.publish(keys.channel(room), payload)
        return True

    async def mark_read(self, user: str, room: str, msg_id: str) -> bool:
        markers = self._markers.setdefault(user, {})
        current = markers.get(room)
        if current is not None and StreamId.parse(msg_id) <= StreamId.parse(current):
            return False
        markers[room] = msg_id
        return True

    async def joined(self, user: str, room: str, last_id: StreamId) -> None:
        self._markers.setdefault(user, {}).setdefault(room, str(last_id))

    async def read_markers(self, user: str) -> dict[str, str]:
        return dict(self._markers.get(user, {}))

    async def unread(self, room: str, after: str) -> int:
        floor = StreamId.parse(after)
        count = sum(1 for e in self._rooms.get(room, ()) if e.id > floor and e.kind == TYPE_MESSAGE)
        return min(UNREAD_CAP, count)

    async def recent_with_changes(self, room: str, count: int) -> list[Entry]:
        entries = list(self._rooms.get(room, ()))
        found = 0
        for index in range(len(entries) - 1, -1, -1):
            found += entries[index].kind == TYPE_MESSAGE
            if found >= count:
                return entries[index:]
        return entries


def create_broker(
    settings: Settings, *, on_connection_change: Callable[[bool], None] | None = None
) -> Broker:
    """The process's broker: Redis when `CHORUS_REDIS_URL` is set, else the in-process one.

    `on_connection_change(up)` hears the pub/sub connection come and go (the readiness probe).
    """
    if settings.uses_redis:
        return RedisBroker(settings, on_connection_change=on_connection_change)
    return MemoryBroker(settings)
