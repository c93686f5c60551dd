"""The scripted person at the simulated robot (lerobot_robot_pirl_sim.operator): judges attempts from what it
sees, reacts after its reaction time, takes over a drifting policy, and reaches the edge through the operator
interface only (HTTP), never through the robot's own verdict."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from lerobot_robot_pirl_sim import ACTION_NAMES, PirlSim, PirlSimConfig, scripted_expert
from lerobot_robot_pirl_sim.config_pirl_sim_expert import PirlSimExpertConfig
from lerobot_robot_pirl_sim.operator import OperatorSettings, SceneView, ScriptedOperator, Sight
from lerobot_robot_pirl_sim.pirl_sim_expert import PirlSimExpert

from edge.configuration import EpisodeConfig
from edge.control import RecordWriter
from edge.operator_inputs import OperatorInputs
from edge.records import Decision
from edge.robot_features import RobotIO
from edge.robot_loop import RobotLoop, RobotLoopStats
from edge.safety import ActionBounds, EStop, SafetyLayer
from edge.spool import Spool
from helpers.net import free_port
from helpers.robot_loop_fakes import records
from pirl.codec import from_tensor_msg

CHUNK = 4


def sight(t, dist=0.0, speed=0.0, opening=100.0) -> Sight:
    return Sight(gripper_xy=(dist, 0.0), gripper_speed=speed, gripper_opening=opening, cube_xy=(0.0, 0.0), time_s=t)


class Script:
    """A fake view (a list of sights, one per look) and a fake operator interface."""

    def __init__(self, sights, phase="run"):
        self.sights, self.phase, self.sent = list(sights), phase, []

    def look(self):
        return self.sights.pop(0)

    def status(self):
        return {"phase": self.phase, "episode": 0}

    def send(self, command):
        self.sent.append(command)


def run_script(script, settings, looks):
    op = ScriptedOperator(script, script.status, script.send, settings)
    for _ in range(looks):
        op.step()
    return op


def test_it_labels_what_it_sees_after_its_reaction_time():
    s = OperatorSettings(reaction_s=0.3)
    closed_on_cube = [sight(1.0, 0.01, 0.01, 0.0), sight(1.2, 0.01, 0.0, 0.0), sight(1.31, 0.01, 0.0, 0.0)]
    script = Script(closed_on_cube)
    run_script(script, s, 2)
    assert script.sent == []  # seen, not yet pressed
    run_script(script, s, 0)
    op = run_script(Script(closed_on_cube), s, 3)
    assert op.labels == {"success": 1}
    too_fast = Script([sight(1.0, 0.01, 0.2, 0.0), sight(1.4, 0.01, 0.0, 0.0), sight(1.5)])
    run_script(too_fast, s, 3)
    assert too_fast.sent == ["failure"]  # pressed once, then waits for the next episode
    beside = Script([sight(1.0, 0.05, 0.0, 0.0), sight(1.5, 0.05, 0.0, 0.0)])
    run_script(beside, s, 2)
    assert beside.sent == ["failure"]
    liar = Script([sight(1.0, 0.01, 0.0, 0.0), sight(1.5, 0.01, 0.0, 0.0)])
    run_script(liar, OperatorSettings(reaction_s=0.3, mislabel=1.0), 2)
    assert liar.sent == ["failure"]


def test_it_takes_over_a_drifting_policy_once_and_never_outside_an_episode():
    s = OperatorSettings(intervene_after_s=1.0, intervene_distance=0.03)
    script = Script([sight(0.5, 0.1), sight(1.0, 0.1), sight(1.1, 0.1), sight(1.2, 0.02)])
    op = run_script(script, s, 4)
    assert script.sent == ["takeover"] and op.takeovers == 1
    on_track = Script([sight(1.0, 0.02), sight(1.5, 0.01)])
    run_script(on_track, s, 2)
    assert on_track.sent == []
    waiting = Script([], phase="wait")
    run_script(waiting, s, 3)  # no look at the scene while no episode runs: nothing to pop
    assert waiting.sent == []


class SpyRobot(PirlSim):
    """The simulated robot with its verdict sealed off: neither the loop (outcome=operator) nor the person
    may read it."""

    def episode_status(self):
        raise AssertionError("the robot's own verdict was read")


class ExpertWorker:
    """A policy: the scripted expert's action, or ``drift`` (go to a far corner, never close), held for a chunk."""

    version = 1

    def __init__(self, drift: bool = False):
        self.drift = drift

    def submit(self, raw, done, after=None):
        state, env = raw["agent_pos"], raw["environment_state"]
        if self.drift:
            action = np.array([[-0.19 if env[0, 0] > 0 else 0.19, -0.19 if env[0, 1] > 0 else 0.19, 100.0]])
        else:
            action = scripted_expert(state.astype(np.float64), env.astype(np.float64))
        done(
            Decision(
                version=self.version,
                observation={"observation.state": state[0].copy()},
                chain=np.zeros((3, CHUNK, 3), np.float32),
                stochastic=np.ones(2, bool),
                noise_level=0.5,
                log_prob=-1.0,
                value=0.0,
                actions=np.repeat(action.astype(np.float32), CHUNK, axis=0),
            )
        )

    def observe(self, raw):
        import torch

        return {"observation.state": torch.as_tensor(raw["agent_pos"])}


