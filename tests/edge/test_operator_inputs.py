"""The operator's inputs: keys (fed as characters, and through a real pseudo-terminal), the local HTTP port
and SIGUSR1; an e-stop from any of them latches the shared EStop at once."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import pty
import signal
import socket
import termios
import time

import pytest

from edge.operator_inputs import OperatorInputs, command_for_key, help_text
from edge.safety import EStop
from helpers.net import free_port


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------------------------------- keys


def test_key_map():
    assert command_for_key("\n") == command_for_key("\r") == "start"
    assert command_for_key("n") == "end" and command_for_key("c") == "release" and command_for_key("?") == "help"
    assert command_for_key("x") == command_for_key("X") == "estop"  # caps lock must not disarm the e-stop
    assert command_for_key("q") is None and command_for_key("N") is None
    assert command_for_key("s", estop_key="s") == "estop" and command_for_key("x", estop_key="s") is None


def test_keys_give_commands_and_the_estop_latches_at_once():
    estop, out = EStop(), io.StringIO()
    inputs = OperatorInputs(estop, out=out, keyboard=False, sigusr1=False)
    assert inputs.feed("\n") == ["start"]
    assert inputs.take("start") == "key" and inputs.take("start") is None  # taken once
    assert inputs.feed("x") == ["estop"]
    assert estop.is_set() and estop.source == "key"  # no queue between the key and the latch
    assert inputs.feed("c") == ["release"] and not estop.is_set()
    assert inputs.feed("n?q") == ["end", "help"]
    assert inputs.pending() == ["end", "estop", "release"]
    assert help_text("x") in out.getvalue() and "operator: estop" in out.getvalue()
    inputs.discard("estop", "release")
    assert inputs.pending() == ["end"]
    inputs.discard()
    assert inputs.pending() == []
    inputs.feed("n\nn")
    assert inputs.poll() == ["end", "start"] and inputs.poll() == []  # each taken once, first-requested order


def test_escape_sequences_give_nothing_but_the_estop_key_always_stops():
    estop = EStop()
    inputs = OperatorInputs(estop, out=io.StringIO(), keyboard=False, sigusr1=False)
    assert inputs.feed("\x1b[C\x1bOC\x1b[1;5D\x1bn") == []  # right arrow, SS3 right, Ctrl-left, Alt-n
    estop.trigger("test")
    assert inputs.feed("\x1b[C") == [] and estop.is_set()  # an arrow key's 'C' is no release
    estop.release()
    assert inputs.feed("\x1b[x") == ["estop"]  # inside a sequence or not
    estop.release()
    inputs.feed("\x1b")
    assert inputs.feed("c") == ["release"]  # a lone Esc does not swallow the next read's key


def test_wait_returns_a_pending_command_or_none_on_timeout_or_stop():
    inputs = OperatorInputs(EStop(), out=io.StringIO(), keyboard=False, sigusr1=False)
    t0 = time.monotonic()
    assert inputs.wait("start", timeout=0.05) is None and time.monotonic() - t0 >= 0.04
    inputs.post("start", "test")
    assert inputs.wait("start", timeout=1) == "test"
    inputs.stop()
    assert inputs.wait("start") is None  # stopped: no one waits forever


def test_estop_key_must_not_shadow_another_key():
    with pytest.raises(ValueError, match="safety.estop_key: 'n' is already the key of end"):
        OperatorInputs(EStop(), estop_key="n")
    with pytest.raises(ValueError, match="safety.estop_key: 'C' is already the key of release"):
        OperatorInputs(EStop(), estop_key="C")
    with pytest.raises(ValueError, match="operator command"):
        OperatorInputs(EStop(), keyboard=False, sigusr1=False).post("launch", "test")


def test_without_a_terminal_the_keyboard_is_off_and_that_is_logged_once(caplog):
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd) as piped, os.fdopen(write_fd, "w"):
        for stdin in (io.StringIO("x"), piped):  # no file descriptor; a pipe (systemd, docker without -t)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="edge.operator_inputs"):
                inputs = OperatorInputs(EStop(), stdin=stdin, out=io.StringIO(), sigusr1=False).start()
                inputs.stop()
            assert not inputs.keyboard_active
            assert caplog.text.count("stdin is not a terminal: keyboard operator inputs are off") == 1


def test_a_terminal_is_read_in_cbreak_mode_and_restored_at_stop():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        estop = EStop()
        with os.fdopen(os.dup(slave)) as stdin:
            inputs = OperatorInputs(estop, stdin=stdin, out=io.StringIO(), sigusr1=False).start()
            try:
                assert inputs.keyboard_active
                lflag = termios.tcgetattr(slave)[3]
                assert not lflag & termios.ICANON and not lflag & termios.ECHO  # keys without Enter, no echo
                os.write(master, b"x")
                assert wait_for(estop.is_set) and estop.source == "key"
                os.write(master, b"c\n")
                assert wait_for(lambda: not estop.is_set() and inputs.pending() == ["estop", "release", "start"])
            finally:
                inputs.stop()
        assert termios.tcgetattr(slave) == before and not inputs.keyboard_active
    finally:
        os.close(master)
        os.close(slave)


# ---------------------------------------------------------------------------------------- HTTP


def request(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else {}
    finally:
        conn.close()


def test_http_endpoint_commands_status_and_refusals():
    estop, port = EStop(), free_port()
    phase = {"phase": "waiting_start"}
    with OperatorInputs(estop, estop_port=port, status=lambda: phase, keyboard=False, sigusr1=False) as inputs:
        assert inputs.port == port
        code, body = request(port, "GET", "/status")
        assert code == 200 and body["estop"] is False and body["phase"] == "waiting_start"
        code, body = request(port, "POST", "/estop")
        assert code == 200 and body["estop"] is True and body["source"] == "http" and estop.is_set()
        phase["phase"] = "estopped"
        code, body = request(port, "GET", "/status")
        assert body["estop"] is True and body["source"] == "http" and body["latched_at"] and body["phase"] == "estopped"
        assert request(port, "POST", "/release")[0] == 200 and not estop.is_set()
        assert request(port, "POST", "/start")[0] == 200 and inputs.take("start") == "http"
        assert request(port, "POST", "/end")[0] == 200 and inputs.take("end") == "http"
        assert request(port, "POST", "/nope")[0] == 404
        assert request(port, "GET", "/nope")[0] == 404
        assert request(port, "GET", "/estop")[0] == 405 and not estop.is_set()
        assert request(port, "POST", "/status")[0] == 405
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            assert request(port, method, "/estop")[0] == 405, method
        # a browser page may stop the robot, never start or release it
        page = {"Origin": "http://example.com"}
        assert request(port, "POST", "/start", page)[0] == 403 and inputs.take("start") is None
        assert request(port, "POST", "/start", {"Host": "evil.example:80"})[0] == 403
        assert request(port, "POST", "/estop", page)[0] == 200 and estop.is_set()
        assert request(port, "POST", "/release", page)[0] == 403 and estop.is_set()
    with pytest.raises(ConnectionRefusedError):  # stopped: the port is closed
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_http_binds_loopback_only_and_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"safety.estop_port: cannot listen on 127.0.0.1:{port}"):
            OperatorInputs(EStop(), estop_port=port, keyboard=False, sigusr1=False).start()
    with OperatorInputs(EStop(), estop_port=free_port(), keyboard=False, sigusr1=False) as inputs:
        assert inputs._http.server_address[0] == "127.0.0.1"


# --------------------------------------------------------------------------------------- signal


def test_sigusr1_estops_while_started_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGUSR1)
    estop = EStop()
    with OperatorInputs(estop, keyboard=False):
        os.kill(os.getpid(), signal.SIGUSR1)
        assert estop.wait(timeout=5) and estop.source == "sigusr1"
    assert signal.getsignal(signal.SIGUSR1) is before
