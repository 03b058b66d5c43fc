"""Presence across replicas: counts, multi-tab users counted once, dead replicas expire.

Presence reaches members as diff frames, at most one per room per interval
(CHORUS_PRESENCE_INTERVAL_SECONDS); `Chat.presence_changes` flattens them.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from chorus.devcluster import LocalCluster, wait_until
from tests.chat import Chat
from tests.conftest import MemoryReplica

pytestmark = pytest.mark.anyio

HEARTBEAT = 1.0
# 3 missed heartbeats expire a replica; a survivor notices within one more interval.
EXPIRY = 4 * HEARTBEAT


INTERVAL = 0.5  # the default CHORUS_PRESENCE_INTERVAL_SECONDS


def presence_events(chat: Chat) -> list[tuple[str, str, int]]:
    return chat.presence_changes()


async def settle(sender: Chat, *watchers: Chat, text: str) -> None:
    """Send a message, wait until every watcher has it, then read one more presence interval.

    Presence changes are published in order with messages but batched per interval on the
    way out: a change made before the message reaches a watcher within one interval of it.
    """
    await sender.send(text, client_id=text)
    await sender.wait_for(lambda f: f.get("type") == "ack" and f.get("client_id") == text)
    for chat in watchers:
        await chat.wait_for(lambda f: f.get("text") == text)
    for chat in (sender, *watchers):
        await chat.drain_for(2 * INTERVAL)


def presence_of(base: str, room: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/api/rooms/{room}/presence")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


async def test_counts_across_replicas_and_multi_tab_users_counted_once(cluster: LocalCluster) -> None:
    room = "presence"
    alice = await Chat.join(cluster.ws_url, room, username="alice", history=0)
    assert alice.welcome["online"] == 1
    bob = await Chat.join(cluster.ws_url, room, username="bob", history=0)
    carol = await Chat.join(cluster.ws_url, room, username="carol", history=0)
    assert len({alice.replica, bob.replica, carol.replica}) == 3, "round robin spreads them"
    assert (bob.welcome["online"], carol.welcome["online"]) == (2, 3)

    # (A diff still pending when a socket joins reaches it too: let bob's and carol's go out.)
    await settle(carol, alice, bob, text="before the tabs")
    # Two more tabs of alice, on whichever replicas the proxy picks: no one hears of them.
    tabs = [await Chat.join(cluster.ws_url, room, username="alice", history=0) for _ in range(2)]
    assert [tab.welcome["online"] for tab in tabs] == [3, 3]
    await settle(carol, alice, bob, *tabs, text="after the tabs")
    for index in range(3):
        body = presence_of(cluster.replica_url(index), room)
        assert body == {"room": room, "online": 3, "users": ["alice", "bob", "carol"]}

    # Closing two of alice's three tabs is not a leave; closing the last one is, once. (A
    # client's close returns before the server has seen it, so wait for the leave itself.)
    for tab in (alice, *tabs):
        await tab.close()
    for chat in (bob, carol):
        await chat.wait_for_change("leave", "alice")
    await settle(carol, bob, text="all tabs closed")

    assert presence_events(bob) == [("join", "carol", 3), ("leave", "alice", 2)]
    assert presence_events(carol) == [("leave", "alice", 2)]
    # bob and carol joined within one interval or two: one frame or two, the same changes.
    heard = [(event, user) for event, user, _ in presence_events(alice)]
    assert heard == [("join", "bob"), ("join", "carol")]
    assert alice.of("presence")[-1]["online"] == 3
    assert presence_events(tabs[0]) == presence_events(tabs[1]) == []
    assert presence_of(cluster.url, room) == {"room": room, "online": 2, "users": ["bob", "carol"]}
    for chat in (bob, carol):
        await chat.close()


async def test_a_killed_replica_leaves_presence_within_the_expiry(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(3, env={"CHORUS_PRESENCE_HEARTBEAT_SECONDS": str(HEARTBEAT)})
    room = "doomed"
    ws = [cluster.replica_ws_url(i) for i in range(3)]
    victim = await Chat.join(ws[0], room, username="victim", history=0)
    # dave has a tab on the doomed replica and one on a survivor: he stays online.
    dave_doomed = await Chat.join(ws[0], room, username="dave", history=0)
    dave = await Chat.join(ws[1], room, username="dave", history=0)
    watchers = [await Chat.join(ws[i], room, username=f"w{i}", history=0) for i in (1, 2)]
    assert watchers[1].welcome["online"] == 4
    assert victim.replica == dave_doomed.replica == "replica-0"

    cluster.replicas[0].signal(signal.SIGKILL)
    for watcher in watchers:
        await watcher.wait_for_change("leave", "victim", timeout=EXPIRY + 6)
    await settle(dave, *watchers, text="after the kill")
    for watcher in watchers:
        # Every survivor races to reap the dead replica; the leave is still announced once.
        assert [e for e in presence_events(watcher) if e[0] == "leave"] == [("leave", "victim", 3)]
    assert presence_of(cluster.replica_url(1), room)["users"] == ["dave", "w1", "w2"]

    # Redis loses everything (a restart without persistence): the live replicas notice their
    # heartbeat lapsed and put their connections back.
    cluster.redis.cli("FLUSHALL")
    wait_until(
        lambda: presence_of(cluster.replica_url(2), room)["users"] == ["dave", "w1", "w2"],
        EXPIRY + 6,
        "the survivors to re-register their members",
    )
    for chat in (dave, *watchers):
        await chat.close()


async def test_memory_broker_presence_behaves_the_same(memory_replica: MemoryReplica) -> None:
    ws = memory_replica.url.replace("http", "ws")
    bob = await Chat.join(ws, "solo", username="bob", history=0)
    tabs = [await Chat.join(ws, "solo", username="alice", history=0) for _ in range(2)]
    assert [bob.welcome["online"], *(t.welcome["online"] for t in tabs)] == [1, 2, 2]
    assert presence_of(memory_replica.url, "solo") == {"room": "solo", "online": 2, "users": ["alice", "bob"]}
    await tabs[0].close()
    await settle(tabs[1], bob, text="one tab closed")
    await tabs[1].close()
    await bob.wait_for_change("leave", "alice")
    await bob.drain_for(2 * INTERVAL)
    assert presence_events(bob) == [("join", "alice", 2), ("leave", "alice", 1)]
    await bob.close()


async def test_a_wave_of_joins_reaches_a_member_as_few_diffs(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # A long interval makes the batching visible without timing anything: 20 joins that land
    # within it reach the watcher as one or two diffs, never one frame each.
    cluster = make_cluster(2, env={"CHORUS_PRESENCE_INTERVAL_SECONDS": "5"})
    room = "wave"
    watcher = await Chat.join(cluster.replica_ws_url(0), room, username="watcher", history=0)
    await watcher.drain_for(0.2)
    joiners = [await Chat.join(cluster.ws_url, room, username=f"u{i}", history=0) for i in range(20)]
    heard: set[str] = set()
    while heard != {f"u{i}" for i in range(20)}:
        frame = await watcher.wait_for(lambda f: f.get("type") == "presence", timeout=15)
        heard |= set(frame.get("joins", []))
    assert len(watcher.of("presence")) < 20 // 2, "a wave is batched, not announced join by join"
    assert watcher.of("presence")[-1]["online"] == 21
    assert sorted(u for e, u, _ in watcher.presence_changes() if e == "join") == sorted(heard)
    for chat in (watcher, *joiners):
        await chat.close()


async def test_a_big_room_carries_only_its_count(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1, env={"CHORUS_PRESENCE_MAX_MEMBERS": "3"})
    ws = cluster.replica_ws_url(0)
    watcher = await Chat.join(ws, "big", username="watcher", history=0)
    others = [await Chat.join(ws, "big", username=f"u{i}", history=0) for i in range(4)]
    await watcher.wait_for(lambda f: f.get("type") == "presence" and f["online"] == 5)
    last = watcher.of("presence")[-1]
    assert "joins" not in last and "leaves" not in last, "above the threshold: the count only"
    assert presence_of(cluster.replica_url(0), "big")["users"] == ["u0", "u1", "u2", "u3", "watcher"]
    for chat in (watcher, *others):
        await chat.close()


async def test_a_replica_forgets_rooms_it_no_longer_holds(cluster: LocalCluster) -> None:
    # chorus:presence-rooms:{owner} once grew with every room a replica ever held.
    ws = cluster.replica_ws_url(0)
    chats = [await Chat.join(ws, f"short-{i}", username="u", history=0) for i in range(5)]
    keep = await Chat.join(cluster.replica_ws_url(0), "kept", username="k", history=0)

    def held() -> set[str]:
        rooms: set[str] = set()
        for key in cluster.redis.cli("--scan", "--pattern", "chorus:presence-rooms:*").split():
            rooms |= set(cluster.redis.cli("SMEMBERS", key).split())
        return rooms

    assert {f"short-{i}" for i in range(5)} | {"kept"} <= held()
    for chat in chats:
        await chat.close()
    wait_until(lambda: not any(r.startswith("short-") for r in held()), 10, "the rooms to be forgotten")
    assert "kept" in held()
    await keep.close()
