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
ERROR_CODES: Final = frozenset({ERROR_INVALID, ERROR_TOO_LARGE, ERROR_UNAVAILABLE, ERROR_RATE_LIMITED})

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


@dataclass(frozen=True, slots=True)
class Published:
    """A message as it arrives from the broker: who sent it, its id, its timestamp, the frame."""

    sender: bytes
    id: StreamId
    ts: float
    frame: str


def encode_published(sender: bytes, frame: bytes) -> bytes:
    return sender + b" " + frame


def decode_published(payload: bytes) -> Published:
    """Split a pub/sub payload `<sender> <frame>`; ValueError when it is not one of ours."""
    space = payload.find(b" ")
    if space < 0 or not payload.startswith(_MESSAGE_PREFIX, space + 1):
        raise ValueError("payload is not a Chorus message")
    id_start = space + 1 + len(_MESSAGE_PREFIX)
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


def welcome_frame(room: str, user: str, replica: str, online: int) -> str:
    return orjson.dumps(
        {"type": "welcome", "room": room, "user": user, "replica": replica, "online": online}
    ).decode()


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
    """Split a pub/sub payload `<sender> <presence frame>`; None when it is not one."""
    space = payload.find(b" ")
    if space < 0 or not payload.startswith(_PRESENCE_PREFIX, space + 1):
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


@dataclass(frozen=True, slots=True)
class ClientMessage:
    text: str
    client_id: str | None = None


class ProtocolError(Exception):
    """A frame the server answers with an error frame; the connection stays open."""

    def __init__(self, code: str, detail: str, client_id: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.client_id = client_id


def parse_client_frame(raw: str, *, max_message_bytes: int) -> ClientMessage:
    """Turn a client's text frame into a message, or raise ProtocolError.

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
    if kind != "message":
        detail = "missing field 'type'" if kind is None else f"unknown type {str(kind)[:32]!r}"
        raise ProtocolError(ERROR_INVALID, detail, client_id)
    text = body.get("text")
    if not isinstance(text, str):
        raise ProtocolError(ERROR_INVALID, "field 'text' must be a string", client_id)
    return ClientMessage(check_text(text, max_message_bytes, client_id), client_id)


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
