"""A member's send side: frames straight to the socket, else a bounded queue and a sender.

A member whose queue is full is closed with 1013 at once and its queue freed, so one slow
reader cannot grow memory or delay anyone else. A member's fan-out frames of one event-loop
turn go out in one write (`Coalescer`), or of one `CHORUS_COALESCE_SECONDS` window when set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import ClassVar, Final

from . import metrics
from .protocol import CLOSE_TRY_AGAIN_LATER, ZERO_ID, StreamId
from .sockets import FrameWriter

log = logging.getLogger("chorus.connection")

CLOSE_TIMEOUT: Final = 5.0
# Takes a member whose frames are held, to flush them later (`Coalescer.hold`).
Hold = Callable[["Connection"], None]


class Coalescer:
    """One per process: a member's fan-out frames of one event-loop turn go out in one write.

    The first frame a member gets in a turn is held, and one flush per turn is scheduled with
    `loop.call_soon`: it runs after every callback already ready, so after the room tasks the
    pub/sub reader woke with the same read (under load one read carries many messages, and a
    room task fans out all it has queued without yielding). A lone message waits for no timer:
    the flush is the next thing the loop does. The write per member per fan-out is most of a
    fan-out's cost; a busy loop has longer turns, so batching grows with the load by itself.

    With `window` > 0 (`CHORUS_COALESCE_SECONDS`), a busy room (its mean gap between fan-outs
    under `window`) holds its members' frames for a timer about one mean gap away, so about
    two fan-outs share each write (half the writes) for at most that gap, never more than
    `window`, of added latency. Sized from the rate because the first extra message per write
    saves half the writes and each further one less (a fixed window holds a fast room longer
    than the saving needs). A quiet room still flushes per turn.
    """

    __slots__ = ("_held", "_timed", "_timer", "_turn", "window")

    def __init__(self, window: float = 0.0) -> None:
        self.window = window
        self._held: list[Connection] = []  # flushed at the end of this turn
        self._turn: asyncio.Handle | None = None
        self._timed: list[Connection] = []  # flushed when the timer fires
        self._timer: asyncio.TimerHandle | None = None

    def hold(self, mean_gap: float) -> Hold:
        """Called once per fan-out with the room's mean seconds between fan-outs: what holds
        the members' frames (pass it to `Connection.deliver`)."""
        if mean_gap < self.window:
            # One timer for every busy room: a room that joins a running timer waits less.
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(mean_gap, self._flush_timed)
            return self._timed.append
        return self.add

    def add(self, conn: Connection) -> None:
        """Hold `conn`'s frames until the end of this turn."""
        self._held.append(conn)
        if self._turn is None:
            self._turn = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._turn = None
        held, self._held = self._held, []
        _flush(held)

    def _flush_timed(self) -> None:
        self._timer = None
        held, self._timed = self._timed, []
        _flush(held)


def _flush(held: list[Connection]) -> None:
    saved = 0
    for conn in held:
        saved += conn.flush_held()
    if saved:
        metrics.WRITES_COALESCED.inc(saved)


class Connection:
    """A member's send side: frames go straight to the socket, or to a bounded queue.

    A sender task exists only while there is a backlog (the socket was not writable, or
    frames are queued ahead): an idle socket carries no task, which is most sockets.
    """

    # Connections that started a sender (had a backlog) since the gauges sampler last looked:
    # it reads these each second instead of walking every socket (docs/perf/idle.md).
    backlogged: ClassVar[set[Connection]] = set()

    __slots__ = (
        "_close_task",
        "_reason",
        "_sender",
        "close_code",
        "closed_with",
        "closing",
        "floor",
        "held",
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
        # A list, not a deque: an empty deque allocates a 64-slot block (760 B per idle socket,
        # tracemalloc); the queue is short and written out whole (popleft only without a writer).
        self.queue: list[str] = []
        # Frames waiting for the coalescer's flush; the queue is empty while there are any.
        self.held: list[str] | None = None
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
            Connection.backlogged.add(self)

    @classmethod
    def deepest_backlog(cls) -> int:
        """The longest send queue in this process (frames held for a coalesced write aside:
        they go out within the window); forgets the connections whose backlog is gone."""
        deepest = 0
        for conn in list(cls.backlogged):
            depth = len(conn.queue)
            if depth == 0 and (conn._sender is None or conn._sender.done()):
                cls.backlogged.discard(conn)
            deepest = max(deepest, depth)
        return deepest

    def offer(self, frame: str, *, force: bool = False, hold: Hold | None = None) -> bool:
        """Queue a frame; on overflow close the socket with 1013 and free the queue.

        With `hold` (from the `Coalescer`), a frame that could be written now is held for its
        flush instead.
        """
        if self.closing:
            return False
        queue = self.queue
        held = self.held
        if held is not None:
            if len(held) >= self.limit and not force:
                return self._overflow(len(held))
            held.append(frame)  # behind the frames already held, to keep the order
            return True
        if len(queue) >= self.limit and not force:
            return self._overflow(len(queue))
        writer = self.writer
        if not queue and writer is not None and writer.writable():
            if hold is not None and self.close_code is None:
                self.held = [frame]
                hold(self)
                return True
            # Nothing queued ahead and the socket takes it now: write it from here, which
            # saves waking the sender task once per delivery (the fan-out's biggest cost).
            return self._write(writer, (frame,))
        queue.append(frame)
        self._kick()
        return True

    def _overflow(self, queued: int) -> bool:
        metrics.MESSAGES_DROPPED.labels(metrics.DROP_SLOW_CONSUMER).inc(queued + 1)
        log.info("closing slow consumer %s in room %s (send queue full)", self.user, self.room)
        self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
        return False

    def _write(self, writer: FrameWriter, frames: Iterable[str]) -> bool:
        try:
            writer.write(frames)
        except Exception as exc:  # the socket went away; as the sender does, stop
            log.debug("write to %s failed: %r", self.user, exc)
            self.closing = True
            return False
        return True

    def flush_held(self) -> int:
        """The coalescer's flush: write the held frames in one go, or queue them.

        Returns the writes saved: the frames that shared the write with the first one.
        """
        held, self.held = self.held, None
        if not held or self.closing:
            return 0
        writer = self.writer
        if writer is not None and writer.writable():
            return len(held) - 1 if self._write(writer, held) else 0
        self.queue.extend(held)
        self._kick()
        return 0

    def deliver(self, msg_id: StreamId, frame: str, hold: Hold | None = None) -> bool:
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
        return self.offer(frame, hold=hold)

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
        held, self.held = self.held, None
        self.queue.extend(held or ())  # the sender sends them before the close
        self._kick()

    def close(self, code: int, reason: str) -> None:
        """Close now: drop what is queued and stop the sender."""
        if self.closing:
            return
        self.closing = True
        self.closed_with = code
        self.queue.clear()
        self.held = None
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
        return len(self.queue) + len(self.held or ())

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
                    await send(queue.pop(0))
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
