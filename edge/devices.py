"""LeRobot robots (their cameras, and the teleoperators people take over with) for ``pirl-edge --robot.type=...``, found the way LeRobot's own
``lerobot-record`` / ``lerobot-rollout`` find them.

Importing a LeRobot robot / camera module registers its config type in draccus' choice registry;
``register_third_party_plugins()`` imports every installed ``lerobot_robot_*`` / ``lerobot_camera_*`` /
``lerobot_teleoperator_*`` (and ``lerobot_policy_*`` / ``lerobot_env_*``) distribution, so a plugin
robot works unchanged. This must run before the command line is parsed.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


class RobotStartError(ValueError):
    """The robot could not be built or connected (no hardware, wrong port, ...): one line, exit 2."""


def register_devices() -> None:
    """Register LeRobot's robot, camera and teleoperator config types and every installed plugin."""
    # the modules lerobot-record imports for the same purpose
    from lerobot.cameras import opencv, reachy2_camera, realsense, zmq  # noqa: F401
    from lerobot.robots import (  # noqa: F401
        bi_openarm_follower,
        bi_rebot_b601_follower,
        bi_so_follower,
        earthrover_mini_plus,
        hope_jr,
        koch_follower,
        omx_follower,
        openarm_follower,
        reachy2,
        rebot_b601_follower,
        so_follower,
        unitree_g1,
    )
    from lerobot.teleoperators import (  # noqa: F401
        bi_openarm_leader,
        bi_so_leader,
        gamepad,
        homunculus,
        keyboard,
        koch_leader,
        omx_leader,
        openarm_leader,
        so_leader,
    )
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()


def given_type(config, group: str = "robot") -> str:
    """The device type as the user wrote it (LeRobot registers some configs under two names, e.g.
    so100_follower / so101_follower, and reports the first)."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg.startswith(f"--{group}.type="):
            return arg.split("=", 1)[1]
        if arg == f"--{group}.type" and i + 1 < len(args):
            return args[i + 1]
    return config.type


def build_teleop(teleop_config):
    """The teleoperator of ``teleop_config``, not connected yet."""
    from lerobot.teleoperators.utils import make_teleoperator_from_config

    kind = given_type(teleop_config, "teleop")
    try:
        return make_teleoperator_from_config(teleop_config)
    except Exception as e:  # noqa: BLE001  any failure to build it is the user's config or install
        raise RobotStartError(f"teleop.type={kind}: could not be built: {_one_line(e)}") from e


def connect_teleop(teleop, teleop_config) -> None:
    """Connect ``teleop`` (no calibration from here, as for the robot); one-line ``RobotStartError`` on failure."""
    _connect(teleop, teleop_config, "teleop")


def build_robot(robot_config):
    """The robot of ``robot_config``, not connected yet (its features are known without hardware)."""
    from lerobot.robots.utils import make_robot_from_config

    try:
        return make_robot_from_config(robot_config)
    except Exception as e:  # noqa: BLE001  any failure to build it is the user's config or install
        raise RobotStartError(f"robot.type={given_type(robot_config)}: could not be built: {_one_line(e)}") from e


def connect_robot(robot, robot_config) -> None:
    """Connect ``robot``; a failure is a ``RobotStartError`` naming the robot and what went wrong
    (LeRobot raises ConnectionError, serial errors, OSError, ...)."""
    _connect(robot, robot_config, "robot")


def _connect(device, config, group: str) -> None:
    """Connect a robot or teleoperator (``group``: its flag group), never calibrating: calibration needs a person
    at the device (lerobot-calibrate). A failure, or a device that is not calibrated, is one RobotStartError."""
    kind = given_type(config, group)
    try:
        device.connect(calibrate=False)
    except Exception as e:  # noqa: BLE001  no hardware, a wrong port, a busy bus: all reported the same way
        _disconnect_quietly(device)
        raise RobotStartError(f"{group}.type={kind}: could not connect: {_one_line(e)}") from e
    if not device.is_calibrated:
        _disconnect_quietly(device)
        raise RobotStartError(
            f"{group}.type={kind} (id {config.id!r}) is not calibrated: run lerobot-calibrate for it first"
        )


def disconnect_robot(robot) -> None:
    _disconnect_quietly(robot)


def _disconnect_quietly(device) -> None:
    try:
        if device.is_connected:
            device.disconnect()
    except Exception:  # noqa: BLE001  at shutdown: log, do not mask the real exit status
        log.exception("disconnecting %s failed", type(device).__name__)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text
