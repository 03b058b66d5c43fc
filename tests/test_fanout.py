"""Cross-replica fan-out through a real round-robin proxy, with real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from chorus.devcluster import LocalCluster
from tests.chat import Chat, metric_value, metrics_text, texts
from tests.conftest import MemoryReplica

pytestmark = pytest.mark.anyio


async def join_spread(cluster: LocalCluster, room: str, count: int, **params: Any) -> list[Chat]:
    """Join through the proxy until members sit on every replica (round robin spreads them)."""
    chats = [await Chat.join(cluster.ws_url, room, username=f"u{i}", **params) for i in range(count)]
    assert len({chat.replica for chat in chats}) == len(cluster.replicas), [c.replica for c in chats]
    return chats


async def test_every_member_gets_every_message_once_in_stream_order(cluster: LocalCluster) -> None:
    chats = await join_spread(cluster, "lobby", 6, history=0)
    per_sender = 15
    for round_ in range(per_sender):
        for index, chat in enumerate(chats):
            await chat.send(f"m{index}-{round_}", client_id=f"c{index}-{round_}")
    total = per_sender * len(chats)
    for index, chat in enumerate(chats):
        acks = await chat.collect(per_sender, kind="ack")
        got = await chat.collect(total - per_sender)
        await chat.drain_for(0.3)
        got = chat.of("message")
        assert len(got) == total - per_sender, "each member gets the others' messages exactly once"
        assert not any(text.startswith(f"m{index}-") for text in texts(got)), "own messages come back as acks"
        assert [a["client_id"] for a in acks] == [f"c{index}-{r}" for r in range(per_sender)]
        ids = [tuple(map(int, frame["id"].split("-"))) for frame in got]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), "stream order, no duplicates"
        # Every replica delivered in the same order, with the same ids.
        assert {f["replica"] for f in got} == {c.replica for c in chats}
    orders = [[f["id"] for f in chat.of("message") + chat.of("ack")] for chat in chats]
    assert all(sorted(order) == sorted(orders[0]) for order in orders)
    for chat in chats:
        await chat.close()


async def test_history_api_and_replay_on_join(cluster: LocalCluster) -> None:
    alice = await Chat.join(cluster.ws_url, "hist", username="alice")
    for i in range(30):
        await alice.send(f"h{i}")
    await alice.collect(30, kind="ack")
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        body = (await http.get("/api/rooms/hist/history", params={"limit": 5})).json()
        assert body["room"] == "hist"
        assert texts(body["messages"]) == [f"h{i}" for i in range(25, 30)]
        assert (await http.get("/api/rooms/hist/history")).json()["messages"][0]["text"] == "h0"
        assert (await http.get("/api/rooms/hist/history", params={"limit": 500})).status_code == 422
        assert (await http.get("/api/rooms/bad room!/history")).status_code == 400
    bob = await Chat.join(cluster.ws_url, "hist", username="bob", history=7)
    await bob.collect(7)
    assert texts(bob.of("message")) == [f"h{i}" for i in range(23, 30)]
    for chat in (alice, bob):
        await chat.close()


async def test_resume_with_since_gets_exactly_the_missed_messages(cluster: LocalCluster) -> None:
    alice = await Chat.join(cluster.ws_url, "resume", username="alice")
    bob = await Chat.join(cluster.ws_url, "resume", username="bob")
    await bob.send("before")
    last = (await alice.wait_for(lambda f: f.get("text") == "before"))["id"]
    await alice.close()
    for i in range(5):
        await bob.send(f"missed{i}")
    await bob.collect(6, kind="ack")
    again = await Chat.join(cluster.ws_url, "resume", username="alice", since=last)
    await again.collect(5)
    await bob.send("live")
    await again.wait_for(lambda f: f.get("text") == "live")
    await again.drain_for(0.3)
    assert texts(again.of("message")) == [f"missed{i}" for i in range(5)] + ["live"]
    assert not again.of("resync")
    for chat in (bob, again):
        await chat.close()


async def test_unknown_or_malformed_since_gets_resync_then_history(cluster: LocalCluster) -> None:
    writer = await Chat.join(cluster.ws_url, "rs", username="w")
    for i in range(3):
        await writer.send(f"r{i}")
    await writer.collect(3, kind="ack")
    for since in ("garbage", "1-0"):
        chat = await Chat.join(cluster.ws_url, "rs", username="r", since=since, history=2)
        first = await chat.wait_for(lambda f: True)
        assert first == {"type": "resync", "room": "rs", "_seen": True}
        await chat.collect(2)
        assert texts(chat.of("message")) == ["r1", "r2"]
        await chat.close()
    await writer.close()


async def test_many_clients_joining_a_new_room_at_once_all_get_the_first_message(
    cluster: LocalCluster,
) -> None:
    chats = await asyncio.gather(
        *(Chat.join(cluster.ws_url, "storm", username=f"s{i}", history=0) for i in range(60))
    )
    assert len({chat.replica for chat in chats}) == 3
    await chats[0].send("first!")
    for chat in chats[1:]:
        frame = await chat.wait_for(lambda f: f.get("type") == "message")
        assert frame["text"] == "first!"
    await asyncio.gather(*(chat.close() for chat in chats))


async def test_a_send_burst_bigger_than_the_redis_pool_waits_its_turn_and_is_never_refused(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # Two commands in flight at a time for 40 sockets that join and send at once: redis-py's
    # own pool would refuse the overflow (MaxConnectionsError); the sends must queue instead.
    cluster = make_cluster(1, env={"CHORUS_REDIS_MAX_CONNECTIONS": "2"})
    chats = await asyncio.gather(
        *(Chat.join(cluster.replica_ws_url(0), f"burst{i}", username=f"b{i}", history=0) for i in range(40))
    )
    try:
        await asyncio.gather(*(chat.send("now", client_id="c") for chat in chats))
        replies = [await chat.wait_for(lambda f: f.get("client_id") == "c") for chat in chats]
        assert [reply["type"] for reply in replies] == ["ack"] * len(chats), replies
    finally:
        await asyncio.gather(*(chat.close() for chat in chats))


@pytest.mark.parametrize("window", ["0.1", "0"])
async def test_a_busy_room_shares_socket_writes_and_keeps_the_order(
    make_cluster: Callable[..., LocalCluster], window: str
) -> None:
    # 20 messages sent back to back make the room busy at once (its mean gap between fan-outs
    # falls under the 100 ms window after the first, which goes out at the end of its loop
    # turn): the rest are held about one mean gap, so each member gets them in fewer writes,
    # in order. With
    # no window (the default) only frames of one loop turn share a write: in order all the same.
    cluster = make_cluster(1, env={"CHORUS_COALESCE_SECONDS": window})
    url = cluster.replica_ws_url(0)
    chats = [await Chat.join(url, "busy", username=f"w{i}", history=0) for i in range(6)]
    try:
        for i in range(20):
            await chats[0].send(f"m{i}")
        await chats[0].collect(20, kind="ack")  # read, or the client stops reading before the close
        for chat in chats[1:]:
            assert texts(await chat.collect(20)) == [f"m{i}" for i in range(20)]
        if window != "0":
            saved = metric_value(await metrics_text(cluster.replica_url(0)), "chorus_writes_coalesced_total")
            assert saved >= 5, "each of the 5 receivers shared at least one write"
    finally:
        await asyncio.gather(*(chat.close() for chat in chats))


async def test_bad_frames_get_error_frames_and_the_socket_stays_open(cluster: LocalCluster) -> None:
    chat = await Chat.join(cluster.replica_ws_url(0), "errs", username="e")
    await chat.ws.send(json.dumps({"type": "nope", "client_id": "x1"}))
    err = await chat.wait_for(lambda f: f.get("type") == "error")
    assert err["code"] == "invalid" and err["client_id"] == "x1"
    await chat.ws.send(json.dumps({"text": "no type"}))
    assert (await chat.wait_for(lambda f: f.get("type") == "error"))["code"] == "invalid"
    await chat.ws.send(json.dumps({"type": "message", "text": 5}))
    assert (await chat.wait_for(lambda f: f.get("type") == "error"))["code"] == "invalid"
    await chat.send("x" * 4097, client_id="big")
    err = await chat.wait_for(lambda f: f.get("type") == "error")
    assert err["code"] == "too_large" and err["client_id"] == "big"
    await chat.ws.send("[1, 2]")  # not an object: taken as text
    await chat.wait_for(lambda f: f.get("type") == "ack")
    await chat.ws.send(b"\x00\x01")
    await asyncio.wait_for(chat.ws.wait_closed(), 5)
    assert chat.ws.close_code == 1003


async def test_handshake_refuses_bad_room_username_and_history(cluster: LocalCluster) -> None:
    from websockets.exceptions import InvalidStatus

    for path in ("/ws/bad%20room", "/ws/ok?username=bad%20name", "/ws/ok?history=101", "/ws/ok?history=x"):
        with pytest.raises(InvalidStatus) as info:
            await Chat.join(cluster.ws_url, path.removeprefix("/ws/"))
        assert info.value.response.status_code == 400


async def test_memory_broker_replica_serves_a_room_on_its_own(memory_replica: MemoryReplica) -> None:
    """`make run`: no Redis, one replica; messages, history and resume work, and a warning says so."""
    base = memory_replica.url.replace("http", "ws")
    alice = await Chat.join(base, "solo", username="alice")
    bob = await Chat.join(base, "solo", username="bob")
    for i in range(5):
        await alice.send(f"s{i}")
    got = await bob.collect(5)
    assert texts(got) == [f"s{i}" for i in range(5)]
    await bob.close()
    await alice.send("while bob was away")
    await alice.collect(6, kind="ack")
    back = await Chat.join(base, "solo", username="bob", since=got[-1]["id"])
    assert texts(await back.collect(1)) == ["while bob was away"]
    async with httpx.AsyncClient() as http:
        body = (await http.get(memory_replica.url + "/api/rooms/solo/history?limit=2")).json()
    assert texts(body["messages"]) == ["s4", "while bob was away"]
    assert "CHORUS_REDIS_URL is not set" in memory_replica.process.output()
    for chat in (alice, back):
        await chat.close()


def test_bad_setting_stops_serve_with_one_line_naming_it(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "CHORUS_SEND_QUEUE_SIZE": "lots"}
    result = subprocess.run(
        [sys.executable, "-m", "chorus", "serve", "--port", "1"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("chorus: error: CHORUS_SEND_QUEUE_SIZE: Input should be a valid integer")
