"""The wire protocol: frame shapes, close codes, error codes and rejection reasons, listed once.

Message frames are built once per replica as bytes and shared by every member of a room,
so the hot path never parses or serialises JSON per subscriber.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

import orjson

# Names: the one definition of each rule. `\Z`, not `$`: under `re.match`, `$` also matches
# before a trailing newline, and `alice\n` got in. Use is_room/is_username.
ROOM_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
USERNAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,32}\Z")
ROOM_RULE: Final = "room must be 1-64 letters, digits, '_', '.' or '-'"
USERNAME_RULE: Final = "username must be 1-32 letters, digits, '_', '.' or '-'"
CLIENT_ID_MAX: Final = 64

DEFAULT_HISTORY: Final = 20
MAX_HISTORY: Final = 100
API_HISTORY_DEFAULT: Final = 50
API_HISTORY_MAX: Final = 200

# Close codes (RFC 6455 numbers, Chorus meanings).
CLOSE_NORMAL: Final = 1000
CLOSE_UNSUPPORTED_DATA: Final = 1003  # binary frames
CLOSE_INVALID_PAYLOAD: Final = 1007  # text frame that is not UTF-8
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011  # the broker could not be reached for this room
CLOSE_SERVICE_RESTART: Final = 1012  # the replica drains; reconnect (with since=) elsewhere
CLOSE_TRY_AGAIN_LATER: Final = 1013  # slow consumer: the send queue overflowed
CLOSE_DISCONNECTED: Final = (
    4001  # a backend closed this user's sockets (POST /api/v1/users/{user}/disconnect)
)
# What clients send: a page going away (1001), a close frame without a code (1005).
CLOSE_GOING_AWAY: Final = 1001
CLOSE_NO_STATUS: Final = 1005
# Never on the wire: how a server reports a connection that dropped without a close frame.
CLOSE_ABNORMAL: Final = 1006
# Codes a client's own close carries (and Chorus's plain 1000); README's close-code table
# lists the others, each with its Chorus meaning (tests/test_names.py checks it).
CLIENT_CLOSE_CODES: Final = frozenset({CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_NO_STATUS})

# chorus_connections_closed_total{code} label values: a closed set, so a client cannot mint
# series by picking close codes (4000-4999 alone are a thousand).
CLOSE_CODES: Final = frozenset(
    {
        CLOSE_NORMAL,
        CLOSE_GOING_AWAY,
        CLOSE_UNSUPPORTED_DATA,
        CLOSE_NO_STATUS,
        CLOSE_INVALID_PAYLOAD,
        CLOSE_POLICY,
        CLOSE_TOO_BIG,
        CLOSE_INTERNAL_ERROR,
        CLOSE_SERVICE_RESTART,
        CLOSE_TRY_AGAIN_LATER,
        CLOSE_DISCONNECTED,
    }
)
CLOSE_LABEL_CLIENT_OTHER: Final = "client_other"  # any other code a client chose
CLOSE_LABEL_ABNORMAL: Final = "abnormal"  # no close frame: the connection dropped (1006)
CLOSE_LABELS: Final = (
    *sorted(str(code) for code in CLOSE_CODES),
    CLOSE_LABEL_CLIENT_OTHER,
    CLOSE_LABEL_ABNORMAL,
)


def close_label(code: int | None) -> str:
    """The metric label for a close: a code from CLOSE_CODES, `client_other` or `abnormal` (None, 1006)."""
    if code is None or code == CLOSE_ABNORMAL:
        return CLOSE_LABEL_ABNORMAL
    return str(code) if code in CLOSE_CODES else CLOSE_LABEL_CLIENT_OTHER


# Error frame codes.
ERROR_INVALID: Final = "invalid"
ERROR_TOO_LARGE: Final = "too_large"
ERROR_UNAVAILABLE: Final = "unavailable"
ERROR_RATE_LIMITED: Final = "rate_limited"
ERROR_NOT_FOUND: Final = "not_found"  # an edit, delete or reaction names no message the room holds
ERROR_FORBIDDEN: Final = "forbidden"  # an edit or delete of someone else's message
ERROR_CODES: Final = frozenset(
    {ERROR_INVALID, ERROR_TOO_LARGE, ERROR_UNAVAILABLE, ERROR_RATE_LIMITED, ERROR_NOT_FOUND, ERROR_FORBIDDEN}
)

# Frame types. Those stored in a room's stream (each with its own id, in one order everywhere)
# and the client frames a socket may send.
TYPE_MESSAGE: Final = "message"
TYPE_EDIT: Final = "edit"
TYPE_DELETE: Final = "delete"
TYPE_REACTION: Final = "reaction"
TYPE_TYPING: Final = "typing"
TYPE_READ: Final = "read"
TYPE_REACT: Final = "react"  # the client's request; members get a `reaction`
STREAM_TYPES: Final = frozenset({TYPE_MESSAGE, TYPE_EDIT, TYPE_DELETE, TYPE_REACTION})
CLIENT_TYPES: Final = (TYPE_MESSAGE, TYPE_TYPING, TYPE_EDIT, TYPE_DELETE, TYPE_REACT, TYPE_READ)
TYPING_INTERVAL_SECONDS: Final = 2.0  # at most one typing frame per user per room per interval
MAX_REACTIONS_PER_MESSAGE: Final = 20  # distinct emoji
UNREAD_CAP: Final = 1000
MODERATOR_ROLE: Final = "moderator"
DM_PREFIX: Final = "dm."
API_USER: Final = "api"  # the `user` of a delete made through the server API

# Rejection reasons (chorus_rejections_total{reason}): why a handshake or a room read was
# refused, or a socket closed for breaking a rule. A closed set, used by reference; listed in
# README and docs/security.md.
REJECT_BAD_REQUEST: Final = "bad_request"
REJECT_UNAUTHORIZED: Final = "unauthorized"
REJECT_FORBIDDEN_ROOM: Final = "forbidden_room"
REJECT_ORIGIN: Final = "origin"
REJECT_HOST: Final = "host"  # Host header not in CHORUS_ALLOWED_HOSTS
REJECT_DRAINING: Final = "draining"
REJECT_MAX_CONNECTIONS: Final = "max_connections"
REJECT_MAX_CONNECTIONS_PER_USER: Final = "max_connections_per_user"
REJECT_TOO_MANY_HANDSHAKES: Final = "too_many_handshakes"  # CHORUS_MAX_PENDING_HANDSHAKES
REJECT_REBALANCE: Final = "rebalance"  # this replica sheds its excess (chorus.rebalance)
REJECT_BINARY: Final = "binary"
REJECT_FLOOD: Final = "flood"
REJECT_INVALID_UTF8: Final = "invalid_utf8"
REJECT_FRAME_TOO_LARGE: Final = "frame_too_large"
# ... and those of the HTTP front door (chorus.httpguard).
REJECT_HEAD_TIMEOUT: Final = "head_timeout"
REJECT_TOO_MANY_PENDING: Final = "too_many_pending"
REJECT_URL_TOO_LONG: Final = "url_too_long"
REJECT_HEADERS_TOO_LARGE: Final = "headers_too_large"
# Every REJECT_* above, collected rather than listed a second time.
REJECTION_REASONS: Final = frozenset(
    value for name, value in dict(globals()).items() if name.startswith("REJECT_")
)

_MESSAGE_PREFIX: Final = b'{"type":"message","id":"'
_PRESENCE_PREFIX: Final = b'{"type":"presence",'
# Events published outside the stream (never stored, never replayed): `<sender> <frame>`.
_EVENT_PREFIXES: Final = (_PRESENCE_PREFIX, b'{"type":"typing",')
_STREAM_PREFIXES: Final = tuple(b'{"type":"%s","id":"' % kind.encode() for kind in sorted(STREAM_TYPES))


def is_room(name: str) -> bool:
    return ROOM_RE.fullmatch(name) is not None


def is_username(name: str) -> bool:
    """A user name as a client may give it, or a token's `sub`: the same rule for both."""
    return USERNAME_RE.fullmatch(name) is not None


