"""One load: receivers and publishers on one target, driven open-loop in measured steps."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .bench_procs import Target, self_cpu_seconds
from .bench_wire import Tally, WsClient, framing_for, now_us, open_socket

MESSAGE_BYTES = 80  # the text of each message, as in the reference runs
CONNECT_CONCURRENCY = 64
TICK_SECONDS = 0.002
CLIENT_BOUND_CORES = 0.9  # a generator above this share of one core measures itself
_step_ids = itertools.count(1)


@dataclass
class StepResult:
    """One measured step; latencies in ms, CPU in seconds and cores."""

    impl: str
    scenario: str
    replicas: int
    rooms: int
    receivers: int
    publishers: int
    offered_msgs_s: float
    seconds: float
    sent: int
    expected: int
    delivered: int
    duplicates: int
    loss: int
    offered_dps: float
    delivered_dps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    server_cpu_per_1k: float
    server_cpu_ms_per_msg: float  # what a small room pays: each message reaches only a few
    server_cores: float
    redis_cpu_s: float
    redis_us_per_msg: float
    generator_cores: float
    client_bound: bool
    closed: dict[int, int] = field(default_factory=dict)
    attempt: int = 1

    def passed(self, p99_ms: float = 50.0) -> bool:
        return self.loss == 0 and self.duplicates == 0 and self.p99_ms <= p99_ms and not self.closed

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed()}


def _percentile(ordered: list[int], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


class Load:
    """C receivers spread over `rooms` and the replicas (round robin), plus publishers.

    By default a publisher is a socket of its own; with `publisher_is_member` the room's first
    receiver publishes too (a room of 4 is then 4 sockets, each message reaching the other 3).
    """

    def __init__(
        self,
        target: Target,
        *,
        scenario: str,
        rooms: int,
        receivers: int,
        publishers_per_room: int,
        publisher_is_member: bool = False,
    ) -> None:
        self.target = target
        self.framing = framing_for(target.impl)
        self.publisher_is_member = publisher_is_member
        self.scenario = scenario
        self.rooms = rooms
        self.receivers_count = receivers
        self.publishers_per_room = publishers_per_room
        self.tally = Tally()
        self.receivers: list[WsClient] = []
        self.publishers: list[tuple[WsClient, int]] = []
        self.members = [0] * rooms

    def _port(self, room: int, ordinal: int) -> int:
        """The n-th member of each room goes to the next replica, as a round-robin balancer
        without affinity spreads a room: a room with at least R members lives on every replica."""
        ports = self.target.ports
        return ports[(room + ordinal) % len(ports)]

    async def connect(self) -> None:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(room: int, ordinal: int, receiver: bool) -> WsClient:
            # One username per role and room: Chorus announces only a user's first join and
            # last leave, so N distinct joiners would add an N-squared presence storm that is
            # not what this measures (and that the baseline does not have).
            path = self.framing.path(f"bench-{room}", "recv" if receiver else "pub")
            async with gate:
                return await open_socket(
                    self._port(room, ordinal), path, self.tally, receiver=receiver, framing=self.framing
                )

        rooms = [index % self.rooms for index in range(self.receivers_count)]
        for room in rooms:
            self.members[room] += 1
        opening = (one(room, index // self.rooms, True) for index, room in enumerate(rooms))
        self.receivers = list(await asyncio.gather(*opening))
        if self.publisher_is_member:
            # Receivers were opened room by room in turn: the first `rooms` are one per room.
            self.publishers = [(self.receivers[room], room) for room in range(min(self.rooms, len(rooms)))]
            return
        # A publisher is a separate socket, not a receiver: Chorus acks the sender instead of echoing.
        pub_rooms = [room for room in range(self.rooms) for _ in range(self.publishers_per_room)]
        clients = await asyncio.gather(
            *(one(room, index % self.publishers_per_room + 1, False) for index, room in enumerate(pub_rooms))
        )
        self.publishers = list(zip(clients, pub_rooms, strict=True))

    def close(self) -> None:
        for client in [*self.receivers, *(pub for pub, _ in self.publishers)]:  # closing twice is a no-op
            client.close()

    async def step(self, msgs_per_s: float, seconds: float) -> StepResult:
        """Send `msgs_per_s` for `seconds` open-loop, wait (bounded) for stragglers, measure."""
        step_id = next(_step_ids)
        target = self.target
        target.check_alive()
        cpu0, redis0, gen0, wall0 = (
            target.server_cpu(),
            target.redis_cpu(),
            self_cpu_seconds(),
            time.monotonic(),
        )
        sent, expected = await self._publish(step_id, msgs_per_s, seconds)
        tally = self.tally.step(step_id)
        deadline = time.monotonic() + max(2.0, seconds)
        # A bounded poll: stragglers get the deadline, not an open-ended wait.
        while tally.received + tally.duplicates < expected and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        wall = time.monotonic() - wall0
        cpu, redis, gen = target.server_cpu() - cpu0, target.redis_cpu() - redis0, self_cpu_seconds() - gen0
        ordered = sorted(tally.latencies_us)
        delivered = tally.received
        return StepResult(
            impl=target.impl,
            scenario=self.scenario,
            replicas=len(target.ports),
            rooms=self.rooms,
            receivers=self.receivers_count,
            publishers=len(self.publishers),
            offered_msgs_s=msgs_per_s,
            seconds=seconds,
            sent=sent,
            expected=expected,
            delivered=delivered,
            duplicates=tally.duplicates,
            loss=max(0, expected - delivered),
            offered_dps=expected / seconds,
            delivered_dps=delivered / seconds,
            p50_ms=_percentile(ordered, 0.50),
            p90_ms=_percentile(ordered, 0.90),
            p99_ms=_percentile(ordered, 0.99),
            max_ms=ordered[-1] / 1000 if ordered else float("nan"),
            server_cpu_s=cpu,
            server_cpu_per_1k=cpu / delivered * 1000 if delivered else float("nan"),
            server_cpu_ms_per_msg=cpu / sent * 1000 if sent else float("nan"),
            server_cores=cpu / wall,
            redis_cpu_s=redis,
            redis_us_per_msg=redis / sent * 1e6 if sent else float("nan"),
            generator_cores=gen / wall,
            client_bound=gen / wall > CLIENT_BOUND_CORES,
            closed=dict(self.tally.closed),
        )

    async def _publish(self, step_id: int, msgs_per_s: float, seconds: float) -> tuple[int, int]:
        total = max(1, round(msgs_per_s * seconds))
        publishers = self.publishers
        seqs = [0] * len(publishers)
        pad = b"x" * MESSAGE_BYTES
        expected = 0
        others = 1 if self.publisher_is_member else 0  # a sender does not receive its own message
        started = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - started) * msgs_per_s) + 1)
            while sent < due:
                index = sent % len(publishers)
                client, room = publishers[index]
                head = b"%d %d %d %d " % (step_id, index, seqs[index], now_us())
                seqs[index] += 1
                client.send_message(head + pad[len(head) :])
                expected += self.members[room] - others
                sent += 1
            await asyncio.sleep(TICK_SECONDS)
        return sent, expected
