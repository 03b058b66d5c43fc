"""The in-process broker: `MemoryBroker`, for a single replica (`CHORUS_REDIS_URL` unset).

It does what `RedisBroker` (chorus.redis_broker) does, in process: broadcaster's memory backend
for pub/sub and a bounded history per room, appended to and published in one step, so
subscribers see messages in history order.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections import deque

import orjson
from broadcaster import Broadcast

from . import keys
from .broker import Broker, Change, Entry
from .config import Settings
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
)
from .scripts import STATE_PRUNE_BATCH

log = logging.getLogger("chorus.broker")


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
