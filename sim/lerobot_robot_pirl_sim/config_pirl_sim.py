"""Configs of the simulated robot ``pirl_sim`` and of its camera type ``pirl_sim``.

``--robot.type=pirl_sim --robot.cameras='{front: {type: pirl_sim, width: 64, height: 64, fps: 30}}'`` works
as for LeRobot's own robots once this package is imported (LeRobot's scripts import it through
``register_third_party_plugins()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.cameras import CameraConfig
from lerobot.robots import RobotConfig

from lerobot_robot_pirl_sim.physics import TaskParams
from lerobot_robot_pirl_sim.vec_env import DEFAULT_MAX_STEPS

__all__ = ["PirlSimCameraConfig", "PirlSimConfig"]

_TASK = TaskParams()
CAMERA_NAMES = ("front", "top")  # the cameras of the scene's MJCF (physics.build_mjcf)


@CameraConfig.register_subclass("pirl_sim")
@dataclass(kw_only=True)
class PirlSimCameraConfig(CameraConfig):
    """A camera of the simulated scene, rendered offscreen by MuJoCo in a thread of its own at ``fps``.
    ``width``, ``height`` and ``fps`` (from ``CameraConfig``) are required, as for every camera of a robot."""

    # the scene camera to render: `front` (oblique, from the table's front edge) or `top` (straight down)
    camera: str = "front"

    def __post_init__(self) -> None:
        if self.camera not in CAMERA_NAMES:
            raise ValueError(f"camera: the pirl_sim scene has the cameras {CAMERA_NAMES}, got {self.camera!r}")
        for name in ("width", "height", "fps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0, got {value}")


@RobotConfig.register_subclass("pirl_sim")
@dataclass(kw_only=True)
class PirlSimConfig(RobotConfig):
    """The simulated gantry robot (see ``lerobot_robot_pirl_sim.physics`` for the task and the units).

    The task fields must match the ``PirlSimVecEnv`` a policy is trained on (the defaults do)."""

    # cameras by observation key; only `pirl_sim` cameras (a real camera cannot see the simulated scene)
    cameras: dict[str, CameraConfig] = field(
        default_factory=lambda: {"front": PirlSimCameraConfig(width=64, height=64, fps=30)}
    )
    # control rate, Hz: in lock-step mode each `send_action` advances the physics by 1 / control_hz seconds;
    # the rate the controller should tick at in realtime mode (the vec env steps at this rate too)
    control_hz: float = _TASK.control_hz
    # True: the physics follows wall-clock time in a background thread, like hardware (if the controller stalls,
    # the arm keeps following its last target). False: lock-step, each `send_action` advances exactly
    # 1 / control_hz (deterministic, for tests and for comparing with the vec env)
    realtime: bool = True
    # seed of the scene generator (cube and start positions at `connect` and `reset_scene()`); None: fresh entropy
    seed: int | None = None
    # `send_action` calls per episode before `episode_status()` reports a (truncated) failure; None: no limit
    max_episode_steps: int | None = DEFAULT_MAX_STEPS
    # max end-effector / cube distance for a successful grasp, metres
    success_radius: float = _TASK.success_radius
    # max end-effector speed for a successful grasp, metres per second
    max_speed_at_grasp: float = _TASK.max_speed_at_grasp
    # cube positions are drawn uniformly in [-cube_range, cube_range]^2, metres
    cube_range: float = _TASK.cube_range
    # end-effector start positions are drawn uniformly in [-start_range, start_range]^2, metres
    start_range: float = _TASK.start_range
    # minimum start distance between end-effector and cube, metres
    min_start_distance: float = _TASK.min_start_distance
    # start a scripted person (lerobot_robot_pirl_sim.operator) that labels episodes and takes over when the policy
    # drifts, through the edge's operator HTTP port: give the edge's --safety.estop_port here (None: no one)
    operator_port: int | None = None
    # the scripted person labels episodes (success / failure); false: they only take over (e.g. a success detector
    # judges the outcomes)
    operator_labels: bool = True
    # the scripted person's reaction time: seconds of robot time between an attempt ending and the label
    operator_reaction_s: float = 0.3
    # fraction of episodes the scripted person labels the wrong way round
    operator_mislabel: float = 0.0
    # the scripted person takes over (POST /takeover; the edge's --teleop drives) when, this many seconds into an
    # episode, the gripper is still farther than operator_intervene_distance from the cube (None: never)
    operator_intervene_after_s: float | None = None
    # metres; see operator_intervene_after_s
    operator_intervene_distance: float = 0.03
    # the scripted person also takes over when the gripper starts closing while the arm still moves too fast
    operator_intervene_on_rush: bool = False
    # fraction of drifting episodes the scripted person takes over
    operator_intervene_fraction: float = 1.0
    # seed of the scripted person's choices (mislabels, which episodes they take over)
    operator_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()  # LeRobot's check: every camera needs width, height and fps
        for key, cam in self.cameras.items():
            if not isinstance(cam, PirlSimCameraConfig):
                raise ValueError(
                    f"cameras.{key}: the simulated robot renders its own cameras; use type 'pirl_sim' "
                    f"(got {cam.type!r})"
                )
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps: must be >= 1 or None, got {self.max_episode_steps}")
        self.task_params()  # checks control_hz
        if self.operator_port is not None:
            self.operator_settings()  # checks the operator_* fields

    def operator_settings(self):
        """The scripted person's settings (lerobot_robot_pirl_sim.operator.OperatorSettings)."""
        from lerobot_robot_pirl_sim.operator import OperatorSettings

        return OperatorSettings(
            labels=self.operator_labels,
            reaction_s=self.operator_reaction_s,
            grasp_radius=self.success_radius,
            grasp_speed=self.max_speed_at_grasp,
            mislabel=self.operator_mislabel,
            intervene_after_s=self.operator_intervene_after_s,
            intervene_distance=self.operator_intervene_distance,
            intervene_on_rush=self.operator_intervene_on_rush,
            intervene_fraction=self.operator_intervene_fraction,
            seed=self.operator_seed,
        )

    def task_params(self) -> TaskParams:
        return TaskParams(
            control_hz=self.control_hz,
            success_radius=self.success_radius,
            max_speed_at_grasp=self.max_speed_at_grasp,
            cube_range=self.cube_range,
            start_range=self.start_range,
            min_start_distance=self.min_start_distance,
        )
