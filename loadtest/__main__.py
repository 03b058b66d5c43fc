"""`python -m loadtest`: run locust headless against a local cluster (or any URL) and judge it.

Without --url it starts Redis + REPLICAS replicas + a round-robin HAProxy with
chorus.devcluster.LocalCluster, stops them afterwards, and compares the replicas' own
counters with what the clients saw. Exit status 0 only when every SLO passes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from chorus.devcluster import LocalCluster

from .plot import plot_run
from .verdict import Slo, judge, render, server_counts

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    target = parser.add_argument_group("target")
    target.add_argument(
        "--url", help="an existing deployment (http[s]://host:port); default: start a local cluster"
    )
    target.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        help="a replica's /metrics URL (repeat per replica) to compare server counts",
    )
    target.add_argument(
        "--replicas", type=int, default=3, help="local cluster replicas; with --url, how many serve it"
    )
    target.add_argument("--workers", type=int, default=2, help="gunicorn workers per local replica")
    load = parser.add_argument_group("load")
    load.add_argument("--users", type=int, default=60)
    load.add_argument("--spawn-rate", type=float, default=30)
    load.add_argument("--run-time", type=int, default=60, help="seconds, including ramp-up and the drain")
    load.add_argument("--room-size", type=int, default=10)
    load.add_argument("--msg-rate", type=float, default=1.0, help="messages per second per user")
    load.add_argument(
        "--drain", type=float, default=3.0, help="last seconds with no sends, to count every delivery"
    )
    slo = parser.add_argument_group("SLOs")
    slo.add_argument("--max-p99-ms", type=float, default=500)
    slo.add_argument("--cross-tolerance", type=float, default=0.15)
    slo.add_argument("--max-lost", type=int, default=0)
    slo.add_argument("--max-duplicates", type=int, default=0)
    parser.add_argument("--results", type=Path, default=None, help="default: results/loadtest-<time>")
    return parser.parse_args(argv)  # fmt: skip


def scrape(urls: list[str]) -> dict[str, float]:
    texts = []
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            texts.append(response.read().decode())
    return server_counts(texts)


def run_locust(args: argparse.Namespace, url: str, results: Path) -> Path:
    ledger = results / "ledger.json"
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", url, "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.run_time}s",
        "--stop-timeout", "5", "--csv", str(results / "locust"), "--csv-full-history",
        "--html", str(results / "report.html"),
        "--room-size", str(args.room_size), "--msg-rate", str(args.msg_rate), "--drain", str(args.drain),
        "--ledger", str(ledger),
    ]  # fmt: skip
    with open(results / "locust.log", "wb") as log:
        subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=args.run_time + 120, check=False)
    if not ledger.exists():
        raise SystemExit(f"locust wrote no ledger; see {results / 'locust.log'}")
    return ledger


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = args.results or Path("results") / time.strftime("loadtest-%Y%m%d-%H%M%S")
    results.mkdir(parents=True, exist_ok=True)
    cluster: LocalCluster | None = None
    metrics_urls = list(args.metrics_url)
    try:
        if args.url:
            url = args.url
        else:
            cluster = LocalCluster(args.replicas, workers=args.workers, workdir=results / "cluster")
            (results / "cluster").mkdir(exist_ok=True)
            cluster.start()
            url = cluster.url
            metrics_urls = [cluster.replica_url(i) + "/metrics" for i in range(args.replicas)]
        print(f"load test: {args.users} users in rooms of {args.room_size}, {args.msg_rate} msg/s each, "
              f"{args.run_time}s against {url}", flush=True)  # fmt: skip
        before = scrape(metrics_urls) if metrics_urls else None
        ledger_path = run_locust(args, url, results)
        after = scrape(metrics_urls) if metrics_urls else None
    finally:
        if cluster is not None:
            cluster.stop()
    ledger = json.loads(ledger_path.read_text())
    server = None
    if before is not None and after is not None:
        server = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    slo = Slo(args.max_p99_ms / 1000, args.cross_tolerance, args.max_lost, args.max_duplicates)
    checks = judge(ledger, slo, replicas=args.replicas, server=server)
    plot_run(ledger, results / "run.png", title=f"Chorus load test: {args.users} users, {url}")
    verdict = {
        "pass": all(check.ok for check in checks),
        "checks": [check.__dict__ for check in checks],
        "server": server,
        "ledger": {key: value for key, value in ledger.items() if key not in ("per_second", "placement")},
    }
    (results / "verdict.json").write_text(json.dumps(verdict, indent=1))
    print(render(checks))
    print(f"results in {results}/ (report.html, locust_*.csv, run.png, verdict.json)")
    return 0 if verdict["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
