"""LeRobot env type ``pirl_reach``: the built-in reach-and-grasp task as a LeRobot ``EnvConfig``.

With this registered, ``lerobot-eval --env.type=pirl_reach ...`` and ``make_env(PiRLReachEnvConfig())``
work unchanged: LeRobot 0.6.1's ``EnvConfig.create_envs`` calls ``gym.make(self.gym_id, **self.gym_kwargs)``
for each sub-env of a ``SyncVectorEnv`` / ``AsyncVectorEnv`` (same-step autoreset), importing
``self.package_name`` first if ``gym_id`` is not yet in gymnasium's registry.

Why ``package_name`` and ``gym_id`` are overridden: by default ``package_name`` is ``"gym_{type}"``
(``gym_pirl_reach``, a module that does not exist) and ``gym_id`` is ``"{package_name}/{task}"``. Our
env lives in ``lerobot_policy_pi_rl.envs``, but that cannot be the gym namespace because gymnasium's
id regex does not allow dots in namespaces (``[\\w:-]+``). So ``package_name`` points at the real
module (importing it registers the gym id) and ``gym_id`` uses the dot-free namespace ``pirl``:
``pirl/ReachGrasp-v0``.

Observation keys follow LeRobot's conventions so ``lerobot.envs.utils.preprocess_observation`` maps them
without any env-specific processor: ``agent_pos`` -> ``observation.state``, ``pixels`` ->
``observation.image``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_STATE

from lerobot_policy_pi_rl.envs.reach_grasp import (
    DEFAULT_MAX_SPEED_AT_GRASP,
    DEFAULT_SUCCESS_RADIUS,
    GYM_NAMESPACE,
    GYM_TASK,
    OBS_TYPES,
    ReachGraspVecEnv,
    register_gym_envs,
)

__all__ = ["PiRLReachEnvConfig"]


@EnvConfig.register_subclass("pirl_reach")
@dataclass
class PiRLReachEnvConfig(EnvConfig):
    """Reach-and-grasp task (see :mod:`lerobot_policy_pi_rl.envs.reach_grasp`)."""

    task: str | None = GYM_TASK
    fps: int = 50
    episode_length: int = 60
    obs_type: str = "state"  # "state" | "pixels_agent_pos"
    image_size: int = 32
    render_size: int = 128
    success_radius: float = DEFAULT_SUCCESS_RADIUS
    max_speed_at_grasp: float = DEFAULT_MAX_SPEED_AT_GRASP
    render_mode: str = "rgb_array"
    features: dict[str, PolicyFeature] = field(
        default_factory=lambda: {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ReachGraspVecEnv.action_dim,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(ReachGraspVecEnv.state_dim,)),
        }
    )
    features_map: dict[str, str] = field(
        default_factory=lambda: {
            ACTION: ACTION,
            "agent_pos": OBS_STATE,
            "pixels": OBS_IMAGE,
        }
    )

    def __post_init__(self):
        if self.obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type must be one of {OBS_TYPES}, got {self.obs_type!r}")
        if self.obs_type == "pixels_agent_pos":
            self.features["pixels"] = PolicyFeature(
                type=FeatureType.VISUAL, shape=(self.image_size, self.image_size, 3)
            )
        else:
            self.features.pop("pixels", None)
        register_gym_envs()

    @property
    def package_name(self) -> str:
        return "lerobot_policy_pi_rl.envs"

    @property
    def gym_id(self) -> str:
        return f"{GYM_NAMESPACE}/{self.task}"

    @property
    def gym_kwargs(self) -> dict:
        return {
            "max_steps": self.episode_length,
            "obs_type": self.obs_type,
            "image_size": self.image_size,
            "render_size": self.render_size,
            "render_mode": self.render_mode,
            "success_radius": self.success_radius,
            "max_speed_at_grasp": self.max_speed_at_grasp,
            "dt": 1.0 / self.fps,
        }
