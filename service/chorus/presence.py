"""Presence: who is online in a room, counted across every replica.

Each connection is one entry; a user is online while at least one of their connections is,
so several tabs count once and only the first join and the last leave are announced.
Announcements are published on the room's message channel, so they reach every replica in
the order they happened and travel with the messages.

`RedisPresence` keeps the entries in Redis and a per-process heartbeat key with a TTL of
three heartbeat intervals. A process that dies without saying goodbye stops refreshing it;
every surviving process checks the others' heartbeats each interval and removes a dead
one's entries, announcing the leaves (the removal is idempotent, so a leave is announced
once however many survivors race). `MemoryPresence` does the same in one process.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Final

from . import keys
from .batch import Batch
from .broker import Broker, BrokerUnavailable
from .config import Settings
from .protocol import encode_published, presence_frame, user_key
from .redis_broker import RedisCommands

log = logging.getLogger("chorus.presence")

HEARTBEATS_TO_EXPIRE: Final = 3

# A user is counted under `protocol.user_key` (Dave, dave: one user) and shown under the
# spelling of the connection that brought them online (kept until their last one leaves), so a
# join and its leave carry the same name. Values go through cjson.encode, never spliced in
# raw; the fixed parts match protocol.presence_frame, which hub.py recognises by its prefix.
_ANNOUNCE: Final = """
local function announce(event, key)
  local online = redis.call('HLEN', KEYS[2])
  local name = redis.call('HGET', KEYS[4], key) or key
  redis.call('PUBLISH', KEYS[3], ARGV[3] .. ' {"type":"presence","room":' .. cjson.encode(ARGV[4])
    .. ',"event":"' .. event .. '","user":' .. cjson.encode(name) .. ',"online":' .. online .. '}')
end
local function drop(key)
  if redis.call('HINCRBY', KEYS[2], key, -1) <= 0 then
    redis.call('HDEL', KEYS[2], key)
    announce('leave', key)
    redis.call('HDEL', KEYS[4], key)
  end
end
"""
# KEYS: connections hash (entry -> user key), users hash (user key -> connections), room
# channel, names hash (user key -> name shown).
# ARGV: entry, user key, sender, room, name shown. Each returns the number of users online afterwards.
JOIN: Final = (
    _ANNOUNCE
    + """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then
    redis.call('HSET', KEYS[4], ARGV[2], ARGV[5])
    announce('join', ARGV[2])
  end
end
return redis.call('HLEN', KEYS[2])
"""
)
LEAVE: Final = (
    _ANNOUNCE
    + """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then drop(ARGV[2]) end
return redis.call('HLEN', KEYS[2])
"""
)
# ARGV[1] here is an entry prefix: every entry of one (dead) process goes.
REAP: Final = (
    _ANNOUNCE
    + """
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #ARGV[1]) == ARGV[1] then
    redis.call('HDEL', KEYS[1], all[i])
    drop(all[i + 1])
  end
end
return redis.call('HLEN', KEYS[2])
"""
)


@dataclass(frozen=True, slots=True)
class Member:
    """One connection as presence sees it; `entry` is unique across every replica."""

    room: str
    user: str  # as the connection gave it
    entry: str

    @property
    def key(self) -> str:
        """Who the user is for counting: connections of `Dave` and `dave` are one user."""
        return user_key(self.user)


class Presence(ABC):
    """Who is online per room; join/leave announcements go out on the room's channel."""

    @abstractmethod
    async def start(self) -> None:
        """Start background work (heartbeats)."""

    @abstractmethod
    async def stop(self) -> None:
        """Say goodbye: announce this process's members as gone."""

    @abstractmethod
    async def join(self, member: Member) -> int:
        """Add a connection; return how many users are online. Raises BrokerUnavailable."""

    @abstractmethod
    async def leave(self, member: Member) -> None:
        """Remove a connection; never raises (a failed removal is retried in the background)."""

    @abstractmethod
    async def users(self, room: str) -> list[str]:
        """The users online in `room`, sorted. Raises BrokerUnavailable."""

    @abstractmethod
    async def occupancy(self) -> dict[str, int]:
        """Rooms with members now on any replica, and how many users each. Raises BrokerUnavailable."""


