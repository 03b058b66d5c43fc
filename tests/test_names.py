"""Names the wire or an operator sees are listed once in code; the README's tables match them."""

from __future__ import annotations

import re
from pathlib import Path

from chorus import keys, metrics
from chorus.protocol import CLIENT_CLOSE_CODES, CLIENT_TYPES, CLOSE_CODES, ERROR_CODES, REJECTION_REASONS

README = Path(__file__).resolve().parents[1] / "README.md"


def table_after(heading: str) -> list[str]:
    """The first column of the Markdown table that follows the line starting with `heading`."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows: list[str] = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append(line.split("|")[1].strip())
    return rows[2:]  # the header row and its --- line


def metric_row(metric: str) -> set[str]:
    """The backticked label values in the README metrics table's row for `metric`."""
    row = next(line for line in README.read_text().splitlines() if line.startswith(f"| `{metric}"))
    return set(re.findall(r"`([a-z_]+)`", row.split("|")[3]))


def test_readme_close_code_table_lists_the_codes_chorus_sends() -> None:
    assert {int(code) for code in table_after("Close codes")} == set(CLOSE_CODES - CLIENT_CLOSE_CODES)


def test_readme_error_code_table_matches_protocol() -> None:
    assert {code.strip("`") for code in table_after("Error codes")} == set(ERROR_CODES)


def test_readme_rejection_reason_table_matches_protocol() -> None:
    assert {reason.strip("`") for reason in table_after("Rejection reasons")} == set(REJECTION_REASONS)


def test_readme_dropped_reasons_match_metrics() -> None:
    assert metric_row("chorus_messages_dropped_total") == set(metrics.DROP_REASONS)


def test_redis_keys_follow_one_rule() -> None:
    room = "lobby"
    built = [keys.channel(room), keys.stream(room), keys.presence_entries(room), keys.online(room)]
    built += [keys.names(room), keys.connections("dave"), keys.heartbeat("ab12"), keys.probe("r:1")]
    built += [keys.presence_rooms("ab12"), keys.state(room), keys.typing(room), keys.read_markers("dave")]
    built += [keys.state_index(room)]
    built += [keys.control()]
    for key in built:
        assert re.fullmatch(r"chorus:[a-z-]+:\{[^{}]+\}", key), key
    assert keys.PRESENCE_REPLICAS.startswith(f"{keys.PREFIX}:")


def test_readme_client_frame_table_lists_every_client_frame_type() -> None:
    frames = table_after("Client to server")
    assert {re.search(r'"type":"([a-z]+)"', frame)[1] for frame in frames} == set(CLIENT_TYPES)  # type: ignore[index]


def test_readme_frames_received_row_lists_every_client_frame_type() -> None:
    assert metric_row("chorus_frames_received_total") == set(CLIENT_TYPES)
