"""Locust users for Chorus: plain WebSockets (websocket-client under gevent).

Run through `python -m loadtest` (which starts a local cluster, runs this headless and prints
the verdict), or directly: `locust -f loadtest/locustfile.py --host ws://127.0.0.1:8000`.

Request types in locust's stats: `WS` connect (handshake to welcome), `WSS` send (send to
ack), `WSR` receive (end-to-end fan-out latency from the timestamp inside the payload). Every
received frame is counted exactly in the ledger; locust's `WSR` stats get a random sample of
at most `--wsr-sample` per second so that locust's own bookkeeping never becomes the
bottleneck at high fan-out. The ledger is written as JSON at the end for the verdict.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import defaultdict
from typing import Any

import gevent
import websocket
from locust import User, constant_throughput, events, task
from locust.env import Environment

ROOM_PREFIX = "lt"


class Ledger:
    """Every send, ack and delivery of this locust process, for the exactly-once verdict."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.run_id = f"{int(self.t0)}{random.randrange(1000):03d}"
        self.next_user = itertools.count()
        self.members: dict[str, dict[int, str]] = defaultdict(dict)  # room -> user -> replica
        self.joined = 0
        self.target_users = 0
        self.open_at: float | None = None
        self.stop_at = float("inf")
        # (sender, seq) -> [room, sender replica, sent at, expected receivers, acked]
        self.sent: dict[tuple[int, int], list[Any]] = {}
        self.receivers: dict[tuple[int, int], set[int]] = defaultdict(set)
        self.duplicates = 0
        self.unknown = 0
        self.cross = 0
        self.errors: dict[str, int] = defaultdict(int)
        self.disconnects = 0
        self.latencies: list[float] = []
        self.per_second: dict[int, list[float]] = defaultdict(list)
        self.sent_per_second: dict[int, int] = defaultdict(int)
        self.samples: list[tuple[float, bool]] = []

    def sending(self) -> bool:
        now = time.time()
        if self.open_at is None and self.target_users and self.joined >= self.target_users:
            self.open_at = now
        return self.open_at is not None and now < self.stop_at

    def record_delivery(self, receiver: int, receiver_replica: str, payload: dict[str, Any]) -> None:
        now = time.time()
        key = (int(payload["s"]), int(payload["q"]))
        if key not in self.sent:
            self.unknown += 1
            return
        seen = self.receivers[key]
        if receiver in seen:
            self.duplicates += 1
            return
        seen.add(receiver)
        latency = now - float(payload["t"])
        crossed = payload["r"] != receiver_replica
        self.cross += crossed
        self.latencies.append(latency)
        self.per_second[int(now - self.t0)].append(latency)
        self.samples.append((latency, crossed))

    def summary(self) -> dict[str, Any]:
        expected = sum(entry[3] for entry in self.sent.values())
        delivered = sum(len(receivers) for receivers in self.receivers.values())
        per_second = []
        for second in sorted(set(self.per_second) | set(self.sent_per_second)):
            values = sorted(self.per_second.get(second, []))
            per_second.append(
                {
                    "t": second,
                    "sent": self.sent_per_second.get(second, 0),
                    "delivered": len(values),
                    "p50": _quantile(values, 0.50),
                    "p99": _quantile(values, 0.99),
                }
            )
        latencies = sorted(self.latencies)
        replicas = {replica for room in self.members.values() for replica in room.values()}
        return {
            "users": self.joined,
            "rooms": len(self.members),
            "replicas": sorted(replicas),
            "placement": {room: sorted(members.values()) for room, members in self.members.items()},
            "sending_seconds": (min(time.time(), self.stop_at) - self.open_at) if self.open_at else 0.0,
            "sent": len(self.sent),
            "acked": sum(1 for entry in self.sent.values() if entry[4]),
            "expected_deliveries": expected,
            "delivered": delivered,
            "lost": expected - delivered,
            "duplicates": self.duplicates,
            "unknown": self.unknown,
            "cross_replica": self.cross,
            "errors": dict(self.errors),
            "disconnects": self.disconnects,
            "latency": {q: _quantile(latencies, float(q)) for q in ("0.5", "0.9", "0.99", "0.999", "1.0")},
            "per_second": per_second,
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


LEDGER = Ledger()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--room-size", type=int, default=10, help="members per room")
    parser.add_argument("--msg-rate", type=float, default=1.0, help="messages per second per user")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds before the end with no sends")
    parser.add_argument(
        "--wsr-sample", type=int, default=300, help="WSR events per second fed to locust stats"
    )
    parser.add_argument("--ledger", default="", help="write the ledger summary (JSON) to this path")


@events.test_start.add_listener
def _test_start(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and getattr(options, "run_time", None):
        LEDGER.stop_at = time.time() + float(options.run_time) - float(options.drain)
    gevent.spawn(_feed_stats, environment)


@events.quitting.add_listener
def _quitting(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and options.ledger:
        with open(options.ledger, "w") as out:
            json.dump(LEDGER.summary(), out, indent=1)


def _feed_stats(environment: Environment) -> None:
    """Once a second, report a random sample of the fan-out latencies as WSR requests."""
    cap = int(getattr(environment.parsed_options, "wsr_sample", 300) or 300)
    while True:
        gevent.sleep(1.0)
        batch, LEDGER.samples = LEDGER.samples, []
        if len(batch) > cap:
            batch = random.sample(batch, cap)
        for latency, crossed in batch:
            environment.events.request.fire(
                request_type="WSR",
                name="fan-out cross-replica" if crossed else "fan-out same replica",
                response_time=latency * 1000,
                response_length=0,
                exception=None,
                context={},
            )


class WebSocketUser(User):
    """Owns one WebSocket and a receive greenlet; subclasses handle frames in `on_frame`."""

    abstract = True
    ws: websocket.WebSocket | None = None
    _receiver: gevent.Greenlet | None = None

    def connect(self, path: str, name: str) -> dict[str, Any]:
        """Open the socket and return its first frame (Chorus' welcome)."""
        url = self.host.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + path
        started = time.perf_counter()
        try:
            self.ws = websocket.create_connection(url, timeout=10)
            first = json.loads(self.ws.recv())
        except Exception as exc:
            self._fire("WS", name, started, exc)
            raise
        self._fire("WS", name, started, None)
        self.ws.settimeout(None)
        self._receiver = gevent.spawn(self._receive_loop)
        return first  # type: ignore[no-any-return]

    def send_frame(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        self.ws.send(json.dumps(frame))

    def _receive_loop(self) -> None:
        assert self.ws is not None
        while True:
            try:
                text = self.ws.recv()
            except Exception as exc:
                self.on_disconnect(exc)
                return
            if not text:
                self.on_disconnect(None)
                return
            self.on_frame(json.loads(text))

    def on_frame(self, frame: dict[str, Any]) -> None:
        raise NotImplementedError

    def on_disconnect(self, exc: BaseException | None) -> None:
        pass

    def on_stop(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self._receiver is not None:
            self._receiver.kill(block=False)

    def _fire(self, kind: str, name: str, started: float, exc: BaseException | None, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )


class ChatUser(WebSocketUser):
    """Joins a room (consecutive users share one, so round robin spreads it over replicas),
    then sends timestamped, numbered messages and accounts for every delivery."""

    rate = 1.0

    def wait_time(self) -> float:
        # constant_throughput's pacing, with the rate taken from --msg-rate at start.
        return constant_throughput(self.rate)(self)  # type: ignore[no-any-return]

    def on_start(self) -> None:
        options = self.environment.parsed_options
        room_size = int(getattr(options, "room_size", 10))
        rate = float(getattr(options, "msg_rate", 1.0))
        self.rate = rate
        self.index = next(LEDGER.next_user)
        self.room = f"{ROOM_PREFIX}-{LEDGER.run_id}-{self.index // room_size}"
        self.seq = itertools.count()
        self.in_flight: dict[str, float] = {}
        self.stopping = False
        welcome = self.connect(f"/ws/{self.room}?username=u{self.index}&history=0", "/ws/[room]")
        assert welcome.get("type") == "welcome", welcome
        self.replica = str(welcome["replica"])
        LEDGER.members[self.room][self.index] = self.replica
        LEDGER.joined += 1
        if self.environment.runner is not None:
            LEDGER.target_users = self.environment.runner.target_user_count or 0

    @task
    def say(self) -> None:
        if not LEDGER.sending():
            return
        seq = next(self.seq)
        now = time.time()
        text = json.dumps({"s": self.index, "q": seq, "t": now, "r": self.replica}, separators=(",", ":"))
        members = LEDGER.members[self.room]
        LEDGER.sent[(self.index, seq)] = [self.room, self.replica, now, len(members) - 1, False]
        LEDGER.sent_per_second[int(now - LEDGER.t0)] += 1
        self.in_flight[str(seq)] = time.perf_counter()
        self.send_frame({"type": "message", "text": text, "client_id": str(seq)})

    def on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "message":
            try:
                payload = json.loads(frame["text"])
            except (ValueError, TypeError):
                LEDGER.unknown += 1
                return
            LEDGER.record_delivery(self.index, self.replica, payload)
        elif kind == "ack":
            client_id = str(frame.get("client_id"))
            started = self.in_flight.pop(client_id, None)
            if started is not None:
                LEDGER.sent[(self.index, int(client_id))][4] = True
                self._fire("WSS", "message", started, None)
        elif kind in ("error", "resync"):
            LEDGER.errors[str(frame.get("code", kind))] += 1
            started = self.in_flight.pop(str(frame.get("client_id")), time.perf_counter())
            self._fire("WSS", "message", started, RuntimeError(f"{kind}: {frame.get('detail', '')}"))

    def on_disconnect(self, exc: BaseException | None) -> None:
        if self.stopping:
            return
        LEDGER.disconnects += 1
        LEDGER.members[self.room].pop(self.index, None)
        LEDGER.errors["disconnect"] += 1

    def on_stop(self) -> None:
        self.stopping = True
        super().on_stop()
