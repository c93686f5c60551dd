"""Built-in CPU task(s) and a batched env interface for PI-RL rollouts.

Importing this package registers the gymnasium ids ``pirl/ReachGrasp-v0`` and ``pirl/MetaWorldState-v3``
(``envs/metaworld.py``: MetaWorld on its full state) and the LeRobot env type ``pirl_reach``
(``--env.type=pirl_reach``).

Vector-env protocol, implemented by :class:`ReachGraspVecEnv` (numpy-batched built-in task) and
:class:`GymVecAdapter` (any gymnasium env with a Box action space):

Attributes
    ``num_envs`` (int), ``action_dim`` (int), ``state_dim`` (int, width of ``agent_pos``),
    ``max_steps`` (int | None, episode step limit), ``obs_type`` (``"state"`` or
    ``"pixels_agent_pos"``), ``action_low`` / ``action_high`` (float32 [action_dim]),
    ``task_description`` (str).
``reset(seed=None | int | sequence, options=None) -> (obs, info)``
    ``seed=s``: env ``i`` gets seed ``s + i``; a sequence gives env ``i`` seed ``seed[i]`` (equal seeds
    give identical start states); ``None`` continues each env's generator.
    ``options["reset_mask"]`` (bool [num_envs]) resets only some envs.
``step(actions [num_envs, action_dim], active=None) -> (obs, reward, terminated, truncated, info)``
    ``reward`` float32 [N], ``terminated`` / ``truncated`` bool [N]. Envs with ``active[i] == False``
    are frozen (state unchanged, reward 0, not done). Same-step autoreset: a finished env is reset in
    the same call, ``obs`` holds its new first observation and ``info["final_obs"]`` (full batch,
    rows valid where ``info["done"]``) the terminal one. ``info["is_success"]`` bool [N].
``obs``
    dict of numpy arrays with a leading ``num_envs`` axis: ``"agent_pos"`` float32 [N, state_dim] and,
    for ``obs_type="pixels_agent_pos"``, ``"pixels"`` uint8 [N, H, W, 3] (LeRobot's raw env keys).
``close()``
"""

from __future__ import annotations

from typing import Any

from lerobot_policy_pi_rl.envs.configs import PiRLReachEnvConfig
from lerobot_policy_pi_rl.envs.gym_adapter import AsyncGymVecEnv, GymVecAdapter
from lerobot_policy_pi_rl.envs.lerobot_env import LeRobotVecEnv
from lerobot_policy_pi_rl.envs.metaworld import register_gym_env as _register_metaworld
from lerobot_policy_pi_rl.envs.reach_grasp import (
    GYM_ID,
    TASK_DESCRIPTION,
    ReachGraspEnv,
    ReachGraspVecEnv,
    register_gym_envs,
    scripted_expert,
)

__all__ = [
    "GYM_ID",
    "TASK_DESCRIPTION",
    "AsyncGymVecEnv",
    "GymVecAdapter",
    "LeRobotVecEnv",
    "PiRLReachEnvConfig",
    "ReachGraspEnv",
    "ReachGraspVecEnv",
    "builtin_obs_kwargs",
    "known_vec_env",
    "make_vec_env",
    "open_sim_env",
    "register_vec_env",
    "require_known_env",
    "scripted_expert",
    "sim_env_kwargs",
]

BUILTIN_NAMES = ("pirl_reach", GYM_ID)

# vector envs other packages provide under a short name (e.g. the simulated robot's task, registered
# by ``lerobot_robot_pirl_sim`` when it is imported): name -> factory(num_envs, **kwargs)
_VEC_ENVS: dict[str, Any] = {}

register_gym_envs()
_register_metaworld()  # pirl/MetaWorldState-v3 (MetaWorld is imported only when one is made)


def builtin_obs_kwargs(policy_config) -> dict[str, Any]:
    """The built-in task's observation settings for a policy: ``pixels_agent_pos`` at the side of
    its image feature when it reads images (the VLA backbones do), else ``state``."""
    images = list(policy_config.image_features.values())
    if not images:
        return {"obs_type": "state"}
    side = images[0].shape[-1]
    if len(images) > 1 or images[0].shape != (3, side, side):
        raise ValueError(
            f"the built-in task renders one square RGB camera; the policy reads "
            f"{ {k: tuple(v.shape) for k, v in policy_config.image_features.items()} }"
        )
    return {"obs_type": "pixels_agent_pos", "image_size": side}


