"""One Chorus replica that reports where its memory is, for `loadtest.bench_idle`.

    python -m loadtest.idle_probe --port P --out DIR

Runs the replica exactly as `chorus serve` does (settings from `CHORUS_*`), with tracemalloc
on. Each SIGUSR1 writes `DIR/snap-N.tracemalloc` (a tracemalloc snapshot) and `DIR/types-N.json`
(live objects per type: count and `sys.getsizeof` bytes, after a full collection), so a
caller can diff two moments: before and after it opened its idle sockets.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import signal
import sys
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

FRAMES = 12  # traceback depth kept per allocation: enough to see who asked for it


def _types() -> dict[str, list[int]]:
    gc.collect()
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return {name: [counts[name], sizes[name]] for name in counts}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.idle_probe")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    numbers = itertools.count()

    def dump(signum: int, frame: FrameType | None) -> None:
        index = next(numbers)
        gc.collect()
        tracemalloc.take_snapshot().dump(str(args.out / f"snap-{index}.tracemalloc"))
        (args.out / f"types-{index}.json").write_text(json.dumps(_types()))
        (args.out / f"done-{index}").write_text("")

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, dump)
    from chorus.config import load_settings
    from chorus.server import serve_uvicorn

    serve_uvicorn(load_settings(), host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