def run_sim_episodes(tmp_path, *, drift: bool, episodes: int, intervene_after_s=None):
    port = free_port()
    robot = SpyRobot(
        PirlSimConfig(
            id="op-test",
            calibration_dir=tmp_path,
            realtime=False,
            seed=3,
            cameras={},
            operator_port=port,
            operator_reaction_s=0.2,
            operator_intervene_after_s=intervene_after_s,
            max_episode_steps=None,  # the episode's time limit ends it, not the robot's step counter
        )
    )
    estop = EStop(robot_id="r0")
    inputs = OperatorInputs(estop, keyboard=False, sigusr1=False, estop_port=port)
    io = RobotIO.of(robot)
    bounds = ActionBounds(np.array([-0.2, -0.2, 0.0], np.float32), np.array([0.2, 0.2, 100.0], np.float32), "config")
    layer = SafetyLayer(bounds, None, io.action_names, estop=estop, robot_id="r0")
    spool = Spool(tmp_path / "spool", fsync=False)
    teleop = PirlSimExpert(PirlSimExpertConfig(id="op-test"))
    loop = RobotLoop(
        robot,
        io,
        ExpertWorker(drift),
        RecordWriter(spool, "r0", RobotLoopStats()),
        layer,
        estop,
        robot_id="r0",
        control_hz=50.0,  # lock-step: the simulated robot runs at twice its real rate
        episode=EpisodeConfig(start="delay", start_delay_s=0.0, time_limit_s=4.0),
        inputs=inputs,
        teleop=teleop,
        outcome="operator",
    )
    inputs.status_fn = loop.status
    sources = []
    original_post = inputs.post

    def post(command, source):
        sources.append((command, source))
        original_post(command, source)

    inputs.post = post
    inputs.start()
    robot.connect()
    teleop.connect()
    try:
        loop.run(threading.Event(), max_episodes=episodes)
        loop.close()
    finally:
        inputs.stop()
        teleop.disconnect()
        robot.disconnect()
    return loop, records(spool), sources


@pytest.mark.slow
def test_on_the_simulated_robot_labels_arrive_over_http_and_the_verdict_is_never_read(tmp_path):
    loop, recs, sources = run_sim_episodes(tmp_path, drift=False, episodes=3)
    assert loop.stats.episodes == 3
    labels = [r.label for r in recs if r.HasField("label")]
    assert len(labels) == 3 and all(lb.source == lb.OPERATOR for lb in labels)
    assert sum(lb.verdict == lb.SUCCESS for lb in labels) >= 2  # the expert policy grasps
    assert {c for c, _ in sources} <= {"success", "failure"} and {s for _, s in sources} == {"http"}


@pytest.mark.slow
def test_on_the_simulated_robot_the_person_takes_over_a_drifting_policy_and_finishes_the_grasp(tmp_path):
    loop, recs, sources = run_sim_episodes(tmp_path, drift=True, episodes=2, intervene_after_s=0.4)
    assert loop.stats.interventions == 2 and loop.stats.teleop_ticks > 0
    assert [c for c, _ in sources if c == "takeover"] == ["takeover", "takeover"]
    marked = [r for r in recs if r.HasField("intervention")]
    assert marked and any(from_tensor_msg(r.intervention.teleop).all() for r in marked)
    labels = [r.label for r in recs if r.HasField("label")]
    assert all(lb.source == lb.OPERATOR for lb in labels) and any(lb.verdict == lb.SUCCESS for lb in labels)
    assert all(a in ACTION_NAMES for a in RobotIO.of(PirlSim(PirlSimConfig(id="x"))).action_names)


def test_the_view_reads_only_the_scene_state_and_a_clock():
    class Scene:
        config = PirlSimConfig(id="v")
        episode_steps = 25

        def read_state(self):
            return np.array([0.1, 0.0, 0.03, 0.04, 10.0, 0.1, 0.01])

        def __getattr__(self, name):  # anything else (episode_status, _status, judge...) is off limits
            raise AssertionError(f"the view read {name}")

    s = SceneView(Scene()).look()
    assert s.time_s == pytest.approx(1.0) and s.gripper_speed == pytest.approx(0.05)
    assert s.distance == pytest.approx(0.01) and s.closed


def test_with_intervene_on_rush_it_takes_over_a_grasp_that_starts_before_the_arm_has_settled():
    s = OperatorSettings(intervene_on_rush=True)
    rushing = Script([sight(0.4, 0.01, 0.2, 100.0), sight(0.5, 0.01, 0.2, 80.0), sight(0.6, 0.01, 0.1, 70.0)])
    op = run_script(rushing, s, 3)
    assert rushing.sent == ["takeover"] and op.takeovers == 1  # once, at the first sight of closing too fast
    settled = Script([sight(0.5, 0.01, 0.01, 80.0)])
    run_script(settled, s, 1)
    assert settled.sent == []  # closing at rest is what the person wants to see
    run_script(off := Script([sight(0.5, 0.01, 0.2, 80.0)]), OperatorSettings(), 1)
    assert off.sent == []  # off by default
