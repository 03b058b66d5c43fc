"""k8s/kind/resume_check.py offline: its backoff, its verdict, and one run against a fake room.

The script's real run needs a kind cluster and a rollout (the kind-e2e workflow). Here a small
in-process WebSocket server plays a room that refuses handshakes with 503 + Retry-After, closes
the receiver with 1012 midway and replays on `since=`, so the retry and resume logic is run,
not only read.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from http import HTTPStatus
from types import ModuleType
from urllib.parse import parse_qsl, urlsplit

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response

from tests.k8s import ROOT


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("resume_check", ROOT / "k8s" / "kind" / "resume_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["resume_check"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


rc = _load()


def _refused(status: int, retry_after: str | None = None) -> InvalidStatus:
    headers = Headers({"Retry-After": retry_after} if retry_after is not None else {})
    return InvalidStatus(Response(status, HTTPStatus(status).phrase, headers))


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    backoff = rc.Backoff(base=0.1, cap=2.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    for n, delay in enumerate(delays):
        ceiling = min(2.0, 0.1 * 2**n)
        assert ceiling * 0.5 <= delay <= ceiling
    assert len(set(delays)) == len(delays), "jittered, so clients that lost one pod do not return in step"
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_refused_handshakes_are_retried_and_retry_after_honoured() -> None:
    assert rc.retryable(_refused(503)) and rc.retryable(_refused(502)) and rc.retryable(_refused(429))
    assert not rc.retryable(_refused(403)), "a refused token will not get better by retrying"
    assert not rc.retryable(ValueError("bug"))
    assert rc.retry_after(_refused(503, "3")) == 3.0
    assert rc.retry_after(_refused(503, "Wed, 21 Oct 2015 07:28:00 GMT")) is None
    assert rc.retry_after(_refused(503)) is None
    backoff = rc.Backoff(base=0.1, cap=5.0, rng=random.Random(1))
    assert backoff.next_delay(rc.retry_after(_refused(503, "3"))) == 3.0
    assert backoff.next_delay(60.0) == 5.0, "never beyond the cap"


def test_tally_dedupes_by_id_and_proves_the_resume() -> None:
    tally = rc.Tally(4)
    for message_id, number in [("1-0", 0), ("2-0", 1), ("2-0", 1), ("3-0", 2), ("4-0", 2)]:
        tally.add(message_id, number)
    assert tally.duplicate_ids == ["2-0"] and tally.retried() == 1 and tally.missing() == [3]
    ok, report = tally.verdict()
    assert not ok and "1 missing" in report and "delivered twice" in report and "no 1012" in report
    tally.add("5-0", 3)
    tally.duplicate_ids.clear()
    ok, report = tally.verdict()
    assert not ok and "no 1012 close seen" in report, "a roll that missed the window tested nothing"
    ok, report = tally.verdict(sender_1012=1)
    assert not ok and "never resumed" in report
    tally.since_resumes = 1
    ok, report = tally.verdict(sender_1012=1)
    assert ok, report
    tally.add("4-5", 9)
    assert tally.out_of_order == ["4-5"]


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
        await ws.send(json.dumps({"type": "welcome"}))
        if query["username"] == "receiver":
            since = query.get("since")
            ids = [i for i, _ in self.stream]
            start = ids.index(since) + 1 if since in ids else len(ids)
            for message_id, text in self.stream[start:]:
                await ws.send(json.dumps({"type": "message", "id": message_id, "text": text}))
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
                await receiver.send(json.dumps({"type": "message", "id": message_id, "text": frame["text"]}))


@pytest.mark.anyio
async def test_the_check_survives_refusals_and_proves_a_resume(capsys: pytest.CaptureFixture[str]) -> None:
    room = FakeRoom(refuse=2, drain_receiver_after=10)
    async with serve(room.handler, "127.0.0.1", 0, process_request=room.process_request) as server:
        port = server.sockets[0].getsockname()[1]
        code = await rc.main(f"ws://127.0.0.1:{port}", 30, 0.01, 20.0)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "30/30 messages" in out and "receiver 1" in out and "1 since= resumes" in out
    assert "2 refused handshakes retried" in out
    # Message 10 never went out live to the receiver: only the replay after since= delivers it.
    assert re.search(r" [1-9][0-9]* replayed", out), out


@pytest.mark.anyio
async def test_the_check_fails_when_the_roll_never_drains(capsys: pytest.CaptureFixture[str]) -> None:
    room = FakeRoom(refuse=0, drain_receiver_after=-1)
    async with serve(room.handler, "127.0.0.1", 0, process_request=room.process_request) as server:
        port = server.sockets[0].getsockname()[1]
        code = await rc.main(f"ws://127.0.0.1:{port}", 10, 0.01, 20.0)
    out = capsys.readouterr().out
    assert code == 1 and "no 1012 close seen" in out, out