def sim_env_kwargs(
    target: Any,
    policy_config=None,
    success_key: str = "is_success",
    extra: dict[str, Any] | None = None,
    async_envs: bool = False,
) -> dict[str, Any]:
    """What :func:`make_vec_env` is given besides the name for a policy: the built-in task observed the way
    the policy reads (``builtin_obs_kwargs``); a registered vector env nothing (its factory decides); a
    gymnasium id or a LeRobot ``EnvConfig`` the info key it reports success under. ``extra`` (a user's env
    kwargs: ``gymnasium.make`` arguments, a factory's or the built-in task's constructor arguments) is added
    on top; a LeRobot ``EnvConfig`` takes none (its fields are its arguments). ``async_envs`` runs a gymnasium
    id's or an ``EnvConfig``'s envs in subprocesses."""
    from lerobot.envs.configs import EnvConfig

    if extra and isinstance(target, EnvConfig):
        raise ValueError(
            f"env kwargs {sorted(extra)} apply to a gymnasium id or a registered env; env.type={target.type} takes "
            "its arguments as --env.<field>"
        )
    own = isinstance(target, str) and (target in BUILTIN_NAMES or target in _VEC_ENVS)
    if async_envs and own:
        raise ValueError(
            f"async envs: {target!r} runs its envs its own way; subprocesses are for a gymnasium id or an env type"
        )
    if isinstance(target, str) and target in BUILTIN_NAMES:
        base = builtin_obs_kwargs(policy_config) if policy_config is not None else {}
    elif own:
        base = {}
    else:
        base = {"success_key": success_key, **({"use_async": True} if async_envs else {})}
    return {**base, **(extra or {})}


def open_sim_env(target: Any, num_envs: int, field_name: str, **kwargs: Any) -> Any:
    """:func:`make_vec_env` for a tool's start-up: an env that cannot be built (a gymnasium id missing its
    arguments, a package that is not installed, an argument the env does not take) is a ValueError naming
    ``field_name`` and the cause, not a traceback."""
    import gymnasium as gym

    try:
        return make_vec_env(target, num_envs, **kwargs)
    except (TypeError, ValueError, ImportError, AttributeError, gym.error.Error) as e:
        hint = (
            ""
            if not isinstance(target, str) or target in BUILTIN_NAMES
            else "; gymnasium.make arguments go in the env kwargs (e.g. --control.env_kwargs='{env_name: reach-v3}')"
        )
        raise ValueError(f"{field_name}: the env could not be built: {type(e).__name__}: {e}{hint}") from e


def register_vec_env(name: str, factory: Any) -> None:
    """Make ``make_vec_env(name, num_envs, **kwargs)`` call ``factory(num_envs, **kwargs)``; the factory
    returns an env of the vector-env protocol above."""
    if name in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is the built-in task's name")
    _VEC_ENVS[name] = factory


def known_vec_env(name_or_gym_id: Any) -> bool:
    """Whether :func:`make_vec_env` can build ``name_or_gym_id`` (built-in, registered, a gymnasium id, a
    gymnasium ``module:id`` whose module registers the id when imported, or a LeRobot ``EnvConfig``)."""
    import importlib

    import gymnasium as gym
    from lerobot.envs.configs import EnvConfig

    if isinstance(name_or_gym_id, EnvConfig):
        return True
    if name_or_gym_id in BUILTIN_NAMES or name_or_gym_id in _VEC_ENVS or name_or_gym_id in gym.registry:
        return True
    module, sep, gym_id = str(name_or_gym_id).partition(":")
    if not sep:
        return False
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return gym_id in gym.registry


def require_known_env(target: Any, field_name: str, what_else: str = "") -> None:
    """ValueError naming ``field_name`` when :func:`make_vec_env` cannot build ``target``, listing the accepted
    forms (``what_else``: the tool's own alternative, appended)."""
    if not known_vec_env(target):
        raise ValueError(
            f"{field_name}: unknown env {target!r} (the built-in 'pirl_reach', an env an installed plugin registers "
            "such as 'pirl_sim', a gymnasium id, or 'module:id' for an id a package registers when imported, e.g. "
            f"'metaworld:Meta-World/MT1'; a LeRobot env type is --env.type=...){what_else}"
        )


def make_vec_env(name_or_gym_id: Any, num_envs: int, **kwargs: Any) -> Any:
    """Build a batched env: ``"pirl_reach"`` (or ``"pirl/ReachGrasp-v0"``) gives
    :class:`ReachGraspVecEnv` (``kwargs`` are its constructor arguments); a name given to
    :func:`register_vec_env` calls its factory; a LeRobot ``EnvConfig`` (``--env.type=...``) gives
    :class:`LeRobotVecEnv` (``kwargs``: ``autoreset``, ``success_key``, ``use_async``, ``seed``); anything
    else is a gymnasium id wrapped in :class:`GymVecAdapter` (``kwargs``: ``seed``, ``autoreset``,
    ``success_key``, ``check_seed`` and ``gymnasium.make`` arguments), or with ``use_async=True`` run in
    subprocesses by :class:`AsyncGymVecEnv`."""
    from lerobot.envs.configs import EnvConfig

    if isinstance(name_or_gym_id, EnvConfig):
        return LeRobotVecEnv(name_or_gym_id, num_envs, **kwargs)
    if name_or_gym_id in BUILTIN_NAMES:
        return ReachGraspVecEnv(num_envs, **kwargs)
    use_async = kwargs.pop("use_async", False)
    if name_or_gym_id in _VEC_ENVS:
        if use_async:
            raise ValueError(
                f"{name_or_gym_id!r} is a registered vector env: it runs its envs its own way (no use_async)"
            )
        return _VEC_ENVS[name_or_gym_id](num_envs, **kwargs)
    if use_async:
        kwargs.pop("check_seed", None)
        return AsyncGymVecEnv(name_or_gym_id, num_envs, **kwargs)
    return GymVecAdapter(name_or_gym_id, num_envs, **kwargs)