def user_key(name: str) -> str:
    """Who a user name means: `Dave`, `dave` and look-alikes are one user (per-user cap, presence).

    NFKC folds compatibility forms (full-width letters) and casefold folds case, so the rule
    holds if USERNAME_RE is ever widened beyond ASCII. Frames show names as given.
    """
    return unicodedata.normalize("NFKC", name).casefold()


# At most 20 digits each (2**64 has 20): int() never sees a huge string.
_STREAM_ID_RE: Final = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_U64: Final = 2**64


class StreamId(tuple[int, int]):
    """A Redis Stream id (`ms-seq`), ordered like Redis orders them."""

    __slots__ = ()

    @classmethod
    def parse(cls, raw: bytes | str) -> StreamId:
        """`ms-seq` or `ms`; ValueError unless each part is ASCII digits below 2**64, as in Redis."""
        if isinstance(raw, bytes):
            # Every replica parses every message's id from Redis: split and int() skip the
            # decode and the regex (bytes.isdigit is ASCII-only, as the regex is).
            head, _, tail = raw.partition(b"-")
            if head.isdigit() and tail.isdigit() and len(head) <= 20 and len(tail) <= 20:
                parsed = (int(head), int(tail))
                if parsed[0] < _U64 and parsed[1] < _U64:
                    return cls(parsed)
        text = raw.decode() if isinstance(raw, bytes) else raw
        found = _STREAM_ID_RE.fullmatch(text)
        if found is None:
            raise ValueError(f"not a stream id: {text[:48]!r}")
        ms, seq = int(found[1]), int(found[2] or 0)
        if ms >= _U64 or seq >= _U64:
            # Redis refuses such an id, which the join would report as the broker failing.
            raise ValueError(f"stream id out of range: {text[:48]!r}")
        return cls((ms, seq))

    def __str__(self) -> str:
        return f"{self[0]}-{self[1]}"


