"""A join's Redis work in one round trip, once its room's subscription is live.

A join waited on four round trips one after another: the owner's room set (SADD) and the
presence script, the history read (or the resume's read after `since`), and the
`/api/me/rooms` record (HSETNX). None needs another's answer, so with Redis they go in one
`Batch`: one write and one read on one connection instead of four. Everything in it is
idempotent or read-only, so a Cluster may split it by shard. Without Redis (one process, the
memory broker) the join does what it did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from . import keys
from .batch import Batch
from .broker import Broker, BrokerUnavailable, Entry
from .presence import Member, Presence, RedisPresence
from .protocol import ZERO_ID, StreamId
from .redis_broker import entries_from_rows  # the Redis broker's decoding of stream rows, shared

log = logging.getLogger("chorus.joins")


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the join read for `Hub.replay`; None in a field means: read it the usual way."""

    after: list[Entry] | None = None  # a resume: the entries after `since` (None: not held)
    recent: list[Entry] | None = None  # a fresh join: back to the `history`-th newest message


async def enter(
    broker: Broker,
    presence: Presence,
    member: Member,
    *,
    last_id: StreamId,
    since: StreamId | None,
    resume: bool,
    history: int,
    replay_limit: int,
) -> tuple[int, Backlog | None]:
    """Join presence, read the backlog and record the room for the user: users online, and the
    backlog (None when nothing was read here: `Hub.replay` and `Broker.joined` do it then).

    Raises BrokerUnavailable when presence or the read fails; the room record is best effort.
    """
    commands = broker.commands
    if commands is None or not isinstance(presence, RedisPresence):
        return await presence.join(member), None
    batch = Batch(commands)
    online_at = presence.queue_join(batch, member)
    stream = keys.stream(member.room)
    read_at = page = -1
    if resume and since is not None:
        # As Broker.read_after: from the anchor itself, whose absence means history lost it.
        start = "-" if since == ZERO_ID else str(since)
        count = replay_limit if since == ZERO_ID else replay_limit + 1
        read_at = batch.command("XRANGE", stream, start, "+", "COUNT", count)
    elif not resume and history > 0:
        # The first page of Broker.recent_with_changes; the rare join it does not cover (a page
        # of mostly edits and reactions) reads the rest in Hub.replay.
        page = max(history * 2, 64)
        read_at = batch.command("XREVRANGE", stream, "+", "-", "COUNT", page)
    marker_at = batch.command("HSETNX", keys.read_markers(member.key), member.room, str(last_id))
    replies = await batch.run()
    for index, reply in enumerate(replies):
        if index != marker_at:
            _reply(reply)  # presence (its room set included) and the read are not optional
    online = replies[online_at]
    marker = replies[marker_at]
    if isinstance(marker, Exception):
        log.warning("could not record that %s joined %s: %s", member.user, member.room, marker)
    if read_at < 0:
        return int(online), Backlog()
    rows = _reply(replies[read_at])
    if page < 0:
        return int(online), Backlog(after=_after(rows, since))
    messages = sum(1 for _, fields in rows if b"k" not in fields)
    complete = messages >= history or len(rows) < page
    return int(online), Backlog(recent=entries_from_rows(rows[::-1]) if complete else None)


def _reply(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise BrokerUnavailable(str(reply) or type(reply).__name__)
    return reply


def _after(rows: list[tuple[bytes, dict[bytes, bytes]]], since: StreamId | None) -> list[Entry] | None:
    if since == ZERO_ID:
        return entries_from_rows(rows)
    if not rows or rows[0][0] != str(since).encode():
        return None
    return entries_from_rows(rows[1:])
