"""The pirl_sim teleoperators: the scripted expert (found through the registry by id) and the terminal keyboard."""

from __future__ import annotations

import os

import numpy as np
import pytest
from lerobot.teleoperators import TeleoperatorConfig, make_teleoperator_from_config
from lerobot_robot_pirl_sim import (
    ACTION_NAMES,
    PirlSim,
    PirlSimConfig,
    PirlSimExpert,
    PirlSimExpertConfig,
    PirlSimKeyboard,
    PirlSimKeyboardConfig,
)
from lerobot_robot_pirl_sim.physics import WORKSPACE


def make_robot(tmp_path, robot_id="op", **kw) -> PirlSim:
    cfg = PirlSimConfig(id=robot_id, calibration_dir=tmp_path, realtime=False, cameras={}, seed=0, **kw)
    return PirlSim(cfg)


def keyboard(tmp_path, **kw) -> PirlSimKeyboard:
    r, w = os.pipe()  # stands in for the terminal
    kb = PirlSimKeyboard(PirlSimKeyboardConfig(calibration_dir=tmp_path, input_fd=r, **kw))
    kb._test_pipe = (r, w)
    return kb


def test_types_are_registered(tmp_path):
    assert TeleoperatorConfig.get_choice_class("pirl_sim_expert") is PirlSimExpertConfig
    assert TeleoperatorConfig.get_choice_class("pirl_sim_keyboard") is PirlSimKeyboardConfig
    expert = make_teleoperator_from_config(PirlSimExpertConfig(id="op", calibration_dir=tmp_path))
    kb = make_teleoperator_from_config(PirlSimKeyboardConfig(calibration_dir=tmp_path))
    assert isinstance(expert, PirlSimExpert) and isinstance(kb, PirlSimKeyboard)
    for teleop in (expert, kb):
        assert teleop.action_features == dict.fromkeys(ACTION_NAMES, float) and teleop.feedback_features == {}


def test_expert_drives_the_robot_with_its_id_to_success(tmp_path):
    expert = PirlSimExpert(PirlSimExpertConfig(id="op", calibration_dir=tmp_path))
    expert.connect()  # before the robot, as lerobot-teleoperate does
    with pytest.raises(LookupError, match="'op'"):
        expert.get_action()
    robot = make_robot(tmp_path)
    robot.connect()
    try:
        with pytest.raises(ValueError, match="already connected"):
            make_robot(tmp_path).connect()  # ids are unique among connected sims
        for _ in range(60):
            action = expert.get_action()
            assert set(action) == set(ACTION_NAMES)
            robot.send_action(action)
            if robot.episode_status():
                break
        assert robot.episode_status() == "success"
        expert.send_feedback({})
    finally:
        robot.disconnect()
        expert.disconnect()
    with pytest.raises(LookupError):
        PirlSimExpert(PirlSimExpertConfig(id="op", calibration_dir=tmp_path)).robot()


def test_expert_noise_is_seeded(tmp_path):
    robot = make_robot(tmp_path, robot_id="noisy")
    robot.connect()
    try:
        actions = []
        for _ in range(2):
            expert = PirlSimExpert(PirlSimExpertConfig(id="noisy", calibration_dir=tmp_path, noise_std=0.1, seed=4))
            expert.connect()
            actions.append([expert.get_action() for _ in range(3)])
        assert actions[0] == actions[1] and actions[0][0] != actions[0][1]
    finally:
        robot.disconnect()


def test_keyboard_keys_move_the_targets(tmp_path):
    kb = keyboard(tmp_path, step_m=0.01)
    kb.connect()
    try:
        assert kb.get_action() == {"x.pos": 0.0, "y.pos": 0.0, "gripper.pos": 100.0}
        kb.feed("ddw")
        a = kb.get_action()
        assert a["x.pos"] == pytest.approx(0.02) and a["y.pos"] == pytest.approx(0.01)
        kb.feed("\x1b[D\x1b[B")  # arrows: left, down
        a = kb.get_action()
        assert a["x.pos"] == pytest.approx(0.01) and a["y.pos"] == pytest.approx(0.0)
        kb.feed("\x1b[")  # an arrow cut between two reads...
        kb.feed("C")  # ...completes on the next one
        assert kb.get_action()["x.pos"] == pytest.approx(0.02)
        kb.feed(" ")
        assert kb.get_action()["gripper.pos"] == 0.0
        kb.feed(" ")
        assert kb.get_action()["gripper.pos"] == 100.0
        kb.feed("c")
        assert kb.get_action()["gripper.pos"] == 0.0
        kb.feed("+d")  # step doubled
        assert kb.get_action()["x.pos"] == pytest.approx(0.04)
        kb.feed("D" * 20 + "zq\x1bx")  # clipped at the workspace; unknown keys ignored
        assert kb.get_action()["x.pos"] == pytest.approx(WORKSPACE)
    finally:
        kb.disconnect()


def test_keyboard_reads_typed_keys_without_blocking(tmp_path):
    kb = keyboard(tmp_path, step_m=0.01)
    _, w = kb._test_pipe
    kb.connect()
    try:
        assert kb.get_action()["y.pos"] == 0.0  # nothing typed: returns at once
        os.write(w, b"ww")
        assert kb.get_action()["y.pos"] == pytest.approx(0.02)
        assert kb.get_action()["y.pos"] == pytest.approx(0.02)  # consumed once
    finally:
        kb.disconnect()
        for fd in kb._test_pipe:
            os.close(fd)


def test_keyboard_starts_from_the_robots_targets_and_h_holds_the_pose(tmp_path):
    robot = make_robot(tmp_path, robot_id="kb")
    robot.connect()
    null = os.open(os.devnull, os.O_RDONLY)  # input at its end: read once, then no longer polled
    kb = PirlSimKeyboard(PirlSimKeyboardConfig(id="kb", calibration_dir=tmp_path, input_fd=null))
    try:
        start = robot.targets()
        kb.connect()
        assert kb.get_action() == start
        for _ in range(3):
            robot.send_action({"x.pos": 0.0, "y.pos": 0.0})
        kb.feed("h")
        obs = robot.get_observation()
        a = kb.get_action()
        assert a["x.pos"] == pytest.approx(obs["x.pos"]) and a["y.pos"] == pytest.approx(obs["y.pos"])
    finally:
        kb.disconnect()
        os.close(null)
        robot.disconnect()


def test_keyboard_puts_a_terminal_in_cbreak_mode_and_restores_it(tmp_path):
    import termios

    leader, follower = os.openpty()
    try:
        before = termios.tcgetattr(follower)
        assert before[3] & termios.ICANON
        kb = PirlSimKeyboard(PirlSimKeyboardConfig(calibration_dir=tmp_path, input_fd=follower))
        kb.connect()
        assert not termios.tcgetattr(follower)[3] & (termios.ICANON | termios.ECHO)  # keys arrive one by one
        os.write(leader, b"d")
        assert np.isclose(kb.get_action()["x.pos"], 0.01)
        kb.disconnect()
        assert termios.tcgetattr(follower) == before
    finally:
        os.close(leader)
        os.close(follower)
