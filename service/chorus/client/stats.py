"""What a room saw: counters for logs, benchmarks and the storm report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """What the client saw, for logs and benchmarks; counters only grow."""

    connects: int = 0  # handshakes that reached the welcome frame, the first one included
    reconnects: int = 0  # connects after the first
    resumes: int = 0  # connects that asked for `since=<last id>`
    replayed: int = 0  # stream entries a resume delivered that predate it (id time vs. our clock)
    duplicates_dropped: int = 0  # stream entries already seen (by id) or our own, already acked
    resyncs: int = 0  # `resync` frames: the server could not resume from our last id
    unreachable: int = 0  # attempts that failed before a usable HTTP answer (refused, reset, timeout)
    close_codes: Counter[int] = field(default_factory=Counter)  # every socket close, by code
    refused: Counter[int] = field(default_factory=Counter)  # refused handshakes, by HTTP status
