"""Config of the scripted expert teleoperator ``pirl_sim_expert``."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.teleoperators import TeleoperatorConfig

from lerobot_robot_pirl_sim.expert import DEFAULT_CLOSE_MARGIN

__all__ = ["PirlSimExpertConfig"]


@TeleoperatorConfig.register_subclass("pirl_sim_expert")
@dataclass(kw_only=True)
class PirlSimExpertConfig(TeleoperatorConfig):
    """A scripted operator for a ``pirl_sim`` robot. Its ``id`` must be the robot's (``--teleop.id`` =
    ``--robot.id``): it reads that robot's state through the process-wide registry (``registry.py``)."""

    # std of the Gaussian noise added to each action, as a fraction of the action's half-range (0.2 m for x / y,
    # 50 percent for the gripper); 0: the noiseless expert
    noise_std: float = 0.0
    # seed of the noise generator; None: fresh entropy
    seed: int | None = None
    # close once within close_margin x the task's success radius and grasp speed (smaller: waits longer to settle)
    close_margin: float = DEFAULT_CLOSE_MARGIN

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ValueError(f"noise_std: must be >= 0, got {self.noise_std}")
        if self.close_margin <= 0:
            raise ValueError(f"close_margin: must be > 0, got {self.close_margin}")
