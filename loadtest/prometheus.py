"""A real Prometheus (the OS package) scraping Chorus replicas on loopback, and its HTTP API.

The generated scrape config adds `namespace` and `pod` target labels, as Kubernetes service
discovery would, so the dashboard's and the alerts' queries run unchanged.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from chorus.devcluster import Process, find_binary, free_port, http_status, wait_until

JOB = "chorus"


def scrape_config(targets: dict[str, str], *, namespace: str, interval: str = "1s") -> str:
    """Prometheus YAML (JSON is YAML) scraping each `pod -> host:port` under job `chorus`."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {"targets": [address], "labels": {"namespace": namespace, "pod": pod}}
                    for pod, address in targets.items()
                ],
            }
        ],
    }
    return json.dumps(config, indent=1)


class PrometheusServer:
    def __init__(self, workdir: Path, targets: dict[str, str], *, namespace: str = "chorus") -> None:
        self.workdir = workdir
        self.targets = targets
        self.namespace = namespace
        self.port = free_port()
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        config = self.workdir / "prometheus.yml"
        config.write_text(scrape_config(self.targets, namespace=self.namespace))
        argv = [
            find_binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
        ]
        self.process = Process("prometheus", argv, self.workdir / "prometheus.log")
        self.process.start()
        process = self.process

        def ready() -> bool:
            if not process.alive():
                raise RuntimeError(f"prometheus exited:\n{process.output()[-3000:]}")
            return http_status(self.url + "/-/ready") == 200

        wait_until(ready, 30, "prometheus to be ready")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{params}: {exc.read().decode(errors='replace')}") from exc
        if body.get("status") != "success":
            raise ValueError(f"{params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; a list of {metric, value: [ts, "v"]}."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        """The single value of an aggregated query, None when it has no result."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> int:
        return len(self.query(f'up{{job="{JOB}"}} == 1'))

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
