"""The HTTP front door under attack (issue 16, findings 2 and 3), through real replicas and raw sockets."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httptools
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from chorus import protocol
from chorus.config import Settings, SettingsError, load_settings
from chorus.devcluster import LocalCluster, http_status
from chorus.httpguard import PINNED_UVICORN, UVICORN_INTERNALS, GuardedHttpProtocol, HeadLimits, guarded_http
from chorus.server import server_options

LIVEZ = b"GET /livez HTTP/1.1\r\nHost: chorus\r\n\r\n"


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_response(sock: socket.socket, timeout: float = 5) -> bytes:
    """One response on a keep-alive socket: the head and a Content-Length body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes; fails the test if it does not by `timeout`."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the server did not close the connection in {timeout}s (got {data[:80]!r})"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed `sock` (without waiting)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except OSError:
        return True


def keep_alive_after_livez(port: int) -> socket.socket:
    """A connection that has had one complete `GET /livez` answered and stays open."""
    sock = connect(port)
    sock.sendall(LIVEZ)
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    return sock


def rejections(port: int, reason: str) -> float:
    with connect(port) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: chorus\r\nConnection: close\r\n\r\n")
        text = read_until_closed(sock, 10).decode()
    prefix = f'chorus_rejections_total{{reason="{reason}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def refusal(response: bytes) -> tuple[int, dict[str, str], str]:
    """Status, headers and the JSON `detail` of a refusal."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)["detail"]


def test_uvicorn_internals_httpguard_relies_on_are_there() -> None:
    """chorus.httpguard overrides uvicorn's httptools protocol: a new uvicorn must be re-read first."""
    assert uvicorn.__version__ == PINNED_UVICORN, (
        f"uvicorn {uvicorn.__version__} is not {PINNED_UVICORN}: re-read "
        "uvicorn/protocols/http/httptools_impl.py against chorus/httpguard.py, then update PINNED_UVICORN"
    )

    async def app(scope: object, receive: object, send: object) -> None:
        pass

    config = uvicorn.Config(app, http="httptools", lifespan="off", log_config=None)
    loop = asyncio.new_event_loop()
    try:
        protocol = HttpToolsProtocol(config, ServerState(), {}, _loop=loop)
        protocol.on_message_begin()  # sets `url`
        missing = [name for name in UVICORN_INTERNALS if not hasattr(protocol, name)]
    finally:
        loop.close()
    assert not missing, f"uvicorn's HttpToolsProtocol no longer has {missing}"

    # A callback's exception reaches data_received as the context of HttpParserCallbackError.
    class Refuse:
        def on_url(self, url: bytes) -> None:
            raise LookupError("refused")

    with pytest.raises(httptools.HttpParserCallbackError) as info:
        httptools.HttpRequestParser(Refuse()).feed_data(b"GET /x HTTP/1.1\r\n")
    assert isinstance(info.value.__context__, LookupError)


