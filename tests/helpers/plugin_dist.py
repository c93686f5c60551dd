"""A third-party LeRobot robot plugin, installed for a test: a distribution named
``lerobot_robot_fakearm`` (package + ``.dist-info`` metadata, what ``pip install`` leaves on disk) in a
directory the test puts on ``PYTHONPATH``. LeRobot's ``register_third_party_plugins()`` finds it by its
distribution name, exactly as it would a plugin from PyPI.

The fake arm has the built-in task's feature names (the policies of ``tests/helpers/policy.py`` drive
it): six state floats, three actions; it integrates its commanded velocities, never judges its
episodes (they end at the time limit), and logs every ``send_action`` to a JSON-lines file.
"""

from __future__ import annotations

from pathlib import Path

NAME = "lerobot_robot_fakearm"

PACKAGE = '''
"""A fake arm for tests: a LeRobot Robot plugin (robot type ``fakearm``)."""
import json
import os
from dataclasses import dataclass

from lerobot.robots.config import RobotConfig
from lerobot.robots.robot import Robot

STATE = ["ee_x", "ee_y", "ee_vx", "ee_vy", "target_x", "target_y"]
ACTIONS = ["vx", "vy", "grip"]


@RobotConfig.register_subclass("fakearm")
@dataclass
class FakeArmConfig(RobotConfig):
    # JSON-lines log of every action sent (for the test to read)
    log_path: str | None = None


class FakeArm(Robot):
    config_class = FakeArmConfig
    name = "fakearm"

    def __init__(self, config):
        super().__init__(config)
        self.config = config
        self._connected = False
        self.p = [0.5, -0.5]
        self._log = None

    @property
    def observation_features(self):
        return dict.fromkeys(STATE, float)

    @property
    def action_features(self):
        return dict.fromkeys(ACTIONS, float)

    @property
    def is_connected(self):
        return self._connected

    def connect(self, calibrate=True):
        self._connected = True
        if self.config.log_path:
            self._log = open(self.config.log_path, "a")

    @property
    def is_calibrated(self):
        return True

    def calibrate(self):
        pass

    def configure(self):
        pass

    def get_observation(self):
        return dict(zip(STATE, [self.p[0], self.p[1], 0.0, 0.0, 0.0, 0.0]))

    def send_action(self, action):
        self.p = [self.p[0] + 0.02 * action["vx"], self.p[1] + 0.02 * action["vy"]]
        if self._log:
            self._log.write(json.dumps(action) + "\\n")
            self._log.flush()
        return action

    def disconnect(self):
        self._connected = False
        if self._log:
            self._log.close()
'''


def install_dist(root: Path, name: str, source: str) -> Path:
    """Write a one-module distribution ``name`` (package ``name`` with ``source`` as its ``__init__``, and the
    ``.dist-info`` metadata ``pip install`` leaves) under ``root``; returns the directory to put on
    ``PYTHONPATH``."""
    site = root / "site"
    (site / name).mkdir(parents=True, exist_ok=True)
    (site / name / "__init__.py").write_text(source)
    info = site / f"{name}-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "top_level.txt").write_text(name + "\n")
    return site


def install_fake_robot_plugin(root: Path) -> Path:
    """Write the ``lerobot_robot_fakearm`` distribution under ``root``; returns the directory to put on
    ``PYTHONPATH``."""
    return install_dist(root, NAME, PACKAGE)
