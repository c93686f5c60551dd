"""A scripted person at a ``pirl_sim`` robot: labels episodes and corrects a drifting policy, through the
edge's operator interface only.

A person running PI-RL on a real arm watches it, says "success" or "failure" when an attempt is over, and
takes over with a leader arm when the policy wanders off. :class:`ScriptedOperator` does the same for the
simulated robot, for tests and benchmarks that must not need a person:

- what it sees (:class:`SceneView`) is what a person standing at the table sees: where the gripper and the
  cube are, how fast the arm moves, how far the gripper is open, and a clock. It never reads the robot's own
  verdict (``episode_status()``): it judges an attempt itself, the way a person would (the gripper closed
  around the cube while the arm was at rest), and it may be told to mislabel a fraction of episodes;
- what it does goes through the edge's operator interface only: HTTP on ``127.0.0.1:<safety.estop_port>``
  (``GET /status`` for the episode's phase and number; ``POST /success``, ``/failure``, ``/takeover``, ``/handback``), the
  same calls a person's button box or script would make. The correction itself is driven by the teleoperator
  the edge was given (``--teleop.type=pirl_sim_expert``), as a person's leader arm would be.

Start it on the robot: ``--robot.operator_port=PORT`` (the edge's ``--safety.estop_port``) with
``--episode.outcome=operator``; the ``operator_*`` fields of the robot's config set its behaviour.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lerobot_robot_pirl_sim.physics import GRASP_THRESHOLD

__all__ = ["OperatorSettings", "SceneView", "ScriptedOperator", "Sight", "http_operator_interface"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sight:
    """One look at the scene: what a person at the table sees (metres, m/s, gripper opening in %, seconds)."""

    gripper_xy: tuple[float, float]
    gripper_speed: float
    gripper_opening: float
    cube_xy: tuple[float, float]
    time_s: float  # the robot's clock (a person's watch): seconds of robot time since the episode began

    @property
    def distance(self) -> float:
        return math.hypot(self.gripper_xy[0] - self.cube_xy[0], self.gripper_xy[1] - self.cube_xy[1])

    @property
    def closed(self) -> bool:
        return self.gripper_opening <= GRASP_THRESHOLD


class SceneView:
    """The person's eyes on a connected ``PirlSim``: its physical state, never its verdict."""

    def __init__(self, robot):
        self._robot = robot

    def look(self) -> Sight:
        s = self._robot.read_state()  # x, y, vx, vy, gripper %, cube x, cube y
        steps = self._robot.episode_steps
        return Sight(
            gripper_xy=(float(s[0]), float(s[1])),
            gripper_speed=float(math.hypot(s[2], s[3])),
            gripper_opening=float(s[4]),
            cube_xy=(float(s[5]), float(s[6])),
            time_s=steps / self._robot.config.control_hz,
        )


@dataclass
class OperatorSettings:
    """How the scripted person behaves (the robot's ``operator_*`` config fields)."""

    # label episodes (success / failure); off: the person only takes over (another source judges outcomes)
    labels: bool = True
    # seconds of robot time between seeing an attempt end and pressing the label (a person's reaction)
    reaction_s: float = 0.3
    # what counts as a grasp for this person: the gripper closed within this distance of the cube, metres ...
    grasp_radius: float = 0.02
    # ... while the arm moved slower than this, m/s
    grasp_speed: float = 0.05
    # fraction of episodes labelled the wrong way round (a tired person); 0: never
    mislabel: float = 0.0
    # take over when the policy drifts: after this many seconds of an episode the gripper is still farther than
    # intervene_distance from the cube (None: never take over)
    intervene_after_s: float | None = None
    # metres; see intervene_after_s
    intervene_distance: float = 0.03
    # also take over when the gripper starts closing (under rush_opening % open, not yet closed) while the arm still
    # moves faster than grasp_speed: the few-shot policy's usual mistake, a grasp before the arm has settled
    intervene_on_rush: bool = False
    # %: the opening under which the person sees the gripper closing (fully open is 100)
    rush_opening: float = 90.0
    # fraction of episodes in which the person is watching closely enough to take over (1: every drifting one)
    intervene_fraction: float = 1.0
    # seed of the person's choices (mislabels, which episodes they watch)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("reaction_s", "grasp_radius", "grasp_speed", "intervene_distance"):
            if getattr(self, name) < 0:
                raise ValueError(f"operator_{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("mislabel", "intervene_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"operator_{name}: must be in [0, 1], got {getattr(self, name)}")


