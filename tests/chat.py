"""A small test client for the Chorus protocol and its /metrics, with bounded waits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect


class Chat:
    """One WebSocket member of a room; frames are collected in order as they arrive."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.frames: list[dict[str, Any]] = []

    @property
    def replica(self) -> str:
        return str(self.welcome["replica"])

    @classmethod
    async def join(cls, base: str, room: str, timeout: float = 10, **params: object) -> Chat:
        query = "&".join(f"{key}={value}" for key, value in params.items())
        ws = await connect(f"{base}/ws/{room}?{query}", open_timeout=timeout, max_size=2**22)
        welcome: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        assert welcome["type"] == "welcome", welcome
        return cls(ws, welcome)

    async def send(self, text: str, client_id: str | None = None) -> None:
        body: dict[str, Any] = {"type": "message", "text": text}
        if client_id is not None:
            body["client_id"] = client_id
        await self.ws.send(json.dumps(body))

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """Read frames until one matches; earlier frames stay recorded in `frames`."""
        for frame in self.frames:
            if predicate(frame) and not frame.get("_seen"):
                frame["_seen"] = True
                return frame
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame in {timeout}s; got {self.frames[-5:]}")
            received: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), remaining))
            self.frames.append(received)
            if predicate(received):
                received["_seen"] = True
                return received

    async def collect(self, count: int, kind: str = "message", timeout: float = 10) -> list[dict[str, Any]]:
        """Wait until `count` frames of `kind` have arrived in total; return them in order."""
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(self.of(kind))}/{count} {kind} frames after {timeout}s")
            self.frames.append(json.loads(await asyncio.wait_for(self.ws.recv(), remaining)))
        return self.of(kind)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame.get("type") == kind]

    def presence_changes(self) -> list[tuple[str, str, int]]:
        """Every presence change heard, flattened from the diff frames: (event, user, online)."""
        changes: list[tuple[str, str, int]] = []
        for frame in self.of("presence"):
            changes += [("join", user, frame["online"]) for user in frame.get("joins", [])]
            changes += [("leave", user, frame["online"]) for user in frame.get("leaves", [])]
        return changes

    def online(self) -> int:
        """The room's count as last heard (welcome, then presence frames)."""
        frames = self.of("presence")
        return int(frames[-1]["online"]) if frames else int(self.welcome["online"])

    async def wait_for_change(self, event: str, user: str, timeout: float = 10) -> None:
        """Wait until a presence diff has carried `event` ("join"/"leave") of `user`."""

        def has(frame: dict[str, Any]) -> bool:
            return frame.get("type") == "presence" and user in frame.get(f"{event}s", [])

        await self.wait_for(has, timeout)

    async def drain_for(self, seconds: float) -> None:
        """Read whatever arrives for `seconds` (to prove nothing more comes)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.frames.append(json.loads(await asyncio.wait_for(self.ws.recv(), remaining)))
            except TimeoutError:
                return

    async def close(self) -> None:
        await self.ws.close()


async def poll(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Wait until `check()` is true; return the seconds it took, fail naming `what` at the deadline."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started


def texts(frames: list[dict[str, Any]]) -> list[str]:
    return [str(frame["text"]) for frame in frames]


async def metrics_text(replica_url: str) -> str:
    """One replica's /metrics, in Prometheus text."""
    async with httpx.AsyncClient() as http:
        return (await http.get(replica_url + "/metrics")).text


def metric_value(text: str, name: str) -> float:
    """A sample's value in Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
