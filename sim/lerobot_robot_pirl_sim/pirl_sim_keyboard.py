"""``PirlSimKeyboard``: drive a ``pirl_sim`` robot from a terminal, for a person over SSH without a display.

LeRobot's keyboard teleoperators listen to an X display (pynput); this one reads the terminal itself: while
connected, standard input is in cbreak mode (keys arrive one by one, unechoed; Ctrl-C still interrupts) and
``get_action()`` drains whatever was typed since the last call without blocking, so it never slows the
control loop. Keys move absolute position targets:

    w / s, up / down      +y / -y by step_m        (W / S: five steps)
    a / d, left / right   -x / +x by step_m        (A / D: five steps)
    space                 toggle the gripper (open 100 % / closed 0 %)
    o / c                 open / close the gripper
    h                     hold: targets := the robot's present pose (after an e-stop, say)
    + / -                 double / halve step_m

:meth:`PirlSimKeyboard.feed` handles characters as if typed (tests, or another input source).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import sys
from functools import cached_property

import numpy as np
from lerobot.teleoperators import Teleoperator
from lerobot.utils.decorators import check_if_already_connected, check_if_not_connected

from lerobot_robot_pirl_sim import registry
from lerobot_robot_pirl_sim.config_pirl_sim_keyboard import PirlSimKeyboardConfig
from lerobot_robot_pirl_sim.physics import ACTION_NAMES, TaskParams

__all__ = ["KEYS", "PirlSimKeyboard"]

logger = logging.getLogger(__name__)

_RANGE = TaskParams()
# key -> (dx steps, dy steps); arrows arrive as the escape sequences ESC [ A..D
KEYS = {
    "w": (0, 1),
    "s": (0, -1),
    "a": (-1, 0),
    "d": (1, 0),
    "W": (0, 5),
    "S": (0, -5),
    "A": (-5, 0),
    "D": (5, 0),
    "\x1b[A": (0, 1),
    "\x1b[B": (0, -1),
    "\x1b[C": (1, 0),
    "\x1b[D": (-1, 0),
}


class PirlSimKeyboard(Teleoperator):
    """The terminal keyboard teleoperator (``--teleop.type=pirl_sim_keyboard``)."""

    config_class = PirlSimKeyboardConfig
    name = "pirl_sim_keyboard"

    def __init__(self, config: PirlSimKeyboardConfig):
        super().__init__(config)
        self.config = config
        self.step_m = config.step_m
        self.target = np.array([0.0, 0.0, 100.0])  # x.pos m, y.pos m, gripper.pos %
        self._pending = ""  # an escape sequence cut between two reads
        self._fd: int | None = None
        self._saved_tty = None  # termios attributes to restore
        self._connected = False

    @cached_property
    def action_features(self) -> dict[str, type]:
        return dict.fromkeys(ACTION_NAMES, float)

    @cached_property
    def feedback_features(self) -> dict[str, type]:
        return {}

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        """Nothing to calibrate."""

    def configure(self) -> None:
        """Nothing to configure."""

    @check_if_already_connected
    def connect(self, calibrate: bool = True) -> None:
        """Start from the robot's targets (when a robot with this id is connected) and take the terminal."""
        self._hold(use_targets=True)
        fd = self.config.input_fd
        if fd is None:
            try:
                fd = sys.stdin.fileno()
            except (AttributeError, OSError, ValueError):  # no usable stdin (a service, a test runner)
                logger.warning(f"{self}: standard input is not readable; no keys will arrive")
                fd = None
        self._fd = fd
        if fd is not None and os.isatty(fd):
            import termios
            import tty

            self._saved_tty = termios.tcgetattr(fd)
            tty.setcbreak(fd, termios.TCSANOW)
            atexit.register(self._restore_tty)  # a crash must not leave the user's terminal in cbreak mode
        self._connected = True
        logger.info(f"{self}: w/a/s/d or arrows move, space toggles the gripper, h holds, +/- change the step")

    def _restore_tty(self) -> None:
        if self._saved_tty is not None and self._fd is not None:
            import termios

            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None

    def _hold(self, use_targets: bool = False) -> None:
        """targets := the robot's current targets (``use_targets``) or present pose, if the robot is found."""
        try:
            robot = registry.find(self.id)
        except LookupError:
            return
        if use_targets:
            t = robot.targets()
            self.target = np.array([t[k] for k in ACTION_NAMES])
        else:
            state = robot.read_state()
            self.target = np.array([state[0], state[1], state[4]])

    def _read_pending(self) -> str:
        """Everything typed since the last call, without blocking."""
        if self._fd is None:
            return ""
        chunks = []
        while select.select([self._fd], [], [], 0)[0]:
            data = os.read(self._fd, 1024)
            if not data:  # end of input (a closed pipe): stop reading it
                self._fd = None
                break
            chunks.append(data.decode("latin-1"))
        return "".join(chunks)

    def feed(self, text: str) -> None:
        """Handle ``text`` as typed keys."""
        text = self._pending + text
        self._pending = ""
        i = 0
        while i < len(text):
            if text[i] == "\x1b":
                seq = text[i : i + 3]
                if len(seq) < 3 and "\x1b[".startswith(seq):  # cut by the read: finish it next time
                    self._pending = seq
                    return
                self.handle_key(seq if seq in KEYS else "\x1b")
                i += 3 if seq in KEYS else 1
            else:
                self.handle_key(text[i])
                i += 1

    def handle_key(self, key: str) -> None:
        """Apply one key (a character, or an arrow's escape sequence); unknown keys are ignored."""
        if key in KEYS:
            dx, dy = KEYS[key]
            self.target[0] += dx * self.step_m
            self.target[1] += dy * self.step_m
        elif key == " ":
            self.target[2] = 0.0 if self.target[2] > 50.0 else 100.0
        elif key == "o":
            self.target[2] = 100.0
        elif key == "c":
            self.target[2] = 0.0
        elif key == "h":
            self._hold()
        elif key == "+":
            self.step_m *= 2.0
        elif key == "-":
            self.step_m /= 2.0
        self.target = np.clip(self.target, _RANGE.action_low, _RANGE.action_high)

    @check_if_not_connected
    def get_action(self) -> dict[str, float]:
        """The targets after the keys typed since the last call."""
        self.feed(self._read_pending())
        return dict(zip(ACTION_NAMES, self.target.tolist(), strict=True))

    def send_feedback(self, feedback: dict) -> None:
        """No feedback channel."""

    @check_if_not_connected
    def disconnect(self) -> None:
        self._restore_tty()
        self._fd = None
        self._connected = False
