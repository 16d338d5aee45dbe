"""ruff and mypy over the project, as DESIGN.md asks (section 5, item 10): a lint or type error
fails the suite like any other test. Both come with the ``dev`` extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_ruff_check() -> None:
    proc = _run("ruff", "check", "memopt", "tests", "benchmarks", "--output-format", "concise")
    assert proc.returncode == 0, f"ruff found problems:\n{proc.stdout}{proc.stderr}"


def test_mypy() -> None:
    proc = _run("mypy")  # files and options: [tool.mypy] in pyproject.toml
    assert proc.returncode == 0, f"mypy found problems:\n{proc.stdout}{proc.stderr}"