ZERO_ID: Final = StreamId((0, 0))


def parse_since(raw: str | None) -> StreamId | None:
    """A client's `since` cursor, or None when it is not a well-formed stream id."""
    if raw is None:
        return None
    try:
        return StreamId.parse(raw)
    except ValueError:
        return None


def message_tail(*, room: str, user: str, text: str, ts: float, replica: str) -> bytes:
    """The part of a message frame known before Redis assigns the id: `{"ts":...,...}`."""
    return orjson.dumps({"ts": ts, "room": room, "user": user, "text": text, "replica": replica})


def message_frame(msg_id: bytes, tail: bytes) -> bytes:
    """A full message frame: the id spliced in front of the tail (the Lua script does the same)."""
    return _MESSAGE_PREFIX + msg_id + b'",' + tail[1:]


def stream_frame(kind: str, msg_id: bytes, tail: bytes) -> bytes:
    """A frame of any stream type (message, edit, delete, reaction), spliced as the Lua does."""
    if kind == TYPE_MESSAGE:
        return message_frame(msg_id, tail)
    return b'{"type":"%s","id":"%s",%s' % (kind.encode(), msg_id, tail[1:])


def change_tail(*, ts: float, target: str, room: str, user: str, **fields: object) -> bytes:
    """The part of an edit, delete or reaction frame known before Redis assigns its id."""
    return orjson.dumps({"ts": ts, "target": target, "room": room, "user": user, **fields})


@dataclass(frozen=True, slots=True)
class Published:
    """A stream entry as it arrives from the broker: who sent it, its id, its timestamp, the frame."""

    sender: bytes
    id: StreamId
    ts: float
    frame: str


def encode_published(sender: bytes, frame: bytes) -> bytes:
    return sender + b" " + frame


def decode_published(payload: bytes) -> Published:
    """Split a pub/sub payload `<sender> <frame>`; ValueError when it is not a stream entry."""
    space = payload.find(b" ")
    if space < 0:
        raise ValueError("payload is not a Chorus stream entry")
    if payload.startswith(_MESSAGE_PREFIX, space + 1):
        prefix = _MESSAGE_PREFIX
    else:
        found = next((p for p in _STREAM_PREFIXES if payload.startswith(p, space + 1)), None)
        if found is None:
            raise ValueError("payload is not a Chorus stream entry")
        prefix = found
    id_start = space + 1 + len(prefix)
    id_end = payload.index(b'"', id_start)
    if not payload.startswith(b',"ts":', id_end + 1):
        raise ValueError("payload has no timestamp")
    ts_start = id_end + 7
    ts_end = payload.index(b",", ts_start)
    return Published(
        sender=payload[:space],
        id=StreamId.parse(payload[id_start:id_end]),
        ts=float(payload[ts_start:ts_end]),
        frame=payload[space + 1 :].decode(),
    )


def welcome_frame(room: str, user: str, replica: str, online: int, last_id: StreamId) -> str:
    """The first frame; `last_id`: every message after it reaches this socket (resume from it
    when no message has arrived yet; "0-0" in an empty room)."""
    body = {"type": "welcome", "room": room, "user": user, "replica": replica, "online": online}
    return orjson.dumps({**body, "last_id": str(last_id)}).decode()


