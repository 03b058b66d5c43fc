"""A member's send side: frames straight to the socket, else a bounded queue and a sender.

A member whose queue is full is closed with 1013 at once and its queue freed, so one slow
reader cannot grow memory or delay anyone else.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from . import metrics
from .protocol import CLOSE_TRY_AGAIN_LATER, ZERO_ID, StreamId
from .sockets import FrameWriter

log = logging.getLogger("chorus.connection")

CLOSE_TIMEOUT: Final = 5.0


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
