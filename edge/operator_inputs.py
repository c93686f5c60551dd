"""The operator's inputs to the robot episode protocol, usable over SSH without a display.

Commands: ``start`` (begin the next episode), ``end`` (end the current episode now, unlabelled),
``success`` / ``failure`` / ``abort`` (end it with that label: an aborted episode is trained on by nobody),
``intervene`` (toggle: a person takes over with the teleoperator, or hands control back), ``takeover`` /
``handback`` (the same, explicit), ``estop`` and ``release`` (clear a latched e-stop). Three sources feed them:

- the keyboard, when stdin is a terminal in the foreground: cbreak mode (keys act without Enter, no
  echo), read off a daemon thread, the terminal restored on ``stop()`` and at exit. Enter = start,
  ``s`` = success, ``f`` = failure, ``a`` = abort, ``n`` = end, space or ``i`` = intervene, the e-stop
  key (``safety.estop_key``, default ``x``, either case) = e-stop, ``c`` = release, ``?`` = help. A USB
  foot pedal that types a key works as that key. Without a terminal (systemd, ``docker run`` without
  ``-t``, a background job) the keyboard is off, logged once;
- HTTP on ``127.0.0.1:safety.estop_port``: ``POST /<command>`` for every command above, ``GET /status``
  (``curl -X POST 127.0.0.1:PORT/estop``);
- SIGUSR1: e-stop (``kill -USR1 <pid>``).

A teleoperator's own buttons (LeRobot's gamepad and keyboard teleoperators report success, failure,
re-record and intervention events) reach the robot loop directly (``edge.robot_loop``).

An e-stop from any source latches the shared ``EStop`` on the spot (the loop sees it at its next tick);
a release clears it on the spot too, but moves nothing: the next episode waits for a ``start``. The
other commands wait, pending, until the loop takes them (``take`` / ``wait``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TextIO

from edge.safety import EStop, install_sigusr1

log = logging.getLogger(__name__)

# every command an operator can give; estop and release act on the EStop at once, the rest wait for the loop
COMMANDS = ("start", "end", "success", "failure", "abort", "intervene", "takeover", "handback", "estop", "release")
# the episode labels among them (what they end an episode as)
LABELS = ("success", "failure", "abort")
# the keyboard, beside the configurable e-stop key ("help" is no command: it prints HELP); s / f and space
# as in LeRobot's HIL-SERL keyboard (which uses Esc for failure: a lone Esc cannot be told from the start of
# an arrow key's sequence in a terminal, so failure is f here)
KEYS = {
    "\n": "start",
    "\r": "start",
    "n": "end",
    "s": "success",
    "f": "failure",
    "a": "abort",
    " ": "intervene",
    "i": "intervene",
    "c": "release",
    "?": "help",
}
# e-stop is the only command a browser page may send (a request with an Origin header or a non-loopback
# Host, e.g. a malicious page or DNS rebinding): stopping more is safe, starting the robot is not
BROWSER_SAFE = ("estop",)
HTTP_PATHS = {f"/{c}": c for c in COMMANDS}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def command_for_key(ch: str, estop_key: str = "x") -> str | None:
    """The command of one key (None: not a key of ours). The e-stop key in either case (caps lock must
    not disarm it); the others exactly."""
    if ch.lower() == estop_key.lower():
        return "estop"
    return KEYS.get(ch)


def help_text(estop_key: str = "x") -> str:
    return (
        "operator keys: Enter = start the next episode, s = success, f = failure, a = abort (not trained on), "
        f"n = end unlabelled, space / i = take over or hand back (teleoperator), {estop_key} = E-STOP, "
        "c = release the e-stop, ? = this help"
    )


class OperatorInputs:
    """The operator's commands from the keyboard, the local HTTP port and SIGUSR1 (see the module).

    ``status``: an optional callable returning a dict (e.g. ``{"phase": "running", "episode": 3}``) that
    ``GET /status`` adds to the e-stop state. ``stdin`` / ``out``: the keyboard's input and where help and
    acknowledgements go (default sys.stdin / sys.stderr). ``keyboard`` / ``sigusr1``: turn those sources
    off (``estop_port`` 0 turns HTTP off).
    """

    def __init__(
        self,
        estop: EStop,
        *,
        estop_key: str = "x",
        estop_port: int = 0,
        status: Callable[[], dict] | None = None,
        stdin: TextIO | None = None,
        out: TextIO | None = None,
        keyboard: bool = True,
        sigusr1: bool = True,
    ):
        if len(estop_key) != 1 or estop_key.isspace():
            raise ValueError(f"safety.estop_key: must be one printable character (got {estop_key!r})")
        taken = next((KEYS[k] for k in (estop_key, estop_key.lower(), estop_key.upper()) if k in KEYS), None)
        if taken is not None:
            raise ValueError(f"safety.estop_key: {estop_key!r} is already the key of {taken}; choose another")
        self.estop, self.estop_key, self.estop_port = estop, estop_key, estop_port
        self.status_fn = status
        self._stdin, self._out = stdin, out
        self._use_keyboard, self._use_sigusr1 = keyboard, sigusr1
        self._cond = threading.Condition()
        self._pending: dict[str, str] = {}  # command -> source of its latest request
        self._stop = threading.Event()
        self._kb_thread: threading.Thread | None = None
        self._kb_fd: int | None = None
        self._saved_tty: list | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._prev_sigusr1 = None
        self.keyboard_active = False
        self.port: int | None = None  # the HTTP port actually bound

    # ------------------------------------------------------------------------------- commands

    def post(self, command: str, source: str) -> None:
        """A command from ``source`` ("key", "http", "sigusr1", a test's name...)."""
        if command == "help":
            self._say(help_text(self.estop_key))
            return
        if command not in COMMANDS:
            raise ValueError(f"operator command: must be one of {COMMANDS} (got {command!r})")
        if command == "estop":  # at once: the loop must not have to drain a queue to see it
            self.estop.trigger(source)
            self.estop.poll()
        elif command == "release":
            self.estop.release(source)
        with self._cond:
            self._pending[command] = source
            self._cond.notify_all()
        if source == "key":
            self._say(f"operator: {command}")

    def take(self, command: str) -> str | None:
        """The source of a pending ``command``, which is then no longer pending (None: none pending)."""
        with self._cond:
            return self._pending.pop(command, None)

    def wait(self, command: str, timeout: float | None = None) -> str | None:
        """Wait for ``command`` (or one already pending) and take it; None on timeout or ``stop()``."""
        with self._cond:
            self._cond.wait_for(lambda: command in self._pending or self._stop.is_set(), timeout)
            return self._pending.pop(command, None)

    def poll(self) -> list[str]:
        """Every pending command, taken (the loop's per-tick check), in the order first requested."""
        with self._cond:
            taken = list(self._pending)
            self._pending.clear()
            return taken

    def discard(self, *commands: str) -> None:
        """Forget pending ``commands`` (all without any), e.g. a start pressed during the last episode."""
        with self._cond:
            for c in commands or list(self._pending):
                self._pending.pop(c, None)

    def pending(self) -> list[str]:
        with self._cond:
            return sorted(self._pending)

    def status(self) -> dict:
        out = self.estop.status()
        out["pending"] = self.pending()
        if self.status_fn is not None:
            out.update(self.status_fn())
        return out

    # ------------------------------------------------------------------------------- lifecycle

    def start(self) -> OperatorInputs:
        if self._use_keyboard:
            self._start_keyboard()
        if self.estop_port:
            self._start_http()
        if self._use_sigusr1:
            if threading.current_thread() is threading.main_thread():
                self._prev_sigusr1 = install_sigusr1(self.estop)
            else:
                log.warning("SIGUSR1 e-stop not installed: operator inputs started off the main thread")
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._kb_thread is not None:
            self._kb_thread.join(1.0)
            self._kb_thread = None
        self._restore_terminal()
        if self._prev_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._prev_sigusr1)
            self._prev_sigusr1 = None

    def __enter__(self) -> OperatorInputs:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _say(self, line: str) -> None:
        out = self._out if self._out is not None else sys.stderr
        with contextlib.suppress(OSError, ValueError):  # a closed terminal must not take the control loop down
            print(line, file=out, flush=True)

    # -------------------------------------------------------------------------------- keyboard

    def feed(self, chars: str, source: str = "key") -> list[str]:
        """Handle typed characters; returns the commands they gave. Terminal escape sequences (arrow and
        function keys, whose bytes include letters such as ``C``) give nothing, except that the e-stop key
        always stops; a sequence never spans two reads (a lone Esc must not swallow the next key)."""
        given, esc = [], None  # esc: None, "esc" (after ESC), "csi" (ESC [ ... final byte), "ss3" (ESC O x)
        for ch in chars:
            cmd = command_for_key(ch, self.estop_key)
            if cmd == "estop":
                esc = None
            elif ch == "\x1b":
                esc = "esc"
                continue
            elif esc == "esc":
                esc = "csi" if ch == "[" else "ss3" if ch == "O" else None
                continue
            elif esc == "csi":
                if "\x40" <= ch <= "\x7e":
                    esc = None
                continue
            elif esc == "ss3":
                esc = None
                continue
            if cmd is not None:
                self.post(cmd, source)
                given.append(cmd)
        return given

    def _start_keyboard(self) -> bool:
        stream = self._stdin if self._stdin is not None else sys.stdin
        try:
            fd = stream.fileno()
        except (AttributeError, ValueError, OSError):
            fd = None
        if fd is None or not os.isatty(fd):
            log.warning(
                "stdin is not a terminal: keyboard operator inputs are off (e-stop: kill -USR1 %d%s)",
                os.getpid(),
                f", or POST 127.0.0.1:{self.estop_port}/estop" if self.estop_port else "",
            )
            return False
        try:  # a background job reading (or setting) its terminal is stopped by SIGTTIN / SIGTTOU
            if os.tcgetpgrp(fd) != os.getpgrp():
                log.warning("running in the background of its terminal: keyboard operator inputs are off")
                return False
        except OSError:  # not our controlling terminal (e.g. a pty handed over): no job control applies
            pass
        self._saved_tty = termios.tcgetattr(fd)
        self._kb_fd = fd
        tty.setcbreak(fd)  # keys arrive one by one, unechoed; Ctrl-C still signals
        atexit.register(self._restore_terminal)
        self.keyboard_active = True
        self._kb_thread = threading.Thread(target=self._read_keys, args=(fd,), name="pirl-operator-keys", daemon=True)
        self._kb_thread.start()
        self._say(help_text(self.estop_key))
        return True

    def _read_keys(self, fd: int) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.1)
                if not ready:
                    continue
                data = os.read(fd, 64)
            except OSError as e:  # the terminal went away (SSH dropped)
                log.warning("operator keyboard closed (%s): e-stop with kill -USR1 %d", e, os.getpid())
                return
            if not data:
                log.warning("operator keyboard closed (end of input): e-stop with kill -USR1 %d", os.getpid())
                return
            self.feed(data.decode(errors="ignore"))

    def _restore_terminal(self) -> None:
        saved, fd = self._saved_tty, self._kb_fd
        self._saved_tty = None
        if saved is None or fd is None:
            return
        with contextlib.suppress(OSError, termios.error):  # the terminal is already gone
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        self.keyboard_active = False
        atexit.unregister(self._restore_terminal)

    # ------------------------------------------------------------------------------------ HTTP

    def _start_http(self) -> None:
        try:
            self._http = ThreadingHTTPServer(("127.0.0.1", self.estop_port), _handler_for(self))
        except OSError as e:
            raise ValueError(f"safety.estop_port: cannot listen on 127.0.0.1:{self.estop_port} ({e})") from e
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, name="pirl-operator-http", daemon=True
        )
        self._http_thread.start()


