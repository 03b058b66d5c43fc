"""Write the chart README's values table from values.yaml's helm-docs `# --` comments.

Usage: python k8s/tools/chart_readme.py [--check]. With --check it exits 1 when
helm/chorus/README.md is out of date (the test suite runs that).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "chorus"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
MARKER = "## Values"


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for every key preceded by a `# --` comment, in file order."""
    rows: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if not match:
            if not stripped:
                continue
            comment = None  # a list item or a continuation: not a key
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if comment is not None:
            rows.append((".".join(key for _, key in stack), " ".join(comment)))
        comment = None
    return rows


def lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        node = node[part]
    return node


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    lines = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for key, description in documented_keys(values_text):
        default = json.dumps(lookup(values, key), separators=(", ", ": "))
        lines.append(f"| `{key}` | `{default}` | {description} |")
    return "\n".join(lines) + "\n"


def render(readme: str, values_text: str) -> str:
    head = readme.split(MARKER)[0].rstrip() + "\n\n"
    return f"{head}{MARKER}\n\n{table(values_text)}"


def main(argv: list[str]) -> int:
    readme_path = CHART / "README.md"
    wanted = render(readme_path.read_text(), (CHART / "values.yaml").read_text())
    if "--check" in argv:
        if readme_path.read_text() != wanted:
            print("helm/chorus/README.md is out of date: run `make chart-readme`", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
