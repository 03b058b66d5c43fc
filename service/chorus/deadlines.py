"""Token expiry from one timer per process: a socket may not outlive its token.

With JWTs every socket has a deadline hours away. A `call_later` per socket holds a
`TimerHandle` and, under uvloop, a libuv timer of its own for all that time (about 0.4 KiB per
socket, and one more timer for the loop to keep sorted). Here the deadlines sit in one heap and
one timer is armed for the earliest. A socket that closes first cancels its entry, which the
heap drops when it comes up, or at once when cancelled entries outnumber the live ones.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger("chorus.deadlines")

# Below this many entries a heap full of cancelled ones is cheap to keep: no compaction.
COMPACT_ABOVE: Final = 64


class Deadline:
    """One scheduled action; `cancel()` before it runs and it never does."""

    __slots__ = ("action", "at")

    def __init__(self, at: float, action: Callable[[], None]) -> None:
        self.at = at
        self.action: Callable[[], None] | None = action

    def cancel(self) -> None:
        self.action = None


class Deadlines:
    """Actions at wall-clock times (`time.time()`, as a token's `exp`), from one timer."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()  # equal times run in the order they were added
        self._cancelled = 0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = float("inf")

    def __len__(self) -> int:
        """Deadlines still to run (cancelled ones not counted)."""
        return len(self._heap) - self._cancelled

    def at(self, when: float, action: Callable[[], None]) -> Deadline:
        deadline = Deadline(when, action)
        heapq.heappush(self._heap, (when, next(self._order), deadline))
        if when < self._armed_for:
            self._arm()
        return deadline

    def cancel(self, deadline: Deadline | None) -> None:
        if deadline is None or deadline.action is None:
            return
        deadline.cancel()
        self._cancelled += 1
        if self._cancelled > COMPACT_ABOVE and self._cancelled * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].action is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_for = float("inf")

    def _arm(self) -> None:
        self.stop()
        while self._heap and self._heap[0][2].action is None:
            heapq.heappop(self._heap)
            self._cancelled -= 1
        if not self._heap:
            return
        when = self._heap[0][0]
        self._armed_for = when
        self._handle = asyncio.get_running_loop().call_later(max(0.0, when - time.time()), self._run)

    def _run(self) -> None:
        self._handle = None
        self._armed_for = float("inf")
        now = time.time()
        while self._heap and self._heap[0][0] <= now:
            _, _, deadline = heapq.heappop(self._heap)
            action, deadline.action = deadline.action, None
            if action is None:
                self._cancelled -= 1
                continue
            try:
                action()
            except Exception:  # one failed action must not stop the others
                log.exception("a deadline's action failed")
        self._arm()
