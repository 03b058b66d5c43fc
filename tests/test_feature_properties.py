"""Property tests for the frames of issue 13: typing, edit, delete, react, read, and the fold."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chorus.broker import Entry
from chorus.history import fold
from chorus.protocol import (
    ERROR_INVALID,
    TYPE_DELETE,
    TYPE_EDIT,
    TYPE_REACTION,
    ClientDelete,
    ClientEdit,
    ClientReact,
    ClientRead,
    ClientTyping,
    ProtocolError,
    StreamId,
    change_tail,
    decode_published,
    dm_members,
    encode_published,
    is_emoji,
    message_tail,
    parse_client_frame,
    stream_frame,
)

ids = st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)).map(lambda t: f"{t[0]}-{t[1]}")
texts = st.text(alphabet=st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=50)
emojis = st.sampled_from(["👍", "👍🏽", "🇫🇷", "❤️", "👨‍👩‍👧", "1️⃣", "🏳️‍🌈", "😀", "🎉", "©️"])
client_ids = st.none() | st.text(max_size=64)


def parse(body: dict[str, object]) -> object:
    return parse_client_frame(
        json.dumps({k: v for k, v in body.items() if v is not None}), max_message_bytes=4096
    )


@given(target=ids, text=texts, client_id=client_ids)
def test_edit_delete_read_frames_round_trip(target: str, text: str, client_id: str | None) -> None:
    assert parse({"type": "edit", "id": target, "text": text, "client_id": client_id}) == ClientEdit(
        target, text, client_id
    )
    assert parse({"type": "delete", "id": target, "client_id": client_id}) == ClientDelete(target, client_id)
    assert parse({"type": "read", "id": target, "client_id": client_id}) == ClientRead(target, client_id)
    assert parse({"type": "typing", "client_id": client_id}) == ClientTyping(client_id)


@given(target=ids, emoji=emojis, on=st.booleans())
def test_react_frames_round_trip(target: str, emoji: str, on: bool) -> None:
    assert parse({"type": "react", "target": target, "emoji": emoji, "on": on}) == ClientReact(
        target, emoji, on
    )


@given(value=st.text(max_size=20))
def test_only_one_emoji_grapheme_is_an_emoji(value: str) -> None:
    # Anything with a letter, a digit not in a keycap, or two pictographs side by side is refused.
    if is_emoji(value):
        assert not any(ch.isalpha() for ch in value)
        assert 0 < len(value) <= 16
    assert not is_emoji(value + value) or value == ""


@given(emoji=emojis)
def test_two_emoji_are_not_one(emoji: str) -> None:
    assert is_emoji(emoji)
    assert not is_emoji(emoji + emoji)


@given(
    body=st.dictionaries(
        st.sampled_from(["type", "id", "target", "text", "emoji", "on"]), st.text(max_size=8)
    )
)
def test_wrong_shapes_are_invalid_never_a_crash(body: dict[str, str]) -> None:
    body["type"] = body.get("type") or "react"
    if body["type"] not in ("edit", "delete", "react", "read"):
        return
    with pytest.raises(ProtocolError) as refused:
        parse(
            dict(body.items())
        )  # ids are text here but never a valid id with the other fields wrong, or on is a str
    assert refused.value.code in (ERROR_INVALID, "too_large")


@given(kind=st.sampled_from([TYPE_EDIT, TYPE_DELETE, TYPE_REACTION]), target=ids, new=ids, user=texts)
def test_change_frames_survive_pub_sub_and_parse_as_json(kind: str, target: str, new: str, user: str) -> None:
    tail = change_tail(ts=1.5, target=target, room="r", user=user, text="t")
    frame = stream_frame(kind, new.encode(), tail)
    published = decode_published(encode_published(b"tag.1", frame))
    assert published.id == StreamId.parse(new) and published.ts == 1.5
    assert orjson.loads(published.frame) == {
        "type": kind, "id": new, "ts": 1.5, "target": target, "room": "r", "user": user, "text": "t"
    }  # fmt: skip


def entry(n: int, kind: str, tail: bytes) -> Entry:
    return Entry(StreamId((n, 0)), f"{n}-0".encode(), tail, b"s", kind)


ops = st.lists(
    st.tuples(
        st.sampled_from(["edit", "delete", "on", "off"]), st.integers(0, 3), st.sampled_from(["a", "b"])
    ),
    max_size=20,
)


@settings(max_examples=200)
@given(ops=ops)
def test_fold_gives_each_message_its_latest_state(ops: list[tuple[str, int, str]]) -> None:
    entries = [
        entry(i + 1, "message", message_tail(room="r", user="u", text=f"m{i}", ts=1.0, replica="x"))
        for i in range(4)
    ]
    expected: dict[int, dict[str, object]] = {i: {"text": f"m{i}", "reactions": {}} for i in range(4)}
    for n, (op, index, user) in enumerate(ops, start=10):
        target = f"{index + 1}-0"
        state = expected[index]
        if op == "edit":
            entries.append(
                entry(n, TYPE_EDIT, change_tail(ts=float(n), target=target, room="r", user="u", text=f"e{n}"))
            )
            if "deleted" not in state:
                state["text"], state["edited_ts"] = f"e{n}", float(n)
        elif op == "delete":
            entries.append(entry(n, TYPE_DELETE, change_tail(ts=float(n), target=target, room="r", user="u")))
            expected[index] = {"deleted": True}
        else:
            tail = change_tail(ts=float(n), target=target, room="r", user=user, emoji="👍", on=op == "on")
            entries.append(entry(n, TYPE_REACTION, tail))
            reactions = state.get("reactions")
            if isinstance(reactions, dict):
                users = reactions.setdefault("👍", [])
                if op == "on" and user not in users:
                    users.append(user)
                elif op == "off" and user in users:
                    users.remove(user)
    frames = [orjson.loads(frame) for frame in fold(entries)]
    assert [f["id"] for f in frames] == ["1-0", "2-0", "3-0", "4-0"], "messages only, in order"
    for index, frame in enumerate(frames):
        want = expected[index]
        if want.get("deleted"):
            assert frame["deleted"] is True and "text" not in frame and "reactions" not in frame
            continue
        assert frame["text"] == want["text"] and frame.get("edited_ts") == want.get("edited_ts")
        reactions = {e: u for e, u in want["reactions"].items() if u}  # type: ignore[attr-defined]
        assert frame.get("reactions", {}) == reactions


@given(a=st.from_regex(r"[a-z]{1,5}", fullmatch=True), b=st.from_regex(r"[a-z]{1,5}", fullmatch=True))
def test_dm_rooms_name_two_sorted_distinct_users(a: str, b: str) -> None:
    found = dm_members(f"dm.{a}.{b}")
    assert (found is not None) == (a < b)
    assert dm_members(f"dm.{a}.{b}.{a}") is None
