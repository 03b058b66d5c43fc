"""Property-based tests: the frame, name, text and settings parsers never fail in an unplanned way."""

from __future__ import annotations

import json
import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.config import SettingsError, load_settings
from chorus.protocol import (
    ERROR_INVALID,
    ERROR_TOO_LARGE,
    ClientMessage,
    ProtocolError,
    StreamId,
    check_text,
    decode_published,
    encode_published,
    is_room,
    is_username,
    message_frame,
    message_tail,
    parse_client_frame,
    parse_since,
    user_key,
)

json_values = st.recursive(
    # JSON has no NaN or Infinity (json.dumps would write them; they are not JSON).
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.text(max_size=300), st.integers(min_value=1, max_value=200))
def test_any_text_frame_is_a_message_or_a_protocol_error(raw: str, limit: int) -> None:
    try:
        message = parse_client_frame(raw, max_message_bytes=limit)
    except ProtocolError as exc:
        assert exc.code in (ERROR_INVALID, ERROR_TOO_LARGE)
        return
    if not isinstance(message, ClientMessage):
        assert raw.lstrip().startswith("{"), "only a JSON object can be another kind of frame"
        return
    assert message.text.strip()
    assert len(message.text.encode()) <= limit


@given(
    st.dictionaries(st.sampled_from(["type", "text", "client_id", "extra"]), json_values, max_size=4),
)
def test_any_json_object_is_a_message_or_a_protocol_error(body: dict[str, object]) -> None:
    raw = json.dumps(body, allow_nan=False)
    try:
        message = parse_client_frame(raw, max_message_bytes=4096)
    except ProtocolError as exc:
        assert exc.code in (ERROR_INVALID, ERROR_TOO_LARGE)
        if isinstance(body.get("client_id"), str) and len(str(body["client_id"])) <= 64:
            assert exc.client_id == body["client_id"]
        return
    if not isinstance(message, ClientMessage):
        assert body.get("type") in ("typing", "edit", "delete", "react", "read"), body
        return
    assert body.get("type") == "message" and message.text == body["text"]


@given(
    st.text(min_size=1, max_size=200).filter(str.strip),
    st.from_regex(r"[A-Za-z0-9_.-]{1,32}", fullmatch=True),
)
def test_what_a_replica_publishes_decodes_to_the_same_frame(text: str, user: str) -> None:
    tail = message_tail(room="r", user=user, text=text, ts=1.5, replica="x")
    frame = message_frame(b"17-4", tail)
    published = decode_published(encode_published(b"ab.3", frame))
    assert orjson.loads(published.frame) == {
        "type": "message", "id": "17-4", "ts": 1.5, "room": "r", "user": user, "text": text, "replica": "x",
    }  # fmt: skip


@given(st.binary(max_size=200))
def test_arbitrary_pubsub_payloads_never_escape_as_other_errors(payload: bytes) -> None:
    try:
        decode_published(payload)
    except (ValueError, UnicodeDecodeError):
        pass


