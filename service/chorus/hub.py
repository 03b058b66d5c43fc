"""Local fan-out: one broker subscription per room per process.

The naive design subscribes once per WebSocket and parses each message once per member. Here
a room's single subscription decodes a message once and hands the same frame to every
member's `Connection` (chorus.connection), which writes it or queues it, bounded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Final, TypeVar

import orjson

from . import metrics
from .broker import Broker, BrokerUnavailable, Entry, Gap, Subscription
from .connection import Coalescer, Connection, Hold
from .history import fold
from .joins import Backlog
from .presence_diff import PresenceDiff
from .protocol import (
    CLOSE_DISCONNECTED,
    CLOSE_INTERNAL_ERROR,
    ZERO_ID,
    StreamId,
    decode_event,
    decode_published,
    read_frame,
    resync_frame,
    user_key,
)

log = logging.getLogger("chorus.hub")

RETRY_SECONDS: Final = 0.5
CONTROL_DISCONNECT: Final = "disconnect"
CONTROL_READ: Final = "read"
T = TypeVar("T")
# A room's mean gap between fan-outs moves 1/4 of the way to each new gap: a burst of a few
# fan-outs makes a quiet room busy, a pause of a few makes it quiet again. Gaps count up to
# the longest window allowed (0.1 s): a room quieter than that is quiet for every setting.
MEAN_GAP_WEIGHT: Final = 0.25
MEAN_GAP_CAP: Final = 0.1


class Room:
    __slots__ = (
        "last_fanout",
        "last_id",
        "mean_gap",
        "members",
        "name",
        "presence",
        "ready",
        "ready_id",
        "subscription",
        "task",
    )

    def __init__(self, name: str, *, presence_interval: float, presence_max_members: int) -> None:
        self.name = name
        self.presence = PresenceDiff(
            name, self._deliver_presence, interval=presence_interval, max_members=presence_max_members
        )
        self.subscription: Subscription | None = None  # set before `ready`
        self.members: set[Connection] = set()
        self.last_id: StreamId = ZERO_ID
        self.ready_id: StreamId = ZERO_ID  # the stream's newest id when the subscription went live
        self.last_fanout = -math.inf  # time.monotonic() of the previous live fan-out
        # Seconds between live fan-outs, a moving mean (capped: a long pause is just "quiet").
        self.mean_gap = MEAN_GAP_CAP
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def _deliver_presence(self, frame: str, personal: dict[Hashable, str | None]) -> None:
        for conn in self.members:
            own = personal.get(conn, frame) if personal else frame
            if own is not None:
                conn.deliver_event(own)


class Hub:
    """Rooms with members on this replica, and their one subscription each."""

    def __init__(
        self,
        broker: Broker,
        *,
        join_timeout: float,
        replay_limit: int,
        coalesce_seconds: float = 0.0,
        presence_interval: float = 0.0,
        presence_max_members: int = 1_000_000,
    ) -> None:
        self.broker = broker
        self.coalescer = Coalescer(coalesce_seconds)
        self._hold_turn: Hold = self.coalescer.add
        self.join_timeout = join_timeout
        self.replay_limit = replay_limit
        self.presence_interval = presence_interval
        self.presence_max_members = presence_max_members
        self.rooms: dict[str, Room] = {}
        self.connections: set[Connection] = set()
        self._by_tag: dict[bytes, Connection] = {}
        self._by_user: dict[str, set[Connection]] = {}

    async def join(self, conn: Connection) -> StreamId:
        """Register `conn` and wait until its room's subscription is live; return its position.

        Every message after the position reaches `conn` (buffered until `replay` ends), so a
        client that has seen no message yet can resume from it (the welcome's `last_id`).
        Raises BrokerUnavailable when the subscription cannot be made live in time.
        """
        room = self.rooms.get(conn.room)
        if room is None:
            room = self.rooms[conn.room] = Room(
                conn.room,
                presence_interval=self.presence_interval,
                presence_max_members=self.presence_max_members,
            )
            room.task = asyncio.create_task(self._run_room(room), name=f"room:{conn.room}")
            metrics.ROOMS.inc()
        # A live room fans out to `conn` from now on: what it fanned out last is the position.
        # A room still subscribing reads the stream's end once it is live (`ready_id`).
        position = room.last_id if room.ready.is_set() else None
        room.members.add(conn)
        self.connections.add(conn)
        self._by_tag[conn.tag] = conn
        self._by_user.setdefault(user_key(conn.user), set()).add(conn)
        try:
            async with asyncio.timeout(self.join_timeout):
                await room.ready.wait()
                assert room.subscription is not None
                await room.subscription.live()
        except TimeoutError:
            raise BrokerUnavailable("the room's subscription did not become live in time") from None
        return room.ready_id if position is None else position

    async def replay(
        self,
        conn: Connection,
        *,
        since: StreamId | None,
        resume: bool,
        history: int,
        backlog: Backlog | None = None,
    ) -> None:
        """Queue what the client missed (or recent history), then switch it to live delivery.

        `resume` says the client sent `since`; `since` is None when that value was malformed.
        `backlog` holds what the join already read (chorus.joins); the rest is read here.
        """
        backlog = backlog or Backlog()
        entries: list[Entry] | None = None
        if resume and since is not None:
            entries = backlog.after
            if entries is None:
                entries = await self.broker.read_after(conn.room, since, self.replay_limit)
        if resume and entries is None:
            conn.offer(resync_frame(conn.room), force=True)
            metrics.RESYNCS.inc()
        if entries is None:
            # A join shows messages as they stand now; a resume replays the changes themselves.
            recent = backlog.recent
            if recent is None:
                recent = await self.broker.recent_with_changes(conn.room, history)
            frames = fold(recent)[-history:] if history > 0 else []
            floor = recent[-1].id if recent else None
        else:
            frames = [entry.frame for entry in entries]
            floor = entries[-1].id if entries else since
        for frame in frames:
            conn.offer(frame.decode(), force=True)
        metrics.MESSAGES_DELIVERED.inc(len(frames))
        conn.go_live(floor)

    def leave(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._by_tag.get(conn.tag) is conn:
            del self._by_tag[conn.tag]
        mine = self._by_user.get(user_key(conn.user))
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self._by_user[user_key(conn.user)]
        room = self.rooms.get(conn.room)
        if room is None:
            return
        room.members.discard(conn)
        if not room.members:
            del self.rooms[room.name]
            metrics.ROOMS.dec()
            room.presence.cancel()
            if room.task is not None:
                room.task.cancel()

    async def close(self) -> None:
        tasks = [room.task for room in self.rooms.values() if room.task is not None]
        for task in tasks:
            task.cancel()
        for room in self.rooms.values():
            room.presence.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.rooms.clear()

    def last_id(self, room: str) -> StreamId:
        """The newest id this replica has seen in `room` (ZERO_ID when it has no such room)."""
        found = self.rooms.get(room)
        return found.last_id if found is not None else ZERO_ID

    def max_queue_depth(self) -> int:
        """The deepest send queue in the process, without walking every socket."""
        return Connection.deepest_backlog()

    # -- the fleet's control channel: a user's sockets on every replica ----------------------

    async def disconnect_user(self, user: str) -> None:
        """Close every socket of `user` on every replica with 4001 (through the broker)."""
        await self.broker.publish_control(orjson.dumps({"op": CONTROL_DISCONNECT, "user": user_key(user)}))

    async def announce_read(self, conn: Connection, msg_id: str) -> None:
        """Tell the user's other sockets, on every replica, that their read marker moved."""
        body = {"op": CONTROL_READ, "user": user_key(conn.user), "room": conn.room, "id": msg_id}
        await self.broker.publish_control(orjson.dumps({**body, "sender": conn.tag.decode()}))

    async def run_control(self) -> None:
        """Act on control events for this replica's sockets, for as long as the process serves.

        A control event published while the subscription is being made again is lost (pub/sub
        has no back-fill for it): a disconnect should be repeated by the caller if it matters.
        """
        while True:
            try:
                async with self.broker.subscribe_control() as subscription:
                    while True:
                        event = await subscription.get()
                        if not isinstance(event, Gap):
                            self._control(event.payload)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control subscription failed; making it again")
                await asyncio.sleep(RETRY_SECONDS)

    def _control(self, payload: bytes) -> None:
        try:
            event = orjson.loads(payload)
            conns = list(self._by_user.get(str(event["user"]), ()))
            if event["op"] == CONTROL_DISCONNECT:
                for conn in conns:
                    conn.close(CLOSE_DISCONNECTED, "disconnected by the server")
            elif event["op"] == CONTROL_READ:
                frame = read_frame(str(event["room"]), str(event["id"]))
                for conn in conns:
                    if conn.tag.decode() != event.get("sender"):
                        conn.deliver_event(frame)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.warning("ignored an undecodable control event (%d bytes)", len(payload))

    # -- per-room subscription --------------------------------------------------------------

    async def _run_room(self, room: Room) -> None:
        try:
            async with self.broker.subscribe(room.name) as subscription:
                room.subscription = subscription
                await subscription.live()
                room.last_id = await self._retry(f"room {room.name}", lambda: self.broker.last_id(room.name))
                room.ready_id = room.last_id
                room.ready.set()
                while True:
                    event = await subscription.get()
                    if isinstance(event, Gap):
                        await self._backfill(room)
                    else:
                        self._fanout(room, event.payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("room %s stopped unexpectedly; closing its members", room.name)
            for conn in list(room.members):
                conn.close(CLOSE_INTERNAL_ERROR, "room failed")
            if self.rooms.get(room.name) is room:
                del self.rooms[room.name]
                metrics.ROOMS.dec()

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` until the broker answers: a room's subscription outlives a Redis outage."""
        while True:
            try:
                return await call()
            except BrokerUnavailable as exc:
                log.warning("%s: broker unavailable (%s); retrying", what, exc)
                await asyncio.sleep(RETRY_SECONDS)

    def _fanout(self, room: Room, payload: bytes) -> None:
        try:
            msg = decode_published(payload)
        except (ValueError, UnicodeDecodeError, TypeError):
            if self._fanout_event(room, payload):
                return
            metrics.MESSAGES_DROPPED.labels(metrics.DROP_UNDECODABLE).inc()
            log.warning("dropped an undecodable payload in room %s (%d bytes)", room.name, len(payload))
            return
        if msg.id <= room.last_id:
            return  # already delivered by a back-fill
        room.last_id = msg.id
        sender = self._by_tag.get(msg.sender)
        frame = msg.frame
        msg_id = msg.id
        hold: Hold = self._hold_turn
        if self.coalescer.window:
            now = time.monotonic()
            gap = min(now - room.last_fanout, MEAN_GAP_CAP)
            room.mean_gap += (gap - room.mean_gap) * MEAN_GAP_WEIGHT
            room.last_fanout = now
            hold = self.coalescer.hold(room.mean_gap)
        delivered = 0
        for conn in room.members:
            if conn is not sender and conn.deliver(msg_id, frame, hold):
                delivered += 1
        metrics.MESSAGES_DELIVERED.inc(delivered)
        metrics.FANOUT_LATENCY.observe(max(0.0, time.time() - msg.ts))

    def _fanout_event(self, room: Room, payload: bytes) -> bool:
        """Fold a presence payload into the room's next diff frame, or deliver an ephemeral one
        (typing) to every member but its sender; False when the payload is neither."""
        try:
            event = decode_event(payload)
        except (UnicodeDecodeError, TypeError, AttributeError):
            return False
        if event is None:
            return False
        sender = self._by_tag.get(event[0])
        if room.presence.add(event[1], sender):
            return True
        for conn in room.members:
            if conn is not sender:
                conn.deliver_event(event[1])
        return True

    async def _backfill(self, room: Room) -> None:
        entries = await self._retry(
            f"back-fill of {room.name}",
            lambda: self.broker.read_after(room.name, room.last_id, self.replay_limit),
        )
        if entries is None:
            log.warning("room %s: history no longer holds %s; sending resync", room.name, room.last_id)
            frame = resync_frame(room.name)
            for conn in room.members:
                if conn.pending is None:
                    conn.offer(frame, force=True)
            metrics.RESYNCS.inc(len(room.members))
            room.last_id = await self._retry(f"room {room.name}", lambda: self.broker.last_id(room.name))
            return
        for entry in entries:
            sender = self._by_tag.get(entry.sender)
            frame = entry.frame.decode()
            delivered = 0
            for conn in room.members:
                if conn is not sender and conn.deliver(entry.id, frame):
                    delivered += 1
            metrics.MESSAGES_DELIVERED.inc(delivered)
            room.last_id = entry.id
        if entries:
            log.info("room %s: back-filled %d messages after a pub/sub gap", room.name, len(entries))
        metrics.BROKER_BACKFILLED.inc(len(entries))
