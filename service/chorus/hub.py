"""Local fan-out: one broker subscription per room per process, one bounded queue per socket.

The naive design subscribes once per WebSocket and parses each message once per member. Here
a room's single subscription decodes a message once and hands the same frame string to every
member's queue; each connection's own sender task writes it out. A member whose queue is full
is closed with 1013 at once and its queue freed, so one slow reader cannot grow memory or
delay anyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from broadcaster import Event

from . import metrics
from .backend import GAP
from .broker import Broker, BrokerUnavailable, Entry, channel_key
from .protocol import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_TRY_AGAIN_LATER,
    ZERO_ID,
    StreamId,
    decode_event,
    decode_published,
    resync_frame,
)
from .sockets import FrameWriter

log = logging.getLogger("chorus.hub")

CLOSE_TIMEOUT: Final = 5.0
RETRY_SECONDS: Final = 0.5


class Connection:
    """A member's send side: frames go straight to the socket, or to a bounded queue.

    A sender task exists only while there is a backlog (the socket was not writable, or
    frames are queued ahead): an idle socket carries no task, which is most sockets.
    """

    __slots__ = (
        "_close_task",
        "_reason",
        "_sender",
        "close_code",
        "closed_with",
        "closing",
        "floor",
        "limit",
        "on_close",
        "pending",
        "queue",
        "room",
        "send",
        "tag",
        "user",
        "writer",
    )

    def __init__(
        self,
        *,
        room: str,
        user: str,
        tag: bytes,
        limit: int,
        send: Callable[[str], Awaitable[None]],
        close: Callable[[int, str], Awaitable[None]],
    ) -> None:
        self.room = room
        self.user = user
        self.tag = tag
        self.limit = limit
        self.send = send
        self.writer = FrameWriter.for_send(send)
        self.on_close = close
        self.queue: deque[str] = deque()
        # While the join replays history, live messages wait here (bounded like the queue);
        # afterwards `floor` drops live copies of what the replay already sent.
        self.pending: list[tuple[StreamId, str]] | None = []
        self.floor: StreamId | None = None
        self.closing = False
        self.closed_with: int | None = None
        self.close_code: int | None = None
        self._reason = ""
        self._sender: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None

    def _kick(self) -> None:
        """Make sure a sender is draining the queue."""
        sender = self._sender
        if sender is None or sender.done():
            self._sender = asyncio.create_task(self._run_sender())

    def offer(self, frame: str, *, force: bool = False) -> bool:
        """Queue a frame; on overflow close the socket with 1013 and free the queue."""
        if self.closing:
            return False
        queue = self.queue
        if len(queue) >= self.limit and not force:
            metrics.MESSAGES_DROPPED.labels(metrics.DROP_SLOW_CONSUMER).inc(len(queue) + 1)
            log.info("closing slow consumer %s in room %s (send queue full)", self.user, self.room)
            self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
            return False
        writer = self.writer
        if not queue and writer is not None and writer.writable():
            # Nothing queued ahead and the socket takes it now: write it from here, which
            # saves waking the sender task once per delivery (the fan-out's biggest cost).
            try:
                writer.write((frame,))
            except Exception as exc:  # the socket went away; as the sender does, stop
                log.debug("write to %s failed: %r", self.user, exc)
                self.closing = True
                return False
            return True
        queue.append(frame)
        self._kick()
        return True

    def deliver(self, msg_id: StreamId, frame: str) -> bool:
        pending = self.pending
        if pending is not None:
            if len(pending) >= self.limit:
                self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
                return False
            pending.append((msg_id, frame))
            return True
        floor = self.floor
        if floor is not None:
            if msg_id <= floor:
                return False
            self.floor = None
        return self.offer(frame)

    def deliver_event(self, frame: str) -> bool:
        """Queue a frame outside the message stream (presence), after the replay like live ones."""
        if self.pending is not None:
            return self.deliver(ZERO_ID, frame)
        return self.offer(frame)

    def go_live(self, floor: StreamId | None) -> None:
        """End the replay: flush what arrived meanwhile, skipping what the replay sent."""
        pending, self.pending = self.pending or [], None
        self.floor = floor
        for msg_id, frame in pending:
            # ZERO_ID is no message's id: it marks an event held back during the replay.
            if msg_id == ZERO_ID:
                self.offer(frame)
            else:
                self.deliver(msg_id, frame)

    def close_after_flush(self, code: int, reason: str) -> None:
        """Send what is queued, then close (used by the drain)."""
        if self.closing or self.close_code is not None:
            return
        self.close_code = code
        self._reason = reason
        self._kick()

    def close(self, code: int, reason: str) -> None:
        """Close now: drop what is queued and stop the sender."""
        if self.closing:
            return
        self.closing = True
        self.closed_with = code
        self.queue.clear()
        self.pending = None
        if self._sender is not None and self._sender is not asyncio.current_task():
            self._sender.cancel()
        self._close_task = asyncio.create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.on_close(code, reason), CLOSE_TIMEOUT)
        except Exception as exc:  # the peer may be gone already; nothing left to tell it
            log.debug("close %s for %s failed: %r", code, self.user, exc)

    async def wait_closed(self) -> None:
        """Stop the sender and wait for a pending close frame to go out."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        for task in (self._sender, self._close_task):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    @property
    def depth(self) -> int:
        return len(self.queue)

    async def _run_sender(self) -> None:
        queue = self.queue
        send = self.send
        writer = self.writer
        try:
            while queue:
                if writer is not None:
                    # The whole backlog in one write, once uvicorn's flow control allows.
                    await writer.wait_writable()
                    writer.write(queue)
                    queue.clear()
                else:
                    await send(queue.popleft())
            # No await between the empty queue and returning: an `offer` that comes after
            # finds this task done and starts another.
            if self.close_code is not None:
                self.close(self.close_code, self._reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away under us; the endpoint cleans up
            log.debug("sender for %s stopped: %r", self.user, exc)
            self.closing = True
            queue.clear()


class Room:
    __slots__ = ("channel", "last_id", "members", "name", "ready", "task")

    def __init__(self, name: str) -> None:
        self.name = name
        self.channel = channel_key(name)
        self.members: set[Connection] = set()
        self.last_id: StreamId = ZERO_ID
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Hub:
    """Rooms with members on this replica, and their one subscription each."""

    def __init__(self, broker: Broker, *, join_timeout: float, replay_limit: int) -> None:
        self.broker = broker
        self.join_timeout = join_timeout
        self.replay_limit = replay_limit
        self.rooms: dict[str, Room] = {}
        self.connections: set[Connection] = set()
        self._by_tag: dict[bytes, Connection] = {}

    async def join(self, conn: Connection) -> None:
        """Register `conn` and wait until its room's subscription is live.

        From then on every message published reaches `conn` (buffered until `replay` ends).
        Raises BrokerUnavailable when the subscription cannot be made live in time.
        """
        room = self.rooms.get(conn.room)
        if room is None:
            room = self.rooms[conn.room] = Room(conn.room)
            room.task = asyncio.create_task(self._run_room(room), name=f"room:{conn.room}")
            metrics.ROOMS.inc()
        room.members.add(conn)
        self.connections.add(conn)
        self._by_tag[conn.tag] = conn
        try:
            async with asyncio.timeout(self.join_timeout):
                await room.ready.wait()
                await self.broker.wait_live(room.channel)
        except TimeoutError:
            raise BrokerUnavailable("the room's subscription did not become live in time") from None

    async def replay(self, conn: Connection, *, since: StreamId | None, resume: bool, history: int) -> None:
        """Queue what the client missed (or recent history), then switch it to live delivery.

        `resume` says the client sent `since`; `since` is None when that value was malformed.
        """
        entries: list[Entry] | None = None
        if resume and since is not None:
            entries = await self.broker.read_after(conn.room, since, self.replay_limit)
        if resume and entries is None:
            conn.offer(resync_frame(conn.room), force=True)
            metrics.RESYNCS.inc()
        if entries is None:
            entries = await self.broker.recent(conn.room, history)
            floor = entries[-1].id if entries else None
        else:
            floor = entries[-1].id if entries else since
        for entry in entries:
            conn.offer(entry.frame.decode(), force=True)
        metrics.MESSAGES_DELIVERED.inc(len(entries))
        conn.go_live(floor)

    def leave(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._by_tag.get(conn.tag) is conn:
            del self._by_tag[conn.tag]
        room = self.rooms.get(conn.room)
        if room is None:
            return
        room.members.discard(conn)
        if not room.members:
            del self.rooms[room.name]
            metrics.ROOMS.dec()
            if room.task is not None:
                room.task.cancel()

    async def close(self) -> None:
        tasks = [room.task for room in self.rooms.values() if room.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.rooms.clear()

    def max_queue_depth(self) -> int:
        return max((conn.depth for conn in self.connections), default=0)

    # -- per-room subscription --------------------------------------------------------------

    async def _run_room(self, room: Room) -> None:
        try:
            async with self.broker.broadcast.subscribe(room.channel) as subscriber:
                await self.broker.wait_live(room.channel)
                room.last_id = await self._retry(lambda: self.broker.last_id(room.name))
                room.ready.set()
                while True:
                    event: Event = await subscriber.get()
                    if event.message is GAP:
                        await self._backfill(room)
                    else:
                        self._fanout(room, event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("room %s stopped unexpectedly; closing its members", room.name)
            for conn in list(room.members):
                conn.close(CLOSE_INTERNAL_ERROR, "room failed")
            if self.rooms.get(room.name) is room:
                del self.rooms[room.name]
                metrics.ROOMS.dec()

    async def _retry(self, call: Callable[[], Awaitable[StreamId]]) -> StreamId:
        while True:
            try:
                return await call()
            except BrokerUnavailable as exc:
                log.warning("broker unavailable (%s); retrying", exc)
                await asyncio.sleep(RETRY_SECONDS)

    def _fanout(self, room: Room, event: Event) -> None:
        payload: bytes = event.message  # type: ignore[assignment]
        try:
            msg = decode_published(payload)
        except (ValueError, UnicodeDecodeError, TypeError):
            if self._fanout_event(room, payload):
                return
            metrics.MESSAGES_DROPPED.labels(metrics.DROP_UNDECODABLE).inc()
            log.warning("dropped an undecodable payload on %s (%d bytes)", room.channel, len(payload or b""))
            return
        if msg.id <= room.last_id:
            return  # already delivered by a back-fill
        room.last_id = msg.id
        sender = self._by_tag.get(msg.sender)
        frame = msg.frame
        msg_id = msg.id
        delivered = 0
        for conn in room.members:
            if conn is not sender and conn.deliver(msg_id, frame):
                delivered += 1
        metrics.MESSAGES_DELIVERED.inc(delivered)
        metrics.FANOUT_LATENCY.observe(max(0.0, time.time() - msg.ts))

    def _fanout_event(self, room: Room, payload: bytes) -> bool:
        """Deliver a presence payload to every member but its sender; False when it is not one."""
        try:
            event = decode_event(payload)
        except (UnicodeDecodeError, TypeError, AttributeError):
            return False
        if event is None:
            return False
        sender = self._by_tag.get(event[0])
        for conn in room.members:
            if conn is not sender:
                conn.deliver_event(event[1])
        return True

    async def _backfill(self, room: Room) -> None:
        entries = await self._retry_entries(room)
        if entries is None:
            log.warning("room %s: history no longer holds %s; sending resync", room.name, room.last_id)
            frame = resync_frame(room.name)
            for conn in room.members:
                if conn.pending is None:
                    conn.offer(frame, force=True)
            metrics.RESYNCS.inc(len(room.members))
            room.last_id = await self._retry(lambda: self.broker.last_id(room.name))
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

    async def _retry_entries(self, room: Room) -> list[Entry] | None:
        while True:
            try:
                return await self.broker.read_after(room.name, room.last_id, self.replay_limit)
            except BrokerUnavailable as exc:
                log.warning("back-fill of %s: broker unavailable (%s); retrying", room.name, exc)
                await asyncio.sleep(RETRY_SECONDS)
