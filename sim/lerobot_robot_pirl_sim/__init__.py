"""A simulated LeRobot robot backed by MuJoCo, as a LeRobot plugin (``lerobot_robot_pirl_sim``).

Importing this package registers (LeRobot's scripts import it through ``register_third_party_plugins()``):

- the robot type ``pirl_sim`` (:class:`PirlSimConfig` -> :class:`PirlSim`) and the camera type ``pirl_sim``
  (:class:`PirlSimCameraConfig` -> :class:`PirlSimCamera`);
- the teleoperator types ``pirl_sim_expert`` (scripted expert) and ``pirl_sim_keyboard`` (terminal keys);
- the vector env ``pirl_sim`` (:class:`PirlSimVecEnv`) with ``lerobot_policy_pi_rl.envs.register_vec_env``, when
  the PI-RL plugin is installed.

The task, its units and its physics are described in :mod:`lerobot_robot_pirl_sim.physics`.
"""

from lerobot_robot_pirl_sim.config_pirl_sim import PirlSimCameraConfig, PirlSimConfig
from lerobot_robot_pirl_sim.config_pirl_sim_expert import PirlSimExpertConfig
from lerobot_robot_pirl_sim.config_pirl_sim_keyboard import PirlSimKeyboardConfig
from lerobot_robot_pirl_sim.expert import scripted_expert
from lerobot_robot_pirl_sim.physics import (
    ACTION_NAMES,
    ENV_STATE_NAMES,
    OBS_NAMES,
    STATE_NAMES,
    TASK_DESCRIPTION,
    TaskParams,
)
from lerobot_robot_pirl_sim.pirl_sim import PirlSim
from lerobot_robot_pirl_sim.pirl_sim_camera import PirlSimCamera
from lerobot_robot_pirl_sim.pirl_sim_expert import PirlSimExpert
from lerobot_robot_pirl_sim.pirl_sim_keyboard import PirlSimKeyboard
from lerobot_robot_pirl_sim.vec_env import PirlSimVecEnv, register as _register_vec_env

__all__ = [
    "ACTION_NAMES",
    "ENV_STATE_NAMES",
    "OBS_NAMES",
    "STATE_NAMES",
    "TASK_DESCRIPTION",
    "PirlSim",
    "PirlSimCamera",
    "PirlSimCameraConfig",
    "PirlSimConfig",
    "PirlSimExpert",
    "PirlSimExpertConfig",
    "PirlSimKeyboard",
    "PirlSimKeyboardConfig",
    "PirlSimVecEnv",
    "TaskParams",
    "record_demos",
    "scripted_expert",
]


def record_demos(*args, **kwargs):
    """:func:`lerobot_robot_pirl_sim.demos.record_demos` (imported on use: it loads LeRobot's dataset code)."""
    from lerobot_robot_pirl_sim.demos import record_demos as _record_demos

    return _record_demos(*args, **kwargs)


_register_vec_env()
