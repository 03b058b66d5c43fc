"""Redis key and channel names, listed once: `chorus:{kind}:{tag}`, the tag in braces.

The braces are Redis Cluster's hash tag: a room's keys and channel share the tag `{room}`, so
they live on one shard and one Lua script may touch them all. Every module names Redis keys
through these builders; README and docs/security.md say `chorus:msg:{room}` etc. by the same
rule.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "chorus"


def _key(kind: str, tag: str) -> str:
    return f"{PREFIX}:{kind}:{{{tag}}}"


# -- a room's messages (chorus.broker, chorus.redis_broker)


def channel(room: str) -> str:
    """The room's pub/sub channel (a shard channel in a Cluster): messages and presence events."""
    return _key("msg", room)


def stream(room: str) -> str:
    """The room's Redis Stream: its history, and the source of message ids."""
    return _key("stream", room)


def state(room: str) -> str:
    """Hash: what the stream's changes imply for checks (deletions, reactions by user and emoji).

    Bounded by the stream: every field is also in `state_index(room)`, scored by its target's
    ms, and each edit/delete/reaction script, after its XADD, drops up to STATE_PRUNE_BATCH
    (16) fields whose target is older than the stream's first entry (chorus.scripts), while
    adding at most 3. One hash plus one index,
    both named here and passed as KEYS, so a Cluster runs the scripts on the room's shard with
    no key built inside Lua; plain messages never touch either.
    """
    return _key("state", room)


def state_index(room: str) -> str:
    """Sorted set: each `state(room)` field -> its target's ms, so stale fields go oldest first."""
    return _key("state-index", room)


def typing(room: str) -> str:
    """Sorted set: user key -> when (ms) the user's last typing event went out in the room."""
    return _key("typing", room)


def read_markers(user: str) -> str:
    """Hash: room -> the id of the newest message the user has read there (rooms joined)."""
    return _key("read", user)


def control() -> str:
    """The fleet's control channel: disconnects and read markers for a user's sockets anywhere."""
    return _key("control", "fleet")


def probe(name: str) -> str:
    """A readiness self-probe channel that one process publishes to and subscribes to."""
    return _key("probe", name)


# -- presence (chorus.presence)


def presence_entries(room: str) -> str:
    """Hash: connection entry -> user key, for the room."""
    return _key("presence", room)


def online(room: str) -> str:
    """Hash: user key -> connections online in the room."""
    return _key("online", room)


def names(room: str) -> str:
    """Hash: user key -> the name shown for that user in the room."""
    return _key("names", room)


def heartbeat(owner: str) -> str:
    """A process's presence heartbeat (expires when the process stops beating)."""
    return _key("heartbeat", owner)


def presence_rooms(owner: str) -> str:
    """Set: the rooms in which a process has presence entries."""
    return _key("presence-rooms", owner)


LOAD: Final = f"{PREFIX}:load"  # hash: process -> its socket count and readiness (chorus.rebalance)
PRESENCE_REPLICAS: Final = f"{PREFIX}:presence:replicas"  # set of processes with presence entries


# -- limits (chorus.limits)


def connections(user: str) -> str:
    """Sorted set: a user's connections across the cluster, scored by lease expiry."""
    return _key("conns", user)
