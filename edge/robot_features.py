"""A LeRobot robot's features, mapped to the ``pi_rl`` policy's inputs and outputs.

The mapping is the one ``lerobot-record`` / ``lerobot-rollout`` use (``hw_to_dataset_features``): the
robot's float observations become ``observation.state`` (in the robot's order, with their names), each
camera ``(H, W, 3)`` becomes ``observation.images.<camera>``, the float actions become ``action``. So a
dataset recorded with ``lerobot-record`` SFTs a policy that the edge then drives the same robot with.

One addition: a robot may name some of its float observations as the *environment's* state
(``environment_state_features``: an object's pose from a perception module, or from the simulator of
``lerobot_robot_pirl_sim``); those become ``observation.environment_state``, the way LeRobot's gym-hil
and PushT datasets carry an object's pose, instead of being mixed into the robot's own state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGES, OBS_STATE, OBS_STR
from lerobot.utils.feature_utils import hw_to_dataset_features

log = logging.getLogger(__name__)


class FeatureMismatchError(ValueError):
    """The robot does not provide what the policy reads or writes (named in the message)."""


@dataclass
class RobotIO:
    """How one robot's observation / action dicts become policy inputs and dataset frames, and back."""

    state_names: list[str]  # robot observation floats -> observation.state, in this order
    env_state_names: list[str]  # robot observation floats -> observation.environment_state
    cameras: dict[str, tuple[int, int, int]]  # camera name -> (H, W, C) as get_observation returns it
    action_names: list[str]  # action vector order <-> send_action dict keys

    @classmethod
    def of(cls, robot) -> RobotIO:
        obs = robot.observation_features
        env = [k for k in getattr(robot, "environment_state_features", ()) if k in obs]
        missing = [k for k in getattr(robot, "environment_state_features", ()) if k not in obs]
        if missing:
            raise FeatureMismatchError(
                f"robot {robot.name}: environment_state_features names {missing}, which are not observation features"
            )
        state = [k for k, v in obs.items() if v is float and k not in env]
        cams = {k: tuple(v) for k, v in obs.items() if isinstance(v, tuple)}
        actions = [k for k, v in robot.action_features.items() if v is float]
        return cls(state, env, cams, actions)

    def dataset_features(self, use_videos: bool) -> dict[str, dict]:
        """LeRobot dataset features of what this robot observes and does (``hw_to_dataset_features``)."""
        feats = hw_to_dataset_features(dict.fromkeys(self.action_names, float), ACTION, use_videos)
        hw_obs: dict = dict.fromkeys(self.state_names, float)
        hw_obs.update(self.cameras)
        feats.update(hw_to_dataset_features(hw_obs, OBS_STR, use_videos))
        if self.env_state_names:
            feats[OBS_ENV_STATE] = {
                "dtype": "float32",
                "shape": (len(self.env_state_names),),
                "names": list(self.env_state_names),
            }
        return feats

    def policy_input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The policy inputs this robot can feed, as the policy config shapes them (images C, H, W)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.state_names:
            shapes[OBS_STATE] = (len(self.state_names),)
        if self.env_state_names:
            shapes[OBS_ENV_STATE] = (len(self.env_state_names),)
        for cam, (h, w, c) in self.cameras.items():
            shapes[f"{OBS_IMAGES}.{cam}"] = (c, h, w)
        return shapes

    # --- per tick -------------------------------------------------------------------------------

    def raw_observation(self, obs: dict) -> dict:
        """A robot observation as a one-env batch of LeRobot's raw env keys (``agent_pos``,
        ``environment_state``, ``pixels``), which ``PolicyRunner.observe`` maps to the policy's inputs."""
        raw: dict = {}
        if self.state_names:
            raw["agent_pos"] = np.asarray([[obs[k] for k in self.state_names]], np.float32)
        if self.env_state_names:
            raw["environment_state"] = np.asarray([[obs[k] for k in self.env_state_names]], np.float32)
        if self.cameras:
            raw["pixels"] = {cam: np.asarray(obs[cam])[None] for cam in self.cameras}
        return raw

    def frame(self, obs: dict) -> dict[str, np.ndarray]:
        """The observation part of a dataset frame (what ``build_dataset_frame`` builds in lerobot-record)."""
        out: dict[str, np.ndarray] = {}
        if self.state_names:
            out[OBS_STATE] = np.asarray([obs[k] for k in self.state_names], np.float32)
        if self.env_state_names:
            out[OBS_ENV_STATE] = np.asarray([obs[k] for k in self.env_state_names], np.float32)
        for cam in self.cameras:
            out[f"{OBS_IMAGES}.{cam}"] = np.asarray(obs[cam])
        return out

    def action_dict(self, action: np.ndarray) -> dict[str, float]:
        return {k: float(v) for k, v in zip(self.action_names, action, strict=True)}

    def action_vector(self, action: dict) -> np.ndarray:
        return np.asarray([action[k] for k in self.action_names], np.float32)

    def positions(self, obs: dict) -> np.ndarray | None:
        """The robot's present value of each action (``<joint>.pos`` actions read back from the
        observation): what "hold" commands. None when the robot does not report them."""
        if not all(k in obs for k in self.action_names):
            return None
        return np.asarray([obs[k] for k in self.action_names], np.float32)


def check_policy_fits(policy_config, io: RobotIO, robot_type: str, trained_names: dict | None = None) -> None:
    """Stop at start-up, naming the feature, when the robot cannot feed the policy or take its actions.

    ``trained_names``: feature -> names of the dataset the policy was trained on (when known); the
    robot's state and action names must then match them in order, not only in number."""
    can_feed = io.policy_input_shapes()
    for key, ft in (policy_config.input_features or {}).items():
        if key not in can_feed:
            what = "camera" if key.startswith(OBS_IMAGES) else "feature"
            raise FeatureMismatchError(
                f"the policy reads {key} {tuple(ft.shape)}, but robot {robot_type} has no such {what} "
                f"(it provides {sorted(can_feed)})"
            )
        if tuple(ft.shape) != can_feed[key]:
            raise FeatureMismatchError(
                f"the policy reads {key} with shape {tuple(ft.shape)}, robot {robot_type} provides {can_feed[key]}"
            )
    action_dim = policy_config.action_feature.shape[0]
    if action_dim != len(io.action_names):
        raise FeatureMismatchError(
            f"the policy writes {ACTION} with {action_dim} dims, robot {robot_type} takes {len(io.action_names)} "
            f"({io.action_names})"
        )
    checked = {ACTION: io.action_names, OBS_STATE: io.state_names, OBS_ENV_STATE: io.env_state_names}
    inputs = policy_config.input_features or {}
    for key, robot_names in checked.items():
        names = (trained_names or {}).get(key)
        if names is None or (key != ACTION and key not in inputs):
            continue
        if list(names) != list(robot_names):
            raise FeatureMismatchError(
                f"{key}: the policy was trained on names {list(names)}, robot {robot_type} has {list(robot_names)}"
            )


def trained_feature_names(pretrained_dir: str | Path) -> dict[str, list[str]] | None:
    """Feature names of the dataset a LeRobot checkpoint was trained on, when that dataset's metadata
    is on this machine (``train_config.json`` -> ``dataset.root`` -> ``meta/info.json``); None otherwise
    (the edge then checks dimensions only, and says so)."""
    train_cfg = Path(pretrained_dir) / "train_config.json"
    try:
        root = json.loads(train_cfg.read_text())["dataset"]["root"]
        info = json.loads((Path(root) / "meta" / "info.json").read_text())
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return {k: list(v["names"]) for k, v in info.get("features", {}).items() if isinstance(v.get("names"), list)}