def presence_frame(room: str, event: str, user: str, online: int) -> str:
    """A join or leave announcement (presence.py's Lua builds the same bytes)."""
    body = {"type": "presence", "room": room, "event": event, "user": user, "online": online}
    return orjson.dumps(body).decode()


def presence_diff_frame(room: str, joins: list[str], leaves: list[str], online: int) -> str:
    """What members receive: a room's presence changes over one interval, at most one frame.

    A room above CHORUS_PRESENCE_MAX_MEMBERS gets only its count (no `joins`/`leaves`).
    """
    body: dict[str, object] = {"type": "presence", "room": room}
    if joins or leaves:
        body["joins"] = joins
        body["leaves"] = leaves
    body["online"] = online
    return orjson.dumps(body).decode()


def decode_event(payload: bytes) -> tuple[bytes, str] | None:
    """Split a pub/sub payload `<sender> <presence or typing frame>`; None when it is not one."""
    space = payload.find(b" ")
    if space < 0 or not any(payload.startswith(p, space + 1) for p in _EVENT_PREFIXES):
        return None
    return payload[:space], payload[space + 1 :].decode()


def resync_frame(room: str) -> str:
    return orjson.dumps({"type": "resync", "room": room}).decode()


def ack_frame(msg_id: str, client_id: str | None) -> str:
    body: dict[str, Any] = {"type": "ack", "id": msg_id}
    if client_id is not None:
        body["client_id"] = client_id
    return orjson.dumps(body).decode()


def error_frame(code: str, detail: str, client_id: str | None = None) -> str:
    body: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if client_id is not None:
        body["client_id"] = client_id
    return orjson.dumps(body).decode()


def typing_frame(room: str, user: str) -> bytes:
    return orjson.dumps({"type": TYPE_TYPING, "room": room, "user": user})


def read_frame(room: str, msg_id: str) -> str:
    return orjson.dumps({"type": TYPE_READ, "room": room, "id": msg_id}).decode()


@dataclass(frozen=True, slots=True)
class ClientMessage:
    text: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class ClientTyping:
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class ClientEdit:
    target: str
    text: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class ClientDelete:
    target: str
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class ClientReact:
    target: str
    emoji: str
    on: bool
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class ClientRead:
    id: str
    client_id: str | None = None


ClientFrame = ClientMessage | ClientTyping | ClientEdit | ClientDelete | ClientReact | ClientRead


class ProtocolError(Exception):
    """A frame the server answers with an error frame; the connection stays open."""

    def __init__(self, code: str, detail: str, client_id: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.client_id = client_id


def parse_client_frame(raw: str, *, max_message_bytes: int) -> ClientFrame:
    """Turn a client's text frame into one of the client frames, or raise ProtocolError.

    A frame that is not a JSON object is taken, as it is, as the text of a message.
    """
    body: object = None
    if raw[:1] == "{":
        # Meant as JSON: a broken object is an error, not a message to post as it is.
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProtocolError(ERROR_INVALID, "the frame starts with '{' but is not valid JSON") from None
    if not isinstance(body, dict):
        return ClientMessage(check_text(raw, max_message_bytes))
    client_id = body.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or len(client_id) > CLIENT_ID_MAX):
        raise ProtocolError(ERROR_INVALID, f"client_id must be a string of at most {CLIENT_ID_MAX} chars")
    kind = body.get("type")
    if kind == TYPE_MESSAGE:
        text = body.get("text")
        if not isinstance(text, str):
            raise ProtocolError(ERROR_INVALID, "field 'text' must be a string", client_id)
        return ClientMessage(check_text(text, max_message_bytes, client_id), client_id)
    if kind == TYPE_TYPING:
        return ClientTyping(client_id)
    if kind == TYPE_EDIT:
        target = _target(body, "id", client_id)
        text = body.get("text")
        if not isinstance(text, str):
            raise ProtocolError(ERROR_INVALID, "field 'text' must be a string", client_id)
        return ClientEdit(target, check_text(text, max_message_bytes, client_id), client_id)
    if kind == TYPE_DELETE:
        return ClientDelete(_target(body, "id", client_id), client_id)
    if kind == TYPE_REACT:
        target = _target(body, "target", client_id)
        on = body.get("on", True)
        if not isinstance(on, bool):
            raise ProtocolError(ERROR_INVALID, "field 'on' must be true or false", client_id)
        return ClientReact(target, check_emoji(body.get("emoji"), client_id), on, client_id)
    if kind == TYPE_READ:
        return ClientRead(_target(body, "id", client_id), client_id)
    detail = "missing field 'type'" if kind is None else f"unknown type {str(kind)[:32]!r}"
    raise ProtocolError(ERROR_INVALID, detail, client_id)


