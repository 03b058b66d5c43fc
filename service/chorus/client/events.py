"""Server frames as typed events; a frame of a type this client does not know stays an `Event`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..protocol import STREAM_TYPES as PROTOCOL_STREAM_TYPES
from ..protocol import StreamId


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A server frame: its `type` and the frame as received (`raw`).

    Frames of types this client does not know (new server features) arrive as plain `Event`s,
    never as an exception; so do known types whose fields do not parse.
    """

    type: str
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Event):
    """First frame of every connection: the room's subscription on `replica` is live.

    Every message after `last_id` reaches this connection ("0-0": the room was empty; None
    from a server older than the field).
    """

    type: str = "welcome"
    room: str
    user: str
    replica: str
    online: int
    last_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Message(Event):
    """A message in the room, replayed or live; `id` orders it (a Redis Stream id, `ms-seq`).

    `edited_ts`, `deleted` (then `text` is empty) and `reactions` (emoji -> users) are the
    latest-form fields of history and of the replay on join; live, changes come as `Edit`,
    `Delete` and `Reaction` events.
    """

    type: str = "message"
    id: str
    ts: float
    room: str
    user: str
    text: str
    replica: str
    edited_ts: float | None = None
    deleted: bool = False
    reactions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Event):
    """The server stored one of our messages under `id` (`client_id` as we sent it)."""

    type: str = "ack"
    id: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Presence(Event):
    """Who joined and left a room since the last one (`joins`, `leaves`), and how many are online.

    The server batches a room's changes into at most one frame per interval; a room above its
    member threshold sends only `online` (`joins` and `leaves` empty, `counts_only` True).
    Older servers sent one change per frame (`event` "join"/"leave" and `user`): it is read
    into the same fields.
    """

    type: str = "presence"
    room: str
    online: int
    joins: tuple[str, ...] = ()
    leaves: tuple[str, ...] = ()
    counts_only: bool = False
    event: str | None = None  # the older one-change frame only
    user: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Resync(Event):
    """The server could not resume from our last id: what we hold may have a gap."""

    type: str = "resync"
    room: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Event):
    """A frame we sent was not accepted (`code`: invalid, too_large, rate_limited, unavailable)."""

    type: str = "error"
    code: str
    detail: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Edit(Event):
    """Message `target` now reads `text` (edited by `user`, its author or a moderator)."""

    type: str = "edit"
    id: str
    target: str
    room: str
    user: str
    text: str
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete(Event):
    """Message `target` was deleted by `user` (`api` when a backend did it)."""

    type: str = "delete"
    id: str
    target: str
    room: str
    user: str
    ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Reaction(Event):
    """`user` added (`on`) or took back the reaction `emoji` on message `target`."""

    type: str = "reaction"
    id: str
    target: str
    room: str
    user: str
    emoji: str
    on: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Typing(Event):
    """`user` is typing in `room` (ephemeral: never replayed)."""

    type: str = "typing"
    room: str
    user: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Read(Event):
    """Our read marker in `room` moved to `id` on another of our sockets."""

    type: str = "read"
    room: str
    id: str


def _welcome(f: Mapping[str, Any]) -> Event:
    return Welcome(
        room=_s(f, "room"),
        user=_s(f, "user"),
        replica=_s(f, "replica"),
        online=_i(f, "online"),
        last_id=_opt_s(f, "last_id"),
        raw=f,
    )


def _message(f: Mapping[str, Any]) -> Event:
    deleted = f.get("deleted") is True
    return Message(
        id=_s(f, "id"),
        ts=_f(f, "ts"),
        room=_s(f, "room"),
        user=_s(f, "user"),
        text="" if deleted and "text" not in f else _s(f, "text"),
        replica=_s(f, "replica"),
        edited_ts=None if f.get("edited_ts") is None else _f(f, "edited_ts"),
        deleted=deleted,
        reactions=_reactions(f.get("reactions")),
        raw=f,
    )


def _reactions(value: object) -> Mapping[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(users, list) for users in value.values()):
        raise TypeError("reactions")
    return {str(emoji): tuple(str(user) for user in users) for emoji, users in value.items()}


