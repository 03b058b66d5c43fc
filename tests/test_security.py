"""Identity, origins, limits and bad input, through real replicas (uvicorn) and real Redis."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from chorus.devcluster import LocalCluster, RedisServer
from tests import wsraw
from tests.chat import Chat, metrics_text

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"


def token(
    sub: str = "alice", *, ttl: float = 300, key: str | bytes = SECRET, alg: str = "HS256", **claims: object
) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, key, algorithm=alg)


async def refused(url: str, **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):  # type: ignore[arg-type]
            pass
    return info.value.response.status_code


async def join_when_admitted(base: str, room: str, timeout: float = 15, **params: Any) -> Chat:
    """Join, retrying while the server still counts a socket that was just closed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await Chat.join(base, room, **params)
        except InvalidStatus as exc:
            assert exc.response.status_code in (429, 503), exc
            assert time.monotonic() < deadline, f"still refused after {timeout}s"
            await asyncio.sleep(0.1)


async def test_jwt_required_sub_is_the_name_rooms_claim_limits(
    make_cluster: Callable[..., LocalCluster], redis: RedisServer
) -> None:
    cluster = make_cluster(1, env={"CHORUS_AUTH_JWT_SECRET": SECRET})
    base = cluster.replica_ws_url(0)
    commands_before = int(redis.cli("INFO", "stats").split("total_commands_processed:")[1].split()[0])
    # Every token problem refuses the handshake with 403 (the HTTP reads say 401 where it fits).
    bad = [
        (f"{base}/ws/r", 403),  # no token
        (f"{base}/ws/r?token=garbage", 403),
        (f"{base}/ws/r?token={token(ttl=-60)}", 403),  # expired
        (f"{base}/ws/r?token={token(key='another-secret-that-is-also-long-enough')}", 403),
        (f"{base}/ws/r?token={jwt.encode({'sub': 'alice'}, SECRET, algorithm='HS256')}", 403),  # no exp
        (f"{base}/ws/secret?token={token(rooms=['r', 'team-*'])}", 403),
    ]
    for url, status in bad * 10:
        assert await refused(url) == status, url
    commands_after = int(redis.cli("INFO", "stats").split("total_commands_processed:")[1].split()[0])
    # 60 refusals; the readiness probe alone issues a few commands a second meanwhile.
    assert commands_after - commands_before < 30, "refusals must not touch Redis"

    chat = await Chat.join(base, "team-blue", token=token("alice", rooms=["r", "team-*"]), username="mallory")
    assert chat.welcome["user"] == "alice", "the token's sub is the name; ?username is ignored"
    await chat.close()
    # The browser way: the token in a subprotocol entry, the server selects chorus.v1.
    async with connect(f"{base}/ws/r", subprotocols=["chorus.v1", f"bearer.{token('bob')}"]) as sock:  # type: ignore[list-item]
        assert sock.subprotocol == "chorus.v1"
        assert json.loads(await sock.recv())["user"] == "bob"
    # A socket may not outlive its token.
    short = await Chat.join(base, "r", token=token("carol", ttl=2))
    await asyncio.wait_for(short.ws.wait_closed(), 15)
    assert short.ws.close_code == 1008
    log = cluster.replicas[0].output()
    assert "token=eyJ" not in log and "token=garbage" not in log and "bearer." not in log
    assert "token=***" in log
    text = await metrics_text(cluster.replica_url(0))
    assert 'chorus_rejections_total{reason="unauthorized"}' in text
    assert 'chorus_rejections_total{reason="forbidden_room"}' in text