def _host_name(host: str) -> str:
    """``Host`` without its port (``[::1]:8080`` -> ``[::1]``)."""
    return host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]


def _handler_for(inputs: OperatorInputs) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pirl-edge-operator"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path == "/status":
                self._reply(HTTPStatus.OK, inputs.status())
            elif self.path in HTTP_PATHS:
                self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.path}: POST only"}, allow="POST")
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: no such endpoint"})

        def do_POST(self):  # noqa: N802
            self._drain_body()
            command = HTTP_PATHS.get(self.path)
            if command is None:
                if self.path == "/status":
                    self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "/status: GET only"}, allow="GET")
                else:
                    self._reply(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: no such endpoint"})
                return
            if command not in BROWSER_SAFE and self._from_browser():
                self._reply(HTTPStatus.FORBIDDEN, {"error": f"{self.path}: refused from a browser page"})
                return
            inputs.post(command, "http")
            self._reply(HTTPStatus.OK, {"ok": True, "command": command, **inputs.status()})

        def __getattr__(self, name: str):
            # any other method (PUT, DELETE, HEAD, ...): 405, where http.server would answer 501
            if name.startswith("do_"):
                return self._method_not_allowed
            raise AttributeError(name)

        def _method_not_allowed(self):
            self._drain_body()
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command}: not allowed"}, allow="GET, POST")

        def _from_browser(self) -> bool:
            host = _host_name(self.headers.get("Host") or "")
            return bool(self.headers.get("Origin")) or (host != "" and host not in LOOPBACK_HOSTS)

        def _drain_body(self) -> None:
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = 0
            if 0 < n <= 65536:
                self.rfile.read(n)

        def _reply(self, code: HTTPStatus, body: dict, allow: str | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if allow:
                self.send_header("Allow", allow)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format, *args):  # http.server's signature
            log.debug("operator http: " + format, *args)

    return Handler