ENV_NAMES = [
    "CHORUS_HISTORY_SIZE",
    "CHORUS_SEND_QUEUE_SIZE",
    "CHORUS_MAX_MESSAGE_BYTES",
    "CHORUS_MAX_FRAME_BYTES",
    "CHORUS_DRAIN_SECONDS",
    "CHORUS_REDIS_URL",
    "CHORUS_LOG_FORMAT",
    "CHORUS_ALLOWED_ORIGINS",
    "CHORUS_ALLOWED_HOSTS",
    "CHORUS_RATE_LIMIT",
    "CHORUS_AUTH_JWT_SECRET",
    "CHORUS_MAX_CONNECTIONS",
]


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(ENV_NAMES), st.text(max_size=40), max_size=4))
def test_any_environment_gives_settings_or_one_line_naming_a_variable(env: dict[str, str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name in ENV_NAMES:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            if "\x00" in value:
                continue  # the OS cannot carry NUL in an environment variable
            patch.setenv(name, value)
        try:
            load_settings()
        except SettingsError as exc:
            message = str(exc)
            assert "\n" not in message and "CHORUS_" in message
            secret = env.get("CHORUS_AUTH_JWT_SECRET")
            if secret and len(secret) > 3:
                assert secret not in message


# Names (issue 16, finding 4): one rule for rooms, user names and a token's sub.
NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"


@given(st.text(max_size=80))
def test_a_name_is_valid_only_when_every_character_is_allowed(name: str) -> None:
    allowed = all(ch in NAME_CHARS for ch in name)
    assert is_room(name) == (allowed and 1 <= len(name) <= 64)
    assert is_username(name) == (allowed and 1 <= len(name) <= 32)


@given(
    st.text(alphabet=NAME_CHARS, min_size=1, max_size=32),
    st.sampled_from(["\n", "\r\n", "\x00", " ", "\u2028"]),
)
def test_a_valid_name_with_a_line_break_or_space_anywhere_is_refused(name: str, extra: str) -> None:
    for bad in (name + extra, extra + name, name[:1] + extra + name[1:]):
        assert not is_username(bad) and not is_room(bad)


@given(st.text(alphabet=NAME_CHARS, min_size=1, max_size=32))
def test_spellings_of_one_name_are_one_user(name: str) -> None:
    full_width = "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in name)
    key = user_key(name)
    assert user_key(name.upper()) == user_key(name.lower()) == user_key(full_width) == key
    assert user_key(key) == key
    assert not is_username(full_width), "look-alikes are refused as names in the first place"


# Text policy (finding 9).
FORBIDDEN = [chr(c) for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]] + [
    chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]
]
INVISIBLE = [
    " ",
    "\n",
    "\t",
    "\u00a0",
    "\u3000",
    "\u200b",
    "\u200c",
    "\u200d",
    "\u2060",
    "\ufeff",
    "\u200e",
    "\u200f",
]


@given(st.text(max_size=200))
def test_accepted_text_has_no_control_or_bidi_override_and_something_visible(text: str) -> None:
    try:
        kept = check_text(text, 4096)
    except ProtocolError as exc:
        assert exc.code == ERROR_INVALID
        return
    assert kept == text, "text is accepted unchanged or refused, never altered"
    assert not any(ch in FORBIDDEN for ch in text)
    assert any(ch not in INVISIBLE and not ch.isspace() for ch in text)


@given(st.text(max_size=50), st.sampled_from(FORBIDDEN), st.text(max_size=50))
def test_a_control_or_bidi_override_anywhere_is_refused(before: str, bad: str, after: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(
            json.dumps({"type": "message", "text": before + bad + after}), max_message_bytes=4096
        )
    assert info.value.code == ERROR_INVALID


@given(st.lists(st.sampled_from(INVISIBLE), max_size=20))
def test_only_invisible_characters_is_refused(chars: list[str]) -> None:
    with pytest.raises(ProtocolError) as info:
        check_text("".join(chars), 4096)
    assert info.value.code == ERROR_INVALID


# Cursors (finding 6): Redis stream ids are two 64-bit numbers.
@given(st.integers(min_value=0, max_value=2**70), st.integers(min_value=0, max_value=2**70))
def test_since_is_a_cursor_only_within_64_bits(ms: int, seq: int) -> None:
    parsed = parse_since(f"{ms}-{seq}")
    if ms < 2**64 and seq < 2**64:
        assert parsed == StreamId((ms, seq))
    else:
        assert parsed is None


@given(st.one_of(st.text(alphabet="0123456789-", max_size=45), st.text(max_size=45)))
def test_an_id_parses_the_same_from_redis_bytes_as_from_a_client_string(raw: str) -> None:
    # StreamId.parse has a fast path for the bytes Redis sends; it must agree with the rule.
    try:
        want: StreamId | None = StreamId.parse(raw)
    except ValueError:
        want = None
    try:
        got: StreamId | None = StreamId.parse(raw.encode())
    except ValueError:
        got = None
    assert got == want


@given(st.text(max_size=60))
def test_any_since_is_a_cursor_or_none(raw: str) -> None:
    parsed = parse_since(raw)
    if parsed is not None:
        assert re.fullmatch(r"[0-9]+(-[0-9]+)?", raw) and max(parsed) < 2**64
