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


# -- a room's messages (chorus.broker)


def channel(room: str) -> str:
    """The room's pub/sub channel (a shard channel in a Cluster): messages and presence events."""
    return _key("msg", room)


def stream(room: str) -> str:
    """The room's Redis Stream: its history, and the source of message ids."""
    return _key("stream", room)


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
