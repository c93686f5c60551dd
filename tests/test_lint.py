"""Pyflakes-level checks of the whole tree (unused or undefined names, redefinitions, syntax errors):
the mistakes that a test suite does not always reach. Style is left to the reader."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_pyflakes_errors():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e '.[test]'"
    run = subprocess.run([ruff, "check", "--no-cache", "--select", "F,E9", "--output-format", "concise", str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
