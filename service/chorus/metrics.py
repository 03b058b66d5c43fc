"""The Prometheus metric catalogue. Names are part of the operator contract.

Under gunicorn, `chorus serve` sets PROMETHEUS_MULTIPROC_DIR before any worker imports this
module; live gauges then use `livesum`/`livemax`/`livemin` so dead workers drop out.
"""

from __future__ import annotations

import os
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

from . import __version__, protocol

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

CONNECTIONS = Gauge("chorus_connections", "Open WebSockets on this replica.", multiprocess_mode="livesum")
CONNECTIONS_OPENED = Counter("chorus_connections_opened", "WebSockets accepted.")
CONNECTIONS_CLOSED = Counter("chorus_connections_closed", "WebSockets closed, by close code.", ["code"])
ROOMS = Gauge("chorus_rooms", "Rooms with members on this replica.", multiprocess_mode="livesum")
MESSAGES_RECEIVED = Counter("chorus_messages_received", "Chat messages received from clients.")
FRAMES_RECEIVED = Counter(
    "chorus_frames_received", "Client frames received, by type (message, typing, edit, ...).", ["type"]
)
MESSAGES_PUBLISHED = Counter("chorus_messages_published", "Chat messages stored and published to the broker.")
MESSAGES_DELIVERED = Counter(
    "chorus_messages_delivered", "Message frames queued to clients (live and replay)."
)
MESSAGES_DROPPED = Counter(
    "chorus_messages_dropped",
    "Messages not delivered or not published, by reason.",
    ["reason"],
)
WRITES_COALESCED = Counter(
    "chorus_writes_coalesced",
    "Frames that went out in the same socket write as an earlier frame (system calls saved).",
)
FANOUT_LATENCY = Histogram(
    "chorus_fanout_latency_seconds",
    "From a message's timestamp to its fan-out on this replica.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BROKER_UP = Gauge(
    "chorus_broker_up", "1 when the broker self-probe succeeds, else 0.", multiprocess_mode="livemin"
)
BROKER_RECONNECTS = Counter("chorus_broker_reconnects", "Pub/sub connections re-established.")
BROKER_BACKFILLED = Counter(
    "chorus_broker_backfilled", "Messages recovered from the room stream after a gap."
)
BROKER_PROBE_LATENCY = Histogram(
    "chorus_broker_probe_latency_seconds",
    "Round trip of the readiness self-probe through Redis pub/sub.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
REBALANCE_CLOSES = Counter(
    "chorus_rebalance_closes", "Sockets closed with 1012 `rebalance` to move them to a less loaded replica."
)
RESYNCS = Counter("chorus_resyncs", "Resync frames sent because history could not fill a gap.")
SEND_QUEUE_DEPTH = Gauge(
    "chorus_send_queue_depth",
    "Deepest per-connection send queue on this replica.",
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge("chorus_build_info", "Chorus version.", ["version"], multiprocess_mode="livemax")
BUILD_INFO.labels(version=__version__).set(1)

REJECTIONS = Counter(
    "chorus_rejections",
    "Handshakes and room reads refused, and sockets closed for breaking a rule, by reason (a closed set).",
    ["reason"],
)

# chorus_messages_dropped_total{reason} label values: these, and the code of the error frame
# that refused a client's message (protocol.ERROR_INVALID, protocol.ERROR_TOO_LARGE).
DROP_SLOW_CONSUMER: Final = "slow_consumer"
DROP_BROKER_UNAVAILABLE: Final = "broker_unavailable"
DROP_UNDECODABLE: Final = "undecodable"
DROP_RATE_LIMITED: Final = "rate_limited"
# Every DROP_* above (collected, not listed again) and the two error codes.
DROP_REASONS: Final = frozenset(
    [value for name, value in dict(globals()).items() if name.startswith("DROP_")]
    + [protocol.ERROR_INVALID, protocol.ERROR_TOO_LARGE]
)


def render() -> tuple[bytes, str]:
    """The exposition for /metrics, merged over every worker when several run."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