def http_operator_interface(port: int, timeout_s: float = 2.0) -> tuple[Callable[[], dict], Callable[[str], None]]:
    """(status, send) over the edge's local operator HTTP port: ``GET /status`` and ``POST /<command>``."""
    base = f"http://127.0.0.1:{port}"

    def status() -> dict:
        with urllib.request.urlopen(f"{base}/status", timeout=timeout_s) as r:
            return json.loads(r.read())

    def send(command: str) -> None:
        req = urllib.request.Request(f"{base}/{command}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            r.read()

    return status, send


class ScriptedOperator:
    """Watches ``view`` and acts through ``status`` / ``send`` (the operator interface); see the module.

    ``step()`` is one look (the thread calls it every ``period_s`` of wall time); tests call it directly."""

    def __init__(
        self,
        view,
        status: Callable[[], dict],
        send: Callable[[str], None],
        settings: OperatorSettings | None = None,
        period_s: float = 0.01,
    ):
        self.view, self.status, self.send = view, status, send
        self.settings = settings or OperatorSettings()
        self.period_s = period_s
        self._rng = np.random.default_rng(self.settings.seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.labels: dict[str, int] = {}  # what it pressed, for reports
        self.takeovers = 0
        self._episode = None  # the edge's episode number the person is watching
        self._new_episode()

    def _new_episode(self) -> None:
        self._judged: tuple[str, float] | None = None  # (label, robot time it was judged at)
        self._sent_label = False
        self._driving = False
        self._watching = self._rng.random() < self.settings.intervene_fraction
        self._mislabel = self._rng.random() < self.settings.mislabel

    def step(self) -> None:
        try:
            status = self.status()
        except (OSError, ValueError, urllib.error.URLError):
            return  # the edge is not up (yet) or going down: look again later
        episode = status.get("episode")
        if episode != self._episode:  # the next episode (the phases between two can pass unseen)
            self._episode = episode
            self._new_episode()
        if status.get("phase") != "run":
            return
        if self._sent_label:
            return
        sight = self.view.look()
        s = self.settings
        if self._judged is None and sight.closed and s.labels:
            grasped = sight.distance <= s.grasp_radius and sight.gripper_speed <= s.grasp_speed
            label = "success" if grasped != self._mislabel else "failure"
            self._judged = (label, sight.time_s)
        if self._judged is not None:
            label, at = self._judged
            if sight.time_s - at >= s.reaction_s:
                self._press(label)
                self._sent_label = True
            return
        drifting = (
            s.intervene_after_s is not None
            and sight.time_s >= s.intervene_after_s
            and sight.distance > s.intervene_distance
        )
        rushing = (
            s.intervene_on_rush
            and not sight.closed
            and sight.gripper_opening < s.rush_opening
            and sight.gripper_speed > s.grasp_speed
        )
        if self._watching and not self._driving and (drifting or rushing):
            self._press("takeover")
            self._driving = True  # until the episode ends: the person finishes the grasp
            self.takeovers += 1

    def _press(self, command: str) -> None:
        try:
            self.send(command)
        except (OSError, urllib.error.URLError) as e:
            logger.warning("scripted operator: %s not delivered (%s)", command, e)
            return
        if command in ("success", "failure"):
            self.labels[command] = self.labels.get(command, 0) + 1

    # ------------------------------------------------------------------ thread
    def start(self) -> ScriptedOperator:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pirl_sim-operator", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001  a scripted person must never take the robot down
                logger.exception("scripted operator: step failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._thread = None