def _edit(f: Mapping[str, Any]) -> Event:
    return Edit(
        id=_s(f, "id"), target=_s(f, "target"), room=_s(f, "room"), user=_s(f, "user"),
        text=_s(f, "text"), ts=_f(f, "ts"), raw=f,
    )  # fmt: skip


def _delete(f: Mapping[str, Any]) -> Event:
    return Delete(
        id=_s(f, "id"), target=_s(f, "target"), room=_s(f, "room"), user=_s(f, "user"), ts=_f(f, "ts"), raw=f
    )


def _reaction(f: Mapping[str, Any]) -> Event:
    on = f["on"]
    if not isinstance(on, bool):
        raise TypeError("on")
    return Reaction(
        id=_s(f, "id"), target=_s(f, "target"), room=_s(f, "room"), user=_s(f, "user"),
        emoji=_s(f, "emoji"), on=on, raw=f,
    )  # fmt: skip


def _typing(f: Mapping[str, Any]) -> Event:
    return Typing(room=_s(f, "room"), user=_s(f, "user"), raw=f)


def _read(f: Mapping[str, Any]) -> Event:
    return Read(room=_s(f, "room"), id=_s(f, "id"), raw=f)


def _ack(f: Mapping[str, Any]) -> Event:
    return Ack(id=_s(f, "id"), client_id=_opt_s(f, "client_id"), raw=f)


def _presence(f: Mapping[str, Any]) -> Event:
    room, online = _s(f, "room"), _i(f, "online")
    if "event" in f:
        event, user = _s(f, "event"), _s(f, "user")
        joins, leaves = ((user,), ()) if event == "join" else ((), (user,))
        return Presence(room=room, online=online, joins=joins, leaves=leaves, event=event, user=user, raw=f)
    if "joins" not in f and "leaves" not in f:
        return Presence(room=room, online=online, counts_only=True, raw=f)
    return Presence(room=room, online=online, joins=_names(f, "joins"), leaves=_names(f, "leaves"), raw=f)


def _names(frame: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = frame.get(key, [])
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise TypeError(key)
    return tuple(value)


def _resync(f: Mapping[str, Any]) -> Event:
    return Resync(room=_s(f, "room"), raw=f)


def _error(f: Mapping[str, Any]) -> Event:
    return Error(code=_s(f, "code"), detail=_s(f, "detail"), client_id=_opt_s(f, "client_id"), raw=f)


_PARSERS = {
    "welcome": _welcome,
    "message": _message,
    "ack": _ack,
    "presence": _presence,
    "resync": _resync,
    "error": _error,
    "edit": _edit,
    "delete": _delete,
    "reaction": _reaction,
    "typing": _typing,
    "read": _read,
}


# Frames that are entries of the room's stream: each has its own `id`, keeps its order with
# the others and is replayed on resume, so each moves the resume cursor and is deduplicated
# by id.
STREAM_TYPES: Final = PROTOCOL_STREAM_TYPES


def stream_id(event: Event) -> StreamId | None:
    """The stream id of a stream entry (`STREAM_TYPES`), None for any other frame."""
    raw_id = event.raw.get("id") if event.type in STREAM_TYPES else None
    if not isinstance(raw_id, str):
        return None
    try:
        return StreamId.parse(raw_id)
    except ValueError:
        return None


def parse_frame(text: str | bytes) -> Event:
    """Turn one server text frame into an event; never raises on what a server may send."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return Event(type="", raw={"data": text if isinstance(text, str) else text.decode(errors="replace")})
    kind = body.get("type")
    kind = kind if isinstance(kind, str) else ""
    parser = _PARSERS.get(kind)
    if parser is not None:
        try:
            return parser(body)
        except (KeyError, TypeError, ValueError):
            pass  # a known type in a shape this client does not know: pass it on as it is
    return Event(type=kind, raw=body)


def _s(frame: Mapping[str, Any], key: str) -> str:
    value = frame[key]
    if not isinstance(value, str):
        raise TypeError(key)
    return value


def _opt_s(frame: Mapping[str, Any], key: str) -> str | None:
    return None if frame.get(key) is None else _s(frame, key)


def _i(frame: Mapping[str, Any], key: str) -> int:
    value = frame[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(key)
    return value


def _f(frame: Mapping[str, Any], key: str) -> float:
    value = frame[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(key)
    return float(value)
