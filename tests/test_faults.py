"""Redis faults, dead replicas, slow consumers and drains, with real processes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chorus.devcluster import LocalCluster, RedisServer, find_binary, http_status
from tests import wsraw
from tests.chat import Chat, metric_value, metrics_text, poll, texts

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def has_client_id(client_id: str, frame: dict[str, Any]) -> bool:
    return frame.get("client_id") == client_id


def ready_states(cluster: LocalCluster) -> list[int | None]:
    return [http_status(cluster.replica_url(i) + "/readyz") for i in range(len(cluster.replicas))]


async def test_redis_restart_readiness_resubscribe_and_unavailable(
    make_cluster: Callable[..., LocalCluster], redis: RedisServer
) -> None:
    cluster: LocalCluster = make_cluster(2)
    a = await Chat.join(cluster.replica_ws_url(0), "fault", username="a")
    b = await Chat.join(cluster.replica_ws_url(1), "fault", username="b")
    redis.stop()
    took = await poll(lambda: ready_states(cluster) == [503, 503], 5, "/readyz 503 on both replicas")
    assert took < 5
    # A send while Redis is down gets `unavailable` quickly, never silence.
    started = time.monotonic()
    await a.send("lost?", client_id="down-1")
    err = await a.wait_for(lambda f: f.get("type") == "error", timeout=5)
    assert err["code"] == "unavailable" and err["client_id"] == "down-1"
    assert time.monotonic() - started < 2.5
    assert http_status(cluster.replica_url(0) + "/livez") == 200
    redis.start()
    await poll(lambda: ready_states(cluster) == [200, 200], 8, "both replicas ready again")
    await a.send("after restart")
    assert (await b.wait_for(lambda f: f.get("type") == "message"))["text"] == "after restart"
    await b.send("and back")
    assert (await a.wait_for(lambda f: f.get("type") == "message"))["text"] == "and back"
    assert all(replica.alive() for replica in cluster.replicas), "no process exits"
    for chat in (a, b):
        await chat.close()


async def test_redis_dying_under_pipelined_sends_answers_every_sender_unavailable(
    make_cluster: Callable[..., LocalCluster], redis: RedisServer
) -> None:
    # Ten senders on one replica share its pipelined Redis connection: Redis stops answering
    # (SIGSTOP) with their appends written, then dies. Each sender hears `unavailable` for its
    # own message, none silence; after a restart the next sends are stored and delivered.
    cluster: LocalCluster = make_cluster(1)
    chats = [await Chat.join(cluster.replica_ws_url(0), "pipe", username=f"p{i}") for i in range(10)]
    try:
        for chat in chats:  # an ack: the join's own Redis work (replay, rooms list) is done
            await chat.send("hello", client_id="h")
            await chat.wait_for(lambda f: f.get("type") == "ack")
        assert redis.process is not None
        redis.process.signal(signal.SIGSTOP)
        await asyncio.gather(*(chat.send("lost?", client_id=f"c{i}") for i, chat in enumerate(chats)))
        redis.kill()
        for i, chat in enumerate(chats):
            want = f"c{i}"
            err = await chat.wait_for(partial(has_client_id, want), timeout=10)
            assert (err["type"], err["code"]) == ("error", "unavailable"), err
        redis.start()
        await poll(lambda: ready_states(cluster) == [200], 10, "the replica ready again")
        await chats[0].send("after", client_id="a1")
        assert (await chats[0].wait_for(lambda f: f.get("type") == "ack"))["client_id"] == "a1"
        await chats[1].wait_for(lambda f: f.get("text") == "after")
    finally:
        await asyncio.gather(*(chat.close() for chat in chats))


async def test_killed_pubsub_connection_is_restored_and_the_gap_back_filled(
    make_cluster: Callable[..., LocalCluster], redis: RedisServer
) -> None:
    cluster: LocalCluster = make_cluster(2)
    sender = await Chat.join(cluster.replica_ws_url(0), "gap", username="s")
    receiver = await Chat.join(cluster.replica_ws_url(1), "gap", username="r")
    await sender.send("m0")
    await receiver.wait_for(lambda f: f.get("text") == "m0")
    # Kill every pub/sub connection and publish at once: these land while nobody listens.
    redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
    for i in range(1, 21):
        await sender.send(f"m{i}")
    await sender.collect(21, kind="ack")
    await receiver.collect(21, timeout=10)
    await receiver.drain_for(0.5)
    assert texts(receiver.of("message")) == [f"m{i}" for i in range(21)], "back-filled, once each, in order"
    assert not receiver.of("resync")
    # The operator sees it: the reconnect and the back-fill are counted (gauges sampled each second).
    for _ in range(40):
        metrics = await metrics_text(cluster.replica_url(1))
        if metric_value(metrics, "chorus_broker_reconnects_total") >= 1:
            break
        await asyncio.sleep(0.1)
    assert metric_value(metrics, "chorus_broker_reconnects_total") >= 1
    assert metric_value(metrics, "chorus_broker_backfilled_total") >= 1
    for chat in (sender, receiver):
        await chat.close()


async def test_gap_that_history_cannot_fill_sends_resync(
    make_cluster: Callable[..., LocalCluster], redis: RedisServer
) -> None:
    cluster: LocalCluster = make_cluster(1)
    chat = await Chat.join(cluster.replica_ws_url(0), "lost", username="x")
    await chat.send("before")
    await chat.collect(1, kind="ack")
    redis.restart()  # no persistence: the room's stream is gone
    frame = await chat.wait_for(lambda f: f.get("type") == "resync", timeout=15)
    assert frame == {"type": "resync", "room": "lost", "_seen": True}
    await chat.close()


async def test_replica_started_while_redis_is_down_becomes_ready_later(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    redis.stop()
    cluster = LocalCluster(1, redis=redis, workdir=tmp_path_factory.mktemp("down"))
    try:
        cluster.start(wait_ready=False)
        url = cluster.replica_url(0)
        await poll(lambda: http_status(url + "/livez") == 200, 20, "livez")
        assert http_status(url + "/readyz") == 503
        async with httpx.AsyncClient() as http:
            assert (await http.get(url + "/readyz")).json()["status"] == "not ready"
        redis.start()
        took = await poll(lambda: http_status(url + "/readyz") == 200, 10, "ready after Redis appears")
        assert took < 8
        chat = await Chat.join(url.replace("http", "ws"), "late", username="l")
        await chat.send("hello")
        await chat.collect(1, kind="ack")
        await chat.close()
    finally:
        cluster.stop()


async def test_resume_on_another_replica_after_sigkill(cluster: LocalCluster) -> None:
    victim = await Chat.join(cluster.replica_ws_url(0), "crash", username="v")
    other = await Chat.join(cluster.replica_ws_url(1), "crash", username="o")
    await other.send("seen")
    last = (await victim.wait_for(lambda f: f.get("text") == "seen"))["id"]
    cluster.replicas[0].signal(signal.SIGKILL)
    cluster.replicas[0].wait(10)
    for i in range(10):
        await other.send(f"while-dead-{i}")
    await other.collect(11, kind="ack")
    cluster.wait_proxy_sees(2)
    back = await Chat.join(cluster.ws_url, "crash", username="v", since=last)
    assert back.replica != "replica-0"
    await other.send("live-after")
    await back.wait_for(lambda f: f.get("text") == "live-after")
    await back.drain_for(0.3)
    assert texts(back.of("message")) == [f"while-dead-{i}" for i in range(10)] + ["live-after"]
    await back.close()
    await other.close()


async def test_slow_consumer_is_closed_with_1013_and_memory_stays_bounded(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster: LocalCluster = make_cluster(1, env={"CHORUS_SEND_QUEUE_SIZE": "64"})
    port = cluster.replica_ports[0]
    url = cluster.replica_ws_url(0)
    slow = wsraw.handshake(port, "/ws/flood?username=slow&history=0", rcvbuf=4096)
    fast = await Chat.join(url, "flood", username="fast", history=0)
    sender = await Chat.join(url, "flood", username="sender", history=0)
    replica = cluster.replicas[0]
    before = replica.rss_kib()
    text = "x" * 4000
    # More than the kernel's socket buffers (up to 4 MiB with autotuning) can absorb.
    total = 2500
    for i in range(total):
        await sender.send(f"{i:05d}{text}")
        if i % 100 == 99:
            await sender.collect(i + 1, kind="ack", timeout=20)
            await fast.collect(i + 1, timeout=20)
    got = await fast.collect(total, timeout=30)
    assert [frame["text"][:5] for frame in got] == [f"{i:05d}" for i in range(total)], "others unaffected"
    grown = replica.rss_kib() - before
    # 10 MB went through; a replica that buffered it for the slow reader would hold it.
    assert grown < 5000, f"replica RSS grew by {grown} KiB"
    assert await asyncio.to_thread(wsraw.read_close_code, slow, 20) == 1013
    slow.close()
    metrics = await metrics_text(cluster.replica_url(0))
    assert 'chorus_messages_dropped_total{reason="slow_consumer"}' in metrics
    assert 'chorus_connections_closed_total{code="1013"}' in metrics
    for chat in (fast, sender):
        await chat.close()


async def test_undecodable_payload_from_redis_cli_is_dropped_and_the_room_lives_on(
    cluster: LocalCluster, redis: RedisServer
) -> None:
    a = await Chat.join(cluster.replica_ws_url(0), "junk", username="a")
    b = await Chat.join(cluster.replica_ws_url(1), "junk", username="b")
    redis.cli("PUBLISH", "chorus:msg:{junk}", "plain text, not a Chorus frame")
    # Raw bytes that are not UTF-8 at all, exactly as an attacker with redis-cli would send.
    subprocess.run(
        [find_binary("redis-cli"), "-p", str(redis.port), "-x", "PUBLISH", "chorus:msg:{junk}"],
        input=b"\xff\xfe\x00garbage", check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    subprocess.run(
        [find_binary("redis-cli"), "-p", str(redis.port), "-x", "PUBLISH", "chorus:msg:{junk}"],
        input=b'x {"type":"message","id":"\xff', check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    await a.send("still alive")
    assert (await b.wait_for(lambda f: f.get("type") == "message"))["text"] == "still alive"
    await b.drain_for(0.2)
    assert texts(b.of("message")) == ["still alive"]
    assert ready_states(cluster) == [200, 200, 200]
    for chat in (a, b):
        await chat.close()


async def test_sigterm_drains_then_exits_zero(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster: LocalCluster = make_cluster(2, env={"CHORUS_DRAIN_SECONDS": "2"})
    url = cluster.replica_url(0)
    chats = [await Chat.join(url.replace("http", "ws"), "drain", username=f"d{i}") for i in range(8)]
    started = time.monotonic()
    cluster.replicas[0].signal(signal.SIGTERM)
    await poll(lambda: http_status(url + "/readyz") == 503, 2, "readyz 503 at once")
    assert http_status(url + "/livez") == 200
    async with httpx.AsyncClient() as http:
        assert (await http.get(url + "/readyz")).json()["reason"] == "draining"
    with pytest.raises(InvalidStatus) as refused:
        await Chat.join(url.replace("http", "ws"), "drain", username="late")
    assert refused.value.response.status_code == 503

    async def closed_after(chat: Chat) -> float:
        # Read every frame (presence events too) until the close: all sockets at once, so
        # each close is timed when it happens, not when a loop over the others gets to it.
        with contextlib.suppress(ConnectionClosed):
            async for _ in chat.ws:
                pass
        return time.monotonic() - started

    closed_at = await asyncio.wait_for(asyncio.gather(*(closed_after(chat) for chat in chats)), 15)
    assert [chat.ws.close_code for chat in chats] == [1012] * len(chats)
    assert max(closed_at) - min(closed_at) > 0.2, "closes are spread over the drain window, not all at once"
    assert await asyncio.to_thread(cluster.replicas[0].wait, 15) == 0
    # The other replica still serves, so clients reconnect there.
    again = await Chat.join(cluster.replica_ws_url(1), "drain", username="d0")
    await again.close()


async def test_sigterm_with_redis_gone_still_exits_zero(
    make_cluster: Callable[..., LocalCluster], redis: RedisServer
) -> None:
    """Shutdown must not wait on a Redis that is not there (every goodbye step is bounded)."""
    cluster = make_cluster(1)
    chat = await Chat.join(cluster.replica_ws_url(0), "bye", username="b")
    await chat.send("settled")  # the ack proves the join (history replay included) is over
    await chat.collect(1, kind="ack")
    redis.kill()
    cluster.replicas[0].signal(signal.SIGTERM)
    assert await asyncio.to_thread(cluster.replicas[0].wait, 30) == 0
    await asyncio.wait_for(chat.ws.wait_closed(), 10)
    assert chat.ws.close_code == 1012
