"""The Grafana dashboard's queries, run against a Prometheus and drawn as a PNG (no Grafana needed)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.dates as mdates
import matplotlib.pyplot as plt

from .prometheus import PrometheusServer

DASHBOARD = Path(__file__).resolve().parent.parent / "helm" / "chorus" / "files" / "dashboard.json"


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    unit: str
    legend: str
    expr: str


def panel_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    dashboard = json.loads(path.read_text())
    return [
        PanelQuery(
            panel["title"], panel["fieldConfig"]["defaults"].get("unit", ""), t["legendFormat"], t["expr"]
        )
        for panel in dashboard["panels"]
        for t in panel.get("targets", [])
    ]


def substitute(expr: str, *, namespace: str, pod: str = ".*", rate_interval: str = "30s") -> str:
    """What Grafana sends: template variables replaced (`pod` All is `.*`)."""
    return (
        expr.replace("$__rate_interval", rate_interval).replace("$namespace", namespace).replace("$pod", pod)
    )


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def render_png(
    prometheus: PrometheusServer,
    out: Path,
    *,
    namespace: str,
    start: float,
    end: float,
    rate_interval: str = "30s",
) -> None:
    """One subplot per panel, each series from the panel's own query over [start, end]."""
    queries = panel_queries()
    panels = list(dict.fromkeys(q.panel for q in queries))
    columns = 2
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(13, 2.6 * rows), squeeze=False)
    step = max(1.0, (end - start) / 200)
    for index, title in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for query in (q for q in queries if q.panel == title):
            expr = substitute(query.expr, namespace=namespace, rate_interval=rate_interval)
            for series in prometheus.query_range(expr, start, end, step):
                points = [(datetime.fromtimestamp(t), float(v)) for t, v in series["values"]]
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    label=legend(query.legend, series["metric"]),
                )
        units = [q.unit for q in queries if q.panel == title]
        unit = {"s": "seconds", "ops": "per second"}.get(units[0], "")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    fig.suptitle(f"Chorus dashboard (queries from dashboard.json against Prometheus), namespace={namespace}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
