"""Pure parts: the RESP parser, frame parsing, stream ids, settings errors, hosts, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from chorus.config import Settings, SettingsError, load_settings, redact_url
from chorus.logs import redact
from chorus.protocol import (
    CLOSE_LABELS,
    REJECTION_REASONS,
    ClientMessage,
    ProtocolError,
    StreamId,
    close_label,
    decode_published,
    encode_published,
    message_frame,
    message_tail,
    parse_client_frame,
    parse_since,
)
from chorus.resp import RespError, RespParser, encode_command
from chorus.runtime import STATE_KEY, State, runtime_in
from chorus.security import host_allowed


def test_resp_parser_handles_split_reads_and_binary_payloads() -> None:
    wire = (
        encode_command(b"subscribe", b"chorus:msg:{a}")[0:0]
        + b"*3\r\n$9\r\nsubscribe\r\n$14\r\nchorus:msg:{a}\r\n:1\r\n"
        + b"*3\r\n$7\r\nmessage\r\n$14\r\nchorus:msg:{a}\r\n$4\r\n\xff\r\n\x00\r\n"
        + b"-ERR boom\r\n"
    )
    parser = RespParser()
    replies = []
    for i in range(len(wire)):  # one byte at a time: every split point
        parser.feed(wire[i : i + 1])
        replies.extend(parser.replies())
    assert replies[0] == [b"subscribe", b"chorus:msg:{a}", 1]
    assert replies[1] == [b"message", b"chorus:msg:{a}", b"\xff\r\n\x00"]
    assert isinstance(replies[2], RespError)


def test_encode_command() -> None:
    assert encode_command(b"SUBSCRIBE", "ch") == b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n"


def test_published_payload_round_trip() -> None:
    tail = message_tail(room="r", user="u", text='he said "hi" \u00e9', ts=12.5, replica="rep")
    frame = message_frame(b"1700-3", tail)
    msg = decode_published(encode_published(b"ab.1", frame))
    assert msg.sender == b"ab.1" and msg.id == StreamId((1700, 3)) and msg.ts == 12.5
    assert msg.frame == frame.decode()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"nospace",
        b'x {"type":"other"}',
        b'x {"type":"message","id":"1-0"}',
        b"\xff\xfe",
        b'x {"type":"message","id":"zz","ts":1,',
    ],
)
def test_decode_published_rejects_foreign_payloads(payload: bytes) -> None:
    with pytest.raises((ValueError, UnicodeDecodeError)):
        decode_published(payload)


def test_stream_ids_order_numerically() -> None:
    assert StreamId.parse("10-0") > StreamId.parse("9-99")
    assert StreamId.parse(b"5") == StreamId((5, 0))
    assert parse_since("garbage") is None and parse_since("1-x") is None
    assert parse_since("18446744073709551615-18446744073709551615") == StreamId((2**64 - 1, 2**64 - 1))
    for out_of_range in ("18446744073709551616", "1-99999999999999999999999", "\u0661-0", "1-2\n"):
        assert parse_since(out_of_range) is None, out_of_range
    assert str(StreamId.parse("3-4")) == "3-4"


def test_client_frames() -> None:
    assert parse_client_frame("hello", max_message_bytes=10) == ClientMessage("hello", None)
    assert parse_client_frame("[1]", max_message_bytes=10) == ClientMessage("[1]", None)
    parsed = parse_client_frame('{"type":"message","text":"x","client_id":"c"}', max_message_bytes=10)
    assert parsed == ClientMessage("x", "c")
    with pytest.raises(ProtocolError) as info:
        parse_client_frame("é" * 6, max_message_bytes=10)  # 12 UTF-8 bytes
    assert info.value.code == "too_large"
    for bad in (
        '{"type":"x"}',
        '{"text":"x"}',
        '{"type":"message","text":1}',
        '{"type":"message","text":"x","client_id":5}',
        "   ",
    ):
        with pytest.raises(ProtocolError) as info:
            parse_client_frame(bad, max_message_bytes=10)
        assert info.value.code == "invalid"


def test_bad_settings_fail_with_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_HISTORY_SIZE", "0")
    with pytest.raises(SettingsError, match=r"^CHORUS_HISTORY_SIZE: "):
        load_settings()
    monkeypatch.delenv("CHORUS_HISTORY_SIZE")
    monkeypatch.setenv("CHORUS_REDIS_URL", "http://x")
    with pytest.raises(SettingsError, match=r"^CHORUS_REDIS_URL: scheme 'http' is not supported"):
        load_settings()
    monkeypatch.setenv("CHORUS_REDIS_URL", "redis://:s3cret@h:6379/0")
    monkeypatch.setenv("CHORUS_MAX_FRAME_BYTES", "2048")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "CHORUS_MAX_FRAME_BYTES" in str(info.value) and "s3cret" not in str(info.value)


def test_kubernetes_service_variables_do_not_break_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Service named `chorus` makes Kubernetes inject these into every pod of the namespace.
    monkeypatch.setenv("CHORUS_PORT", "tcp://10.0.0.1:8000")
    monkeypatch.setenv("CHORUS_SERVICE_HOST", "10.0.0.1")
    assert load_settings().workers == 1


def test_redis_password_is_redacted() -> None:
    assert redact_url("rediss://user:pw@host:6380/0") == "rediss://user:***@host:6380/0"
    assert Settings(redis_url="redis://:pw@h:1/0").redis_url_redacted == "redis://:***@h:1/0"


def test_allowed_hosts_match_like_django() -> None:
    allowed = [".example.com", "chorus.internal", "[::1]"]
    for host in (
        "example.com",
        "chat.example.com:443",
        "A.B.Example.COM.",
        "chorus.internal:8000",
        "[::1]:80",
    ):
        assert host_allowed(host, allowed), host
    for host in ("", "example.com.evil.test", "notexample.com", "chorus.internal.evil", "[::2]", "::1"):
        assert not host_allowed(host, allowed), host
    assert host_allowed("anything:1", ["*"])
    # As an Ingress or HTTPRoute wildcard means it (the chart copies their hosts): one label.
    assert host_allowed("a.example.net:443", ["*.example.net"])
    for host in ("example.net", "a.b.example.net", "aexample.net"):
        assert not host_allowed(host, ["*.example.net"]), host
    assert load_settings(allowed_hosts="*.Example.net").allowed_hosts == ["*.example.net"]
    assert load_settings(allowed_hosts=" Chat.Example.com., .example.org ").allowed_hosts == [
        "chat.example.com",
        ".example.org",
    ]
    for bad in ("https://chat.example.com", "chat.example.com:443", "a..b", "/x", "*example.com", "a.*.b"):
        with pytest.raises(SettingsError, match=r"^CHORUS_ALLOWED_HOSTS: "):
            load_settings(allowed_hosts=bad)


def test_token_values_are_redacted_whatever_the_spelling_of_the_name() -> None:
    line = '127.0.0.1:5 - "WebSocket /ws/r?%74oken=eyJa.b.c&username=x&TOKEN=t2&to%6Ben=t3&tokens=keep" 403'
    assert redact(line) == (
        '127.0.0.1:5 - "WebSocket /ws/r?%74oken=***&username=x&TOKEN=***&to%6Ben=***&tokens=keep" 403'
    )
    assert (
        redact("GET /api/rooms/r/history?token=abc HTTP/1.1") == "GET /api/rooms/r/history?token=*** HTTP/1.1"
    )
    assert redact("no query here") == "no query here"


def test_close_labels_are_a_closed_set() -> None:
    assert [close_label(code) for code in (1000, 1001, 1005, 1012)] == ["1000", "1001", "1005", "1012"]
    assert close_label(4123) == close_label(3000) == close_label(1004) == "client_other"
    assert close_label(None) == close_label(1006) == "abnormal"
    assert {close_label(code) for code in range(0, 70_000)} <= set(CLOSE_LABELS)


def test_docs_list_every_close_label_and_rejection_reason() -> None:
    root = Path(__file__).resolve().parents[1]
    security = (root / "docs" / "security.md").read_text()
    readme = (root / "README.md").read_text()
    reasons = sorted(REJECTION_REASONS)
    assert "host" in reasons
    for reason in reasons:
        assert f"`{reason}`" in security, reason
    for label in CLOSE_LABELS:
        assert f"{label}" in readme and f"{label}" in security, label


def test_the_lifespan_state_key_is_the_typed_one() -> None:
    assert set(State.__annotations__) == {STATE_KEY}
    assert runtime_in({}) is None
