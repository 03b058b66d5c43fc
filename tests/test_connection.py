"""A member's send side and an app from create_app(settings), in process (no replica processes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY

from chorus import create_app
from chorus.config import Settings
from chorus.connection import Coalescer, Connection
from chorus.devcluster import free_port
from chorus.protocol import CLOSE_TRY_AGAIN_LATER, StreamId
from chorus.server import UVICORN_OPTIONS, server_options
from chorus.sockets import FrameWriter
from tests.chat import Chat, poll

pytestmark = pytest.mark.anyio


class Socket:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: list[int] = []
        self.blocked = asyncio.Event()  # a send waits while this is clear: a reader that stopped

    async def send(self, frame: str) -> None:
        await self.blocked.wait()
        self.sent.append(frame)

    async def close(self, code: int, reason: str) -> None:
        self.closed.append(code)


def connection(socket: Socket, limit: int = 3) -> Connection:
    return Connection(room="r", user="u", tag=b"t.1", limit=limit, send=socket.send, close=socket.close)


async def test_a_full_queue_closes_with_1013_and_frees_it() -> None:
    socket = Socket()
    conn = connection(socket)
    conn.go_live(None)
    assert all(conn.offer(f"f{i}") for i in range(3))
    assert conn.offer("one too many") is False
    await conn.wait_closed()
    assert socket.closed == [CLOSE_TRY_AGAIN_LATER] and conn.depth == 0


async def test_live_copies_of_what_the_replay_sent_are_dropped_in_order() -> None:
    socket = Socket()
    socket.blocked.set()
    conn = connection(socket, limit=10)
    conn.deliver(StreamId((1, 0)), "live-1")  # arrives during the replay: held
    conn.deliver(StreamId((2, 0)), "live-2")
    conn.offer("replayed-1", force=True)
    conn.go_live(StreamId((1, 0)))  # the replay ended at 1-0
    await asyncio.sleep(0.05)
    assert socket.sent == ["replayed-1", "live-2"]


class Wire(FrameWriter):
    """A socket that is always writable and records each write as the frames it carried."""

    __slots__ = ("writes",)

    def __init__(self) -> None:  # no uvicorn protocol behind it
        self.writes: list[list[str]] = []

    def writable(self) -> bool:
        return True

    def write(self, frames: Iterable[str]) -> None:
        self.writes.append(list(frames))


def wired(limit: int = 16) -> tuple[Connection, Wire]:
    conn = connection(Socket(), limit=limit)
    wire = Wire()
    conn.writer = wire
    conn.go_live(None)
    return conn, wire


def coalesced() -> float:
    return REGISTRY.get_sample_value("chorus_writes_coalesced_total") or 0.0


async def test_a_lone_fanout_frame_is_written_on_the_next_loop_pass_not_after_a_window() -> None:
    coalescer = Coalescer()  # CHORUS_COALESCE_SECONDS=0, the default
    conn, wire = wired()
    assert conn.deliver(StreamId((1, 0)), "m1", coalescer.add)
    await asyncio.sleep(0)  # one pass of the loop: the flush scheduled with call_soon has run
    assert wire.writes == [["m1"]]


async def test_fanouts_of_one_loop_turn_share_one_write_per_member_in_order() -> None:
    coalescer = Coalescer()
    (a, wire_a), (b, wire_b) = wired(), wired()
    before = coalesced()
    for i in range(3):  # as a room task fans out what one pub/sub read brought, without yielding
        for conn in (a, b):
            conn.deliver(StreamId((1, i)), f"m{i}", coalescer.add)
    a.offer("ack")  # a frame outside the fan-out stays behind the held ones
    await asyncio.sleep(0)
    assert wire_a.writes == [["m0", "m1", "m2", "ack"]]
    assert wire_b.writes == [["m0", "m1", "m2"]]
    assert coalesced() - before == 3 + 2, "each frame after a member's first saved a write"
    b.deliver(StreamId((2, 0)), "next", coalescer.add)  # a later turn: a write of its own
    await asyncio.sleep(0)
    assert wire_b.writes[1:] == [["next"]]


async def test_frames_held_for_the_flush_count_against_the_slow_consumer_bound() -> None:
    coalescer = Coalescer()
    conn, wire = wired(limit=3)
    assert all(conn.deliver(StreamId((1, i)), f"m{i}", coalescer.add) for i in range(3))
    assert conn.deliver(StreamId((1, 3)), "one too many", coalescer.add) is False
    await conn.wait_closed()
    await asyncio.sleep(0)
    assert wire.writes == [] and conn.closed_with == CLOSE_TRY_AGAIN_LATER and conn.depth == 0


async def test_a_coalescing_window_holds_a_busy_rooms_frames_for_its_timer() -> None:
    coalescer = Coalescer(0.5)
    conn, wire = wired()
    conn.deliver(StreamId((1, 0)), "quiet", coalescer.hold(mean_gap=1.0))  # a quiet room: this turn
    await asyncio.sleep(0)
    assert wire.writes == [["quiet"]]
    for i in range(3):  # fan-outs 1 ms apart: held for a timer, not the turn
        conn.deliver(StreamId((2, i)), f"busy{i}", coalescer.hold(mean_gap=0.001))
    conn.offer("ack")  # behind the held frames
    await asyncio.sleep(0)
    assert wire.writes == [["quiet"]]
    await poll(lambda: len(wire.writes) == 2, 5, "the timer's flush")
    assert wire.writes[1] == ["busy0", "busy1", "busy2", "ack"]


async def test_a_busy_room_is_held_about_its_mean_gap_never_past_the_window() -> None:
    loop = asyncio.get_running_loop()
    coalescer = Coalescer(0.5)
    conn, wire = wired()
    conn.deliver(StreamId((1, 0)), "m0", coalescer.hold(mean_gap=0.2))
    timer = coalescer._timer
    assert timer is not None and timer.when() - loop.time() <= 0.2, "held longer than the room's mean gap"
    other, other_wire = wired()  # a faster room joining the running timer waits no longer
    other.deliver(StreamId((2, 0)), "o0", coalescer.hold(mean_gap=0.01))
    assert coalescer._timer is timer
    assert conn.depth == 1 and other.depth == 1
    await poll(lambda: bool(wire.writes and other_wire.writes), 5, "the timer's flush")
    assert wire.writes == [["m0"]] and other_wire.writes == [["o0"]]
    # A mean gap at or above the window is a quiet room: the end of this turn, no timer.
    conn.deliver(StreamId((3, 0)), "m1", coalescer.hold(mean_gap=0.5))
    assert coalescer._timer is None
    await asyncio.sleep(0)
    assert wire.writes[1:] == [["m1"]]


async def test_the_deepest_backlog_is_found_without_walking_idle_sockets() -> None:
    stalled = Socket()  # its reader stopped: the sender waits on the first frame
    conn = connection(stalled, limit=10)
    conn.go_live(None)
    idle = connection(Socket(), limit=10)
    idle.go_live(None)
    for index in range(3):
        conn.offer(f"f{index}")
    await poll(lambda: Connection.deepest_backlog() >= 2, 5, "the stalled socket's backlog to show")
    assert conn in Connection.backlogged and idle not in Connection.backlogged
    stalled.blocked.set()
    await poll(
        lambda: (Connection.deepest_backlog(), conn not in Connection.backlogged)[1], 5, "the backlog to go"
    )
    assert stalled.sent == ["f0", "f1", "f2"]


def unit_settings() -> Settings:
    """One replica on the in-process broker; the rate limit lifted as the process tests do."""
    return Settings(replica_name="unit", rate_limit=5000, rate_burst=5000)


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    """create_app(settings) under the pinned uvicorn in this process, as `chorus serve` runs it;
    yields its base address."""
    port = free_port()
    options = {**UVICORN_OPTIONS, **server_options(settings)}
    del options["loop"]  # the test's own event loop
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, **options)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await poll(lambda: server.started or task.done(), 10, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_app_from_create_app_serves_http_and_becomes_ready() -> None:
    async with serving(unit_settings()) as address, httpx.AsyncClient(base_url=f"http://{address}") as http:
        assert (await http.get("/livez")).json() == {"status": "ok"}
        deadline = time.monotonic() + 10
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "the memory broker's self-probe never succeeded"
            await asyncio.sleep(0.05)
        assert (await http.get("/api/rooms/lobby/history")).json() == {"room": "lobby", "messages": []}
        assert (await http.get("/api/rooms/no%20spaces/history")).status_code == 400


async def test_app_from_create_app_fans_out_a_websocket_message() -> None:
    async with serving(unit_settings()) as address:
        a = await Chat.join(f"ws://{address}", "lobby", username="a")
        b = await Chat.join(f"ws://{address}", "lobby", username="b")
        await a.send("hi", client_id="c1")
        ack = await a.wait_for(lambda f: f["type"] == "ack")
        message = await b.wait_for(lambda f: f["type"] == "message")
        assert (ack["client_id"], message["text"], message["id"]) == ("c1", "hi", ack["id"])
        assert a.of("message") == [], "the sender got its own message back"
        await a.close()
        await b.close()
        async with httpx.AsyncClient(base_url=f"http://{address}") as http:
            history = (await http.get("/api/rooms/lobby/history")).json()["messages"]
        assert [m["text"] for m in history] == ["hi"]
