"""`chorus.client`: an asyncio client for the Chorus WebSocket protocol.

    async with connect("ws://127.0.0.1:8000", "lobby", username="bot") as room:
        async for event in room:
            if isinstance(event, Message) and event.text == "ping":
                await room.send("pong")

A room reconnects by itself with full-jitter exponential backoff, honours `Retry-After` on a
refused handshake, resumes with `since=<last id>` and drops messages it has already seen;
`room.stats` counts what happened. See `Room` and `Reconnect` for the rules.
"""

from __future__ import annotations

from ..protocol import CLOSE_DISCONNECTED
from .errors import (
    ChorusError,
    Disconnected,
    HandshakeRefused,
    NotConnected,
    SendRejected,
    SendUnconfirmed,
)
from .events import (
    STREAM_TYPES,
    Ack,
    Delete,
    Edit,
    Error,
    Event,
    Message,
    Presence,
    Reaction,
    Read,
    Resync,
    Typing,
    Welcome,
    parse_frame,
)
from .retry import FATAL_CLOSE_CODES, RETRYABLE_STATUSES, Reconnect
from .room import Room, Token, connect
from .stats import Stats

__all__ = [
    "CLOSE_DISCONNECTED",
    "FATAL_CLOSE_CODES",
    "RETRYABLE_STATUSES",
    "STREAM_TYPES",
    "Ack",
    "ChorusError",
    "Delete",
    "Disconnected",
    "Edit",
    "Error",
    "Event",
    "HandshakeRefused",
    "Message",
    "NotConnected",
    "Presence",
    "Reaction",
    "Read",
    "Reconnect",
    "Resync",
    "Room",
    "SendRejected",
    "SendUnconfirmed",
    "Stats",
    "Token",
    "Typing",
    "Welcome",
    "connect",
    "parse_frame",
]
