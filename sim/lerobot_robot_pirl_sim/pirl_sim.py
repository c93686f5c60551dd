"""``PirlSim``: a LeRobot ``Robot`` whose hardware is a MuJoCo simulation of a gantry reach-and-grasp cell.

It behaves like a LeRobot arm: ``send_action`` takes absolute position targets (``x.pos``, ``y.pos`` in metres,
``gripper.pos`` in percent), clips them to the joint ranges and returns what it sent; ``get_observation``
returns the joints' positions and velocities, the cube's position (the environment's state, what a perception
module would report on a real cell) and one image per camera, without waiting.

Two clocks (``PirlSimConfig.realtime``):

- realtime (default): a physics thread advances the simulation with wall-clock time, as hardware moves on its
  own; if the controller stalls, the arm keeps following its last target;
- lock-step: each ``send_action`` advances exactly ``1 / control_hz`` seconds, so a run is deterministic and
  steps exactly like :class:`~lerobot_robot_pirl_sim.vec_env.PirlSimVecEnv` (same seed, same actions, same
  observations).

Episodes: closing the gripper ends one; ``episode_status()`` then reports ``"success"`` or ``"failure"``
(see :mod:`.physics`), as does reaching ``max_episode_steps`` actions (a truncation, ``episode_truncated``).
``reset_scene()`` is what a person does between episodes (a new cube position, the gripper opened; the arm
is put at a random start pose as the vec env's reset does).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import cached_property

import mujoco
import numpy as np
from lerobot.robots import Robot
from lerobot.utils.decorators import check_if_already_connected, check_if_not_connected
from lerobot.utils.errors import DeviceNotConnectedError

from lerobot_robot_pirl_sim import registry
from lerobot_robot_pirl_sim.config_pirl_sim import PirlSimConfig
from lerobot_robot_pirl_sim.physics import ACTION_NAMES, ENV_STATE_NAMES, OBS_NAMES, SimModel
from lerobot_robot_pirl_sim.pirl_sim_camera import PirlSimCamera

__all__ = ["PirlSim", "PirlSimCamera"]  # PirlSimCamera: where LeRobot's factory looks for the camera config's class

logger = logging.getLogger(__name__)

MAX_CATCH_UP_S = 0.1  # realtime mode: after a longer stall of the process the simulation skips the rest


class PirlSim(Robot):
    """The simulated gantry robot (``--robot.type=pirl_sim``)."""

    config_class = PirlSimConfig
    name = "pirl_sim"
    # observation entries that are the environment's state, not the robot's: the edge maps them to
    # `observation.environment_state` (the rest of the floats to `observation.state`)
    environment_state_features = ENV_STATE_NAMES

    def __init__(self, config: PirlSimConfig):
        super().__init__(config)
        self.config = config
        self.params = config.task_params()
        self.cameras = {key: PirlSimCamera(cam) for key, cam in config.cameras.items()}
        self._lock = threading.RLock()  # guards the MjData, the targets and the episode state
        self._sim: SimModel | None = None
        self._data: mujoco.MjData | None = None
        self._rng = np.random.default_rng(config.seed)
        self._targets = np.zeros(3)
        self._obs = np.zeros(len(OBS_NAMES))
        self._status: str | None = None
        self._truncated = False
        self._steps = 0
        self._stop = threading.Event()
        self._physics: threading.Thread | None = None
        self._physics_error: BaseException | None = None
        self.operator = None  # the scripted person (config.operator_port), while connected

    # ------------------------------------------------------------------ features
    @cached_property
    def observation_features(self) -> dict[str, type | tuple]:
        cams = {key: (cam.height, cam.width, 3) for key, cam in self.config.cameras.items()}
        return {**dict.fromkeys(OBS_NAMES, float), **cams}

    @cached_property
    def action_features(self) -> dict[str, type]:
        return dict.fromkeys(ACTION_NAMES, float)

    # ------------------------------------------------------------------ connection
    @property
    def is_connected(self) -> bool:
        return self._sim is not None

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        """Nothing to calibrate: the simulated joints read their true positions."""

    def configure(self) -> None:
        """Nothing to configure: the servo gains are part of the model."""

    @property
    def model(self) -> mujoco.MjModel:
        """The compiled scene (the cameras render it)."""
        if self._sim is None:
            raise DeviceNotConnectedError(f"{self} is not connected. Run `.connect()` first.")
        return self._sim.model

    @check_if_already_connected
    def connect(self, calibrate: bool = True) -> None:
        """Build the scene, reset it (``config.seed``), start the physics thread (realtime) and the cameras."""
        cams = {cam.camera: (cam.width, cam.height) for cam in self.config.cameras.values()}
        registry.add(self)
        try:
            self._sim = SimModel(self.params, cams)
            self._data = self._sim.make_data()
            self._rng = np.random.default_rng(self.config.seed)
            self.reset_scene()
            if self.config.realtime:
                self._stop.clear()
                self._physics_error = None
                self._physics = threading.Thread(target=self._physics_loop, name=f"pirl_sim-physics-{self.id}")
                self._physics.daemon = True  # stopped by disconnect(), or at exit by the registry
                self._physics.start()
            for cam in self.cameras.values():
                cam.attach(self)
                cam.connect()
            if self.config.operator_port is not None:
                from lerobot_robot_pirl_sim.operator import SceneView, ScriptedOperator, http_operator_interface

                status, send = http_operator_interface(self.config.operator_port)
                self.operator = ScriptedOperator(SceneView(self), status, send, self.config.operator_settings())
                self.operator.start()
        except BaseException:
            self._shutdown()
            raise
        logger.info(f"{self} connected ({'realtime' if self.config.realtime else 'lock-step'}).")

    def _shutdown(self) -> None:
        if self.operator is not None:
            self.operator.stop()
            self.operator = None
        self._stop.set()
        if self._physics is not None and self._physics is not threading.current_thread():
            self._physics.join(timeout=10.0)
        self._physics = None
        for cam in self.cameras.values():
            if cam.is_connected:
                cam.disconnect()
        self._sim = None
        self._data = None
        registry.remove(self)

    @check_if_not_connected
    def disconnect(self) -> None:
        """Stop the physics and render threads (the renderers free their GL contexts)."""
        self._shutdown()
        logger.info(f"{self} disconnected.")

    # ------------------------------------------------------------------ physics
    def _physics_loop(self) -> None:
        """Realtime mode: every physics timestep of wall-clock time, advance the simulation by the time elapsed."""
        timestep = self.params.timestep
        last = time.monotonic()
        owed = 0.0  # simulated seconds due
        try:
            while not self._stop.wait(timestep):
                now = time.monotonic()
                owed = min(owed + now - last, MAX_CATCH_UP_S)
                last = now
                n = int(owed / timestep)
                if n:
                    owed -= n * timestep
                    with self._lock:
                        self._sim.step(self._data, n)
                        self._after_physics()
        except BaseException as e:  # reported by the next call into the robot
            self._physics_error = e
            logger.exception(f"{self}: the physics thread stopped")

    def _after_physics(self) -> None:
        """Read the new state and judge a grasp (call with the lock held)."""
        self._sim.observe(self._data, out=self._obs)
        if self._status is None:
            closed, success = self._sim.judge(self._obs)
            if closed:
                self._status = "success" if success else "failure"

    def _check_physics(self) -> None:
        if self._physics_error is not None:
            raise RuntimeError(f"{self}: the physics thread stopped: {self._physics_error!r}")

    def copy_state(self, data: mujoco.MjData) -> None:
        """Copy the current scene state into ``data`` (a camera's own MjData; same model)."""
        with self._lock:
            src = self._data
            if src is None:
                return
            data.time = src.time
            data.qpos[:] = src.qpos
            data.qvel[:] = src.qvel
            data.mocap_pos[:] = src.mocap_pos
            data.mocap_quat[:] = src.mocap_quat

    # ------------------------------------------------------------------ LeRobot API
    @check_if_not_connected
    def get_observation(self) -> dict:
        """Floats in the units of :mod:`.physics` and one ``(H, W, 3)`` uint8 frame per camera (the latest
        rendered one: no waiting, like LeRobot's cameras' latest-frame reads)."""
        self._check_physics()
        with self._lock:
            values = self._sim.observe(self._data, out=self._obs).tolist()
        obs = dict(zip(OBS_NAMES, values, strict=True))
        for key, cam in self.cameras.items():
            obs[key] = cam.latest()
        return obs

    @check_if_not_connected
    def send_action(self, action: dict) -> dict:
        """Set the position targets (keys of ``action_features``; a missing or NaN key keeps its current
        target), clipped to the joint ranges; returns the targets actually sent. In lock-step mode the physics
        then advances one control step."""
        self._check_physics()
        unknown = set(action) - set(ACTION_NAMES)
        if unknown:
            raise ValueError(f"unknown action key(s) {sorted(unknown)}; pirl_sim takes {list(ACTION_NAMES)}")
        with self._lock:
            wanted = np.array([float(action.get(k, np.nan)) for k in ACTION_NAMES])
            self._targets = self._sim.clip_action(wanted, previous=self._targets)
            self._sim.set_targets(self._data, self._targets)
            if not self.config.realtime:
                self._sim.step(self._data)
                self._after_physics()
            self._steps += 1
            limit = self.config.max_episode_steps
            if self._status is None and limit is not None and self._steps >= limit:
                self._status, self._truncated = "failure", True
            sent = self._targets.tolist()
        return dict(zip(ACTION_NAMES, sent, strict=True))

    # ------------------------------------------------------------------ episodes and safety
    def episode_status(self) -> str | None:
        """``"success"`` / ``"failure"`` once the episode ended (the gripper closed, or ``max_episode_steps``
        actions were sent), ``None`` while it runs. Stays set until :meth:`reset_scene`."""
        self._check_physics()
        with self._lock:
            return self._status

    @property
    def episode_truncated(self) -> bool:
        """The episode ended at ``max_episode_steps`` without a grasp (a time limit, not a terminal state)."""
        with self._lock:
            return self._truncated

    @property
    def episode_steps(self) -> int:
        """``send_action`` calls since the last :meth:`reset_scene`."""
        with self._lock:
            return self._steps

    @check_if_not_connected
    def reset_scene(self, seed: int | None = None) -> None:
        """Start a new episode: a new cube position, the gripper opened, the arm at rest at a random start.

        ``seed`` re-seeds the scene generator (``reset_scene(seed=s)`` starts where env 0 of
        ``PirlSimVecEnv.reset(seed=s)`` starts); ``None`` continues it."""
        with self._lock:
            if seed is not None:
                self._rng = np.random.default_rng(seed)
            ee, cube = self._sim.sample_start(self._rng)
            self._sim.reset(self._data, ee, cube)
            self._targets = self._sim.targets(self._data)
            self._sim.observe(self._data, out=self._obs)
            self._status, self._truncated, self._steps = None, False, 0

    @check_if_not_connected
    def disable_torque(self) -> None:
        """Actuators off (what an e-stop asks): the arm coasts to a stop on the rails' damping and the
        targets are ignored until :meth:`enable_torque`."""
        with self._lock:
            self._sim.set_torque(False)

    @check_if_not_connected
    def enable_torque(self) -> None:
        """Actuators on, holding the current pose (the targets become the present positions, so the arm does
        not jump to a target it was sent while the torque was off)."""
        with self._lock:
            obs = self._sim.observe(self._data, out=self._obs)
            self._targets = np.array([obs[0], obs[1], obs[4]])
            self._sim.set_targets(self._data, self._targets)
            self._sim.set_torque(True)

    @property
    def torque_enabled(self) -> bool:
        return self._sim is not None and self._sim.torque_enabled

    def targets(self) -> dict[str, float]:
        """The position targets the servos hold now (what the last ``send_action`` returned)."""
        with self._lock:
            return dict(zip(ACTION_NAMES, self._targets.tolist(), strict=True))

    def read_state(self) -> np.ndarray:
        """The current observation's floats as ``[7]`` float64 in ``OBS_NAMES`` order (no camera)."""
        with self._lock:
            if self._sim is None:
                raise DeviceNotConnectedError(f"{self} is not connected. Run `.connect()` first.")
            return self._sim.observe(self._data).copy()