def _target(body: dict[str, Any], field: str, client_id: str | None) -> str:
    """A message id a client names, normalised to `ms-seq`."""
    value = body.get(field)
    if not isinstance(value, str):
        raise ProtocolError(ERROR_INVALID, f"field {field!r} must be a message id", client_id)
    try:
        return str(StreamId.parse(value))
    except ValueError:
        raise ProtocolError(ERROR_INVALID, f"field {field!r} is not a message id", client_id) from None


# One emoji grapheme: a pictographic base (or a keycap, or a pair of regional indicators),
# then modifiers, variation selectors and ZWJ-joined pictographs. Python's `re` has no \X,
# so the rule is spelled out; it errs on the side of refusing.
_PICTO: Final = (
    "\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u2199\u21a9\u21aa\u231a\u231b\u2328\u23cf"
    "\u23e9-\u23f3\u23f8-\u23fa\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe\u2600-\u27bf"
    "\u2934\u2935\u2b05-\u2b07\u2b1b\u2b1c\u2b50\u2b55\u3030\u303d\u3297\u3299"
    "\U0001f000-\U0001faff"
)
_EMOJI_RE: Final = re.compile(
    "(?:[\U0001f1e6-\U0001f1ff]{2}"  # a flag
    "|[0-9#*]\ufe0f?\u20e3"  # a keycap
    f"|[{_PICTO}][\ufe0f\U0001f3fb-\U0001f3ff]*"
    f"(?:\u200d[{_PICTO}][\ufe0f\U0001f3fb-\U0001f3ff]*)*"
    "[\U000e0020-\U000e007f]*)\\Z"  # tag sequences (subdivision flags)
)
EMOJI_MAX_CHARS: Final = 16


def is_emoji(value: object) -> bool:
    """One emoji grapheme (a flag, a keycap, a ZWJ sequence with its modifiers)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= EMOJI_MAX_CHARS
        and value[0] not in "\U0001f3fb\U0001f3fc\U0001f3fd\U0001f3fe\U0001f3ff"
        and _EMOJI_RE.match(value) is not None
    )


def check_emoji(value: object, client_id: str | None = None) -> str:
    if not is_emoji(value):
        raise ProtocolError(ERROR_INVALID, "field 'emoji' must be one emoji", client_id)
    assert isinstance(value, str)
    return value


def dm_members(room: str) -> tuple[str, str] | None:
    """The two users a private room `dm.<a>.<b>` names (sorted, distinct), or None when malformed."""
    parts = room[len(DM_PREFIX) :].split(".")
    if len(parts) != 2 or not all(is_username(p) for p in parts):
        return None
    a, b = parts
    if not user_key(a) < user_key(b):
        return None
    return a, b


def is_private(room: str) -> bool:
    return room.startswith(DM_PREFIX)


# Text policy (docs/security.md): refused, never altered, so nothing is lost silently.
# C0 controls but tab and newline, DEL, C1 controls; bidi embeddings/overrides (U+202A-202E)
# and isolates (U+2066-2069), which make text read differently from what was sent.
_FORBIDDEN_CHARS: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Characters that draw nothing: whitespace, zero-width and joiners, bidi marks, word joiner
# and invisible operators, BOM, soft hyphen, combining grapheme joiner, Hangul and braille blanks.
_INVISIBLE: Final = re.compile(
    "[\\s\u200b-\u200f\u061c\u2060-\u2064\ufeff\u00ad\u034f\u115f\u1160\u3164\uffa0\u2800]*"
)


def check_text(text: str, max_bytes: int, client_id: str | None = None) -> str:
    """The text policy for every message, whatever frame carried it; raises ProtocolError."""
    # Cheap bound first: a str of n code points is at least n UTF-8 bytes.
    if len(text) > max_bytes or len(text.encode()) > max_bytes:
        raise ProtocolError(ERROR_TOO_LARGE, f"message text is over {max_bytes} bytes", client_id)
    if _INVISIBLE.fullmatch(text):
        raise ProtocolError(ERROR_INVALID, "message text is empty or only invisible characters", client_id)
    bad = _FORBIDDEN_CHARS.search(text)
    if bad is not None:
        detail = f"message text may not contain U+{ord(bad[0]):04X} (control or bidi override)"
        raise ProtocolError(ERROR_INVALID, detail, client_id)
    return text
