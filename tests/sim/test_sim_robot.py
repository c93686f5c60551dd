"""The simulated robot ``pirl_sim`` (lerobot_robot_pirl_sim): registration, LeRobot's Robot contract, cameras,
the two clocks, episodes, clipping and the torque switch."""

from __future__ import annotations

import time

import numpy as np
import pytest
from lerobot.cameras import CameraConfig
from lerobot.robots import RobotConfig
from lerobot.robots.utils import make_robot_from_config
from lerobot.utils.errors import DeviceAlreadyConnectedError, DeviceNotConnectedError
from lerobot_robot_pirl_sim import (
    ACTION_NAMES,
    ENV_STATE_NAMES,
    OBS_NAMES,
    STATE_NAMES,
    PirlSim,
    PirlSimCameraConfig,
    PirlSimConfig,
    scripted_expert,
)
from lerobot_robot_pirl_sim.physics import GRASP_THRESHOLD, WORKSPACE

CAM = {"front": PirlSimCameraConfig(width=24, height=16, fps=30)}


def make_sim(tmp_path, **overrides) -> PirlSim:
    """A lock-step robot without cameras unless asked (connecting one is ~1 s of GL set-up)."""
    kw = {"id": "test", "calibration_dir": tmp_path, "realtime": False, "seed": 0, "cameras": {}, **overrides}
    return PirlSim(PirlSimConfig(**kw))


