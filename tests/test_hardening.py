"""Issue 16's findings from attacking a running Chorus, each replayed against real replicas.

One test per finding (numbered as in the issue and in docs/security.md's table); each failed
before its fix.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from chorus.devcluster import LocalCluster, RedisServer
from chorus.protocol import CLOSE_LABELS
from tests import wsraw
from tests.chat import Chat, metrics_text

pytestmark = pytest.mark.anyio

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"
AUTH = {"CHORUS_AUTH_JWT_SECRET": SECRET}


def token(sub: str = "alice", *, ttl: float = 300, **claims: object) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl), **claims}, SECRET, algorithm="HS256")


async def refused(url: str, **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):  # type: ignore[arg-type]
            pass
    return info.value.response.status_code


async def http_get(url: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(url, **kwargs)  # type: ignore[arg-type]


def redis_commands(redis: RedisServer) -> int:
    return int(redis.cli("INFO", "stats").split("total_commands_processed:")[1].split()[0])


def detail_of(response: httpx.Response) -> str:
    body = response.json()
    assert list(body) == ["detail"] and isinstance(body["detail"], str), body
    return str(body["detail"])


async def test_1_read_apis_need_the_token_the_websocket_needs(
    make_cluster: Callable[..., LocalCluster], redis: RedisServer
) -> None:
    cluster = make_cluster(1, env=AUTH)
    base = cluster.replica_url(0)
    writer = await Chat.join(cluster.replica_ws_url(0), "team-a", token=token("alice", rooms=["team-*"]))
    await writer.send("the plan", client_id="p")
    await writer.wait_for(lambda f: f.get("type") == "ack")
    async with httpx.AsyncClient(base_url=base) as http:
        before = redis_commands(redis)
        for path in ("/api/rooms/team-a/history", "/api/rooms/team-a/presence"):
            for params, headers, status in [
                ({}, {}, 401),  # no token
                ({"token": "garbage"}, {}, 401),
                ({"token": token(ttl=-60)}, {}, 401),  # expired
                ({}, {"Authorization": "Bearer garbage"}, 401),
                ({}, {"Authorization": f"Bearer {token('bob', rooms=['lobby'])}"}, 403),
                ({"token": token("bob", rooms=["lobby", "team-b*"])}, {}, 403),
            ]:
                response = await http.get(path, params=params, headers=headers)
                assert response.status_code == status, (path, params, headers, response.text)
                assert detail_of(response)
                if status == 401:
                    assert response.headers["www-authenticate"].startswith("Bearer")
        # 12 refusals; the readiness probe alone issues a few commands a second meanwhile.
        assert redis_commands(redis) - before < 12, "refusals must not touch Redis"
        reader = token("carol", rooms=["team-*"])
        history = await http.get("/api/rooms/team-a/history", headers={"Authorization": f"Bearer {reader}"})
        assert [m["text"] for m in history.json()["messages"]] == ["the plan"]
        presence = await http.get("/api/rooms/team-a/presence", params={"token": reader})
        assert presence.json() == {"room": "team-a", "online": 1, "users": ["alice"]}
    text = await metrics_text(base)
    assert 'chorus_rejections_total{reason="forbidden_room"}' in text
    await writer.close()


async def test_4_names_match_whole_and_spellings_of_one_user_count_once(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(2, env={"CHORUS_MAX_CONNECTIONS_PER_USER": "2"})
    ws = [cluster.replica_ws_url(i) for i in range(2)]
    assert await refused(f"{ws[0]}/ws/lobby?username=alice%0A") == 400
    assert await refused(f"{ws[0]}/ws/lobby%0A?username=alice") == 400
    response = await http_get(f"{cluster.replica_url(0)}/api/rooms/lobby%0A/history")
    assert response.status_code == 400 and detail_of(response)

    watcher = await Chat.join(ws[0], "names", username="watcher", history=0)
    first = await Chat.join(ws[0], "names", username="Dave", history=0)
    second = await Chat.join(ws[1], "names", username="dave", history=0)
    assert (first.welcome["user"], second.welcome["user"]) == ("Dave", "dave"), "names shown as given"
    assert second.welcome["online"] == 2, "Dave and dave are one user"
    # The per-user cap counts them together, across replicas.
    assert await refused(f"{ws[0]}/ws/names?username=DAVE") == 429
    await second.send("hi", client_id="h")
    message = await watcher.wait_for(lambda f: f.get("type") == "message")
    assert message["user"] == "dave", "a message carries its connection's spelling"
    presence = (await http_get(f"{cluster.replica_url(1)}/api/rooms/names/presence")).json()
    assert presence == {"room": "names", "online": 2, "users": ["Dave", "watcher"]}
    # A join and a leave within one presence interval cancel out: let the join go out first.
    await watcher.wait_for_change("join", "Dave")
    await first.close()
    await second.close()
    await watcher.wait_for_change("leave", "Dave")
    changes = watcher.presence_changes()
    assert [c for c in changes if c[0] == "join"] == [("join", "Dave", 2)], "one join, first spelling"
    leaves = [c for c in changes if c[0] == "leave"]
    assert leaves == [("leave", "Dave", 1)], "the leave names whom the join named"
    await watcher.close()


async def test_4_token_sub_and_room_follow_the_same_name_rules(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, env=AUTH)
    base = cluster.replica_ws_url(0)
    assert await refused(f"{base}/ws/lobby?token={token('alice' + chr(10))}") == 403
    assert await refused(f"{base}/ws/team-a%0A?token={token('alice', rooms=['team-*'])}") == 400
    response = await http_get(
        f"{cluster.replica_url(0)}/api/rooms/team-a%0A/history", params={"token": token(rooms=["team-*"])}
    )
    assert response.status_code == 400


def _closed_counts(text: str) -> dict[str, float]:
    found = re.findall(r'^chorus_connections_closed_total\{code="([^"]*)"\} (\S+)$', text, re.M)
    return {code: float(value) for code, value in found}


async def test_5_close_codes_become_labels_from_a_closed_set(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    port = cluster.replica_ports[0]
    # A client-chosen code, after reading the welcome.
    chosen = wsraw.handshake(port, "/ws/codes?username=chooser")
    chosen.sendall(wsraw.frame(0x8, (4123).to_bytes(2, "big")))
    assert await asyncio.to_thread(wsraw.read_close_code, chosen, 10) == 4123
    chosen.close()
    # Closed right after the handshake, before the welcome is read.
    hasty = [wsraw.handshake(port, f"/ws/codes?username=hasty{i}") for i in range(5)]
    for sock in hasty:
        sock.sendall(wsraw.frame(0x8, (1000).to_bytes(2, "big")))
    # Gone without a close frame.
    dropped = [wsraw.handshake(port, f"/ws/codes?username=gone{i}") for i in range(3)]
    for sock in hasty + dropped:
        sock.close()
    url = cluster.replica_url(0)

    async def counted() -> dict[str, float]:
        return _closed_counts(await metrics_text(url))

    deadline = time.monotonic() + 10
    while sum((counts := await counted()).values()) < 9:
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.1)
    assert set(counts) <= set(CLOSE_LABELS), counts
    assert counts.get("client_other") == 1
    assert counts.get("abnormal", 0) >= 3
    assert counts.get("1000", 0) + counts.get("abnormal", 0) == 8


async def test_6_out_of_range_since_gets_resync_not_1011(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1)
    base = cluster.replica_ws_url(0)
    for since in ("99999999999999999999999-0", "1-99999999999999999999999", "18446744073709551616"):
        chat = await Chat.join(base, "cursor", since=since, username="resumer")
        assert (await chat.wait_for(lambda f: f.get("type") == "resync"))["room"] == "cursor"
        await chat.send("still here", client_id="s")
        assert (await chat.wait_for(lambda f: f.get("type") == "ack"))["client_id"] == "s"
        assert chat.ws.close_code is None
        await chat.close()
    log = cluster.replicas[0].output()
    assert "WARNING" not in log and "cannot join" not in log, log[-2000:]


async def test_7_token_claims_out_of_range_get_403_not_500(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1, env=AUTH)
    now = int(time.time())
    huge = 10**400
    tokens = [
        jwt.encode({"sub": "a", "exp": huge}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a", "exp": float("inf")}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a", "exp": now + 60, "nbf": huge}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a", "exp": now + 60, "iat": huge}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a", "exp": "tomorrow"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a", "exp": True}, SECRET, algorithm="HS256"),
    ]
    for signed in tokens:
        assert await refused(f"{cluster.replica_ws_url(0)}/ws/r?token={signed}") == 403, jwt.decode(
            signed, options={"verify_signature": False}
        )
        response = await http_get(f"{cluster.replica_url(0)}/api/rooms/r/history", params={"token": signed})
        assert response.status_code == 403 and detail_of(response)
    log = cluster.replicas[0].output()
    assert "Traceback" not in log and "ERROR" not in log, log[-2000:]


async def test_8_the_token_is_redacted_however_its_name_is_spelled(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, env=AUTH)
    base = cluster.replica_ws_url(0)
    secrets = {name: token(name) for name in ("encoded", "upper", "third", "http", "plus")}
    query: dict[str, Any] = {"%74oken": secrets["encoded"]}
    chat = await Chat.join(base, "r", **query)
    assert chat.welcome["user"] == "encoded", "Starlette decodes the name: this is the token"
    await chat.close()
    assert await refused(f"{base}/ws/r?TOKEN={secrets['upper']}") == 403
    third = await Chat.join(base, "r", username="x", history="0", token=secrets["third"])
    await third.close()
    await http_get(f"{cluster.replica_url(0)}/api/rooms/r/history?limit=1&%74oken={secrets['http']}")
    await http_get(f"{cluster.replica_url(0)}/api/rooms/r/presence?to%6B%65n={secrets['plus']}")
    log = cluster.replicas[0].output()
    assert log.count("=***") >= 5, log[-2000:]
    for name, value in secrets.items():
        assert value not in log, f"the {name} token is in the log"


async def test_9_text_policy_refuses_controls_bidi_and_invisible_messages(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    base = cluster.replica_ws_url(0)
    watcher = await Chat.join(base, "text", username="watcher", history=0)
    sender = await Chat.join(base, "text", username="sender", history=0)
    refused_texts = [
        "nul\x00",
        "red \x1b[31malert",
        "bell\x07",
        "del\x7f",
        "c1\x85",
        "evil\u202egnp.exe",
        "isolate\u2066x\u2069",
        "\u200b\u200c\u200d",
        " \ufeff\u2060 ",
        "\u200e\u200f",
        "\n\t ",
    ]
    for i, text in enumerate(refused_texts):
        await sender.send(text, client_id=f"j{i}")
        error = await sender.wait_for(lambda f: f.get("client_id") == f"j{i}")  # noqa: B023 - awaited here
        assert (error["type"], error["code"]) == ("error", "invalid"), (text, error)
        await sender.ws.send(text)  # the same as a plain text frame
        error = await sender.wait_for(lambda f: f.get("type") == "error" and "client_id" not in f)
        assert error["code"] == "invalid", (text, error)
    kept = "two lines\n\tand a tab: \u00e9 \u65e5\u672c \U0001f44d"
    await sender.send(kept, client_id="ok")
    assert (await sender.wait_for(lambda f: f.get("type") == "ack"))["client_id"] == "ok"
    assert (await watcher.wait_for(lambda f: f.get("type") == "message"))["text"] == kept
    await watcher.drain_for(0.3)
    assert len(watcher.of("message")) == 1, "nothing refused was delivered"
    assert sender.ws.close_code is None
    for chat in (watcher, sender):
        await chat.close()


def _ws_status(port: int, path: str, host: str) -> int:
    """The status of a WebSocket handshake sent with the given Host header."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(1024)
            if not chunk:
                break
            head += chunk
    return int(head.split()[1])


