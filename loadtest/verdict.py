"""The SLO verdict of a load test: from the locust ledger and the replicas' own counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = (
    "chorus_messages_received_total",
    "chorus_messages_published_total",
    "chorus_messages_delivered_total",
    "chorus_connections_opened_total",
)


@dataclass(frozen=True)
class Slo:
    max_p99_seconds: float = 0.5
    cross_tolerance: float = 0.15
    max_lost: int = 0
    max_duplicates: int = 0


@dataclass(frozen=True)
class Check:
    name: str
    observed: str
    bound: str
    ok: bool


def server_counts(texts: list[str]) -> dict[str, float]:
    """Sum the counters that matter over every replica's /metrics exposition."""
    totals: dict[str, float] = {name: 0.0 for name in COUNTERS}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
                elif sample.name == "chorus_messages_dropped_total":
                    key = f"dropped:{sample.labels.get('reason', '')}"
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def placement_cross_share(placement: dict[str, list[str]]) -> float | None:
    """The cross-replica share that the rooms' actual placement predicts (every member sends alike)."""
    pairs = cross = 0
    for replicas in placement.values():
        for i, sender in enumerate(replicas):
            for j, receiver in enumerate(replicas):
                if i != j:
                    pairs += 1
                    cross += sender != receiver
    return cross / pairs if pairs else None


def judge(ledger: dict[str, Any], slo: Slo, *, replicas: int, server: dict[str, float] | None) -> list[Check]:
    lost, dups = int(ledger["lost"]), int(ledger["duplicates"])
    checks = [
        Check("messages sent and acked", f"{ledger['acked']}/{ledger['sent']}", "> 0, all acked",
              ledger["sent"] > 0 and ledger["acked"] == ledger["sent"]),
        Check("delivered exactly once", f"{ledger['delivered']}/{ledger['expected_deliveries']}, "
              f"lost {lost}, duplicates {dups}", f"lost <= {slo.max_lost}, dup <= {slo.max_duplicates}",
              ledger["expected_deliveries"] > 0 and lost <= slo.max_lost and dups <= slo.max_duplicates),
        Check("errors and disconnects", f"{sum(ledger['errors'].values())} ({dict(ledger['errors'])})", "0",
              not ledger["errors"] and ledger["unknown"] == 0),
    ]  # fmt: skip
    target = (replicas - 1) / replicas if replicas else 0.0
    share = ledger["cross_replica"] / ledger["delivered"] if ledger["delivered"] else 0.0
    predicted = placement_cross_share(ledger["placement"])
    predicted_text = f" (placement predicts {predicted:.3f})" if predicted is not None else ""
    checks.append(
        Check("cross-replica share", f"{share:.3f}{predicted_text}",
              f"(R-1)/R = {target:.3f} ± {slo.cross_tolerance}",
              replicas > 1 and abs(share - target) <= slo.cross_tolerance)
    )  # fmt: skip
    p99 = ledger["latency"]["0.99"]
    checks.append(
        Check("p99 fan-out latency", "n/a" if p99 is None else f"{p99 * 1000:.1f} ms",
              f"<= {slo.max_p99_seconds * 1000:.0f} ms", p99 is not None and p99 <= slo.max_p99_seconds)
    )  # fmt: skip
    if server is not None:
        published = int(server["chorus_messages_published_total"])
        delivered = int(server["chorus_messages_delivered_total"])
        received = int(ledger["delivered"] + ledger["duplicates"] + ledger["unknown"])
        checks.append(
            Check("replica counters agree", f"published {published}, delivered {delivered}",
                  f"published = acked {ledger['acked']}, delivered = clients' {received}",
                  published == ledger["acked"] and delivered == received)
        )  # fmt: skip
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(check.observed) for check in checks)
    lines = [f"{'SLO':<26} {'observed':<{width}}  {'bound':<44} result"]
    for check in checks:
        verdict = "PASS" if check.ok else "FAIL"
        lines.append(f"{check.name:<26} {check.observed:<{width}}  {check.bound:<44} {verdict}")
    lines.append("VERDICT: " + ("PASS" if all(check.ok for check in checks) else "FAIL"))
    return "\n".join(lines)
