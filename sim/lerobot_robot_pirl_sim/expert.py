"""The scripted expert: what a competent operator sends to the simulated gantry.

Shared by the expert teleoperator (:mod:`.pirl_sim_expert`, one robot) and by demo recording
(:mod:`.demos`, a batch of vec envs), so recorded demonstrations and teleoperated episodes are the same
behaviour.
"""

from __future__ import annotations

import numpy as np

from lerobot_robot_pirl_sim.physics import WORKSPACE, TaskParams

__all__ = ["DEFAULT_CLOSE_MARGIN", "scripted_expert"]

_DEFAULTS = TaskParams()
DEFAULT_CLOSE_MARGIN = 0.5


def scripted_expert(
    agent_pos: np.ndarray,
    environment_state: np.ndarray,
    rng: np.random.Generator | None = None,
    noise_std: float = 0.0,
    *,
    success_radius: float = _DEFAULTS.success_radius,
    max_speed_at_grasp: float = _DEFAULTS.max_speed_at_grasp,
    close_margin: float = DEFAULT_CLOSE_MARGIN,
) -> np.ndarray:
    """Actions float32 [N, 3] (x.pos m, y.pos m, gripper.pos %) from ``agent_pos`` [N, 5] and
    ``environment_state`` [N, 2] (the vec env's arrays; 1-D rows are accepted for one robot).

    Move: the x / y targets are the cube's position (the servos bring the end-effector there and brake).
    Settle, then close: the gripper target drops from 100 % to 0 % once the end-effector is within
    ``close_margin`` times the success radius and slower than ``close_margin`` times the allowed grasp speed
    (the arm keeps braking during the steps the fingers take to close, so margins up to about 1.5 still
    succeed; smaller ones wait longer, leaving a policy that imitates the expert more room for early closes). Gaussian noise of std ``noise_std`` times each action's half-range (0.2 m for
    x / y, 50 % for the gripper: the scale of the built-in task's expert noise on its [-1, 1] actions) is
    added, then actions are clipped to the robot's ranges. ``success_radius`` / ``max_speed_at_grasp``
    must be the task's (the defaults are).
    """
    state = np.asarray(agent_pos, dtype=np.float64).reshape(-1, 5)
    cube = np.asarray(environment_state, dtype=np.float64).reshape(-1, 2)
    err = cube - state[:, 0:2]
    dist = np.sqrt(err[:, 0] ** 2 + err[:, 1] ** 2)
    speed = np.sqrt(state[:, 2] ** 2 + state[:, 3] ** 2)
    close = (dist < close_margin * success_radius) & (speed < close_margin * max_speed_at_grasp)
    act = np.concatenate([cube, np.where(close, 0.0, 100.0)[:, None]], axis=1)
    if noise_std > 0.0:
        if rng is None:
            raise ValueError("scripted_expert needs an rng when noise_std > 0")
        act += noise_std * rng.standard_normal(act.shape) * np.array([WORKSPACE, WORKSPACE, 50.0])
    low, high = _DEFAULTS.action_low, _DEFAULTS.action_high
    return np.clip(act, low, high).astype(np.float32)