async def test_10_allowed_hosts_refuse_a_rebound_host(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1, env={"CHORUS_ALLOWED_HOSTS": ".example.com,127.0.0.1"})
    port = cluster.replica_ports[0]
    base = cluster.replica_url(0)
    assert await asyncio.to_thread(_ws_status, port, "/ws/r", "rebound.attacker.test") == 400
    assert await asyncio.to_thread(_ws_status, port, "/ws/r", "chat.example.com:443") == 101
    assert await asyncio.to_thread(_ws_status, port, "/ws/r", "example.com") == 101
    async with httpx.AsyncClient(base_url=base) as http:
        for host, status in [
            ("rebound.attacker.test", 400),
            ("example.com.attacker.test", 400),
            ("notexample.com", 400),
            ("chat.example.com:8443", 200),
            (f"127.0.0.1:{port}", 200),
        ]:
            response = await http.get("/api/rooms/r/presence", headers={"Host": host})
            assert response.status_code == status, (host, response.text)
            if status == 400:
                assert "host" in detail_of(response)
        for path in ("/livez", "/readyz", "/metrics"):  # kubelet and Prometheus use the pod IP
            assert (await http.get(path, headers={"Host": "10.1.2.3:8000"})).status_code == 200
    text = await metrics_text(base)
    assert re.search(r'^chorus_rejections_total\{reason="host"\} 4\.0$', text, re.M), text
