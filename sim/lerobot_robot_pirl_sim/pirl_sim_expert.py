"""``PirlSimExpert``: a teleoperator that acts as a competent operator of a ``pirl_sim`` robot would.

It has no hardware of its own: each ``get_action()`` reads the state of the connected ``PirlSim`` with the
same ``id`` (found through :mod:`.registry`) and returns :func:`~lerobot_robot_pirl_sim.expert.scripted_expert`'s
action for it (move over the cube, settle, close), the same behaviour :func:`.demos.record_demos` records. With
it, ``lerobot-record --robot.type=pirl_sim --teleop.type=pirl_sim_expert`` records demonstrations, and a
human-in-the-loop strategy (DAgger) can take over with a scripted "person".
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from lerobot.teleoperators import Teleoperator
from lerobot.utils.decorators import check_if_already_connected, check_if_not_connected

from lerobot_robot_pirl_sim import registry
from lerobot_robot_pirl_sim.config_pirl_sim_expert import PirlSimExpertConfig
from lerobot_robot_pirl_sim.expert import scripted_expert
from lerobot_robot_pirl_sim.physics import ACTION_NAMES

__all__ = ["PirlSimExpert"]


class PirlSimExpert(Teleoperator):
    """The scripted expert (``--teleop.type=pirl_sim_expert``)."""

    config_class = PirlSimExpertConfig
    name = "pirl_sim_expert"

    def __init__(self, config: PirlSimExpertConfig):
        super().__init__(config)
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        self._connected = False

    @cached_property
    def action_features(self) -> dict[str, type]:
        return dict.fromkeys(ACTION_NAMES, float)

    @cached_property
    def feedback_features(self) -> dict[str, type]:
        return {}

    @property
    def is_connected(self) -> bool:
        return self._connected

    @check_if_already_connected
    def connect(self, calibrate: bool = True) -> None:
        # the robot is looked up at every get_action, not here: LeRobot's scripts may connect the teleoperator
        # before the robot (lerobot-teleoperate does), and a robot may reconnect
        self._rng = np.random.default_rng(self.config.seed)
        self._connected = True

    @property
    def is_calibrated(self) -> bool:
        return True

    def calibrate(self) -> None:
        """Nothing to calibrate."""

    def configure(self) -> None:
        """Nothing to configure."""

    def robot(self):
        """The connected ``PirlSim`` this expert operates (LookupError when there is none)."""
        return registry.find(self.id)

    @check_if_not_connected
    def get_action(self) -> dict[str, float]:
        robot = self.robot()
        state = robot.read_state()
        action = scripted_expert(
            state[:5],
            state[5:],
            self._rng,
            self.config.noise_std,
            success_radius=robot.params.success_radius,
            max_speed_at_grasp=robot.params.max_speed_at_grasp,
            close_margin=self.config.close_margin,
        )[0]
        return dict(zip(ACTION_NAMES, action.astype(float).tolist(), strict=True))

    def send_feedback(self, feedback: dict) -> None:
        """No feedback channel (nothing to vibrate or display)."""

    @check_if_not_connected
    def disconnect(self) -> None:
        self._connected = False