class FakeTransport(asyncio.Transport):
    """Records what the protocol writes and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = self.eof = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def in_process(limits: HeadLimits) -> Callable[[], tuple[GuardedHttpProtocol, FakeTransport]]:
    async def app(scope: object, receive: object, send: object) -> None:
        pass

    config = uvicorn.Config(app, lifespan="off", log_config=None)
    protocol_class = guarded_http(limits)
    state = ServerState()

    def connect() -> tuple[GuardedHttpProtocol, FakeTransport]:
        protocol, transport = protocol_class(config, state, {}), FakeTransport()
        protocol.connection_made(transport)
        return protocol, transport

    return connect


@pytest.mark.anyio
async def test_head_caps_in_process() -> None:
    connect = in_process(
        HeadLimits(head_timeout=60, max_pending=4, max_url_bytes=1024, max_header_bytes=4096)
    )
    # 64 KiB of target in small reads: refused once past 1 KiB; the target is never built further.
    protocol, transport = connect()
    protocol.data_received(b"GET /ws/lobby?token=")
    for _ in range(1024):
        protocol.data_received(b"a" * 64)
    assert transport.written.startswith(b"HTTP/1.1 414 ") and transport.eof
    assert len(protocol.url) <= 1024
    # One header value in small reads (httptools holds it until its CRLF): counted per read.
    protocol, transport = connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nX-Big: ")
    for _ in range(1024):
        protocol.data_received(b"b" * 64)
    assert transport.written.startswith(b"HTTP/1.1 431 ")
    # A fifth connection waiting for a head closes the one that waited longest.
    waiting = [connect() for _ in range(5)]
    assert [transport.closed for _, transport in waiting] == [True, False, False, False, False]
    for protocol, _ in waiting:
        protocol.connection_lost(None)


def test_every_keep_alive_request_has_a_head_deadline(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1, env={"CHORUS_HANDSHAKE_TIMEOUT_SECONDS": "2"})
    port = cluster.replica_ports[0]
    # A header line every half second after one good request: closed at the deadline (2 s).
    trickle = keep_alive_after_livez(port)
    trickle.sendall(b"GET /livez HTTP/1.1\r\n")
    deadline = time.monotonic() + 15
    while not closed_by_server(trickle):
        assert time.monotonic() < deadline, "a trickled keep-alive request outlived the head deadline"
        try:
            trickle.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break  # closed while we were writing
        time.sleep(0.5)
    # Blank lines between requests start no request at all, and buy no time either.
    blanks = keep_alive_after_livez(port)
    deadline = time.monotonic() + 15
    while not closed_by_server(blanks):
        assert time.monotonic() < deadline, "CRLFs between requests kept a connection open"
        try:
            blanks.sendall(b"\r\n")
        except OSError:
            break
        time.sleep(0.3)
    # Keep-alive itself still works: a second request on the same socket is answered.
    reuse = keep_alive_after_livez(port)
    reuse.sendall(LIVEZ)
    assert read_response(reuse).startswith(b"HTTP/1.1 200")
    for sock in (trickle, blanks, reuse):
        sock.close()
    assert rejections(port, protocol.REJECT_HEAD_TIMEOUT) >= 2


def test_idle_keep_alive_connection_is_closed(make_cluster: Callable[..., LocalCluster]) -> None:
    # The head deadline is far away (30 s): what closes the idle socket is the keep-alive timeout.
    cluster = make_cluster(
        1, env={"CHORUS_HANDSHAKE_TIMEOUT_SECONDS": "30", "CHORUS_KEEP_ALIVE_TIMEOUT_SECONDS": "1"}
    )
    idle = keep_alive_after_livez(cluster.replica_ports[0])
    assert read_until_closed(idle, 10) == b""
    idle.close()


def test_keep_alive_slowloris_crowd_is_cut_and_livez_still_answers(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1, env={"CHORUS_HANDSHAKE_TIMEOUT_SECONDS": "3"})
    port = cluster.replica_ports[0]
    url = cluster.replica_url(0)
    attackers: list[socket.socket] = []
    try:
        for _ in range(300):  # more than the default cap of 256 waiting connections
            sock = keep_alive_after_livez(port)
            sock.sendall(b"G")  # the first byte of a request that never comes
            attackers.append(sock)
        for _ in range(5):  # while the crowd is held, a fresh connection is answered
            assert http_status(url + "/livez", timeout=3) == 200
        deadline = time.monotonic() + 20
        still_open = list(attackers)
        while still_open := [sock for sock in still_open if not closed_by_server(sock)]:
            assert time.monotonic() < deadline, f"{len(still_open)} slowloris sockets still open"
            time.sleep(0.2)
    finally:
        for sock in attackers:
            sock.close()
    assert http_status(url + "/livez", timeout=3) == 200


def test_connections_waiting_for_a_head_are_capped(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(
        1, env={"CHORUS_MAX_PENDING_CONNECTIONS": "20", "CHORUS_HANDSHAKE_TIMEOUT_SECONDS": "60"}
    )
    port = cluster.replica_ports[0]
    silent = [connect(port) for _ in range(60)]
    try:
        deadline = time.monotonic() + 10
        closed: set[int] = set()
        while len(closed) < 40:
            assert time.monotonic() < deadline, f"only {len(closed)} of 60 silent sockets closed (cap 20)"
            closed |= {i for i, sock in enumerate(silent) if i not in closed and closed_by_server(sock)}
            time.sleep(0.1)
        assert set(range(40)) <= closed, "the sockets that waited longest go first"
        assert http_status(cluster.replica_url(0) + "/livez", timeout=3) == 200
        assert rejections(port, protocol.REJECT_TOO_MANY_PENDING) >= 40
    finally:
        for sock in silent:
            sock.close()


def long_line_attack(port: int, stop_at: float, statuses: list[int], sent: list[int]) -> None:
    """`GET /ws/lobby?token=` and 64 KiB chunks, until the server answers (or 16 MiB)."""
    chunk = b"a" * 65536
    while time.monotonic() < stop_at:
        with connect(port) as sock:
            sock.sendall(b"GET /ws/lobby?token=")
            total = 0
            try:
                while total < 16 << 20 and not select.select([sock], [], [], 0)[0]:
                    sock.sendall(chunk)
                    total += len(chunk)
            except OSError:
                pass  # the server closed after its answer
            sent.append(total)
            try:
                response = read_until_closed(sock, 10)
            except OSError:
                response = b""
            statuses.append(int(response.split()[1]) if response.startswith(b"HTTP/1.1 ") else 0)


def test_long_request_line_gets_414_early_with_bounded_memory(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    port = cluster.replica_ports[0]
    replica = cluster.replicas[0]
    baseline = peak = replica.rss_kib()
    statuses: list[int] = []
    sent: list[int] = []
    stop_at = time.monotonic() + 5
    threads = [
        threading.Thread(target=long_line_attack, args=(port, stop_at, statuses, sent), daemon=True)
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    livez: list[int | None] = []
    while any(thread.is_alive() for thread in threads):
        livez.append(http_status(cluster.replica_url(0) + "/livez", timeout=2))
        peak = max(peak, replica.rss_kib())
        time.sleep(0.2)
        assert time.monotonic() < stop_at + 30, "the attackers did not finish"
    assert statuses and set(statuses) == {414}, statuses
    assert livez and set(livez) == {200}, f"/livez during the attack: {livez}"
    assert peak - baseline < 20_000, f"replica RSS grew {peak - baseline} KiB under the attack"

    with connect(port) as sock:
        sock.sendall(b"GET /ws/lobby?token=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: chorus\r\n\r\n")
        status, headers, detail = refusal(read_until_closed(sock, 10))
    assert status == 414
    assert headers["connection"] == "close"
    assert detail == "the request target is longer than 8192 bytes"
    assert rejections(port, protocol.REJECT_URL_TOO_LONG) >= len(statuses)


def test_oversized_headers_get_431(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1)
    port = cluster.replica_ports[0]
    replica = cluster.replicas[0]
    baseline = replica.rss_kib()
    # One header that never ends, 4 KiB at a time (httptools holds it until its CRLF).
    with connect(port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: chorus\r\nX-Big: ")
        try:
            for _ in range(4096):  # up to 16 MiB
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(b"b" * 4096)
        except OSError:
            pass
        status, headers, detail = refusal(read_until_closed(sock, 10))
    assert (status, headers["connection"]) == (431, "close")
    assert detail == "the request headers are larger than 16384 bytes"
    # Many small headers, all in one write.
    with connect(port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: chorus\r\n" + b"X-Many: 0123456789\r\n" * 5000 + b"\r\n")
        assert refusal(read_until_closed(sock, 10))[0] == 431
    assert replica.rss_kib() - baseline < 20_000
    # Under both caps (a 7 KiB target does not count toward the header cap): answered.
    with connect(port) as sock:
        sock.sendall(
            b"GET /livez?pad="
            + b"p" * 7000
            + b" HTTP/1.1\r\nHost: chorus\r\nX-Pad: "
            + b"q" * 12000
            + b"\r\n\r\n"
        )
        assert read_response(sock).startswith(b"HTTP/1.1 200")
    assert rejections(port, protocol.REJECT_HEADERS_TOO_LARGE) == 2


@pytest.mark.slow
def test_gunicorn_workers_use_the_guarded_protocol(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1, workers=2, env={"CHORUS_HANDSHAKE_TIMEOUT_SECONDS": "2"})
    port = cluster.replica_ports[0]
    with connect(port) as sock:
        sock.sendall(b"GET /ws/lobby?token=" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: chorus\r\n\r\n")
        assert refusal(read_until_closed(sock, 10))[0] == 414
    with connect(port) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: chorus\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n")
        assert refusal(read_until_closed(sock, 10))[0] == 431
    trickle = keep_alive_after_livez(port)
    trickle.sendall(b"G")
    assert read_until_closed(trickle, 15) == b""
    trickle.close()


def test_front_door_settings_and_reasons_are_documented() -> None:
    """The README's settings table and docs/security.md name what the code defines."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    security = (root / "docs" / "security.md").read_text()
    defaults = Settings.model_fields
    for field in (
        "handshake_timeout_seconds",
        "keep_alive_timeout_seconds",
        "max_pending_connections",
        "max_url_bytes",
        "max_header_bytes",
    ):
        default = defaults[field].default
        row = f"| `CHORUS_{field.upper()}` | {default:g} |"
        assert row in readme, f"README settings table: no row {row!r}"
        assert f"| `CHORUS_{field.upper()}` | {default:g} |" in security
    for reason in (
        protocol.REJECT_HEAD_TIMEOUT,
        protocol.REJECT_TOO_MANY_PENDING,
        protocol.REJECT_URL_TOO_LONG,
        protocol.REJECT_HEADERS_TOO_LARGE,
    ):
        assert f"`{reason}`" in security, f"docs/security.md does not list the rejection reason {reason}"


def test_front_door_settings_refuse_unsafe_values() -> None:
    with pytest.raises(SettingsError, match="CHORUS_MAX_URL_BYTES"):
        load_settings(max_url_bytes=70_000)  # httptools' URL parser truncates at 64 KiB
    with pytest.raises(SettingsError, match="CHORUS_MAX_PENDING_CONNECTIONS"):
        load_settings(max_pending_connections=0)
    with pytest.raises(SettingsError, match="CHORUS_MAX_HEADER_BYTES"):
        load_settings(max_header_bytes=100)  # not even a browser's ordinary headers
    short = load_settings(handshake_timeout_seconds=2, keep_alive_timeout_seconds=5)
    assert server_options(short)["timeout_keep_alive"] == 2, "the head deadline bounds an idle socket too"
