"""The server API (/api/v1/) for backends and bots, through real replicas, Redis and HAProxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from chorus.devcluster import LocalCluster
from tests.chat import Chat

pytestmark = pytest.mark.anyio

KEY = "a-backend-key-of-some-length"
AUTH = {"Authorization": f"Bearer {KEY}"}


def api_cluster(make_cluster: Callable[..., LocalCluster], **env: str) -> LocalCluster:
    return make_cluster(2, env={"CHORUS_API_KEYS": f"another-key-0123456789,{KEY}", **env})


async def test_publish_reaches_members_on_both_replicas(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = api_cluster(make_cluster)
    members = [
        await Chat.join(cluster.replica_ws_url(i), "news", username=f"u{i}", history=0) for i in range(2)
    ]
    async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH) as http:
        response = await http.post("/api/v1/rooms/news/messages", json={"user": "bot", "text": "deploy done"})
        assert response.status_code == 201, response.text
        frame = response.json()
        assert frame["type"] == "message" and frame["user"] == "bot" and frame["text"] == "deploy done"
        for chat in members:
            got = await chat.wait_for(lambda f: f.get("type") == "message")
            assert {k: v for k, v in got.items() if k != "_seen"} == frame
        # The API deletes it; members on both replicas see the delete, history the latest form.
        gone = await http.delete(f"/api/v1/rooms/news/messages/{frame['id']}")
        assert gone.status_code == 204 and gone.content == b""
        for chat in members:
            assert (await chat.wait_for(lambda f: f.get("type") == "delete"))["target"] == frame["id"]
        again = await http.delete(f"/api/v1/rooms/news/messages/{frame['id']}")
        assert again.status_code == 404 and set(again.json()) == {"detail"}
        assert (await http.delete("/api/v1/rooms/news/messages/nonsense")).status_code == 404
        history = (await http.get("/api/rooms/news/history")).json()["messages"]
        assert history[0]["deleted"] is True and "text" not in history[0]
        bad = await http.post("/api/v1/rooms/news/messages", json={"user": "bad name", "text": "x"})
        assert bad.status_code == 400 and set(bad.json()) == {"detail"}
    for chat in members:
        await chat.close()


async def test_wrong_or_missing_key_gets_401_with_a_sentence(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = api_cluster(make_cluster)
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key-wrong"}, {"Authorization": KEY}):
            for method, path in (
                ("POST", "/api/v1/rooms/r/messages"),
                ("DELETE", "/api/v1/rooms/r/messages/1-0"),
                ("POST", "/api/v1/users/alice/disconnect"),
                ("GET", "/api/v1/rooms"),
            ):
                response = await http.request(method, path, headers=headers, json={"user": "a", "text": "b"})
                assert response.status_code == 401, (method, path, headers)
                assert list(response.json()) == ["detail"]
        schema = (await http.get("/openapi.json")).json()
        post = schema["paths"]["/api/v1/rooms/{room}/messages"]["post"]
        assert {"201", "401", "429"} <= set(post["responses"])
    log = "".join(path.read_text() for path in cluster.workdir.glob("*.log"))
    assert KEY not in log, "keys never appear in logs"


async def test_disconnect_closes_every_socket_of_the_user_on_every_replica(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = api_cluster(make_cluster)
    mallory = [await Chat.join(cluster.replica_ws_url(i), f"r{i}", username="mallory") for i in range(2)]
    alice = await Chat.join(cluster.replica_ws_url(0), "r0", username="alice")
    async with httpx.AsyncClient(base_url=cluster.url, headers=AUTH) as http:
        rooms = (await http.get("/api/v1/rooms")).json()
        assert rooms == {"rooms": [{"room": "r0", "online": 2}, {"room": "r1", "online": 1}]}
        response = await http.post("/api/v1/users/mallory/disconnect")
        assert response.status_code == 202
    for chat in mallory:
        with pytest.raises(ConnectionClosed):
            await chat.wait_for(lambda f: False, timeout=10)
        assert chat.ws.close_code == 4001 and chat.ws.close_reason == "disconnected by the server"
    await alice.send("still here", client_id="c")
    await alice.wait_for(lambda f: f.get("client_id") == "c")
    await alice.close()


async def test_a_key_over_its_rate_gets_429(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = api_cluster(make_cluster, CHORUS_API_RATE_LIMIT="0.1", CHORUS_API_RATE_BURST="2")
    async with httpx.AsyncClient(base_url=cluster.replica_url(0), headers=AUTH) as http:
        codes = [(await http.get("/api/v1/rooms")).status_code for _ in range(4)]
        assert codes[:2] == [200, 200] and codes[-1] == 429
        limited = await http.get("/api/v1/rooms")
        assert list(limited.json()) == ["detail"] and int(limited.headers["retry-after"]) >= 1
    await asyncio.sleep(0)


async def test_without_keys_the_server_api_refuses_everything(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    async with httpx.AsyncClient(base_url=cluster.url) as http:
        response = await http.get("/api/v1/rooms", headers={"Authorization": "Bearer x"})
        assert response.status_code == 401
        assert json.loads(response.text)["detail"]
