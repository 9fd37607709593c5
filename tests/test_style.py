"""The code stays as ``ruff check`` and ``ruff format`` leave it (what pre-commit runs on each
commit, checked here too so that a commit made without pre-commit cannot drift)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "bench", "docs", "scripts"]

pytest.importorskip("ruff")


@pytest.mark.parametrize(
    "command", [["check"], ["format", "--check"]], ids=["ruff check", "ruff format"]
)
def test_code_is_clean_and_formatted(command):
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *PATHS], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, (
        f"run `ruff {' '.join(command)} {' '.join(PATHS)}`:\n"
        + out.stdout[-3000:]
        + out.stderr[-1000:]
    )
