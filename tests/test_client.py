"""`chorus.client` through real replicas, Redis and HAProxy; close rules against a scripted server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosedError

import chorus.client.room as room_module
from chorus.client import (
    FATAL_CLOSE_CODES,
    Ack,
    Disconnected,
    Edit,
    Error,
    Event,
    HandshakeRefused,
    Message,
    NotConnected,
    Presence,
    Reconnect,
    Resync,
    Room,
    SendRejected,
    SendUnconfirmed,
    Stats,
    Typing,
    Welcome,
    connect,
    parse_frame,
)
from chorus.client.retry import parse_retry_after
from chorus.devcluster import LocalCluster
from tests.chat import metric_value, metrics_text, poll

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
FAST = Reconnect(base=0.05, cap=0.5, give_up_after=30)  # tests wait seconds, not minutes


async def history_ids(base: str, room: str) -> list[str]:
    async with httpx.AsyncClient() as http:
        body = (await http.get(f"{base}/api/rooms/{room}/history", params={"limit": 200})).json()
    return [frame["id"] for frame in body["messages"]]


async def next_of(room: Room, kind: type[Event], timeout: float = 10) -> Event:
    async with asyncio.timeout(timeout):
        async for event in room:
            if isinstance(event, kind):
                return event
    raise AssertionError(f"the room ended before a {kind.__name__}")


# -- through real replicas ---------------------------------------------------------------------


async def test_send_returns_its_ack_and_a_member_on_another_replica_gets_the_message(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    async with (
        connect(cluster.replica_ws_url(0), "rt", username="alice", history=0) as alice,
        connect(cluster.replica_ws_url(1), "rt", username="bob", history=0) as bob,
    ):
        assert (alice.replica, bob.replica) == ("replica-0", "replica-1")
        assert isinstance(await next_of(alice, Welcome), Welcome)
        ack = await alice.send("hello", client_id="c1")
        assert isinstance(ack, Ack) and ack.client_id == "c1"
        got = await next_of(bob, Message)
        assert isinstance(got, Message)
        assert (got.id, got.user, got.text, got.replica) == (ack.id, "alice", "hello", "replica-0")
        assert bob.last_id == ack.id
        assert await history_ids(cluster.url, "rt") == [ack.id]
        auto = await alice.send("again")  # a client_id is made up when none is given
        assert auto.client_id and auto.id > ack.id
        for room in (alice, bob):
            assert (room.stats.connects, room.stats.reconnects, room.stats.resumes) == (1, 0, 0)


async def test_a_drained_replica_moves_the_client_to_another_with_no_loss_and_no_duplicate(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    total = 150  # 3 s at the steady rate: longer than the 2 s drain window
    received: list[Message] = []
    async with connect(cluster.ws_url, "drain", username="reader", history=0, reconnect=FAST) as reader:
        assert reader.replica is not None
        victim = int(reader.replica.removeprefix("replica-"))
        survivor = 1 - victim
        async with connect(cluster.replica_ws_url(survivor), "drain", username="writer") as writer:

            async def publish() -> None:
                for i in range(total):
                    await writer.send(f"m{i}")
                    await asyncio.sleep(0.02)  # a steady rate, not a burst

            async def read() -> None:
                async for event in reader:
                    if isinstance(event, Message):
                        received.append(event)
                        if len(received) == 20:
                            cluster.replicas[victim].signal(signal.SIGTERM)
                        if len(received) >= total:
                            return

            async with asyncio.timeout(40):
                await asyncio.gather(publish(), read())
            assert reader.replica == f"replica-{survivor}"
            assert writer.stats.reconnects == 0
    ids = [message.id for message in received]
    assert [message.text for message in received] == [f"m{i}" for i in range(total)], "in order, once each"
    assert ids == await history_ids(cluster.url, "drain"), "the same ids as the room's history"
    stats = reader.stats
    assert stats.close_codes[1012] == 1 and stats.reconnects >= 1 and stats.resumes >= 1
    assert stats.connects == 1 + stats.reconnects
    assert await asyncio.to_thread(cluster.replicas[victim].wait, 15) == 0


async def test_a_member_that_saw_no_message_resumes_from_its_welcome_and_misses_nothing(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    async with connect(cluster.replica_ws_url(1), "quiet", username="early") as early:
        for i in range(3):  # history the bot does not ask for (history=0) and must not be replayed
            await early.send(f"old{i}")
    got: list[Message] = []
    async with connect(cluster.replica_ws_url(0), "quiet", username="bot", history=0, reconnect=FAST) as bot:
        # Nothing delivered yet: the bot's only position is its welcome's (the room's last entry).
        assert bot.last_id is None
        await asyncio.to_thread(cluster.stop_replica, 0)  # drained: 1012, then nowhere to go
        async with connect(cluster.replica_ws_url(1), "quiet", username="writer") as writer:
            posted = [(await writer.send(f"away{i}")).id for i in range(3)]
        await asyncio.to_thread(cluster.start_replica, 0)

        async def read() -> None:
            async for event in bot:
                if isinstance(event, Message):
                    got.append(event)
                    if len(got) == len(posted):
                        return

        async with asyncio.timeout(30):
            await read()
        assert bot.stats.resumes >= 1, "it resumed (since=<welcome last_id>), not a fresh join"
    assert [m.text for m in got] == ["away0", "away1", "away2"], "what was posted while away, once, in order"
    assert [m.id for m in got] == posted


async def test_a_full_replica_refuses_with_503_and_the_client_joins_once_there_is_room(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, env={"CHORUS_MAX_CONNECTIONS": "1"})
    url = cluster.replica_ws_url(0)
    async with connect(url, "full", username="first") as first:
        waiting = asyncio.create_task(_join_and_report(url))
        rejected = 'chorus_rejections_total{reason="max_connections"}'
        for _ in range(200):
            if metric_value(await metrics_text(cluster.replica_url(0)), rejected) >= 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the second client was never refused")
        assert not waiting.done()
        await first.close()
    stats = await asyncio.wait_for(waiting, 15)
    assert stats.refused[503] >= 2 and stats.connects == 1 and stats.reconnects == 0


async def _join_and_report(url: str) -> Stats:
    async with connect(url, "full", username="second", reconnect=FAST) as room:
        return room.stats


async def test_retry_after_on_a_refused_handshake_is_waited_in_full(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    async with (
        refusing_front(cluster.replica_ports[0], refusals=1, retry_after=1) as front,
        connect(front.url, "ra", username="patient", reconnect=FAST) as room,
    ):
        assert room.replica == "replica-0"
        assert room.stats.refused == {503: 1}
        waited = front.arrivals[1] - front.arrivals[0]
        assert waited >= 1.0, f"reconnected after {waited:.2f}s, before Retry-After"
        await room.send("in at last")
    # A budget of no reconnects gives up at once, saying what the server asked for.
    async with refusing_front(cluster.replica_ports[0], refusals=1, retry_after=7) as front:
        with pytest.raises(HandshakeRefused) as refused:
            async with connect(front.url, "ra", reconnect=Reconnect(max_attempts=0)):
                pass
    assert (refused.value.status, refused.value.retry_after, refused.value.detail) == (503, 7.0, "full")


async def test_refused_errors_surface_typed_and_the_room_goes_on(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, env={"CHORUS_MAX_MESSAGE_BYTES": "64"})
    async with connect(cluster.replica_ws_url(0), "errs", username="e", history=0) as room:
        with pytest.raises(SendRejected) as big:
            await room.send("x" * 65, client_id="big")
        assert (big.value.code, big.value.client_id, big.value.retryable) == ("too_large", "big", False)
        with pytest.raises(SendRejected) as empty:
            await room.send("   ")
        assert empty.value.code == "invalid"
        assert (await room.send("x" * 64)).id
        error = await next_of(room, Error)
        assert isinstance(error, Error) and error.code == "too_large" and error.client_id == "big"


async def test_rate_limited_sends_are_refused_typed_and_retryable(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, env={"CHORUS_RATE_LIMIT": "1", "CHORUS_RATE_BURST": "2"})
    async with connect(cluster.replica_ws_url(0), "slow", username="s", history=0) as room:
        outcomes = await asyncio.gather(*(room.send(f"r{i}") for i in range(5)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, SendRejected)]
    assert sum(isinstance(o, Ack) for o in outcomes) >= 2
    assert refused and all(o.code == "rate_limited" and o.retryable for o in refused)


async def test_tokens_go_in_the_subprotocol_are_fetched_per_handshake_and_expiry_is_final(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    secret = "a-test-secret-that-is-long-enough-for-hs256!"
    cluster = make_cluster(1, env={"CHORUS_AUTH_JWT_SECRET": secret})
    url = cluster.replica_ws_url(0)
    minted: list[str] = []

    async def fresh(ttl: float = 300) -> str:
        minted.append(jwt.encode({"sub": "tess", "exp": int(time.time() + ttl)}, secret, algorithm="HS256"))
        return minted[-1]

    async with connect(url, "auth", token=fresh) as room:
        assert room.user == "tess" and len(minted) == 1
        await room.send("signed")
    with pytest.raises(HandshakeRefused) as bad:
        async with connect(url, "auth", token="not-a-jwt", reconnect=FAST):
            pass
    assert bad.value.status == 403 and "token" in bad.value.detail
    # An expired token closes the socket with 1008: reconnecting cannot fix that, so the room ends.
    async with connect(url, "auth", token=await fresh(ttl=2), history=0, reconnect=FAST) as short:
        with pytest.raises(Disconnected) as ended:
            await next_of(short, Message, timeout=15)
    assert ended.value.code == 1008 and short.stats.connects == 1
    assert "token=" not in cluster.replicas[0].output(), "the token stays out of the URL"


async def test_chorus_smoke_crosses_two_replicas_with_the_client(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chorus", "smoke", "--url", cluster.ws_url, "--timeout", "10"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"ok: replica-[01] -> replica-[01] in [0-9.]+ ms\n", result.stdout), result.stdout
    assert len(set(re.findall(r"replica-\d", result.stdout))) == 2
    cluster.replicas[1].stop()
    cluster.wait_proxy_sees(1)
    failed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "chorus", "smoke", "--url", cluster.ws_url, "--attempts", "4"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert failed.returncode == 1
    assert "4 connections all landed on ['replica-0']" in failed.stderr


async def test_the_kind_resume_check_passes_a_rolling_restart_of_the_local_cluster(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    """k8s/kind/resume_check.py, as the kind workflow runs it, while each replica is replaced."""
    cluster = make_cluster(2)
    check = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "k8s" / "kind" / "resume_check.py"), cluster.ws_url, "250", "0.03",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        for index in range(2):
            await asyncio.to_thread(cluster.restart_replica, index)  # SIGTERM, drain, start, ready
        output = (await asyncio.wait_for(check.communicate(), 90))[0].decode()
    finally:
        if check.returncode is None:
            check.kill()
            await check.wait()
    assert check.returncode == 0, output
    assert output.startswith("resume check: ok: 250/250 messages"), output
    assert re.search(r"receiver: [1-9]\d* reconnects, [1-9]\d* resumes", output), output


async def test_the_readme_bot_answers_in_a_room(make_cluster: Callable[..., LocalCluster]) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Python client") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]
    assert len(code.strip().splitlines()) <= 12, "a bot in about ten lines"
    cluster = make_cluster(1)
    url = cluster.replica_ws_url(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = code.replace("ws://127.0.0.1:8000", url)
    bot = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with connect(url, "lobby", username="human", history=0) as room:
            await next_of(room, Presence, timeout=20)  # the bot joined
            await room.send("ping")
            answer = await next_of(room, Message)
            assert isinstance(answer, Message) and answer.text == "pong" and answer.user == "bot"
    finally:
        bot.terminate()
        output = (await asyncio.wait_for(bot.communicate(), 10))[0]
    assert b"Traceback" not in output or b"KeyboardInterrupt" in output, output


# -- close rules and sends in flight, against a scripted server --------------------------------


Script = Callable[[ServerConnection, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def scripted(script: Script, welcome: Callable[[int], bool] = lambda n: True) -> AsyncIterator[str]:
    """A WebSocket server that welcomes its n-th connection (from 0), then runs `script(ws, n)`."""
    count = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal count
        count += 1
        if welcome(count - 1):
            body = {"type": "welcome", "room": "r", "user": "u", "replica": f"s{count}", "online": 1}
            await ws.send(json.dumps(body))
        await script(ws, count - 1)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


@pytest.mark.parametrize("code", [1003, 1008, 1009, 4001])
async def test_close_codes_reconnecting_cannot_fix_end_the_room(code: int) -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        await ws.close(code, "no")

    async with scripted(script) as url, connect(url, "r", reconnect=FAST) as room:
        with pytest.raises(Disconnected) as ended:
            await next_of(room, Message)
        with pytest.raises(Disconnected):
            await room.send("after the end")
    assert ended.value.code == code and code in FATAL_CLOSE_CODES
    assert room.stats.connects == 1 and room.stats.close_codes == {code: 1}
    assert room.ended and not room.connected


@pytest.mark.parametrize("code", [1000, 1001, 1006, 1011, 1012, 1013])
async def test_close_codes_reconnecting_can_fix_reconnect_and_resume(code: int) -> None:
    since: list[str | None] = []

    async def script(ws: ServerConnection, n: int) -> None:
        assert ws.request is not None
        since.append(ws.request.path.partition("since=")[2] or None)
        if n == 0:
            await ws.send(json.dumps(_message("5-0", "first")))
            await ws.send(json.dumps({"type": "sparkle", "room": "r", "user": "t"}))  # unknown: passed on
            await ws.send(json.dumps(EDIT))  # a stream entry that is not a message
            await asyncio.sleep(0.05)
            if code == 1006:
                ws.transport.abort()
            else:
                await ws.close(code)
        else:  # a replay that repeats what we saw, then something new, then an ending close
            for frame in (_message("5-0", "first"), EDIT, _message("6-0", "second")):
                await ws.send(json.dumps(frame))
            await ws.close(4001)

    events: list[Event] = []
    async with scripted(script) as url, connect(url, "r", reconnect=FAST) as room:
        with pytest.raises(Disconnected):
            async for event in room:
                events.append(event)
    kinds = [type(event).__name__ if type(event) is not Event else event.type for event in events]
    assert kinds == ["Welcome", "Message", "sparkle", "Edit", "Welcome", "Message"], kinds
    assert [e.text for e in events if isinstance(e, Message)] == ["first", "second"]
    assert since == [None, "5-1"] and room.last_id == "6-0", "the edit moved the resume cursor"
    stats = room.stats
    assert (stats.reconnects, stats.resumes, stats.duplicates_dropped, stats.replayed) == (1, 1, 2, 1)
    assert room.stats.close_codes == {code: 1, 4001: 1}


async def test_a_send_in_flight_when_the_socket_drops_is_unconfirmed_and_can_be_resent() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        frame = json.loads(await ws.recv())
        if n == 0:
            await ws.close(1012)  # took the frame, no ack: stored or not, the client cannot tell
            return
        await ws.send(json.dumps({"type": "ack", "id": "9-0", "client_id": frame["client_id"]}))
        await ws.wait_closed()

    async with scripted(script) as url, connect(url, "r", reconnect=FAST, receive=False) as room:
        with pytest.raises(SendUnconfirmed) as lost:
            await room.send("hello", client_id="h1")
        assert lost.value.client_id == "h1"
        ack = await room.send("hello", client_id="h1")
        assert (ack.id, ack.client_id) == ("9-0", "h1")
        assert room.stats.reconnects == 1


async def test_a_send_made_while_reconnecting_waits_for_the_next_socket_or_says_it_was_not_sent() -> None:
    async def script(ws: ServerConnection, n: int) -> None:
        if n == 0:
            await ws.close(1012)
            return
        frame = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "ack", "id": "7-0", "client_id": frame["client_id"]}))
        await ws.wait_closed()

    async with scripted(script) as url, connect(url, "r", reconnect=FAST) as room:
        await poll(lambda: room.stats.close_codes[1012] == 1, 5, "the first socket to close")
        ack = await room.send("after the move")
        assert ack.id == "7-0" and room.stats.reconnects == 1

    async def silent(ws: ServerConnection, n: int) -> None:
        if n == 0:
            await ws.close(1012)
        await ws.wait_closed()

    async with (
        scripted(silent, welcome=lambda n: n == 0) as url,
        connect(url, "r", reconnect=FAST, send_timeout=0.5) as room,
    ):
        await poll(lambda: room.stats.close_codes[1012] == 1, 5, "the first socket to close")
        with pytest.raises(NotConnected):
            await room.send("nobody there")


async def test_a_refused_handshake_that_waiting_cannot_fix_is_not_retried() -> None:
    async with refusing_front(1, refusals=5, status=403) as front:
        with pytest.raises(HandshakeRefused) as refused:
            async with connect(front.url, "r", reconnect=FAST):
                pass
    assert refused.value.status == 403 and len(front.arrivals) == 1
    unreachable = Reconnect(max_attempts=2, base=0.01)
    with pytest.raises(Disconnected, match="cannot open a WebSocket") as gone:
        async with connect("ws://127.0.0.1:1", "r", reconnect=unreachable):
            pass
    assert not isinstance(gone.value, HandshakeRefused)
    for bad in ({"room": "bad room"}, {"username": "x y"}, {"history": 101}, {"url": "tcp://x"}):
        with pytest.raises(ValueError):
            async with connect(**{"url": "ws://127.0.0.1:1", "room": "r", **bad}):  # type: ignore[arg-type]
                pass


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop")])
async def test_a_proxy_answer_that_beats_the_request_out_of_a_stalled_loop_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A proxy answers 408 and hangs up when a request is late (HAProxy's `timeout http-request`).
    # A load generator's loop stalled past it; under uvloop the answer is read before the
    # request goes out and websockets fails an assertion of its own: the room ended for good.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def front() -> None:
        with contextlib.suppress(OSError):
            while True:
                peer, _ = listener.accept()
                peer.sendall(
                    b"HTTP/1.1 408 Request Time-out\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                peer.close()

    threading.Thread(target=front, daemon=True).start()

    async def stalled(*args: Any, **kwargs: Any) -> Any:
        opening = asyncio.ensure_future(ws_connect(*args, **kwargs))
        await asyncio.sleep(0)  # the connect goes out...
        time.sleep(0.2)  # ...and the loop stalls while the answer and the FIN arrive
        return await opening

    monkeypatch.setattr(room_module, "ws_connect", stalled)
    try:
        with pytest.raises(Disconnected, match="cannot open a WebSocket") as gone:
            async with connect(f"ws://127.0.0.1:{listener.getsockname()[1]}", "r",
                               reconnect=Reconnect(max_attempts=2, base=0.01)):  # fmt: skip
                pass
    finally:
        listener.close()
    assert "client failed" not in str(gone.value), "every attempt failed and was retried"


# -- pure parts ----------------------------------------------------------------------------------


def test_frames_parse_to_typed_events_and_unknown_ones_pass_through() -> None:
    msg = parse_frame(json.dumps(_message("1-2", "hi")))
    assert isinstance(msg, Message) and (msg.id, msg.text, msg.ts) == ("1-2", "hi", 1.5)
    assert parse_frame('{"type":"resync","room":"r"}') == Resync(room="r")
    assert parse_frame('{"type":"typing","room":"r","user":"u"}') == Typing(room="r", user="u")
    edit = '{"type":"edit","id":"2-0","target":"1-2","room":"r","user":"u","text":"x","ts":1}'
    assert parse_frame(edit) == Edit(id="2-0", target="1-2", room="r", user="u", text="x", ts=1.0)
    for raw in (
        '{"type":"sparkle","room":"r","user":"u"}',
        '{"type":"edit","id":"2-0"}',
        '{"type":"message","id":5}',  # a known type in a shape this client does not know
        '{"type":7}',
        "[1, 2]",
        "not json",
    ):
        event = parse_frame(raw)
        assert type(event) is Event, raw
    assert parse_frame('{"type":"sparkle","room":"r","user":"u"}').raw["user"] == "u"
    gone = parse_frame(json.dumps({**_message("3-0", "x"), "text": None} | {"deleted": True}))
    assert type(gone) is Event, "text null is not a shape this client knows"
    deleted = {k: v for k, v in _message("3-0", "x").items() if k != "text"} | {"deleted": True}
    assert parse_frame(json.dumps(deleted)) == Message(
        id="3-0", ts=1.5, room="r", user="u", text="", replica="s", deleted=True
    )
    edited = parse_frame(json.dumps(_message("3-0", "y") | {"edited_ts": 9}))
    assert isinstance(edited, Message) and edited.edited_ts == 9.0 and not edited.deleted
    presence = parse_frame('{"type":"presence","room":"r","joins":["u"],"leaves":["v"],"online":2}')
    match presence:
        case Presence(joins=("u",), leaves=("v",), online=online, counts_only=False):
            assert online == 2
        case _:
            raise AssertionError(presence)
    counts = parse_frame('{"type":"presence","room":"r","online":500}')
    assert isinstance(counts, Presence) and counts.counts_only and counts.joins == counts.leaves == ()
    older = parse_frame('{"type":"presence","room":"r","event":"join","user":"u","online":2}')
    assert isinstance(older, Presence) and (older.joins, older.leaves, older.user) == (("u",), (), "u")


def test_the_client_offers_the_subprotocols_the_server_accepts_and_stays_light() -> None:
    from chorus import security
    from chorus.client import room

    assert (room.SUBPROTOCOL, room.BEARER_PREFIX) == (security.SUBPROTOCOL, security.BEARER_PREFIX)
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, chorus.client; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    heavy = {"fastapi", "redis", "prometheus_client", "pydantic", "jwt", "chorus.app", "chorus.security"}
    assert not heavy & set(loaded), "a bot's import of chorus.client loads no server code"


def test_backoff_is_full_jitter_capped_and_retry_after_is_a_floor() -> None:
    policy = Reconnect(base=0.25, cap=10.0, max_attempts=5, give_up_after=60)
    for attempt, ceiling in ((0, 0.25), (1, 0.5), (3, 2.0), (6, 10.0), (40, 10.0)):
        delays = [policy.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays) and max(delays) > ceiling / 2
    assert all(3.0 <= policy.delay(0, retry_after=3.0) <= 3.25 for _ in range(100))
    # The fifth refusal in a row waits what the server said, not that plus a grown backoff.
    assert all(1.0 <= policy.delay(5, retry_after=1.0) <= 1.25 for _ in range(100))
    assert policy.delay(0, retry_after=10_000) <= 120.25, "a silly Retry-After is bounded"
    assert not policy.exhausted(4, 59.0) and policy.exhausted(5, 1.0) and policy.exhausted(0, 60.0)
    assert Reconnect(max_attempts=0).exhausted(0, 0.0) and not Reconnect().exhausted(10**6, 1e9)
    assert parse_retry_after("5") == 5.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


EDIT = {"type": "edit", "id": "5-1", "target": "5-0", "room": "r", "user": "u", "text": "1st", "ts": 2.0}


def _message(msg_id: str, text: str) -> dict[str, object]:
    return {
        "type": "message",
        "id": msg_id,
        "ts": 1.5,
        "room": "r",
        "user": "u",
        "text": text,
        "replica": "s",
    }


class Front:
    def __init__(self) -> None:
        self.url = ""
        self.arrivals: list[float] = []


@contextlib.asynccontextmanager
async def refusing_front(
    port: int, *, refusals: int, retry_after: int | None = None, status: int = 503
) -> AsyncIterator[Front]:
    """A TCP front that refuses the first handshakes (503 + Retry-After), then pipes to `port`."""
    front = Front()
    body = b'{"detail":"full"}'
    header = b"" if retry_after is None else b"Retry-After: %d\r\n" % retry_after
    refusal = (
        b"HTTP/1.1 %d Refused\r\n%sContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, header, len(body), body)
    )

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        front.arrivals.append(time.monotonic())
        if len(front.arrivals) <= refusals:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(refusal)
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    front.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield front
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


async def test_a_connection_lost_during_the_opening_handshake_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    calls = 0

    def flaky_connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first reconnect loses its connection before the request went out
            raise ConnectionClosedError(None, None)
        return ws_connect(*args, **kwargs)

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.close(1012 if n == 0 else 4001)

    monkeypatch.setattr(room_module, "ws_connect", flaky_connect)
    async with scripted(script) as url, connect(url, "r", reconnect=FAST) as room:
        with pytest.raises(Disconnected) as ended:
            await next_of(room, Message)
    assert ended.value.code == 4001, "the room went on to the next socket"
    assert room.stats.unreachable == 1 and room.stats.connects == 2


@pytest.mark.parametrize("status", [408, 500, 503])
async def test_a_proxy_refusing_without_retry_after_is_retried_until_the_server_is_there(status: int) -> None:
    """HAProxy answers 408 (request line late), 500 or 503 (no server up) itself, with no Retry-After."""

    async def script(ws: ServerConnection, n: int) -> None:
        await ws.wait_closed()

    async with scripted(script) as upstream:
        port = int(upstream.rsplit(":", 1)[1])
        async with (
            refusing_front(port, refusals=2, status=status) as front,
            connect(front.url, "r", reconnect=FAST) as room,
        ):
            assert room.connected
    assert room.stats.refused[status] == 2 and len(front.arrivals) == 3
