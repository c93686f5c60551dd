"""A learner and edges as real processes over gRPC + TLS on loopback (the ``cluster`` fixture's
machinery, shared by the system tests)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.net import free_port

BIN = Path(sys.executable).parent
ROBOTS = ["robot-0", "robot-1"]
HOGS = ["hog-0", "hog-1"]  # robots of the fleet (they have tokens) that only hold calls open


class Cluster:
    def __init__(self, root: Path, ckpt: Path, pki: dict, name: str):
        self.dir = root / name
        self.dir.mkdir()
        self.ckpt, self.pki = ckpt, pki
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name, cmd):
        log = open(self.dir / f"{name}.log", "a")  # noqa: SIM115  the child writes to it for its lifetime
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def learner(self, *extra, launcher: tuple[str, ...] = ()):
        """pirl-learner with this cluster's certificates and small-update settings; ``launcher``: a command
        it runs under (e.g. torchrun ... --no-python)."""
        self._start(
            "learner",
            [
                *launcher,
                str(BIN / "pirl-learner"),
                "--policy_path",
                str(self.ckpt),
                "--output_dir",
                str(self.dir / "learner"),
                "--server.address",
                f"127.0.0.1:{self.port}",
                "--tokens",
                str(self.pki["tokens"]),
                "--server.tls_cert",
                str(self.pki["server_cert"]),
                "--server.tls_key",
                str(self.pki["server_key"]),
                "--trainer.episodes_per_update",
                "16",
                "--trainer.eval_every",
                "0",
                "--intake.max_version_lag",
                "3",
                *extra,
            ],
        )

    def edge(self, robot, mode, *extra):
        self._start(
            robot,
            [
                str(BIN / "pirl-edge"),
                "--link.learner",
                f"127.0.0.1:{self.port}",
                "--link.robot_id",
                robot,
                "--link.tokens",
                str(self.pki["tokens"]),
                "--link.tls_ca",
                str(self.pki["ca_cert"]),
                "--policy.path",
                str(self.ckpt),
                "--control.mode",
                mode,
                "--control.num_envs",
                "16",
                "--spool.dir",
                str(self.dir / robot / "spool"),
                "--stats_file",
                str(self.dir / robot / "stats.json"),
                "--spool.drain_timeout_s",
                "60",
                *extra,
            ],
        )

    def wait_control_started(self, name: str, times: int = 1, timeout: float = 180.0) -> None:
        """Until edge ``name``'s log (appended across restarts) says its control started ``times`` times: from
        then on it handles SIGTERM (before, a SIGTERM on a loaded machine can land while it still imports)."""
        deadline = time.monotonic() + timeout
        log = self.dir / f"{name}.log"
        while time.monotonic() < deadline:
            if log.is_file() and log.read_text().count(" control of ") >= times:
                return
            assert self.procs[name].poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        raise AssertionError(
            f"{name}: control not started {times} time(s) in {timeout:.0f}s\n" + log.read_text()[-3000:]
        )

    def status(self) -> dict:
        p = self.dir / "learner" / "status.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def wait_version(self, version: int, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                assert p.poll() is None or name != "learner", (self.dir / "learner.log").read_text()[-3000:]
            st = self.status()
            if st.get("version", -1) >= version:
                return st
            time.sleep(0.3)
        raise AssertionError(
            f"learner did not reach version {version}: {self.status()}\n"
            + (self.dir / "learner.log").read_text()[-3000:]
        )

    def stop(self, name, sig=signal.SIGTERM, timeout=120):
        p = self.procs[name]
        p.send_signal(sig)
        return p.wait(timeout)

    def edge_stats(self, robot) -> dict:
        return json.loads((self.dir / robot / "stats.json").read_text())

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def assert_every_record_accepted_once(c: Cluster, status: dict):
    total = 0
    for robot in ROBOTS:
        stats = c.edge_stats(robot)
        assert stats["records_left_in_spool"] == 0, stats
        assert stats["records_refused"] == {}, stats
        from edge.spool import Spool

        with Spool(c.dir / robot / "spool") as spool:
            allocated = spool.next_sequence
        # A record whose spool write was cut by a kill -9 never existed durably: its temporary file
        # is removed when the edge restarts (logged) and its sequence number is never reused; the
        # edge tells the learner so and the learner closes that gap. Every other sequence 0..N-1
        # the edge allocated must have been accepted, exactly once.
        torn = {
            int(m)
            for m in re.findall(r"removing leftover temporary file (\d+)\.rec", (c.dir / f"{robot}.log").read_text())
        }
        assert status["acked"][robot] == {"below": allocated, "above": []}, (robot, status["acked"][robot], allocated)
        total += allocated - len(torn)
    assert status["counts"]["accepted"] == total
    assert not any(k.startswith("rejected_") for k in status["counts"]), status["counts"]