class MemoryPresence(Presence):
    """One process: the same counting and announcements, kept in dicts."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._entries: dict[str, set[str]] = {}
        self._users: dict[str, Counter[str]] = {}  # by user key
        self._names: dict[str, dict[str, str]] = {}  # user key -> name shown

    async def start(self) -> None:
        pass  # nothing to refresh: this process is the only one

    async def stop(self) -> None:
        pass  # the members' sockets are gone with the process; no one is left to tell

    async def join(self, member: Member) -> int:
        entries = self._entries.setdefault(member.room, set())
        users = self._users.setdefault(member.room, Counter())
        names = self._names.setdefault(member.room, {})
        if member.entry not in entries:
            entries.add(member.entry)
            users[member.key] += 1
            if users[member.key] == 1:
                names[member.key] = member.user
                await self._announce(member.room, "join", member.user, len(users), member.entry)
        return len(users)

    async def leave(self, member: Member) -> None:
        entries = self._entries.get(member.room, set())
        if member.entry not in entries:
            return
        entries.discard(member.entry)
        users = self._users[member.room]
        users[member.key] -= 1
        if users[member.key] <= 0:
            del users[member.key]
            name = self._names[member.room].pop(member.key, member.user)
            await self._announce(member.room, "leave", name, len(users), "-")
        if not entries:
            del self._entries[member.room], self._users[member.room], self._names[member.room]

    async def users(self, room: str) -> list[str]:
        return sorted(self._names.get(room, {}).values())

    async def occupancy(self) -> dict[str, int]:
        return {room: len(users) for room, users in self._users.items() if users}

    async def _announce(self, room: str, event: str, name: str, online: int, sender: str) -> None:
        frame = presence_frame(room, event, name, online).encode()
        await self._broker.announce(room, encode_published(sender.encode(), frame))


class RedisPresence(Presence):
    """Entries in Redis, a heartbeat per process, and reaping of processes that died."""

    def __init__(self, settings: Settings, commands: RedisCommands, *, owner: str) -> None:
        # `owner` prefixes every entry of this process (the connection tags' prefix).
        self.owner = owner
        self.interval = settings.presence_heartbeat_seconds
        self._ttl_ms = int(self.interval * HEARTBEATS_TO_EXPIRE * 1000)
        self._commands = commands
        self._redis = commands.client
        # Each script's keys share the room's hash tag (one slot); announcements go out on the
        # room's channel (register_script makes them SPUBLISH in a Cluster).
        self._join = commands.register_script(JOIN)
        self._leave = commands.register_script(LEAVE)
        self._reap = commands.register_script(REAP)
        self._local: dict[str, Member] = {}
        # This process's members per room: a room stays in `presence_rooms(owner)` exactly while
        # it has one, so the set does not grow with every room ever held and reaping walks
        # only rooms that had members.
        self._rooms: Counter[str] = Counter()
        self._unremoved: dict[str, Member] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chorus-presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._reap_owner(self.owner)
            await self._call(self._redis.delete(keys.heartbeat(self.owner)))
            await self._call(self._redis.srem(keys.PRESENCE_REPLICAS, self.owner))
        except BrokerUnavailable as exc:
            log.warning("presence goodbye failed (%s); other replicas will expire our entries", exc)

    async def _call(self, coro: Awaitable[Any]) -> Any:
        return await self._commands.call(coro)

    async def _run_script(self, script: Any, member: Member, sender: str) -> Any:
        return await self._call(script(keys=_room_keys(member.room), args=_args(member, sender)))

    def _hold(self, member: Member) -> None:
        if member.entry not in self._local:
            self._rooms[member.room] += 1
        self._local[member.entry] = member

    async def join(self, member: Member) -> int:
        self._hold(member)
        # The room must be in the owner's set before its entry exists (reaping finds it there).
        await self._call(self._redis.sadd(keys.presence_rooms(self.owner), member.room))
        online: int = await self._run_script(self._join, member, member.entry)
        return online

    def queue_join(self, batch: Batch, member: Member) -> int:
        """`join` queued in a batch (chorus.joins); the index of its reply, the users online.

        The SADD is queued first; in a Cluster the two may run on different shards in either
        order, and a reaper that ran between them would miss the entry only if this process's
        heartbeat had lapsed, when `_beat` joins every local member again anyway.
        """
        self._hold(member)
        batch.command("SADD", keys.presence_rooms(self.owner), member.room)
        return batch.script(self._join, _room_keys(member.room), _args(member, member.entry))

    async def leave(self, member: Member) -> None:
        if self._local.pop(member.entry, None) is not None:
            self._rooms[member.room] -= 1
        try:
            await self._run_script(self._leave, member, "-")
            await self._forget_room(member.room)
        except BrokerUnavailable as exc:
            log.warning("presence: removing %s from %s failed (%s); retrying", member.user, member.room, exc)
            self._unremoved[member.entry] = member

    async def _forget_room(self, room: str) -> None:
        """Drop `room` from this owner's set once its last local member has left."""
        if self._rooms[room] > 0:
            return
        del self._rooms[room]
        await self._call(self._redis.srem(keys.presence_rooms(self.owner), room))
        if self._rooms[room] > 0:
            # A join came in while the SREM was in flight: its SADD may have landed first.
            await self._call(self._redis.sadd(keys.presence_rooms(self.owner), room))
        else:
            del self._rooms[room]

    async def users(self, room: str) -> list[str]:
        users: list[bytes] = await self._call(self._redis.hkeys(keys.online(room)))
        if not users:
            return []
        names: list[bytes | None] = await self._call(self._redis.hmget(keys.names(room), users))
        return sorted((name or key).decode() for key, name in zip(users, names, strict=True))

    async def occupancy(self) -> dict[str, int]:
        # Every process's room set (the replicas that hold entries), then each room's count.
        owners = await self._call(self._redis.smembers(keys.PRESENCE_REPLICAS))
        rooms: set[str] = set()
        for owner in owners:
            rooms |= {
                r.decode()
                for r in await self._call(self._redis.smembers(keys.presence_rooms(owner.decode())))
            }
        counts = {room: await self._call(self._redis.hlen(keys.online(room))) for room in sorted(rooms)}
        return {room: int(count) for room, count in counts.items() if count}

    async def _run(self) -> None:
        while True:
            try:
                await self._beat()
                await self._reap_dead()
            except BrokerUnavailable as exc:
                log.warning("presence heartbeat failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def _beat(self) -> None:
        beat = self._redis.set(keys.heartbeat(self.owner), b"1", px=self._ttl_ms, get=True)
        previous = await self._call(beat)
        await self._call(self._redis.sadd(keys.PRESENCE_REPLICAS, self.owner))
        if previous is None and self._local:
            # Our heartbeat lapsed (Redis restarted or we stalled) and others may have reaped
            # us: put our members back. Joins are idempotent, so nothing is announced twice.
            log.warning("presence heartbeat had lapsed; re-registering %d connections", len(self._local))
            for member in list(self._local.values()):
                await self.join(member)
        for entry, member in list(self._unremoved.items()):
            await self._run_script(self._leave, member, "-")
            del self._unremoved[entry]
            await self._forget_room(member.room)

    async def _reap_dead(self) -> None:
        owners = {o.decode() for o in await self._call(self._redis.smembers(keys.PRESENCE_REPLICAS))}
        for owner in owners - {self.owner}:
            if await self._call(self._redis.exists(keys.heartbeat(owner))):
                continue
            log.info("presence: replica process %s stopped heartbeating; removing its members", owner)
            await self._reap_owner(owner)
            await self._call(self._redis.srem(keys.PRESENCE_REPLICAS, owner))

    async def _reap_owner(self, owner: str) -> None:
        rooms = [r.decode() for r in await self._call(self._redis.smembers(keys.presence_rooms(owner)))]
        for room in rooms:
            room_keys = _room_keys(room)
            await self._call(self._reap(keys=room_keys, args=[f"{owner}.", "-", "-", room]))
        await self._call(self._redis.delete(keys.presence_rooms(owner)))


def _room_keys(room: str) -> list[str]:
    # The scripts' KEYS (one hash tag: the room's shard): entries, online, channel, names.
    return [keys.presence_entries(room), keys.online(room), keys.channel(room), keys.names(room)]


def _args(member: Member, sender: str) -> list[str]:
    return [member.entry, member.key, sender, member.room, member.user]


def create_presence(settings: Settings, broker: Broker, *, owner: str) -> Presence:
    commands = broker.commands
    if commands is not None:
        return RedisPresence(settings, commands, owner=owner)
    return MemoryPresence(broker)
