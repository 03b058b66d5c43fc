"""k8s/kind/resume_check.py offline: its verdict, and runs against a fake room.

The script's real run needs a kind cluster and a rollout (the kind-e2e workflow); a run
against the local cluster while each replica is replaced is in tests/test_client.py. Here a
small in-process WebSocket server plays a room that refuses handshakes with 503 + Retry-After,
closes the receiver with 1012 midway and replays on `since=`, so the check's own judgement is
run, not only read: it must pass a roll it saw and fail one that missed the window.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from types import ModuleType
from urllib.parse import parse_qsl, urlsplit

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chorus.client import Stats
from tests.k8s import ROOT


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("resume_check", ROOT / "k8s" / "kind" / "resume_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["resume_check"] = module
    spec.loader.exec_module(module)
    return module


rc = _load()


def test_verdict_needs_every_number_in_order_and_a_roll_it_saw() -> None:
    drained, resumed = Stats(), Stats()
    drained.close_codes[1012] += 1
    resumed.resumes = 1
    ok, line = rc.verdict(3, [0, 1, 2], drained, resumed)
    assert ok, line
    ok, line = rc.verdict(3, [0, 2], drained, resumed)
    assert not ok and "1 missing, first [1]" in line
    ok, line = rc.verdict(3, [0, 2, 1], drained, resumed)
    assert not ok and "out of order" in line
    ok, line = rc.verdict(3, [0, 1, 1, 2], drained, resumed)
    assert ok and "1 retried duplicates" in line, "a resent unconfirmed message may arrive twice"
    ok, line = rc.verdict(3, [0, 1, 2], Stats(), resumed)
    assert not ok and "no 1012 close seen" in line, "a roll that missed the window tested nothing"
    ok, line = rc.verdict(3, [0, 1, 2], drained, Stats())
    assert not ok and "never resumed" in line


def message(message_id: str, text: str) -> str:
    frame = {"type": "message", "id": message_id, "ts": 0.0, "room": "r", "user": "sender", "text": text}
    return json.dumps({**frame, "replica": "fake"})


class FakeRoom:
    """One room with stream ids `<n>-0`, acks, replay after `since`, and a scripted fault."""

    def __init__(self, refuse: int, drain_receiver_after: int) -> None:
        self.stream: list[tuple[str, str]] = []
        self.receivers: set[ServerConnection] = set()
        self.refuse = refuse
        self.drain_after = drain_receiver_after
        self.drained = False

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.refuse > 0:  # a draining replica or a gateway without endpoints yet
            self.refuse -= 1
            return Response(
                503, "Service Unavailable", Headers({"Retry-After": "0"}), b'{"detail":"draining"}'
            )
        return None

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = dict(parse_qsl(urlsplit(ws.request.path).query))
        welcome = {"type": "welcome", "room": "r", "user": query["username"], "replica": "fake", "online": 1}
        await ws.send(json.dumps(welcome))
        if query["username"] == "receiver":
            since = query.get("since")
            ids = [i for i, _ in self.stream]
            start = ids.index(since) + 1 if since in ids else len(ids)
            for message_id, text in self.stream[start:]:
                await ws.send(message(message_id, text))
            self.receivers.add(ws)
            try:
                await ws.wait_closed()
            finally:
                self.receivers.discard(ws)
            return
        async for raw in ws:
            frame = json.loads(raw)
            message_id = f"{len(self.stream) + 1}-0"
            self.stream.append((message_id, frame["text"]))
            await ws.send(json.dumps({"type": "ack", "id": message_id, "client_id": frame["client_id"]}))
            if len(self.stream) == self.drain_after and not self.drained:
                self.drained = True
                for receiver in list(self.receivers):
                    await receiver.close(1012, "draining")
                continue  # the receiver misses this one and gets it from the replay
            for receiver in list(self.receivers):
                await receiver.send(message(message_id, frame["text"]))


@pytest.mark.anyio
async def test_the_check_survives_refusals_and_proves_a_resume(capsys: pytest.CaptureFixture[str]) -> None:
    room = FakeRoom(refuse=2, drain_receiver_after=10)
    async with serve(room.handler, "127.0.0.1", 0, process_request=room.process_request) as server:
        port = server.sockets[0].getsockname()[1]
        code = await rc.main(f"ws://127.0.0.1:{port}", 30, 0.01, 20.0)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "resume check: ok: 30/30 messages, 1 1012 closes" in out
    assert re.search(r"receiver: 1 reconnects, 1 resumes, [1-9][0-9]* replayed", out), out
    refusals = sum(int(n) for n in re.findall(r"503x(\d+)", out))
    assert refusals == 2, f"both refused handshakes were retried: {out}"


@pytest.mark.anyio
async def test_the_check_fails_when_the_roll_never_drains(capsys: pytest.CaptureFixture[str]) -> None:
    room = FakeRoom(refuse=0, drain_receiver_after=-1)
    async with serve(room.handler, "127.0.0.1", 0, process_request=room.process_request) as server:
        port = server.sockets[0].getsockname()[1]
        code = await rc.main(f"ws://127.0.0.1:{port}", 10, 0.01, 20.0)
    out = capsys.readouterr().out
    assert code == 1 and "no 1012 close seen" in out, out
