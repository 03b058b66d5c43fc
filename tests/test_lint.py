"""The code stays `ruff` clean and formatted and `mypy --strict` clean: what `make lint` runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def lint_paths() -> list[str]:
    """LINT_PATHS from the Makefile: the paths `make lint` checks, so this test checks the same."""
    found = re.search(r"^LINT_PATHS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found is not None, "the Makefile has no LINT_PATHS"
    return found[1].split()


def test_make_lint_covers_service_tests_and_loadtest() -> None:
    assert lint_paths() == ["service", "tests", "loadtest"]
    recipe = (ROOT / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check $(LINT_PATHS)" in recipe and "ruff format --check $(LINT_PATHS)" in recipe
    assert "$(BIN)/mypy" in recipe


def test_ruff_is_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", *lint_paths())
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "format", "--check", *lint_paths())
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
