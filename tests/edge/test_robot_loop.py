"""Robot mode in process: the episode protocol, the safety layer on the path to the motors, the e-stop,
the watchdog and the records, on a fake LeRobot robot with a scripted inference worker (no learner)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.configuration import EpisodeConfig
from edge.robot_features import FeatureMismatchError, RobotIO, check_policy_fits
from helpers.robot_loop_fakes import HZ, FakeRobot, ScriptedWorker, make_loop, records


def test_time_limited_episodes_write_contiguous_records_and_end_truncated(tmp_path):
    robot, worker = FakeRobot(), ScriptedWorker(step=0.01)
    loop, spool, _, _ = make_loop(tmp_path, robot, worker)
    loop.run(threading.Event(), max_episodes=2)
    loop.close()
    recs = records(spool)
    assert loop.stats.episodes == 2 and loop.stats.episode_ends == {"time_limit": 2}
    assert robot.scene_resets == 2
    by_episode: dict[str, list] = {}
    for r in recs:
        by_episode.setdefault(r.episode_id, []).append(r)
    assert len(by_episode) == 2
    for steps in by_episode.values():
        assert [r.step_index for r in steps] == list(range(len(steps)))
        assert all(not (r.terminated or r.truncated) for r in steps[:-1])
        assert steps[-1].truncated and not steps[-1].terminated and not steps[-1].success
        assert "observation.state" in steps[-1].final_observation  # the learner bootstraps V from it
        assert sum(r.env_steps for r in steps) <= round(0.1 * HZ)
        assert all(r.policy_version == 3 for r in steps)


def test_the_robots_own_success_terminates_with_reward(tmp_path):
    robot = FakeRobot(succeed_after=6)
    loop, spool, _, _ = make_loop(
        tmp_path,
        robot,
        ScriptedWorker(step=0.01),
        episode=EpisodeConfig(start="delay", start_delay_s=0, time_limit_s=5),
    )
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    last = records(spool)[-1]
    assert last.terminated and last.success and last.reward == 1.0
    assert loop.stats.successes == 1


def test_out_of_bound_actions_are_clamped_and_marked(tmp_path):
    robot = FakeRobot()
    loop, spool, _, layer = make_loop(tmp_path, robot, ScriptedWorker(step=0.5), bounds=(-1.0, 1.0))
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    sent = np.stack([p for _, p in robot.sent])
    assert sent.max() <= 1.0 + 1e-6 and layer.stats.clamped_ticks > 0
    assert sum(r.safety.clamped_ticks for r in records(spool)) == layer.stats.clamped_ticks


def test_a_jump_above_the_limit_is_cut(tmp_path):
    robot = FakeRobot()
    loop, _, _, layer = make_loop(tmp_path, robot, ScriptedWorker(step=0.5), max_delta=0.2)
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    sent = np.stack([np.zeros(2, np.float32)] + [p for _, p in robot.sent])
    assert np.abs(np.diff(sent, axis=0)).max() <= 0.2 + 1e-6
    assert layer.stats.limited_ticks > 0


def test_stalled_inference_holds_the_last_command_and_counts(tmp_path):
    robot = FakeRobot()
    # every chunk takes 6 ticks to arrive, longer than a chunk of 4 runs: however early the next one is
    # asked for, the robot holds meanwhile
    worker = ScriptedWorker(step=0.01, delay_s=6 / HZ)
    loop, spool, _, layer = make_loop(
        tmp_path, robot, worker, episode=EpisodeConfig(start="delay", start_delay_s=0, time_limit_s=0.3)
    )
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    assert loop.stats.starved_ticks > 0 and layer.stats.held_ticks > 0
    assert sum(r.safety.held_ticks for r in records(spool)) > 0
    sent = [p for _, p in robot.sent]
    repeats = sum(np.array_equal(a, b) for a, b in zip(sent, sent[1:], strict=False))
    assert repeats > 0  # a held tick re-sends the last command


def test_estop_sends_no_policy_action_after_one_tick_fails_the_episode_and_latches(tmp_path):
    robot = FakeRobot()
    episode = EpisodeConfig(start="delay", start_delay_s=0, time_limit_s=10)
    loop, spool, estop, layer = make_loop(tmp_path, robot, ScriptedWorker(step=0.001), episode=episode)
    stop = threading.Event()
    t = threading.Thread(target=loop.run, args=(stop,), kwargs={"max_episodes": 3})
    t.start()
    while len(robot.sent) < 20:
        time.sleep(0.001)
    estop.trigger("test")
    pressed = time.perf_counter()
    time.sleep(0.2)
    assert loop.phase == "estop"  # latched: waiting for a release, not starting the next episode
    after = [ts for ts, _ in robot.sent if ts > pressed]
    assert len(after) <= 1  # at most the tick already past its e-stop check
    assert robot.torque_off == 0  # estop_action=hold: the arm holds its present position
    stop.set()
    t.join(5)
    loop.close()
    assert loop.stats.episode_ends.get("estop") == 1 and loop.stats.successes == 0
    assert layer.stats.estops == 1
    last = records(spool)[-1]
    assert last.safety.estop and last.terminated and not last.success


def test_estop_released_lets_the_next_episode_start(tmp_path):
    robot = FakeRobot()
    episode = EpisodeConfig(start="delay", start_delay_s=0, time_limit_s=0.2)
    loop, _, estop, _ = make_loop(tmp_path, robot, ScriptedWorker(step=0.001), episode=episode)
    estop.trigger("test")
    stop = threading.Event()
    t = threading.Thread(target=loop.run, args=(stop,), kwargs={"max_episodes": 1})
    t.start()
    time.sleep(0.1)
    assert loop.phase == "estop" and robot.sent == []
    estop.release("test")
    t.join(5)
    loop.close()
    assert loop.stats.episode_ends == {"time_limit": 1}


def test_watchdog_trips_when_the_loop_blocks_and_fails_the_episode(tmp_path):
    robot = FakeRobot()
    episode = EpisodeConfig(start="delay", start_delay_s=0, time_limit_s=10)
    loop, spool, _, layer = make_loop(tmp_path, robot, ScriptedWorker(step=0.001), episode=episode, watchdog_s=0.1)
    stop = threading.Event()
    t = threading.Thread(target=loop.run, args=(stop,), kwargs={"max_episodes": 1})
    t.start()
    while len(robot.sent) < 10:
        time.sleep(0.001)
    robot.stall_s = 0.4  # a stuck bus read
    t.join(10)
    loop.close()
    assert layer.stats.watchdog_trips >= 1
    assert loop.stats.episode_ends == {"watchdog": 1}
    assert records(spool)[-1].safety.watchdog


def test_reset_pose_is_reached_at_bounded_speed(tmp_path):
    robot = FakeRobot()
    robot.pos = np.asarray([2.0, -2.0], np.float32)
    episode = EpisodeConfig(
        start="delay",
        start_delay_s=0,
        time_limit_s=0.05,
        reset_pose={"a.pos": 0.0, "b.pos": 0.0},
        reset_speed=10.0,
        reset_tolerance=0.01,
    )
    loop, _, _, _ = make_loop(tmp_path, robot, ScriptedWorker(step=0.0), episode=episode)
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    first_run = next(i for i, (_, p) in enumerate(robot.sent) if np.allclose(p, 0.0, atol=0.01))
    moves = np.stack([np.asarray([2.0, -2.0], np.float32)] + [p for _, p in robot.sent[: first_run + 1]])
    assert np.abs(np.diff(moves, axis=0)).max() <= 10.0 / HZ + 1e-5
    assert first_run >= 19  # 2.0 at 0.1 a tick


def test_reset_pose_must_name_the_robots_actions(tmp_path):
    with pytest.raises(ValueError, match="not actions of this robot"):
        make_loop(tmp_path, FakeRobot(), ScriptedWorker(), episode=EpisodeConfig(reset_pose={"elbow.pos": 0.0}))


def test_feature_mapping_follows_lerobot_record():
    io = RobotIO.of(FakeRobot())
    feats = io.dataset_features(use_videos=True)
    assert feats["observation.state"]["names"] == ["a.pos", "b.pos"]
    assert feats["observation.environment_state"]["names"] == ["obj.x"]
    assert feats["action"]["names"] == ["a.pos", "b.pos"]
    raw = io.raw_observation(FakeRobot().get_observation())
    assert raw["agent_pos"].shape == (1, 2) and raw["environment_state"].shape == (1, 1)


def test_a_policy_that_does_not_fit_the_robot_is_named():
    from lerobot.configs.types import FeatureType, PolicyFeature

    from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig

    def cfg(inputs, adim=2):
        return PiRLConfig(input_features=inputs, output_features={"action": PolicyFeature(FeatureType.ACTION, (adim,))})

    io = RobotIO.of(FakeRobot())
    state = {"observation.state": PolicyFeature(FeatureType.STATE, (2,))}
    check_policy_fits(cfg(state), io, "fake")
    cam = {**state, "observation.images.wrist": PolicyFeature(FeatureType.VISUAL, (3, 64, 64))}
    with pytest.raises(FeatureMismatchError, match=r"observation.images.wrist .* no such camera"):
        check_policy_fits(cfg(cam), io, "fake")
    with pytest.raises(FeatureMismatchError, match=r"action with 3 dims"):
        check_policy_fits(cfg(state, adim=3), io, "fake")
    with pytest.raises(FeatureMismatchError, match=r"observation.state with shape \(5,\)"):
        check_policy_fits(cfg({"observation.state": PolicyFeature(FeatureType.STATE, (5,))}), io, "fake")
    with pytest.raises(FeatureMismatchError, match=r"action: the policy was trained on names"):
        check_policy_fits(cfg(state), io, "fake", {"action": ["x", "y"]})


def test_the_robots_own_step_limit_truncates_instead_of_failing(tmp_path):
    class StepLimitedRobot(FakeRobot):
        episode_truncated = True  # a property on the simulated robot: its step limit was reached

        def episode_status(self):
            return "failure" if len(self.sent) >= 5 else None

    robot = StepLimitedRobot()
    episode = EpisodeConfig(start="delay", start_delay_s=0, time_limit_s=5)
    loop, spool, _, _ = make_loop(tmp_path, robot, ScriptedWorker(step=0.01), episode=episode)
    loop.run(threading.Event(), max_episodes=1)
    loop.close()
    assert loop.stats.episode_ends == {"time_limit": 1}
    last = records(spool)[-1]
    assert last.truncated and not last.terminated
