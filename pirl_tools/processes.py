"""Child processes of the tools that start a learner and edges on one machine (pirl-demo, pirl-bench robot):
started in their own process group at a chosen niceness and CPU set, always stopped (also when the tool
dies: PR_SET_PDEATHSIG), their logs in one folder; signals to the tool become one ``Interrupted``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ChildFailedError(ValueError):
    """A child process died or hung: reported as one error (with its log tail), not a traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT reached the tool (raised once, by ``Signals``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Signals:
    """SIGTERM and SIGINT raise ``Interrupted`` in the main thread, once: a later signal (a second
    Ctrl-C while the learner and edges are being stopped) is noted and ignored, so the cleanup
    completes. While ``held`` (the cleanup of a run that was not interrupted), the first one is noted
    too and raised by ``raise_if_received`` afterwards. The previous handlers come back on exit."""

    def __init__(self, prog: str):
        self.prog = prog  # the tool's name, for its messages
        self.received: int | None = None
        self.held = False
        self._previous: dict = {}

    def __enter__(self) -> Signals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            if not self.held:
                raise Interrupted(signum)
        else:  # os.write: print() may be in the middle of writing the same stream
            os.write(2, f"{self.prog}: still stopping the learner and edges, please wait\n".encode())

    def hold(self) -> None:
        self.held = True

    def unhold(self) -> None:
        """After a cleanup that completed: the next signal raises again (raise_if_received reports one that
        arrived meanwhile)."""
        self.held = False

    def raise_if_received(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)


def _prctl():
    """libc's prctl where there is one (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


PR_SET_PDEATHSIG = 1


def bin_path(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


class Procs:
    """Child processes that are always stopped, whatever happens to the demo: by ``stop_all`` (also on
    SIGTERM / SIGINT, see ``Signals``), and on Linux by the kernel (SIGTERM to each, PR_SET_PDEATHSIG)
    when the demo itself dies without cleaning up (SIGKILL, out of memory)."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, {}
        self._prctl = _prctl()

    def start(self, name: str, cmd: list[str], nice: int = 0, cpus: set[int] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115  the child writes to it for its lifetime
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        parent, prctl = os.getpid(), self._prctl

        def place():  # in the child, before exec
            if (
                prctl is not None
                and prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
                and os.getppid() != parent
            ):
                os._exit(1)  # the demo died before the request took effect
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            if nice:
                os.nice(nice)
            if cpus:
                os.sched_setaffinity(0, cpus)

        # a stop signal waits until the child is registered here (so that it is stopped too); the
        # child unblocks them in place(). Children get a session of their own: a terminal's Ctrl-C
        # reaches the demo only, which stops them in order.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            p = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=place
            )
            self.procs[name] = p
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return p

    def stop(self, name: str, timeout: float = 60.0) -> int | None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return None if p is None else p.returncode
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def stop_all(self, order: tuple[tuple[str, ...], ...] = (), timeout: float = 10.0) -> None:
        """Stop every child still running: the groups in ``order`` one after the other, then the rest;
        within a group, SIGTERM to each, then a wait of up to ``timeout`` seconds, then SIGKILL."""
        rest = tuple(n for n in self.procs if not any(n in group for group in order))
        for group in (*order, rest):
            running = [self.procs[n] for n in group if n in self.procs and self.procs[n].poll() is None]
            for p in running:
                p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in running:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def check_alive(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is not None:
            tail = (self.logs / f"{name}.log").read_text()[-2000:]
            raise ChildFailedError(f"{name} exited with status {p.returncode}; end of its log:\n{tail}")


def wait_for_file(path: Path, procs: Procs, name: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return path.read_text().strip()
        procs.check_alive(name)
        time.sleep(0.2)
    raise ChildFailedError(f"{name} did not write {path} within {timeout:.0f}s")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a child's /metrics or operator port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
