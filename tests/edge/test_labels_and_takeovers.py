"""People in the loop on the edge, in process: operator labels end episodes with the right outcome in the
records, a teleoperator's takeover runs through the safety layer and is marked in the records, a pad's
buttons and a success detector decide outcomes (fake robot, scripted inference worker, no learner)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from lerobot.teleoperators.utils import TeleopEvents

from edge.configuration import EpisodeConfig
from edge.operator_inputs import OperatorInputs
from edge.robot_features import RobotIO
from edge.robot_mode import check_teleop_fits
from helpers.robot_loop_fakes import CHUNK, FakeRobot, ScriptedWorker, make_loop, records


class HookedRobot(FakeRobot):
    """Calls ``hooks[n]()`` right after its n-th send_action: inputs arrive at known ticks."""

    def __init__(self, hooks: dict, **kw):
        super().__init__(**kw)
        self.hooks = hooks

    def send_action(self, action):
        out = super().send_action(action)
        hook = self.hooks.get(len(self.sent))
        if hook is not None:
            hook()
        return out


class FakeTeleop:
    """A leader arm that a person holds at a fixed target; optional pad-style events by tick."""

    def __init__(self, target=(-1.0, -1.0), events=None, robot=None):
        self.target, self.events, self.robot = target, events or {}, robot
        self.action_features = {"a.pos": float, "b.pos": float}
        self.reads = 0

    def get_action(self):
        self.reads += 1
        return {"a.pos": self.target[0], "b.pos": self.target[1]}

    def get_teleop_events(self):
        return self.events.get(len(self.robot.sent), {}) if self.robot is not None else {}


class FakeRecorder:
    def __init__(self):
        self.frames, self.ends = [], []

    def add_frame(self, frame):
        self.frames.append(frame)

    def end_episode(self, **kw):
        self.ends.append(kw)


def quiet_inputs(loop_estop):
    return OperatorInputs(loop_estop, keyboard=False, sigusr1=False, estop_port=0)


def long_episode(seconds=0.5):
    return EpisodeConfig(start="delay", start_delay_s=0.0, time_limit_s=seconds)


def run_one(tmp_path, robot, worker=None, *, outcome="operator", teleop=None, detector=None, max_delta=None):
    """One episode; returns (loop, records, recorder). ``robot.hooks`` may post to ``robot.inputs``."""
    worker = worker or ScriptedWorker(step=0.01)
    recorder = FakeRecorder()
    loop, spool, estop, _ = make_loop(
        tmp_path,
        robot,
        worker,
        episode=long_episode(),
        outcome=outcome,
        teleop=teleop,
        detector=detector,
        max_delta=max_delta,
        recorder=recorder,
    )
    inputs = quiet_inputs(estop)
    loop.inputs = inputs
    robot.inputs = inputs
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    return loop, records(spool), recorder


@pytest.mark.parametrize(
    ("key", "verdict", "reward", "reason"),
    [("s", "SUCCESS", 1.0, "success"), ("f", "FAILURE", 0.0, "failure"), ("a", "ABORT", 0.0, "abort")],
)
def test_keyboard_labels_end_the_episode_with_that_outcome_in_its_records(tmp_path, key, verdict, reward, reason):
    # the robot would call it a success after 2 actions: with outcome=operator only the person's label counts
    robot = HookedRobot({}, succeed_after=2)
    robot.hooks[6] = lambda: robot.inputs.feed(key)  # a synthetic key press after the 6th tick
    loop, recs, recorder = run_one(tmp_path, robot)
    assert loop.stats.episode_ends == {reason: 1}
    last = recs[-1]
    assert last.terminated and not last.truncated
    assert last.label.source == last.label.OPERATOR
    assert last.label.Verdict.Name(last.label.verdict) == verdict
    assert last.reward == reward and last.success == (verdict == "SUCCESS")
    assert all(not r.HasField("label") for r in recs[:-1])  # only the episode's last record carries it
    assert len(robot.sent) == 7  # the key was taken at the next tick, which was the last
    assert recorder.ends == [{"success": verdict == "SUCCESS", "reason": reason, "label": "operator"}]
    assert loop.stats.labels == {f"OPERATOR/{verdict}": 1}


def first_ticks(recs) -> list[int]:
    """The tick each record's chunk began at (1-based): ticks held before a chunk are in its held_ticks."""
    out, tick = [], 1
    for r in recs:
        tick += r.safety.held_ticks
        out.append(tick)
        tick += r.env_steps
    return out


