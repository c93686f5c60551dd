"""Config of the terminal keyboard teleoperator ``pirl_sim_keyboard``."""

from __future__ import annotations

from dataclasses import dataclass

from lerobot.teleoperators import TeleoperatorConfig

__all__ = ["PirlSimKeyboardConfig"]


@TeleoperatorConfig.register_subclass("pirl_sim_keyboard")
@dataclass(kw_only=True)
class PirlSimKeyboardConfig(TeleoperatorConfig):
    """Drive a ``pirl_sim`` robot from a terminal (over SSH, no display needed). Give it the robot's ``id`` to
    start from the robot's current targets and to let `h` hold the present pose."""

    # target change per key press, metres (W / A / S / D move five times as far)
    step_m: float = 0.01
    # file descriptor keys are read from; None: standard input (put in cbreak mode while connected if a TTY)
    input_fd: int | None = None

    def __post_init__(self) -> None:
        if self.step_m <= 0:
            raise ValueError(f"step_m: must be > 0, got {self.step_m}")