def state_of(obs: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.array([obs[k] for k in STATE_NAMES]), np.array([obs[k] for k in ENV_STATE_NAMES])


def run_expert(robot: PirlSim, limit: int = 60) -> str | None:
    for _ in range(limit):
        state, env = state_of(robot.get_observation())
        robot.send_action(dict(zip(ACTION_NAMES, scripted_expert(state, env)[0].tolist(), strict=True)))
        if robot.episode_status() is not None:
            break
    return robot.episode_status()


def test_types_are_registered_and_lerobots_factory_builds_the_robot(tmp_path):
    assert RobotConfig.get_choice_class("pirl_sim") is PirlSimConfig
    assert CameraConfig.get_choice_class("pirl_sim") is PirlSimCameraConfig
    robot = make_robot_from_config(PirlSimConfig(id="factory", calibration_dir=tmp_path))
    assert isinstance(robot, PirlSim) and robot.name == "pirl_sim" and not robot.is_connected


def test_lerobots_camera_factory_builds_a_camera_that_needs_its_robot():
    from lerobot.cameras import make_cameras_from_configs
    from lerobot_robot_pirl_sim import PirlSimCamera

    cam = make_cameras_from_configs(CAM)["front"]
    assert isinstance(cam, PirlSimCamera) and not cam.is_connected
    with pytest.raises(DeviceNotConnectedError, match="robot"):
        cam.connect()


def test_cameras_are_validated_like_lerobots():
    with pytest.raises(ValueError, match="fps"):
        PirlSimConfig(cameras={"front": PirlSimCameraConfig(width=64, height=64)})
    with pytest.raises(ValueError, match="camera"):
        PirlSimCameraConfig(width=8, height=8, fps=5, camera="side")
    from lerobot.cameras.opencv import OpenCVCameraConfig

    with pytest.raises(ValueError, match="pirl_sim"):
        PirlSimConfig(cameras={"front": OpenCVCameraConfig(index_or_path=0, width=64, height=64, fps=30)})
    with pytest.raises(ValueError, match="control_hz"):
        PirlSimConfig(control_hz=0.0)


def test_cli_style_config():
    import draccus

    cfg = draccus.parse(
        PirlSimConfig,
        args=["--cameras={front: {type: pirl_sim, width: 64, height: 64, fps: 30}}", "--realtime=false"],
    )
    assert cfg.cameras["front"] == PirlSimCameraConfig(width=64, height=64, fps=30) and not cfg.realtime


def test_features(tmp_path):
    robot = make_sim(tmp_path, cameras=CAM)
    assert robot.observation_features == {**dict.fromkeys(OBS_NAMES, float), "front": (16, 24, 3)}
    assert robot.action_features == dict.fromkeys(ACTION_NAMES, float)
    assert robot.environment_state_features == ("cube.x", "cube.y")
    assert set(robot.environment_state_features) < set(robot.observation_features)
    assert robot.is_calibrated


def test_connect_observe_act_disconnect_and_camera_frames(tmp_path):
    robot = make_sim(tmp_path, cameras=CAM)
    with pytest.raises(DeviceNotConnectedError):
        robot.get_observation()
    robot.connect()
    try:
        with pytest.raises(DeviceAlreadyConnectedError):
            robot.connect()
        obs = robot.get_observation()
        assert set(obs) == set(robot.observation_features)
        assert all(isinstance(obs[k], float) for k in OBS_NAMES)
        frame = obs["front"]
        assert frame.shape == (16, 24, 3) and frame.dtype == np.uint8
        assert obs["gripper.pos"] == 100.0 and obs["x.vel"] == 0.0
        before = robot.cameras["front"].async_read(timeout_ms=2000).copy()
        for _ in range(10):  # move 10 cm to the side
            robot.send_action({"x.pos": obs["x.pos"] + 0.1 * np.sign(-obs["x.pos"]), "y.pos": obs["y.pos"]})
        after = robot.cameras["front"].read()
        assert np.abs(after.astype(int) - before).sum() > 0, "the frame did not change when the arm moved"
    finally:
        robot.disconnect()
    assert not robot.is_connected and not robot.cameras["front"].is_connected
    with pytest.raises(DeviceNotConnectedError):
        robot.send_action({"x.pos": 0.0})
    with pytest.raises(DeviceNotConnectedError):
        robot.disconnect()


def test_send_action_clips_and_returns_what_it_sent(tmp_path):
    robot = make_sim(tmp_path)
    robot.connect()
    try:
        sent = robot.send_action({"x.pos": 1.0, "y.pos": -1.0, "gripper.pos": 150.0})
        assert sent == {"x.pos": WORKSPACE, "y.pos": -WORKSPACE, "gripper.pos": 100.0}
        sent = robot.send_action({"x.pos": 0.05, "gripper.pos": float("nan")})  # missing / NaN keep the target
        assert sent == {"x.pos": 0.05, "y.pos": -WORKSPACE, "gripper.pos": 100.0}
        assert robot.targets() == sent
        with pytest.raises(ValueError, match="unknown action"):
            robot.send_action({"z.pos": 0.0})
    finally:
        robot.disconnect()


def test_lock_step_is_deterministic(tmp_path):
    def trajectory(seed):
        robot = make_sim(tmp_path, seed=seed)
        robot.connect()
        rng = np.random.default_rng(1)
        rows = []
        for _ in range(15):
            state, env = state_of(robot.get_observation())
            action = scripted_expert(state, env, rng, noise_std=0.1)[0]
            robot.send_action(dict(zip(ACTION_NAMES, action.tolist(), strict=True)))
            rows.append([robot.get_observation()[k] for k in OBS_NAMES])
        robot.disconnect()
        return np.array(rows)

    a, b = trajectory(3), trajectory(3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, trajectory(4))


def test_realtime_physics_moves_with_wall_clock_time(tmp_path):
    robot = make_sim(tmp_path, realtime=True)
    robot.connect()
    try:
        x0 = robot.get_observation()["x.pos"]
        goal = -0.1 if x0 > 0 else 0.1
        robot.send_action({"x.pos": goal})  # one target, then the controller "stalls"
        time.sleep(0.15)
        x1 = robot.get_observation()["x.pos"]
        time.sleep(0.15)
        x2 = robot.get_observation()["x.pos"]
        assert abs(x1 - x0) > 1e-3 and abs(x2 - goal) < abs(x1 - goal), (x0, x1, x2, goal)
        time.sleep(1.5)
        assert abs(robot.get_observation()["x.pos"] - goal) < 5e-3  # near the last target, still settling
        assert robot.episode_steps == 1
    finally:
        robot.disconnect()


def test_episode_status_on_a_scripted_success_and_a_grasp_far_from_the_cube(tmp_path):
    robot = make_sim(tmp_path)
    robot.connect()
    try:
        assert robot.episode_status() is None
        assert run_expert(robot) == "success" and not robot.episode_truncated
        robot.reset_scene()
        assert robot.episode_status() is None and robot.get_observation()["gripper.pos"] == 100.0
        for _ in range(5):  # close where the arm stands: the start is >= min_start_distance from the cube
            robot.send_action({"gripper.pos": 0.0})
        obs = robot.get_observation()
        assert obs["gripper.pos"] <= GRASP_THRESHOLD
        assert robot.episode_status() == "failure" and not robot.episode_truncated
        robot.send_action({"gripper.pos": 100.0})  # the status stays until the next reset
        assert robot.episode_status() == "failure"
    finally:
        robot.disconnect()


def test_grasp_while_moving_fails(tmp_path):
    robot = make_sim(tmp_path)
    robot.connect()
    try:
        state, cube = state_of(robot.get_observation())
        while np.hypot(*(cube - state[:2])) > 0.03:  # head for the cube at full speed...
            robot.send_action({"x.pos": cube[0], "y.pos": cube[1]})
            state, _ = state_of(robot.get_observation())
        for _ in range(5):  # ...and close without braking
            robot.send_action({"x.pos": cube[0], "y.pos": cube[1], "gripper.pos": 0.0})
        assert robot.episode_status() == "failure"
    finally:
        robot.disconnect()


def test_step_limit_truncates(tmp_path):
    robot = make_sim(tmp_path, max_episode_steps=5)
    robot.connect()
    try:
        for i in range(5):
            assert robot.episode_status() is None, i
            robot.send_action({})
        assert robot.episode_status() == "failure" and robot.episode_truncated and robot.episode_steps == 5
        robot.reset_scene()
        assert robot.episode_status() is None and robot.episode_steps == 0
    finally:
        robot.disconnect()


def test_disable_torque_lets_the_arm_coast_and_enable_holds_the_pose(tmp_path):
    robot = make_sim(tmp_path)
    robot.connect()
    try:
        x0 = robot.get_observation()["x.pos"]
        goal = -0.15 if x0 > 0 else 0.15
        for _ in range(5):
            robot.send_action({"x.pos": goal})
        assert abs(robot.get_observation()["x.vel"]) > 0.2  # moving fast
        robot.disable_torque()
        assert not robot.torque_enabled
        for _ in range(20):
            robot.send_action({"x.pos": goal})  # ignored with the torque off
        obs = robot.get_observation()
        assert abs(obs["x.vel"]) < 1e-3  # the rails' damping stopped it...
        assert abs(obs["x.pos"] - goal) > 0.05  # ...short of the target
        robot.enable_torque()
        assert robot.torque_enabled and robot.targets()["x.pos"] == pytest.approx(obs["x.pos"])
        for _ in range(10):
            robot.send_action({})
        assert robot.get_observation()["x.pos"] == pytest.approx(obs["x.pos"], abs=1e-3)  # held, no jump
    finally:
        robot.disconnect()


def test_reset_scene_seed(tmp_path):
    robot = make_sim(tmp_path)
    robot.connect()
    try:
        robot.reset_scene(seed=11)
        a = robot.get_observation()
        robot.reset_scene(seed=12)
        b = robot.get_observation()
        robot.reset_scene(seed=11)
        assert robot.get_observation() == a and a != b
        cube = np.array([a["cube.x"], a["cube.y"]])
        ee = np.array([a["x.pos"], a["y.pos"]])
        params = robot.params
        assert np.all(np.abs(cube) <= params.cube_range) and np.hypot(*(cube - ee)) >= params.min_start_distance
    finally:
        robot.disconnect()


@pytest.mark.slow
def test_plugin_discovery_and_clean_exit_in_a_fresh_interpreter(tmp_path):
    """LeRobot's register_third_party_plugins() finds the distribution; a realtime robot with a camera left
    connected at exit shuts down without an error."""
    import subprocess
    import sys

    code = f"""
from pathlib import Path
from lerobot.utils.import_utils import register_third_party_plugins
from lerobot.robots import RobotConfig
from lerobot.robots.utils import make_robot_from_config
from lerobot.teleoperators import TeleoperatorConfig
register_third_party_plugins()
cfg = RobotConfig.get_choice_class("pirl_sim")(id="exit", calibration_dir=Path({str(tmp_path)!r}))
TeleoperatorConfig.get_choice_class("pirl_sim_expert")
TeleoperatorConfig.get_choice_class("pirl_sim_keyboard")
robot = make_robot_from_config(cfg)
robot.connect()
robot.send_action({{"x.pos": 0.1}})
print("OK", robot.get_observation()["front"].shape)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "OK (64, 64, 3)" in run.stdout
    tail = run.stderr.split("Falling back to 'pyav'")[-1]  # LeRobot's torchcodec notice is not ours
    assert "Traceback" not in tail and "Exception" not in tail, tail[-3000:]
