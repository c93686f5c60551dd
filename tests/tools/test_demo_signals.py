"""`pirl-demo` stops its learner and edges when it is told to stop (SIGTERM, Ctrl-C's SIGINT; a second
signal does not cut the cleanup short), and the kernel stops them when the demo is killed outright
(SIGKILL: PR_SET_PDEATHSIG). The real demo runs, from a finished SFT checkpoint so SFT is skipped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers.policy import builtin_policy, save_checkpoint

BIN = Path(sys.executable).parent
pytestmark = [
    pytest.mark.slow,  # the real pirl-demo with its learner and edges
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and psutil trees: Linux"),
]


@pytest.fixture
def out(tmp_path) -> Path:
    """A demo output directory whose SFT checkpoint is already there (pirl_tools/common.py reuses it)."""
    out = tmp_path / "demo"
    save_checkpoint(out / "sft" / "train" / "checkpoints" / "last" / "pretrained_model", *builtin_policy(0))
    return out


def start_demo(out: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [str(BIN / "pirl-demo"), "--out", str(out), "--num_envs", "4", "--eval_episodes", "20", "--time_limit", "300"],
        stdout=open(out.parent / "demo.stdout", "w"),
        stderr=open(out.parent / "demo.stderr", "w"),
        env=env,
    )


def output(out: Path, stream: str) -> str:
    return (out.parent / f"demo.{stream}").read_text()


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def ours(out: Path) -> list[psutil.Process]:
    """Every process whose command line names this test's output directory (learner, edges)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(out) in arg for arg in p.info["cmdline"] or []) and p.pid != os.getpid():
            found.append(p)
    return running(found)


def wait_running(demo: subprocess.Popen, out: Path, timeout: float = 240) -> list[psutil.Process]:
    """Until the learner serves and both edges control and have contacted it; returns the demo's
    descendants (the learner, the two edges)."""
    logs = out / "logs"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert demo.poll() is None, f"pirl-demo exited with {demo.returncode}:\n{output(out, 'stderr')[-3000:]}"
        learner = logs / "learner.log"
        edges = [logs / f"robot-{i}.log" for i in (0, 1)]
        if (out / "learner.port").is_file() and learner.is_file() and all(e.is_file() for e in edges):
            learner_log = learner.read_text()
            if all("control of" in e.read_text() for e in edges) and all(
                robot in learner_log for robot in ("robot-0", "robot-1")
            ):
                children = psutil.Process(demo.pid).children(recursive=True)
                names = " ".join(" ".join(c.cmdline()) for c in children)
                assert names.count("pirl-edge") == 2 and names.count("pirl-learner") == 1, names
                return children
        time.sleep(0.5)
    raise AssertionError(
        f"the demo's learner and edges were not running after {timeout:.0f}s:\n{output(out, 'stdout')[-3000:]}"
    )


def kill_leftovers(demo: subprocess.Popen, out: Path, children: list[psutil.Process]) -> None:
    """Whatever happened in the test: no demo, learner or edge outlives it."""
    if demo.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            children = children + psutil.Process(demo.pid).children(recursive=True)
        demo.kill()
        demo.wait()
    for p in running(children + ours(out)):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@pytest.mark.parametrize("sig, count", [(signal.SIGTERM, 1), (signal.SIGINT, 2)], ids=["SIGTERM", "SIGINT-twice"])
def test_a_stop_signal_stops_the_learner_and_edges_then_the_demo(out, sig, count):
    demo, children = start_demo(out), []
    try:
        children = wait_running(demo, out)
        demo.send_signal(sig)
        if count > 1:  # an impatient second Ctrl-C, while the edges and the learner are being stopped
            time.sleep(0.5)
            demo.send_signal(sig)
        started = time.monotonic()
        # the cleanup: edges then learner, each group SIGTERM'ed and killed after 10 s
        rc = demo.wait(60)
        stopped_in = time.monotonic() - started
        err = output(out, "stderr")
        assert rc == 128 + sig, (rc, err)
        lines = [line for line in err.splitlines() if "interrupted" in line]
        assert lines == [
            f"pirl-demo: interrupted by {sig.name}; stopped the learner and edges it had started "
            f"(logs in {out / 'logs'})"
        ], err
        assert "Traceback" not in err, err
        if count > 1:  # the second one was noted, and the cleanup went on
            assert "pirl-demo: still stopping the learner and edges, please wait" in err, err
        assert not running(children), [c.pid for c in running(children)]
        assert not ours(out)
        # they were asked to stop (SIGTERM), not just killed: the learner shut down as it does at the end
        assert "shutting down" in (out / "logs" / "learner.log").read_text()
        assert stopped_in < 45, stopped_in
        assert not (out / "demo.json").exists()  # no report of a run that did not finish
    finally:
        kill_leftovers(demo, out, children)


def test_the_learner_and_edges_die_with_a_killed_demo(out):
    demo, children = start_demo(out), []
    try:
        children = wait_running(demo, out)
        demo.kill()  # SIGKILL: no cleanup runs in the demo; the kernel sends each child SIGTERM
        demo.wait()
        # they stop as on SIGTERM; an edge may spend up to the demo's --drain-timeout (60 s) trying to
        # upload what it spooled when the learner is gone first (usually they are gone in seconds)
        deadline = time.monotonic() + 90
        while running(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not running(children), [" ".join(c.cmdline()) for c in running(children)]
        assert not ours(out)
    finally:
        kill_leftovers(demo, out, children)