@pytest.mark.parametrize("key", ["s", "f"])
def test_a_back_dated_label_ends_the_records_at_the_step_that_ran_a_reaction_time_before_it(tmp_path, key):
    # a person presses the key after the 22nd tick (taken at tick 23); their reaction time is 6 ticks (0.06 s at
    # 100 Hz), so the outcome was decided at tick 17: the records end at the chunk that ran then
    robot = HookedRobot({})
    robot.hooks[22] = lambda: robot.inputs.feed(key)
    episode = EpisodeConfig(start="delay", start_delay_s=0.0, time_limit_s=0.5, label_reaction_s=0.06)
    recorder = FakeRecorder()
    loop, spool, estop, _ = make_loop(
        tmp_path, robot, ScriptedWorker(step=0.01), episode=episode, outcome="operator", recorder=recorder
    )
    loop.inputs = robot.inputs = quiet_inputs(estop)
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    recs = records(spool)
    assert len(robot.sent) == 23
    starts = first_ticks(recs)
    last = recs[-1]
    assert starts[-1] <= 17 < starts[-1] + last.env_steps  # the step that ran at tick 17 is the last record
    assert [r.step_index for r in recs] == list(range(len(recs)))  # none missing before it
    assert last.terminated and last.label.source == last.label.OPERATOR
    assert last.success == (key == "s") and last.reward == (1.0 if key == "s" else 0.0)
    assert all(not r.HasField("label") and r.reward == 0.0 and not r.terminated for r in recs[:-1])
    # the chunks that began after it ran (ticks 18-23), and are counted, not sent
    ran_after = 23 - (starts[-1] + last.env_steps - 1)
    assert ran_after > 0 and 1 <= loop.stats.steps_after_label <= -(-ran_after // CHUNK)
    assert loop.stats.summary()["steps_after_label"] == loop.stats.steps_after_label
    assert len(recorder.frames) == 23  # the session dataset keeps every tick, as it happened
    assert recorder.frames[-1]["next.done"][0] and not any(f["next.done"][0] for f in recorder.frames[:-1])


def test_only_a_persons_label_is_back_dated(tmp_path):
    # the robot's own verdict is not a person's: it lands on the step it came in, reaction time or not
    episode = EpisodeConfig(start="delay", start_delay_s=0.0, time_limit_s=0.5, label_reaction_s=0.06)
    loop, spool, _, _ = make_loop(tmp_path, FakeRobot(succeed_after=22), ScriptedWorker(step=0.01), episode=episode)
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    recs = records(spool)
    starts = first_ticks(recs)
    assert recs[-1].label.source == recs[-1].label.ENV and recs[-1].success and recs[-1].reward == 1.0
    assert starts[-1] + recs[-1].env_steps - 1 == 22 and loop.stats.steps_after_label == 0

    # nor is an e-stop, though a person pressed it: it ends the records where it happened
    robot = HookedRobot({})
    robot.hooks[22] = lambda: robot.inputs.post("estop", "test")
    loop, spool, estop, _ = make_loop(
        tmp_path / "estop", robot, ScriptedWorker(step=0.01), episode=episode, outcome="operator"
    )
    loop.inputs = robot.inputs = quiet_inputs(estop)
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    recs = records(spool)
    assert loop.stats.episode_ends == {"estop": 1} and recs[-1].safety.estop
    assert first_ticks(recs)[-1] + recs[-1].env_steps - 1 == 22 and loop.stats.steps_after_label == 0


def test_time_limit_is_a_time_limit_failure_and_the_robot_verdict_counts_only_with_outcome_robot(tmp_path):
    loop, recs, _ = run_one(tmp_path, FakeRobot(succeed_after=2))  # outcome=operator, nobody labels
    assert loop.stats.episode_ends == {"time_limit": 1}
    assert recs[-1].truncated and recs[-1].label.source == recs[-1].label.TIME_LIMIT
    assert recs[-1].label.verdict == recs[-1].label.FAILURE and recs[-1].reward == 0.0

    loop, recs, _ = run_one(tmp_path / "robot", FakeRobot(succeed_after=2), outcome="robot")
    assert loop.stats.episode_ends == {"success": 1}
    assert recs[-1].label.source == recs[-1].label.ENV and recs[-1].label.verdict == recs[-1].label.SUCCESS


def test_a_takeover_drives_through_the_safety_layer_is_marked_and_hands_back_at_a_chunk_boundary(tmp_path):
    max_delta = 0.05
    robot = HookedRobot({})
    teleop = FakeTeleop(target=(-1.0, -1.0))  # far away: every teleoperated tick is cut by the jump limit
    robot.hooks[2 * CHUNK + 2] = lambda: robot.inputs.post("takeover", "test")  # mid-chunk
    robot.hooks[4 * CHUNK + 1] = lambda: robot.inputs.post("handback", "test")  # mid-chunk too
    robot.hooks[7 * CHUNK] = lambda: robot.inputs.feed("f")
    loop, recs, recorder = run_one(tmp_path, robot, teleop=teleop, max_delta=max_delta)
    s = loop.stats
    assert s.interventions == 1 and s.teleop_ticks > 0 and s.teleop_errors == 0
    sent = np.stack([p for _, p in robot.sent])
    # what reached the motors never jumped more than the safety layer allows, teleoperator or policy
    assert np.all(np.abs(np.diff(sent, axis=0)) <= max_delta + 1e-6)
    marked = [r for r in recs if r.HasField("intervention")]
    assert len(marked) == s.intervened_steps >= 2
    from pirl.codec import from_tensor_msg

    flags = [from_tensor_msg(r.intervention.teleop) for r in marked]
    # the takeover came mid-chunk: that macro-step is part policy, part person (neither PPO nor BC data) ...
    assert not flags[0][0] and flags[0][-1]
    # ... then whole macro-steps driven by the person (BC samples) ...
    assert any(f.all() for f in flags[1:])
    # ... and after the handback the teleoperator drives to the chunk boundary, then the policy again
    assert flags[-1].all()
    after = recs[recs.index(marked[-1]) + 1 :]
    assert after and all(not r.HasField("intervention") for r in after)
    for r, f in zip(marked, flags, strict=True):
        executed = from_tensor_msg(r.intervention.executed)
        assert executed.shape == (r.env_steps, 2) and f.shape == (r.env_steps,)
        assert r.safety.limited_ticks >= int(f.sum())  # each teleoperated tick was cut to max_delta
        assert np.all(executed[f] <= executed[0] + 1e-6)  # the person pulls towards -1
    # every frame of the session dataset says who drove it
    assert sum(bool(fr["intervention"][0]) for fr in recorder.frames) == s.teleop_ticks
    assert loop.intervening is False


def test_a_pad_holds_an_intervention_and_its_success_button_labels_the_episode(tmp_path):
    robot = HookedRobot({})
    held = {TeleopEvents.IS_INTERVENTION: True}
    events = dict.fromkeys(range(3, 3 + 2 * CHUNK), held)
    events[3 + 3 * CHUNK] = {TeleopEvents.SUCCESS: True}
    teleop = FakeTeleop(target=(0.0, 0.0), events=events, robot=robot)
    loop, recs, _ = run_one(tmp_path, robot, teleop=teleop)
    assert loop.stats.interventions == 1 and loop.stats.teleop_ticks >= 2 * CHUNK
    assert loop.stats.episode_ends == {"success": 1}
    assert recs[-1].label.source == recs[-1].label.OPERATOR and recs[-1].reward == 1.0


def test_takeover_without_a_teleoperator_is_logged_and_the_policy_keeps_driving(tmp_path, caplog):
    robot = HookedRobot({})
    robot.hooks[2] = lambda: robot.inputs.post("intervene", "test")
    robot.hooks[10] = lambda: robot.inputs.feed("s")
    loop, recs, _ = run_one(tmp_path, robot)
    assert loop.stats.interventions == 0 and not any(r.HasField("intervention") for r in recs)
    assert "no teleoperator to take over with" in caplog.text
    assert loop.stats.episode_ends == {"success": 1}


class StubDetector:
    """Fires once it has seen ``after`` observations (the real one: edge.success_detector)."""

    def __init__(self, after: int):
        self.after, self.seen, self.resets = after, 0, 0

    def reset(self):
        self.seen, self.resets = 0, self.resets + 1

    def submit(self, obs):
        assert "a.pos" in obs  # the robot's raw observation
        self.seen += 1

    def poll(self):
        return self.seen >= self.after, 0.93


def test_a_success_detector_ends_the_episode_as_a_detector_success(tmp_path):
    detector = StubDetector(after=5)
    loop, recs, _ = run_one(tmp_path, FakeRobot(), outcome="detector", detector=detector)
    assert loop.stats.episode_ends == {"success": 1} and detector.resets == 1
    label = recs[-1].label
    assert label.source == label.DETECTOR and label.verdict == label.SUCCESS
    assert label.detector_score == pytest.approx(0.93) and recs[-1].reward == 1.0


def test_a_teleoperator_whose_actions_are_not_the_robots_is_refused_in_one_line():
    io = RobotIO.of(FakeRobot())
    pad = FakeTeleop()
    pad.action_features = {"delta_x": float, "delta_y": float, "gripper": float}
    with pytest.raises(ValueError, match=r"teleop.type=gamepad: its actions \['delta_x'.*are not robot.type=fake"):
        check_teleop_fits(pad, io, "gamepad", "fake")
    check_teleop_fits(FakeTeleop(), io, "leader", "fake")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--episode.outcome=judge"], "episode.outcome: must be one of ('robot', 'operator', 'detector')"),
        (["--episode.outcome=detector"], "episode.outcome=detector: give the trained detector, --detector.path=DIR"),
        (["--detector.path=DIR"], "detector.path: the detector decides outcomes only with --episode.outcome=detector"),
        (["--teleop.type=pirl_sim_expert", "--robot.type=None"], "teleop: a teleoperator takes over a robot"),
    ],
)
def test_outcome_and_teleoperator_flags_are_checked_in_one_line(tmp_path, capsys, flags, message):
    from edge.configuration import EdgeConfig
    from edge.devices import register_devices
    from edge.success_detector import MANIFEST
    from pirl.cli import parse_config

    register_devices()
    (tmp_path / MANIFEST).write_text("{}")  # a directory that looks like a detector: the flag check comes first
    required = ["--link.learner=h:1", "--link.robot_id=r", "--link.tokens=t.json", "--policy.path=p"]
    robot = [] if any(f.startswith("--robot.type") for f in flags) else ["--robot.type=pirl_sim"]
    args = [f.replace("DIR", str(tmp_path)) for f in flags if f != "--robot.type=None"]
    with pytest.raises(SystemExit) as e:
        parse_config(EdgeConfig, prog="pirl-edge", args=[*required, *robot, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_an_estop_wins_over_a_takeover_within_one_tick(tmp_path):
    """While a person drives, an e-stop still stops everything: the teleoperator's next action never reaches the
    robot, and the episode ends as an e-stop failure."""
    robot = HookedRobot({})
    teleop = FakeTeleop(target=(0.5, 0.5))
    robot.hooks[3] = lambda: robot.inputs.post("takeover", "test")
    reads_at_estop = {}
    robot.hooks[8] = lambda: (reads_at_estop.setdefault("reads", teleop.reads), robot.inputs.post("estop", "test"))
    loop, recs, _ = run_one(tmp_path, robot, teleop=teleop)
    assert loop.stats.episode_ends == {"estop": 1} and loop.stats.interventions == 1
    # after the tick the e-stop came in, only the e-stop's own hold reached the robot: its present position
    assert len(robot.sent) == 9
    np.testing.assert_array_equal(robot.sent[8][1], robot.sent[7][1])
    assert teleop.reads == reads_at_estop["reads"]  # the teleoperator was not even read again
    last = recs[-1]
    assert last.safety.estop and last.label.verdict == last.label.FAILURE and last.reward == 0.0
