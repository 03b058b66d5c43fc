"""The Redis broker: `RedisBroker`, its command client `RedisCommands`, and the decoding of
stream rows into `Entry`s (`entries_from_rows`, shared with chorus.joins).

Redis is touched here and only through what this module builds, once per process in
`create_app`: `RedisBroker` holds the pub/sub connection(s) (chorus.backend, or chorus.shards
for a Cluster) and `RedisCommands`, the one command client; presence and the per-user limiter
get that client from `Broker.commands` and run their own scripts on their own keys
(chorus.keys names every key).

`RedisBroker` appends to a Redis Stream and publishes in one Lua script, so pub/sub order is
stream order and every replica sees the same id.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from . import keys
from .backend import RedisPubSubBackend
from .broker import Broker, BrokerUnavailable, Change, Entry, Load
from .config import Settings
from .pipeline import ScriptPipeline
from .protocol import TYPE_MESSAGE, TYPE_REACTION, UNREAD_CAP, ZERO_ID, StreamId
from .relay import relayed
from .scripts import APPEND_CHANGE, MARK_READ, REACT, TYPING
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
            return entries_from_rows(await self._call(self._redis.xrange(key, "-", "+", count=limit)))
        # One XRANGE from the anchor itself: atomic on every topology (a Cluster has no MULTI
        # across calls here); the anchor missing means history no longer holds `since`.
        start = str(since)
        rows = await self._call(self._redis.xrange(key, start, "+", count=limit + 1))
        if not rows or rows[0][0] != start.encode():
            return None
        return entries_from_rows(rows[1:])

    async def recent(self, room: str, count: int) -> list[Entry]:
        if count <= 0:
            return []
        rows = await self._call(self._redis.xrevrange(keys.stream(room), "+", "-", count=count))
        return entries_from_rows(rows[::-1])

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
        return min(UNREAD_CAP, sum(1 for e in entries_from_rows(rows) if e.kind == TYPE_MESSAGE))

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
        return entries_from_rows(rows[::-1])

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


def entries_from_rows(rows: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Entry]:
    """Stream rows as XRANGE/XREVRANGE return them, `(id, fields)`, as `Entry`s in the same order.

    The fields are those the append scripts write: `d` the frame's tail, `s` the sender and,
    for a change to a message, `k` its kind (absent for a message).
    """
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