async def test_public_key_tokens(make_cluster: Callable[..., LocalCluster], tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pem").write_bytes(pem)
    cluster = make_cluster(1, env={"CHORUS_AUTH_JWT_PUBLIC_KEY": str(tmp_path / "key.pem")})
    good = token("dora", key=private, alg="ES256")  # type: ignore[arg-type]
    chat = await Chat.join(cluster.replica_ws_url(0), "r", token=good)
    assert chat.welcome["user"] == "dora"
    await chat.close()
    assert await refused(f"{cluster.replica_ws_url(0)}/ws/r?token={token('eve')}") == 403, (
        "HS256 is not accepted here"
    )


async def test_origin_check_and_no_permessage_deflate(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(2, env={"CHORUS_ALLOWED_ORIGINS": "https://chat.example.com"})
    port = cluster.replica_ports[0]
    base = cluster.replica_ws_url(0)
    assert await refused(f"{base}/ws/r", origin="https://evil.example") == 403
    async with connect(f"{base}/ws/r", origin=Origin("https://chat.example.com")) as sock:
        assert json.loads(await sock.recv())["type"] == "welcome"
        # The client offered permessage-deflate (the library's default); the server declines.
        assert sock.response is not None
        assert sock.response.headers.get("Sec-WebSocket-Extensions") is None
    async with connect(f"{base}/ws/r") as sock:  # no Origin: not a browser
        assert json.loads(await sock.recv())["type"] == "welcome"
    # Default (no list): only the Host's own origin.
    default = make_cluster(1)
    dport = default.replica_ports[0]
    assert await refused(f"{default.replica_ws_url(0)}/ws/r", origin="http://evil.example") == 403
    own_origin = Origin(f"http://127.0.0.1:{dport}")
    async with connect(f"{default.replica_ws_url(0)}/ws/r", origin=own_origin) as sock:
        assert json.loads(await sock.recv())["type"] == "welcome"
    assert port != dport


async def test_frame_cap_closes_1009_and_long_text_gets_too_large(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    chat = await Chat.join(cluster.replica_ws_url(0), "big", username="b")
    await chat.send("y" * 5000, client_id="c1")
    err = await chat.wait_for(lambda f: f.get("type") == "error")
    assert (err["code"], err["client_id"]) == ("too_large", "c1")
    await chat.ws.send("{not json")
    assert (await chat.wait_for(lambda f: f.get("type") == "error"))["code"] == "invalid"
    await chat.ws.send("z" * 70_000)
    await asyncio.wait_for(chat.ws.wait_closed(), 10)
    assert chat.ws.close_code == 1009


async def test_invalid_utf8_closes_1007_and_others_are_unaffected(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    watcher = await Chat.join(cluster.replica_ws_url(0), "utf", username="w")
    sock = wsraw.handshake(cluster.replica_ports[0], "/ws/utf?username=raw")
    sock.sendall(wsraw.frame(0x1, b"\xff\xfe broken"))
    assert await asyncio.to_thread(wsraw.read_close_code, sock, 10) == 1007
    sock.close()
    sender = await Chat.join(cluster.replica_ws_url(0), "utf", username="s")
    await sender.send("fine")
    assert (await watcher.wait_for(lambda f: f.get("type") == "message"))["text"] == "fine"
    for chat in (watcher, sender):
        await chat.close()


async def test_rate_limit_errors_then_flood_closes_1008(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        1, env={"CHORUS_RATE_LIMIT": "10", "CHORUS_RATE_BURST": "20", "CHORUS_RATE_FLOOD_SECONDS": "2"}
    )
    chat = await Chat.join(cluster.replica_ws_url(0), "rate", username="f")
    for i in range(40):
        await chat.send(f"m{i}", client_id=f"c{i}")
    await chat.collect(20, kind="ack")
    errors = await chat.collect(15, kind="error")
    assert {e["code"] for e in errors} == {"rate_limited"} and errors[0]["client_id"].startswith("c")
    # Keep flooding: after CHORUS_RATE_FLOOD_SECONDS over the limit the socket is closed.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and chat.ws.close_code is None:
        try:
            await chat.send("flood")
            await chat.drain_for(0.01)  # keep reading, as a client must to see the close frame
        except ConnectionClosed:
            break
    await asyncio.wait_for(chat.ws.wait_closed(), 10)
    assert chat.ws.close_code == 1008
    text = await metrics_text(cluster.replica_url(0))
    assert 'chorus_messages_dropped_total{reason="rate_limited"}' in text


async def test_connection_limits_per_replica_and_per_user(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        2,
        env={
            "CHORUS_MAX_CONNECTIONS": "3",
            "CHORUS_MAX_CONNECTIONS_PER_USER": "2",
            "CHORUS_CONNECTION_LEASE_SECONDS": "3",
        },
    )
    a = [await Chat.join(cluster.replica_ws_url(0), "lim", username=f"u{i}") for i in range(3)]
    assert await refused(f"{cluster.replica_ws_url(0)}/ws/lim?username=u9") == 503
    await a[0].close()
    again = await join_when_admitted(cluster.replica_ws_url(0), "lim", username="u0")  # a place was freed
    # Per user, across replicas: two on replica 1, a third anywhere is refused.
    b = [await Chat.join(cluster.replica_ws_url(1), "lim", username="zed") for _ in range(2)]
    assert await refused(f"{cluster.replica_ws_url(1)}/ws/lim?username=zed") == 429
    for chat in (again, *a[1:]):
        await chat.close()
    deadline = time.monotonic() + 10
    while (status := await refused(f"{cluster.replica_ws_url(0)}/ws/lim?username=zed")) == 503:
        assert time.monotonic() < deadline, "replica 0 never noticed its sockets closed"
        await asyncio.sleep(0.1)
    assert status == 429, "the per-user limit holds across replicas"
    await b[0].close()
    b[0] = await join_when_admitted(cluster.replica_ws_url(1), "lim", username="zed")  # closing released it
    # A replica that dies without saying goodbye: its leases run out (3 s here).
    cluster.replicas[1].signal(9)
    cluster.replicas[1].wait(10)
    zed = await join_when_admitted(cluster.replica_ws_url(0), "lim", username="zed")
    await zed.close()
    text = await metrics_text(cluster.replica_url(0))
    assert 'chorus_rejections_total{reason="max_connections"}' in text
    assert 'chorus_rejections_total{reason="max_connections_per_user"}' in text


async def test_dead_peers_and_stalled_handshakes_are_dropped(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(
        1,
        env={
            "CHORUS_PING_INTERVAL_SECONDS": "1",
            "CHORUS_PING_TIMEOUT_SECONDS": "1",
            "CHORUS_HANDSHAKE_TIMEOUT_SECONDS": "1",
        },
    )
    port = cluster.replica_ports[0]
    # Opens TCP, sends half a request line, then nothing: closed at the deadline.
    stalled = socket.create_connection(("127.0.0.1", port))
    stalled.sendall(b"GET /ws/r HTT")
    stalled.settimeout(10)
    assert stalled.recv(100) == b""
    stalled.close()
    # Completes the handshake but never answers pings: closed by the keepalive.
    silent = wsraw.handshake(port, "/ws/r?username=silent")
    silent.settimeout(10)
    started = time.monotonic()
    data = b""
    while chunk := silent.recv(65536):
        data += chunk
    assert time.monotonic() - started < 8
    silent.close()
    # A reader that answers pings (every client library does) stays.
    live = await Chat.join(cluster.replica_ws_url(0), "r", username="reader")
    await live.drain_for(3)
    assert live.ws.close_code is None
    await live.close()
