"""A fake LeRobot robot, a scripted inference worker and a robot loop around them (no learner), for the
robot-mode tests (tests/edge/test_robot_loop.py, tests/edge/test_labels_and_takeovers.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from edge.configuration import EpisodeConfig
from edge.control import RecordWriter
from edge.records import Decision
from edge.robot_features import RobotIO
from edge.robot_loop import RobotLoop, RobotLoopStats
from edge.safety import ActionBounds, EStop, SafetyLayer, Watchdog
from edge.spool import Spool
from pirl.v1 import pirl_pb2

HZ = 100.0
CHUNK = 4


class FakeRobot:
    """Two position-controlled joints that reach their target in one tick; optional verdicts and stalls."""

    name = "fake"

    def __init__(self, succeed_after: int | None = None):
        self.pos = np.zeros(2, np.float32)
        self.sent: list[tuple[float, np.ndarray]] = []
        self.torque_off = 0
        self.succeed_after = succeed_after
        self.stall_s = 0.0  # the next get_observation blocks this long (a stuck bus)
        self.scene_resets = 0

    observation_features = {"a.pos": float, "b.pos": float, "obj.x": float}
    action_features = {"a.pos": float, "b.pos": float}
    environment_state_features = ("obj.x",)

    def get_observation(self):
        if self.stall_s:
            stall, self.stall_s = self.stall_s, 0.0
            time.sleep(stall)
        return {"a.pos": float(self.pos[0]), "b.pos": float(self.pos[1]), "obj.x": 0.5}

    def send_action(self, action):
        self.pos = np.asarray([action["a.pos"], action["b.pos"]], np.float32)
        self.sent.append((time.perf_counter(), self.pos.copy()))
        return action

    def disable_torque(self):
        self.torque_off += 1

    def reset_scene(self):
        self.scene_resets += 1

    def episode_status(self):
        if self.succeed_after is not None and len(self.sent) >= self.succeed_after:
            self.succeed_after = None
            return "success"
        return None


class ScriptedWorker:
    """Stands in for edge.inference.InferenceWorker: every chunk moves both joints by +step per tick."""

    def __init__(self, step: float = 0.1, delay_s: float = 0.0):
        self.version, self.step, self.delay_s = 3, step, delay_s
        self.requests = 0

    def submit(self, raw, done, after=None):
        self.requests += 1
        start = raw["agent_pos"][0]

        def deliver():
            time.sleep(self.delay_s)
            actions = start + self.step * np.arange(1, CHUNK + 1, dtype=np.float32)[:, None]
            done(
                Decision(
                    version=self.version,
                    observation={"observation.state": raw["agent_pos"][0].copy()},
                    chain=np.zeros((3, CHUNK, 2), np.float32),
                    stochastic=np.ones(2, bool),
                    noise_level=0.5,
                    log_prob=-1.0,
                    value=0.0,
                    actions=actions.astype(np.float32),
                )
            )

        threading.Thread(target=deliver, daemon=True).start()

    def observe(self, raw):
        return {"observation.state": torch.as_tensor(raw["agent_pos"])}


def make_loop(
    tmp_path,
    robot,
    worker,
    *,
    bounds=(-10.0, 10.0),
    max_delta=None,
    episode=None,
    watchdog_s=0.0,
    inputs=None,
    teleop=None,
    outcome="robot",
    detector=None,
    recorder=None,
):
    spool = Spool(tmp_path / "spool", fsync=False)
    writer = RecordWriter(spool, "r0", RobotLoopStats())
    io = RobotIO.of(robot)
    estop = EStop(robot_id="r0")
    layer = SafetyLayer(
        ActionBounds(np.full(2, bounds[0], np.float32), np.full(2, bounds[1], np.float32), "config"),
        max_delta,
        io.action_names,
        estop=estop,
        robot_id="r0",
    )
    episode = episode or EpisodeConfig(start="delay", start_delay_s=0.0, time_limit_s=0.1)
    watchdog = Watchdog(watchdog_s, None, robot_id="r0", stats=layer.stats) if watchdog_s else None
    loop = RobotLoop(
        robot,
        io,
        worker,
        writer,
        layer,
        estop,
        robot_id="r0",
        control_hz=HZ,
        episode=episode,
        watchdog=watchdog,
        inputs=inputs,
        teleop=teleop,
        outcome=outcome,
        detector=detector,
        recorder=recorder,
    )
    if watchdog is not None:
        watchdog.start()
    return loop, spool, estop, layer


def records(spool) -> list:
    out = []
    for _seq, blob in spool.pending():
        r = pirl_pb2.RolloutRecord()
        r.ParseFromString(blob)
        out.append(r)
    return out
