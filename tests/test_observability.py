"""Chorus metrics as a real Prometheus sees them: 3 replicas x 2 gunicorn workers, known traffic.

Prometheus (the OS package) scrapes every replica each second with `namespace`/`pod` target
labels; its HTTP API must agree with what the clients counted, every dashboard query must
parse and return data, and the totals must survive a gunicorn worker being killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from chorus.devcluster import LocalCluster, wait_until
from loadtest.dashboard import panel_queries, render_png, substitute
from loadtest.prometheus import PrometheusServer
from tests.chat import Chat

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NAMESPACE = "chorus-test"
REPLICAS = 3
ROOMS = ("obs-a", "obs-b")
PER_ROOM = 6
ARTIFACTS = Path("artifacts")


@pytest.fixture
def observed(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> Iterator[tuple[LocalCluster, PrometheusServer]]:
    cluster = make_cluster(REPLICAS, workers=2)
    targets = {cluster.replica_name(i): f"127.0.0.1:{cluster.replica_ports[i]}" for i in range(REPLICAS)}
    with PrometheusServer(tmp_path, targets, namespace=NAMESPACE) as prometheus:
        wait_until(lambda: prometheus.targets_up() == REPLICAS, 30, "prometheus to scrape every replica")
        yield cluster, prometheus


Join = Callable[[str], Awaitable[Chat]]


@pytest.fixture
async def join(observed: tuple[LocalCluster, PrometheusServer]) -> AsyncIterator[Join]:
    """Clients of the observed cluster, all closed at teardown whatever the test did.

    A socket left open by a failed test is reported (unraisable warning, an error here) in
    whichever later test the garbage collector happens to run, failing that test too.
    """
    cluster, _ = observed
    opened: list[Chat] = []

    async def connect(room: str) -> Chat:
        chat = await Chat.join(cluster.ws_url, room, history=0)
        opened.append(chat)
        return chat

    yield connect
    await asyncio.gather(*(chat.close() for chat in opened))


def settle(prometheus: PrometheusServer, expr: str, expected: float, what: str, timeout: float = 20) -> None:
    """Poll Prometheus until `expr` equals `expected` (scrapes are 1 s apart)."""
    last: list[float | None] = [None]

    def matches() -> bool:
        last[0] = prometheus.scalar(expr)
        return last[0] == expected

    try:
        wait_until(matches, timeout, what, interval=0.5)
    except Exception as exc:
        raise AssertionError(f"{what}: {expr} = {last[0]}, expected {expected}") from exc


def sel(extra: str = "") -> str:
    return f'{{namespace="{NAMESPACE}"{extra}}}'


DELIVERED = f"sum(chorus_messages_delivered_total{sel()})"


async def exchange(chats: list[Chat], rounds: int, tag: str) -> int:
    """Every client sends `rounds` messages; wait until each peer has them all. Deliveries counted."""
    seen = {id(chat): len(chat.of("message")) for chat in chats}
    for n in range(rounds):
        for index, chat in enumerate(chats):
            await chat.send(json.dumps({"tag": tag, "from": index, "n": n}))
    delivered = 0
    for room in ROOMS:
        members = [chat for chat in chats if chat.welcome["room"] == room]
        for chat in members:
            expected = rounds * (len(members) - 1)
            frames = await chat.collect(seen[id(chat)] + expected, timeout=20)
            mine = [f for f in frames[seen[id(chat)] :] if json.loads(f["text"])["tag"] == tag]
            assert len(mine) == expected, (room, len(mine), expected)
            delivered += len(mine)
    return delivered


async def still_open(chat: Chat) -> bool:
    try:
        await asyncio.wait_for(await chat.ws.ping(), 3)
        return True
    except (ConnectionClosed, TimeoutError):
        return False


def socket_count(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while we looked
            count += os.readlink(fd).startswith("socket:")
    return count


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


async def test_prometheus_agrees_with_clients_and_dashboard_queries_return_data(
    observed: tuple[LocalCluster, PrometheusServer], join: Join
) -> None:
    cluster, prometheus = observed
    started = time.time()
    chats = [await join(room) for room in ROOMS for _ in range(PER_ROOM)]
    # Round robin spreads each room over every replica: the fan-out crosses replicas.
    assert {chat.replica for chat in chats} == {cluster.replica_name(i) for i in range(REPLICAS)}
    # A client that leaves again (a close code) and one bad frame (a drop reason) for the panels.
    leaver = await join("obs-leaver")
    await leaver.send("")
    await leaver.wait_for(lambda f: f["type"] == "error")
    await leaver.close()

    settle(prometheus, f"sum(chorus_connections{sel()})", len(chats), "open connections")
    rooms = sum(len({chat.replica for chat in chats if chat.welcome["room"] == room}) for room in ROOMS)
    # chorus_rooms is summed over a replica's workers: a room with members in both workers of a
    # replica counts twice (each holds its own subscription), so it lies between these bounds.
    wait_until(
        lambda: rooms <= (prometheus.scalar(f"sum(chorus_rooms{sel()})") or 0) <= 2 * rooms,
        20,
        "rooms with local members",
    )

    rounds = 5
    delivered = await exchange(chats, rounds, "first")
    sent = rounds * len(chats)
    assert delivered == sum(rounds * (PER_ROOM - 1) for _ in chats)
    settle(prometheus, f"sum(chorus_messages_published_total{sel()})", sent, "published")
    settle(prometheus, f"sum(chorus_messages_received_total{sel()})", sent + 1, "received (+1 invalid)")
    settle(prometheus, DELIVERED, delivered, "delivered = clients' count")
    invalid = sel(', reason="invalid"')
    settle(prometheus, f"sum(chorus_messages_dropped_total{invalid})", 1, "invalid drop")
    # Each message is observed once per replica process with members in its room: at least once.
    fanouts = prometheus.scalar(f"sum(chorus_fanout_latency_seconds_count{sel()})")
    assert fanouts is not None and sent <= fanouts <= sent * REPLICAS * 2
    p99 = prometheus.scalar(
        f"histogram_quantile(0.99, sum by (le) (rate(chorus_fanout_latency_seconds_bucket{sel()}[1m])))"
    )
    assert p99 is not None and 0 < p99 <= 5
    assert prometheus.scalar(f"min(chorus_broker_up{sel()})") == 1
    versions = prometheus.query(f"chorus_build_info{sel()}")
    assert {series["metric"]["pod"] for series in versions} == set(prometheus.targets)

    # Every dashboard query parses and has data while the traffic above is in its window.
    delivered += await exchange(chats, 2, "dashboard")
    empty = []
    for query in panel_queries():
        expr = substitute(query.expr, namespace=NAMESPACE, rate_interval="1m")
        if not prometheus.query(expr):
            empty.append(f"{query.panel} / {query.legend}: {expr}")
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)
    render_png(prometheus, ARTIFACTS / "dashboard.png", namespace=NAMESPACE, start=started, end=time.time())
    if os.environ.get("CHORUS_UPDATE_DOCS"):
        shutil.copy(ARTIFACTS / "dashboard.png", Path("docs/img/dashboard.png"))
    # The baseline for the kill is the clients' count, settled, never one read of Prometheus: a
    # read within a scrape interval of the last delivery can predate it (seen: 340 of 420, two
    # replicas' last scrape older than the dashboard round, so the step below expected 80 too few).
    settle(prometheus, DELIVERED, delivered, "delivered before the kill = clients' count")

    # Kill one gunicorn worker of replica-0 outright: its sockets die, gunicorn forks a new one,
    # `child_exit` marks the dead pid so live gauges forget it while counters keep its totals.
    # The kernel decides which worker accepts a socket: kill the one holding the most.
    victim = max(worker_pids(cluster.replicas[0].pid), key=socket_count)
    os.kill(victim, signal.SIGKILL)
    master = cluster.replicas[0].pid
    wait_until(
        lambda: victim not in worker_pids(master) and len(worker_pids(master)) == 2,
        30,
        "gunicorn to replace the worker",
    )
    alive = [chat for chat in chats if await still_open(chat)]
    assert len(alive) < len(chats), "the killed worker held no client; nothing was proven"
    settle(prometheus, f"sum(chorus_connections{sel()})", len(alive), "connections after the worker died")
    survivors = [chat for chat in alive if sum(c.welcome["room"] == chat.welcome["room"] for c in alive) > 1]
    delivered += await exchange(survivors, 2, "after")
    settle(prometheus, DELIVERED, delivered, "delivered after the restart = clients' count")
