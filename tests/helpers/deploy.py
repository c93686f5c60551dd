"""Helpers for the deployment tests: a small policy checkpoint, dev PKI, free ports, real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKER = ROOT / "deploy" / "docker"
ROBOTS = ["robot-0", "robot-1"]


def make_checkpoint(root: Path) -> Path:
    """A small untrained pi_rl policy saved like an SFT checkpoint (what tests/system/test_runtime.py uses)."""
    from helpers.policy import builtin_policy, save_checkpoint

    return save_checkpoint(root / "policy", *builtin_policy(0))


def process_env(**extra: str) -> dict[str, str]:
    """The test's environment with the venv's console scripts first on PATH, minus any PIRL_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIRL_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"
    )
    env.update(extra)
    return env


class Processes:
    """Child processes started by a test, each logging to a file; all stopped at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")  # noqa: SIM115  the child writes to it for its lifetime
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self.procs[name]

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text()[-4000:] if path.is_file() else ""

    def alive(self, name: str) -> None:
        p = self.procs[name]
        assert p.poll() is None, f"{name} exited with {p.returncode}:\n{self.log(name)}"

    def stop(self, name: str, timeout: float = 90.0) -> int:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_until(predicate, timeout: float, what: str, check=None, interval: float = 0.5):
    """Poll ``predicate`` until it returns something truthy; ``check`` runs each round (e.g. liveness)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def require_tool(name: str, how: str) -> str:
    """Path of an external tool. Missing: skip on a developer machine, fail where
    PIRL_REQUIRE_DEPLOY_TOOLS=1 (set by .ci/run): CI must never skip these checks silently."""
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).is_file() else None)
    if found:
        return found
    message = f"{name} not found: {how}"
    if os.environ.get("PIRL_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(message + " (PIRL_REQUIRE_DEPLOY_TOOLS=1: this check may not be skipped)")
    pytest.skip(message)
