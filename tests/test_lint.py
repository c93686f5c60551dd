"""Lint that bites: LeRobot's ruff rule set over the whole tree, and the tree as `ruff format` writes it.

The rules live in pyproject.toml ([tool.ruff.lint]); this test runs ruff with that configuration, so
`make lint`, the pre-commit hook and this test can never disagree.
"""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEROBOT_RULES = {"E", "W", "F", "I", "B", "C4", "T20", "N", "UP", "SIM"}


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert exe, "ruff is part of the test extra: pip install -e '.[test]'"
    return subprocess.run([exe, *args, "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)


def test_pyproject_selects_lerobots_rule_set():
    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert set(lint["select"]) >= LEROBOT_RULES


def test_ruff_check_is_clean():
    run = ruff("check", "--output-format", "concise")
    assert run.returncode == 0, run.stdout + run.stderr


def test_tree_is_formatted():
    run = ruff("format", "--check")
    assert run.returncode == 0, run.stdout + run.stderr
