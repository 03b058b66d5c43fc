"""Typing, edits, deletes, reactions, read markers and private rooms, across two real replicas."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import InvalidStatus

from chorus.devcluster import LocalCluster, RedisServer
from tests.chat import Chat

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"


def token(sub: str, **claims: object) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 300), **claims}, SECRET, algorithm="HS256")


async def send(chat: Chat, **body: object) -> None:
    await chat.ws.send(json.dumps(body))


async def post(chat: Chat, text: str) -> str:
    """Send a message and return its id (from the ack)."""
    await chat.send(text, client_id=f"post-{text}")
    return str((await chat.wait_for(lambda f: f.get("client_id") == f"post-{text}"))["id"])


async def two(cluster: LocalCluster, room: str, **params: Any) -> tuple[Chat, Chat]:
    alice = await Chat.join(cluster.replica_ws_url(0), room, username="alice", **params)
    bob = await Chat.join(cluster.replica_ws_url(1), room, username="bob", **params)
    assert alice.replica != bob.replica
    return alice, bob


async def history(cluster: LocalCluster, room: str, **params: Any) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        response = await http.get(f"/api/rooms/{room}/history", params=params)
        assert response.status_code == 200, response.text
        messages: list[dict[str, Any]] = response.json()["messages"]
        return messages


def answer_to(client_id: str) -> Callable[[dict[str, Any]], bool]:
    """The ack or error frame that answers the frame sent with `client_id`."""
    return lambda frame: frame.get("client_id") == client_id


def stream_frames(chat: Chat) -> list[dict[str, Any]]:
    kinds = {"message", "edit", "delete", "reaction"}
    return [{k: v for k, v in f.items() if k != "_seen"} for f in chat.frames if f.get("type") in kinds]


async def test_typing_reaches_other_replica_once_per_interval_never_echoed_nor_stored(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    alice, bob = await two(cluster, "typing", history=0)
    for _ in range(5):
        await send(alice, type="typing")
    frame = await bob.wait_for(lambda f: f.get("type") == "typing")
    assert {k: v for k, v in frame.items() if k != "_seen"} == {
        "type": "typing",
        "room": "typing",
        "user": "alice",
    }
    await bob.drain_for(0.5)
    await alice.drain_for(0.1)
    assert len(bob.of("typing")) == 1, "extras within 2 s are dropped silently"
    assert not alice.of("typing") and not alice.of("error"), "never echoed, never an error"
    await asyncio.sleep(2.1)
    await send(alice, type="typing")
    await bob.wait_for(lambda f: f.get("type") == "typing")
    assert await history(cluster, "typing") == []
    carol = await Chat.join(cluster.url.replace("http", "ws"), "typing", username="carol", since="0-0")
    await carol.drain_for(0.3)
    assert not carol.of("typing"), "never replayed"
    for chat in (alice, bob, carol):
        await chat.close()


async def test_edit_and_delete_in_one_order_everywhere_and_latest_form_in_history(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    alice, bob = await two(cluster, "edits", history=0)
    carol = await Chat.join(cluster.replica_ws_url(0), "edits", username="carol", history=0)
    first = await post(alice, "helo")
    second = await post(bob, "oops")
    await send(alice, type="edit", id=first, text="hello", client_id="e1")
    edit_ack = await alice.wait_for(lambda f: f.get("client_id") == "e1")
    assert edit_ack["type"] == "ack" and edit_ack["id"] > second
    await send(bob, type="delete", id=second, client_id="d1")
    delete_ack = await bob.wait_for(lambda f: f.get("client_id") == "d1")
    edit = await bob.wait_for(lambda f: f.get("type") == "edit")
    assert edit["id"] == edit_ack["id"] and edit["target"] == first and edit["text"] == "hello"
    assert edit["room"] == "edits" and edit["user"] == "alice" and isinstance(edit["ts"], float)
    delete = await alice.wait_for(lambda f: f.get("type") == "delete")
    assert delete["id"] == delete_ack["id"] and delete["target"] == second and "text" not in delete
    await carol.collect(2)
    await carol.wait_for(lambda f: f.get("type") == "delete")
    ids = [f["id"] for f in stream_frames(carol)]
    assert ids == sorted(ids) == [first, second, edit["id"], delete["id"]], "one order on every member"
    messages = await history(cluster, "edits")
    assert [m["id"] for m in messages] == [first, second]
    assert messages[0]["text"] == "hello" and messages[0]["edited_ts"] == edit["ts"]
    assert messages[1]["deleted"] is True and "text" not in messages[1]
    dave = await Chat.join(cluster.url.replace("http", "ws"), "edits", username="dave")
    replay = await dave.collect(2)
    assert [m.get("text") for m in replay] == ["hello", None] and replay[1]["deleted"] is True
    assert not dave.of("edit") and not dave.of("delete"), "a join gets the latest form, not the changes"
    for chat in (alice, bob, carol, dave):
        await chat.close()


async def test_edit_errors_not_found_forbidden_invalid(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(2)
    alice, bob = await two(cluster, "refuse", history=0)
    mine = await post(alice, "mine")
    await send(bob, type="edit", id=mine, text="yours now", client_id="x1")
    assert (await bob.wait_for(lambda f: f.get("client_id") == "x1"))["code"] == "forbidden"
    await send(bob, type="delete", id=mine, client_id="x2")
    assert (await bob.wait_for(lambda f: f.get("client_id") == "x2"))["code"] == "forbidden"
    await send(alice, type="edit", id="1-1", text="ghost", client_id="x3")
    assert (await alice.wait_for(lambda f: f.get("client_id") == "x3"))["code"] == "not_found"
    await send(alice, type="edit", id="not-an-id", text="x", client_id="x4")
    assert (await alice.wait_for(lambda f: f.get("client_id") == "x4"))["code"] == "invalid"
    await send(alice, type="delete", id=mine, client_id="x5")
    await alice.wait_for(lambda f: f.get("client_id") == "x5" and f["type"] == "ack")
    await send(alice, type="edit", id=mine, text="too late", client_id="x6")
    assert (await alice.wait_for(lambda f: f.get("client_id") == "x6"))["code"] == "not_found"
    await bob.drain_for(0.3)
    assert not bob.of("edit"), "a refused edit reaches no one"
    assert [m.get("deleted") for m in await history(cluster, "refuse")] == [True]
    for chat in (alice, bob):
        await chat.close()


async def test_resume_across_an_edit_and_a_delete_gives_the_latest_state(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    alice, bob = await two(cluster, "resume", history=0)
    keep = await post(alice, "keep me")
    drop = await post(alice, "drop me")
    await bob.collect(2)
    since = bob.of("message")[-1]["id"]
    await bob.close()
    await send(alice, type="edit", id=keep, text="kept and edited", client_id="e")
    await send(alice, type="delete", id=drop, client_id="d")
    await alice.collect(4, kind="ack")
    back = await Chat.join(cluster.replica_ws_url(1), "resume", username="bob", since=since)
    await back.wait_for(lambda f: f.get("type") == "delete")
    await back.drain_for(0.3)
    state: dict[str, dict[str, Any]] = {keep: {"text": "keep me"}, drop: {"text": "drop me"}}
    for frame in stream_frames(back):
        if frame["type"] == "edit":
            state[frame["target"]]["text"] = frame["text"]
        elif frame["type"] == "delete":
            state[frame["target"]] = {"deleted": True}
    assert state == {keep: {"text": "kept and edited"}, drop: {"deleted": True}}
    assert [f["type"] for f in stream_frames(back)] == ["edit", "delete"], "each change once, in order"
    for chat in (alice, back):
        await chat.close()


async def test_pubsub_kill_between_an_edit_and_its_delivery_back_fills_it_once(
    make_cluster: Callable[..., LocalCluster], redis: RedisServer
) -> None:
    cluster = make_cluster(2)
    alice, bob = await two(cluster, "gap", history=0)
    target = await post(alice, "before")
    await bob.wait_for(lambda f: f.get("text") == "before")
    redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
    await send(alice, type="edit", id=target, text="after", client_id="e")
    await send(alice, type="react", target=target, emoji="👍", on=True, client_id="r")
    await alice.collect(3, kind="ack")
    await bob.wait_for(lambda f: f.get("type") == "reaction", timeout=15)
    await bob.drain_for(0.5)
    assert [f["type"] for f in stream_frames(bob)] == ["message", "edit", "reaction"], "back-filled once each"
    assert not bob.of("resync")
    for chat in (alice, bob):
        await chat.close()


async def test_reactions_are_idempotent_ordered_and_folded_into_history(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    alice, bob = await two(cluster, "react", history=0)
    target = await post(alice, "react to me")
    await send(bob, type="react", target=target, emoji="👍", on=True, client_id="r1")
    await send(bob, type="react", target=target, emoji="👍", on=True, client_id="r2")
    await send(alice, type="react", target=target, emoji="👍🏽", on=True, client_id="r3")
    await send(alice, type="react", target=target, emoji="🇫🇷", on=True, client_id="r4")
    await send(alice, type="react", target=target, emoji="🇫🇷", on=False, client_id="r5")
    for cid, chat in (("r1", bob), ("r2", bob), ("r3", alice), ("r4", alice), ("r5", alice)):
        assert (await chat.wait_for(answer_to(cid)))["type"] == "ack"
    await send(bob, type="react", target=target, emoji="ab", on=True, client_id="bad")
    assert (await bob.wait_for(lambda f: f.get("client_id") == "bad"))["code"] == "invalid"
    await send(bob, type="react", target=target, emoji="👍👍", on=True, client_id="two")
    assert (await bob.wait_for(lambda f: f.get("client_id") == "two"))["code"] == "invalid"
    await send(bob, type="react", target="1-0", emoji="👍", on=True, client_id="nf")
    assert (await bob.wait_for(lambda f: f.get("client_id") == "nf"))["code"] == "not_found"
    await alice.wait_for(lambda f: f.get("type") == "reaction")
    await bob.collect(3, kind="reaction")
    await alice.drain_for(0.3)
    seen = [(f["user"], f["emoji"], f["on"]) for f in bob.of("reaction")]
    assert seen == [("alice", "👍🏽", True), ("alice", "🇫🇷", True), ("alice", "🇫🇷", False)]
    assert [(f["user"], f["emoji"]) for f in alice.of("reaction")] == [("bob", "👍")], (
        "the repeat added nothing"
    )
    reaction = alice.of("reaction")[0]
    assert reaction["target"] == target and reaction["room"] == "react" and reaction["on"] is True
    [message] = await history(cluster, "react")
    assert message["reactions"] == {"👍": ["bob"], "👍🏽": ["alice"]}
    for chat in (alice, bob):
        await chat.close()


async def test_at_most_twenty_distinct_reactions_per_message(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    alice = await Chat.join(cluster.replica_ws_url(0), "many", username="alice", history=0)
    target = await post(alice, "popular")
    emojis = [chr(0x1F600 + i) for i in range(21)]
    for index, emoji in enumerate(emojis):
        await send(alice, type="react", target=target, emoji=emoji, on=True, client_id=f"c{index}")
    answers = [await alice.wait_for(answer_to(f"c{i}")) for i in range(21)]
    assert [a["type"] for a in answers] == ["ack"] * 20 + ["error"]
    assert answers[-1]["code"] == "invalid"
    [message] = await history(cluster, "many")
    assert len(message["reactions"]) == 20
    await alice.close()


async def test_read_markers_move_forward_reach_other_sockets_and_count_unread(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    alice, bob = await two(cluster, "reads", history=0)
    alice_too = await Chat.join(cluster.replica_ws_url(1), "reads", username="alice", history=0)
    ids = [await post(bob, f"m{i}") for i in range(5)]
    await send(alice, type="read", id=ids[2])
    frame = await alice_too.wait_for(lambda f: f.get("type") == "read")
    assert {k: v for k, v in frame.items() if k != "_seen"} == {"type": "read", "room": "reads", "id": ids[2]}
    await send(alice, type="read", id=ids[0])  # backwards: ignored
    await alice_too.drain_for(0.3)
    await alice.drain_for(0.1)
    assert len(alice_too.of("read")) == 1 and not alice.of("read"), "forward only, not echoed to its sender"
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        body = (await http.get("/api/me/rooms", params={"username": "alice"})).json()
        assert body == {"rooms": [{"room": "reads", "last_read": ids[2], "unread": 2}]}
        bob_rooms = (await http.get("/api/me/rooms", params={"username": "bob"})).json()["rooms"]
        assert [r["room"] for r in bob_rooms] == ["reads"] and bob_rooms[0]["unread"] == 5
        assert (await http.get("/api/me/rooms", params={"username": "bad name"})).status_code == 400
    for chat in (alice, bob, alice_too):
        await chat.close()


async def test_private_rooms_open_only_to_the_two_users_they_name(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2, env={"CHORUS_AUTH_JWT_SECRET": SECRET})
    room = "dm.alice.bob"
    alice = await Chat.join(cluster.replica_ws_url(0), room, token=token("alice", rooms=["lobby"]))
    bob = await Chat.join(cluster.replica_ws_url(1), room, token=token("bob"))
    first = await post(alice, "just us")
    await bob.wait_for(lambda f: f.get("text") == "just us")
    for who, target in (("carol", room), ("alice", "dm.bob.alice"), ("alice", "dm.alice.bob.carol")):
        with pytest.raises(InvalidStatus) as refused:
            await Chat.join(cluster.ws_url, target, token=token(who))
        assert refused.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        as_carol = {"Authorization": f"Bearer {token('carol')}"}
        assert (await http.get(f"/api/rooms/{room}/history", headers=as_carol)).status_code == 403
        as_bob = {"Authorization": f"Bearer {token('bob')}"}
        assert (await http.get(f"/api/rooms/{room}/history", headers=as_bob)).status_code == 200
        rooms = (await http.get("/api/me/rooms", headers=as_bob)).json()["rooms"]
        assert [r["room"] for r in rooms] == [room]
    # A moderator may edit anyone's message; bob may not.
    await send(bob, type="edit", id=first, text="not yours", client_id="b")
    assert (await bob.wait_for(lambda f: f.get("client_id") == "b"))["code"] == "forbidden"
    for chat in (alice, bob):
        await chat.close()


async def test_moderator_may_edit_and_delete_anyones_message(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2, env={"CHORUS_AUTH_JWT_SECRET": SECRET})
    alice = await Chat.join(cluster.replica_ws_url(0), "mod", token=token("alice"), history=0)
    mod = await Chat.join(cluster.replica_ws_url(1), "mod", token=token("mo", roles=["moderator"]), history=0)
    target = await post(alice, "rude")
    await send(mod, type="edit", id=target, text="[removed]", client_id="m1")
    assert (await mod.wait_for(lambda f: f.get("client_id") == "m1"))["type"] == "ack"
    edit = await alice.wait_for(lambda f: f.get("type") == "edit")
    assert edit["user"] == "mo" and edit["text"] == "[removed]"
    await send(mod, type="delete", id=target, client_id="m2")
    assert (await mod.wait_for(lambda f: f.get("client_id") == "m2"))["type"] == "ack"
    await alice.wait_for(lambda f: f.get("type") == "delete")
    for chat in (alice, mod):
        await chat.close()


async def test_private_rooms_are_refused_without_auth(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1)
    with pytest.raises(InvalidStatus) as refused:
        await Chat.join(cluster.ws_url, "dm.alice.bob", username="alice")
    assert refused.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        assert (await http.get("/api/rooms/dm.alice.bob/history")).status_code == 403
        assert (await http.get("/api/rooms/dm.alice.bob/presence")).status_code == 403


async def test_new_frame_types_are_counted(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1)
    alice = await Chat.join(cluster.replica_ws_url(0), "count", username="alice", history=0)
    target = await post(alice, "x")
    await send(alice, type="typing")
    await send(alice, type="read", id=target)
    await send(alice, type="react", target=target, emoji="🎉", on=True, client_id="r")
    await alice.wait_for(lambda f: f.get("client_id") == "r")
    async with httpx.AsyncClient() as http:
        text = (await http.get(cluster.replica_url(0) + "/metrics")).text
    for kind in ("message", "typing", "read", "react"):
        assert f'chorus_frames_received_total{{type="{kind}"}} 1.0' in text, kind
    await alice.close()
