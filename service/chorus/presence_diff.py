"""Presence batching: a room's joins and leaves reach its members as one diff per interval.

Presence scripts (chorus.presence) publish one event per first join or last leave, in order,
on the room's channel. Handing each to every member costs N*N/2 frames for a wave of N joins
into one room (2,000 joins took 25 s). Each replica instead folds a room's events over
`interval` into one frame, `{"type":"presence","room":R,"joins":[..],"leaves":[..],"online":N}`
(Phoenix's presence_diff), and above `max_members` users sends only `online` (Ably's occupancy).
A join and a leave of the same user within one interval cancel out; the count is the newest.
As before batching, the connection whose join is announced does not hear its own name (its
welcome said it); it gets the diff without it. Above `max_members` everyone gets the count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable

import orjson

from .protocol import presence_diff_frame


class PresenceDiff:
    """One room's pending presence changes on this replica; `flush` is called at most once per interval."""

    __slots__ = (
        "_changes",
        "_deliver",
        "_handle",
        "_joiners",
        "_last_flush",
        "_online",
        "interval",
        "max_members",
        "room",
    )

    def __init__(
        self,
        room: str,
        deliver: Callable[[str, dict[Hashable, str | None]], None],
        *,
        interval: float,
        max_members: int,
    ) -> None:
        self.room = room
        self.interval = interval
        self.max_members = max_members
        self._deliver = deliver
        self._changes: dict[str, bool] = {}  # user shown -> joined (True) or left (False), in order
        self._joiners: dict[str, Hashable] = {}  # user shown -> the local connection that joined
        self._online: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._last_flush = -float("inf")

    def add(self, frame: str, sender: Hashable | None = None) -> bool:
        """Fold one presence event frame (as the scripts publish it); False when it is not one.

        `sender` is the local connection whose join this is, if any.
        """
        try:
            body = orjson.loads(frame)
            event, user, online = body["event"], body["user"], body["online"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False
        if event not in ("join", "leave") or not isinstance(user, str) or not isinstance(online, int):
            return False
        joined = event == "join"
        if self._changes.get(user) is (not joined):
            del self._changes[user]  # joined and left (or the reverse) within one interval
        else:
            self._changes[user] = joined
        if joined and sender is not None:
            self._joiners[user] = sender
        elif not joined:
            self._joiners.pop(user, None)
        self._online = online
        self._schedule()
        return True

    def _schedule(self) -> None:
        if self._handle is not None:
            return
        wait = self._last_flush + self.interval - time.monotonic()
        if wait <= 0:
            self.flush()
        else:
            self._handle = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        """Deliver what changed since the last flush as one frame (nothing when nothing did)."""
        self._handle = None
        self._last_flush = time.monotonic()
        if self._online is None:
            return
        online, self._online = self._online, None
        changes, self._changes = self._changes, {}
        joiners, self._joiners = self._joiners, {}
        if online > self.max_members:
            self._deliver(presence_diff_frame(self.room, [], [], online), {})
            return
        joins = [user for user, joined in changes.items() if joined]
        leaves = [user for user, joined in changes.items() if not joined]
        personal: dict[Hashable, str | None] = {}
        for user, conn in joiners.items():
            if changes.get(user):
                # At most max_members of these per interval, so this stays small.
                theirs = [name for name in joins if name != user]
                mine = presence_diff_frame(self.room, theirs, leaves, online)
                personal[conn] = mine if theirs or leaves else None
        self._deliver(presence_diff_frame(self.room, joins, leaves, online), personal)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
