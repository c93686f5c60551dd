"""A toy env for the "any env" tests: a gymnasium env and, installed as a fake ``lerobot_env_pirltoy``
distribution, a LeRobot env type ``pirltoy`` (what a third-party ``lerobot_env_*`` plugin from PyPI is).

The env has the built-in task's widths (6 state floats, 3 actions), so the built-in task's policies drive it.
Whatever the actions, the episodes that end alternate: the 1st, 3rd, ... to end succeed at their 3rd step
(terminated, ``info[report_key]`` True); the 2nd, 4th, ... run into the 6-step limit (truncated, never a
success). An episode that is reset before it ends does not count. Success is reported under ``report_key``
(MetaWorld says ``success``, LeRobot reads ``is_success``); every ended episode is appended to ``log_path``
(JSON lines, ``{"success": bool, "steps": int}``) for the test to compare with what the edge counted.
"""

from __future__ import annotations

from pathlib import Path

from helpers.plugin_dist import install_dist

NAME = "lerobot_env_pirltoy"

PACKAGE = '''
"""A toy LeRobot env type ``pirltoy`` (a lerobot_env_* plugin for tests)."""
from dataclasses import dataclass, field

import json

import gymnasium as gym
import numpy as np
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig


class ToyEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, report_key="is_success", max_steps=6, log_path=None):
        self.report_key, self.max_steps, self.log_path = report_key, max_steps, log_path
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.observation_space = gym.spaces.Dict({"agent_pos": gym.spaces.Box(-10, 10, (6,), np.float32)})
        self.task_description = "succeed every other episode"
        self.ended = 0

    def _obs(self):
        return {"agent_pos": np.full(6, self.t / 10.0, np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        ok = self.ended % 2 == 0 and self.t >= 3
        timeout = self.t >= self.max_steps and not ok
        if ok or timeout:
            self.ended += 1
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps({"success": ok, "steps": self.t}) + "\\n")
        return self._obs(), float(ok), ok, timeout, {self.report_key: ok}


gym.register("pirltoy/Toy-v0", entry_point=ToyEnv, max_episode_steps=6)


def zero_expert(obs, env):
    """A scripted expert in pirl-sft's form (the toy succeeds whatever it is sent)."""
    return np.zeros((env.num_envs, 3), np.float32)


@EnvConfig.register_subclass("pirltoy")
@dataclass
class PirlToyEnvConfig(EnvConfig):
    task: str = "Toy-v0"
    fps: int = 50
    episode_length: int = 6
    report_key: str = "is_success"
    log_path: str | None = None
    features: dict = field(
        default_factory=lambda: {
            "action": PolicyFeature(type=FeatureType.ACTION, shape=(3,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(6,)),
        }
    )
    features_map: dict = field(default_factory=lambda: {"action": "action", "agent_pos": "observation.state"})

    @property
    def package_name(self):
        return "lerobot_env_pirltoy"

    @property
    def gym_id(self):
        return "pirltoy/" + self.task

    @property
    def gym_kwargs(self):
        return {"report_key": self.report_key, "max_steps": self.episode_length, "log_path": self.log_path}
'''


def install_toy_env_plugin(root: Path) -> Path:
    """Write the ``lerobot_env_pirltoy`` distribution under ``root``; returns the directory for ``PYTHONPATH``
    (and ``sys.path``)."""
    return install_dist(root, NAME, PACKAGE)
