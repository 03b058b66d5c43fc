"""Random abuse against a running replica: it stays up, ready and fair, and gives memory back."""

from __future__ import annotations

import asyncio
import os
import random
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest

from chorus.devcluster import LocalCluster, http_status
from tests import wsraw
from tests.chat import Chat

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

FUZZ_SECONDS = 6.0
FUZZ_THREADS = 4
MAX_CONNECTIONS_PER_THREAD = 400
KEEP_ALIVE_ATTACKS = 200  # sockets that send one good request, then a request that never ends
HEADER_ATTACKS = 40  # sockets that send one header of up to 1 MiB


def random_payload(rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:  # binary frame: 1003
        return wsraw.frame(0x2, os.urandom(rng.randrange(1, 200)))
    if kind == 1:  # broken UTF-8: 1007
        return wsraw.frame(0x1, b"ok \xc3\x28 \xff" + os.urandom(rng.randrange(50)))
    if kind == 2:  # over the frame cap: 1009 before the body is buffered
        return wsraw.frame(0x1, b"x" * rng.choice([70_000, 200_000]))
    if kind == 3:  # deep JSON
        return wsraw.frame(0x1, b'{"a":' * rng.randrange(100, 3000))
    if kind == 4:  # control characters and odd Unicode as text
        return wsraw.frame(0x1, "".join(chr(rng.randrange(0, 0x2FF)) for _ in range(50)).encode())
    if kind == 5:  # a burst far over the rate limit
        return b"".join(wsraw.frame(0x1, b"spam %d" % i) for i in range(rng.randrange(50, 400)))
    if kind == 6:  # reserved opcode: protocol error
        return wsraw.frame(rng.choice([0x3, 0x7, 0xB]), b"??")
    if kind == 7:  # a fragment that never ends
        return wsraw.frame(0x1, b"part", fin=False)
    return os.urandom(rng.randrange(1, 300))  # not even a frame


def fuzz_worker(port: int, seed: int, stop_at: float, counts: list[int]) -> None:
    rng = random.Random(seed)
    opened = 0
    while time.monotonic() < stop_at and opened < MAX_CONNECTIONS_PER_THREAD:
        try:
            sock = wsraw.handshake(port, f"/ws/fuzz?username=f{seed}-{opened}&history=0")
        except (OSError, AssertionError):
            time.sleep(0.01)
            continue
        opened += 1
        sock.settimeout(0.5)
        try:
            for _ in range(rng.randrange(1, 6)):
                sock.sendall(random_payload(rng))
                counts[0] += 1
        except OSError:
            pass
        finally:
            sock.close()


# What a keep-alive attacker sends after its good request, and what it trickles after that:
# a request line, then header lines; or blank lines, which start no request at all.
SLOW_REQUESTS = [
    (b"GET /livez HTTP/1.1\r\n", b"X-Slow: 1\r\n"),
    (b"\r\n", b"\r\n"),
    (b"GET /livez HTTP/1.1\r\nX-Slow: ", b"1"),
]


def keep_alive_attacker(port: int, seed: int, stop_at: float, cut: list[int]) -> None:
    """One good `GET /livez` per socket, then a trickle of a next request; counts [cut, held] sockets."""
    rng = random.Random(seed)
    held: list[tuple[socket.socket, bytes]] = []
    try:
        while time.monotonic() < stop_at and len(held) < KEEP_ALIVE_ATTACKS:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue
            start, trickle = rng.choice(SLOW_REQUESTS)
            held.append((sock, trickle))
            try:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: fuzz\r\n\r\n")
                sock.recv(65536)
                sock.sendall(start)
            except OSError:
                pass
            for other, more in held:
                if not select.select([other], [], [], 0)[0]:
                    try:
                        other.sendall(more)  # a little more of the same: buys no time
                    except OSError:
                        pass
            time.sleep(0.02)
        # The head deadline is 2 s here: every held socket is closed by the server.
        cut[1] = len(held)
        deadline = time.monotonic() + 15
        for sock, _ in held:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            except OSError:
                continue  # still open at the deadline: not counted
            cut[0] += 1
    finally:
        for sock, _ in held:
            sock.close()


def header_attacker(port: int, seed: int, stop_at: float, statuses: list[int]) -> None:
    """One endless header per socket, in random chunks; collects the status of the answer."""
    rng = random.Random(seed)
    for _ in range(HEADER_ATTACKS):
        if time.monotonic() >= stop_at:
            return
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sent = 0
            try:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: fuzz\r\nX-Big: ")
                while sent < 1 << 20 and not select.select([sock], [], [], 0)[0]:
                    chunk = os.urandom(rng.randrange(1, 32768)).hex().encode()
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            response = b""
            try:
                while chunk := sock.recv(65536):
                    response += chunk
            except OSError:
                pass
            statuses.append(int(response.split()[1]) if response.startswith(b"HTTP/1.1 ") else 0)


async def test_fuzzed_replica_stays_up_fair_and_bounded(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        1,
        env={"CHORUS_RATE_LIMIT": "10", "CHORUS_RATE_BURST": "20", "CHORUS_HANDSHAKE_TIMEOUT_SECONDS": "2"},
    )
    port = cluster.replica_ports[0]
    url = cluster.replica_url(0)
    replica = cluster.replicas[0]
    receiver = await Chat.join(url.replace("http", "ws"), "fuzz", username="good-receiver", history=0)
    sender = await Chat.join(url.replace("http", "ws"), "fuzz", username="good-sender", history=0)
    baseline = replica.rss_kib()

    counts = [0]
    stop_at = time.monotonic() + FUZZ_SECONDS
    threads = [
        threading.Thread(target=fuzz_worker, args=(port, seed, stop_at, counts), daemon=True)
        for seed in range(FUZZ_THREADS)
    ]
    cut = [0, 0]
    statuses: list[int] = []
    threads.append(threading.Thread(target=keep_alive_attacker, args=(port, 99, stop_at, cut), daemon=True))
    threads.append(threading.Thread(target=header_attacker, args=(port, 98, stop_at, statuses), daemon=True))
    for thread in threads:
        thread.start()
    good = 40
    for i in range(good):  # well within the rate limit: 8 per second
        await sender.send(f"good-{i}")
        await asyncio.sleep(0.125)
    for thread in threads:
        await asyncio.to_thread(thread.join, FUZZ_SECONDS + 30)
    assert counts[0] > 100, "the fuzzer did send"
    assert cut[1] > 10 and cut[0] == cut[1], f"the server cut {cut[0]} of {cut[1]} keep-alive attackers"
    assert statuses and set(statuses) == {431}, f"endless headers are answered 431: {statuses}"

    deadline = time.monotonic() + 20

    def from_sender() -> list[str]:
        return [f["text"] for f in receiver.of("message") if f["user"] == "good-sender"]

    while len(from_sender()) < good:
        assert time.monotonic() < deadline, f"the well-behaved client got {len(from_sender())}/{good}"
        await receiver.drain_for(0.2)
    assert from_sender() == [f"good-{i}" for i in range(good)], "every message, once, in order"
    assert len(await sender.collect(good, kind="ack")) == good

    assert cluster.replicas[0].alive()
    assert http_status(url + "/readyz") == 200
    # Memory: closed connections give back what they held (allow for allocator slack).
    settle = time.monotonic() + 15
    while (grown := replica.rss_kib() - baseline) > 30_000 and time.monotonic() < settle:
        await asyncio.sleep(0.5)
    assert grown < 30_000, f"replica RSS still {grown} KiB above its baseline"
    with socket.create_connection(("127.0.0.1", port)) as probe:
        probe.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        assert probe.recv(12) == b"HTTP/1.1 200"
    for chat in (receiver, sender):
        await chat.close()
