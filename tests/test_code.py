"""The code stays checked: `mypy --strict` on the package and `ruff` on the repository, with the
settings in pyproject.toml. Slow-ish (mypy takes tens of seconds), so it runs once per suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=600,
        check=False,
    )


def test_the_package_type_checks_strictly() -> None:
    result = run("mypy", "verdant_trio")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_repository_is_lint_clean() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
