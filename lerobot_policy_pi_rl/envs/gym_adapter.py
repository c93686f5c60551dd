"""Any gymnasium continuous-control env behind the same batched interface as ``ReachGraspVecEnv``.

The adapter keeps ``num_envs`` independent ``gymnasium.make(env_id)`` copies and loops over them in
Python (fine for the small envs this is meant for). Observations are served in LeRobot's raw env keys:
a Dict observation space whose keys are among ``agent_pos`` / ``environment_state`` / ``pixels`` passes
through as is (batched); any other space is flattened to float32 ``{"agent_pos": [num_envs, state_dim]}``.
Actions are clipped to the Box bounds; finished envs are reset in the same ``step`` call and their terminal
observation is kept in ``info["final_obs"]``. Success is read from ``info[success_key]`` (gymnasium's
``is_success`` by default; MetaWorld reports ``success``), with a warning when an episode ends and the env
never reported that key. At construction the adapter checks that ``reset(seed=...)`` is honoured and warns
when it is not (fixed evaluation episodes and GRPO groups would not be what they claim).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from lerobot_policy_pi_rl.envs.vector import SuccessKeyWatch, reset_targets, step_inputs
from lerobot_policy_pi_rl.envs.vector_adapter import VectorEnvAdapter

__all__ = ["AsyncGymVecEnv", "GymVecAdapter"]

log = logging.getLogger(__name__)

# Dict observation keys served as they are: LeRobot's raw env keys (``preprocess_observation``)
PASSTHROUGH_KEYS = ("agent_pos", "environment_state", "pixels")


class GymVecAdapter:
    """``num_envs`` copies of a gymnasium env with a Box action space, in the vec-env protocol.

    Args:
        env_id: gymnasium id, e.g. ``"Pendulum-v1"``.
        num_envs: number of copies.
        seed: if given, the envs are reset at construction with ``seed + i``.
        autoreset: same-step autoreset (default); with ``False`` finished envs stay finished and
            stepping them is a no-op until :meth:`reset`.
        success_key: the ``info`` key that says an episode succeeded.
        check_seed: reset one copy twice with the same seed and warn if the observations differ.
        **make_kwargs: forwarded to ``gymnasium.make``.

    Raises:
        ValueError: if the action space is not a ``gymnasium.spaces.Box``.
    """

    obs_type = "state"

    def __init__(
        self,
        env_id: str,
        num_envs: int = 1,
        seed: int | None = None,
        *,
        autoreset: bool = True,
        success_key: str = "is_success",
        check_seed: bool = True,
        **make_kwargs: Any,
    ):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env_id = env_id
        self.make_kwargs = dict(make_kwargs)  # what the env was made with (a scripted expert may read its task)
        self.num_envs = int(num_envs)
        self.autoreset = bool(autoreset)
        first = gym.make(env_id, **make_kwargs)
        if not isinstance(first.action_space, gym.spaces.Box):
            first.close()
            raise ValueError(
                f"GymVecAdapter needs a continuous (gymnasium.spaces.Box) action space, but env "
                f"{env_id!r} has action space {first.action_space!r}"
            )
        self.envs: list[gym.Env] = [first] + [gym.make(env_id, **make_kwargs) for _ in range(self.num_envs - 1)]
        self.single_action_space: gym.spaces.Box = first.action_space
        self.single_observation_space = space = first.observation_space
        self.passthrough = (
            isinstance(space, gym.spaces.Dict) and bool(space.spaces) and set(space.spaces) <= set(PASSTHROUGH_KEYS)
        )
        self.action_dim = int(np.prod(first.action_space.shape))
        if self.passthrough:
            self.state_dim = int(np.prod(space["agent_pos"].shape)) if "agent_pos" in space.spaces else 0
            self.obs_type = "pixels_agent_pos" if "pixels" in space.spaces else "state"
        else:
            self.state_dim = int(gym.spaces.flatdim(space))
        self.success_key = success_key
        self._success_watch = SuccessKeyWatch(
            env_id, success_key, "give the key the env uses (e.g. success_key='success' for MetaWorld)"
        )
        self.action_low = np.broadcast_to(first.action_space.low, first.action_space.shape).reshape(-1)
        self.action_high = np.broadcast_to(first.action_space.high, first.action_space.shape).reshape(-1)
        self.action_low = self.action_low.astype(np.float32)
        self.action_high = self.action_high.astype(np.float32)
        max_steps = first.spec.max_episode_steps if first.spec is not None else None
        if max_steps is None:
            try:
                max_steps = first.get_wrapper_attr("_max_episode_steps")
            except AttributeError:
                max_steps = None
        self.max_steps: int | None = None if max_steps is None else int(max_steps)
        # the env's own instruction where it has one (LeRobot's envs call it task_description), else its id
        own = getattr(first.unwrapped, "task_description", None)
        self.task = self.task_description = own if isinstance(own, str) and own else env_id
        self.metadata = first.metadata

        n = self.num_envs
        self._obs: list[dict[str, Any]] = [{} for _ in range(n)]
        self._done = np.zeros(n, dtype=bool)
        self._t = np.zeros(n, dtype=np.int64)
        self.seed_honoured = self._seed_is_honoured() if check_seed else None
        self.reset(seed=seed)

    def _convert(self, obs: Any) -> dict[str, Any]:
        """One env's observation in LeRobot's raw keys (float32 state, images as they are)."""
        if not self.passthrough:
            return {"agent_pos": np.asarray(gym.spaces.flatten(self.single_observation_space, obs), dtype=np.float32)}
        out = {}
        for key, value in obs.items():
            if key == "pixels":
                out[key] = (
                    {k: np.asarray(v) for k, v in value.items()} if isinstance(value, dict) else np.asarray(value)
                )
            else:
                out[key] = np.asarray(value, dtype=np.float32).reshape(-1)
        return out

    def _batched(self) -> dict[str, Any]:
        first = self._obs[0]
        out: dict[str, Any] = {}
        for key, value in first.items():
            if isinstance(value, dict):
                out[key] = {k: np.stack([o[key][k] for o in self._obs]) for k in value}
            else:
                out[key] = np.stack([o[key] for o in self._obs])
        return out

    def _seed_is_honoured(self) -> bool:
        """Reset the first copy twice with one seed: the same first observation, or a warning."""
        env = self.envs[0]
        a = gym.spaces.flatten(self.single_observation_space, env.reset(seed=12345)[0])
        b = gym.spaces.flatten(self.single_observation_space, env.reset(seed=12345)[0])
        if np.array_equal(a, b):
            return True
        log.warning(
            "%s does not honour reset(seed=...): two resets with one seed started differently, so fixed evaluation "
            "episodes and GRPO groups (which need equal start states) are not reproducible on it",
            self.env_id,
        )
        return False

    def _reset_one(self, i: int, seed: int | None) -> None:
        obs, _ = self.envs[i].reset(seed=seed)
        self._obs[i] = self._convert(obs)
        self._done[i] = False
        self._t[i] = 0

    def reset(
        self, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset envs: ``seed=s`` seeds env ``i`` with ``s + i``, a sequence seeds env ``i`` with
        ``seed[i]``, ``None`` continues each env's generator. ``options["reset_mask"]`` restricts
        the reset to some envs."""
        n = self.num_envs
        mask, seeds = reset_targets(n, seed, options)
        for i in np.flatnonzero(mask):
            self._reset_one(int(i), seeds[i])
        return self._batched(), {"is_success": np.zeros(n, dtype=bool)}

    def step(
        self, actions: np.ndarray, active: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        n = self.num_envs
        a, m = step_inputs(self, actions, active)

        reward = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        shape = self.single_action_space.shape
        for i in np.flatnonzero(m):
            obs, r, te, tr, info = self.envs[i].step(a[i].reshape(shape))
            self._obs[i] = self._convert(obs)
            self._t[i] += 1
            reward[i] = float(r)
            terminated[i] = bool(te)
            truncated[i] = bool(tr)
            success[i] = bool(info.get(self.success_key, False))
            self._success_watch.observe(info, bool(te or tr))
        done = terminated | truncated
        elapsed = self._t.copy()
        final_obs = self._batched()
        if self.autoreset:
            for i in np.flatnonzero(done):
                self._reset_one(int(i), None)
        else:
            self._done |= done
        info_out = {
            "final_obs": final_obs,
            "is_success": success,
            "done": done,
            "elapsed_steps": elapsed,
        }
        return self._batched(), reward, terminated, truncated, info_out

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.env_id!r}, num_envs={self.num_envs})"


class _RawKeys(gym.ObservationWrapper):
    """A gymnasium env's observation in LeRobot's raw keys, as ``GymVecAdapter`` serves it: a Dict of those keys as
    it is, anything else flattened to float32 ``agent_pos``."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = env.observation_space
        self.passthrough = (
            isinstance(space, gym.spaces.Dict) and bool(space.spaces) and set(space.spaces) <= set(PASSTHROUGH_KEYS)
        )
        if not self.passthrough:
            flat = gym.spaces.Box(-np.inf, np.inf, (gym.spaces.flatdim(space),), np.float32)
            self.observation_space = gym.spaces.Dict({"agent_pos": flat})

    def observation(self, obs):
        if self.passthrough:
            return obs
        return {"agent_pos": np.asarray(gym.spaces.flatten(self.env.observation_space, obs), dtype=np.float32)}


def _make_raw_keys(env_id: str, make_kwargs: dict) -> gym.Env:
    return _RawKeys(gym.make(env_id, **make_kwargs))


class AsyncGymVecEnv(VectorEnvAdapter):
    """``num_envs`` copies of a gymnasium env, each in its own subprocess (gymnasium's ``AsyncVectorEnv``,
    forkserver), in the vec-env protocol: for envs whose construction or step is slow in Python (64 MetaWorld
    copies take most of a minute to build in one process). Observations, actions and success as
    ``GymVecAdapter``; the seed check is not run here."""

    def __init__(
        self,
        env_id: str,
        num_envs: int = 1,
        seed: int | None = None,
        *,
        autoreset: bool = True,
        success_key: str = "is_success",
        **make_kwargs: Any,
    ):
        import functools
        import importlib

        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env_id = env_id
        self.make_kwargs = dict(make_kwargs)
        fns = [functools.partial(_make_raw_keys, env_id, make_kwargs) for _ in range(int(num_envs))]
        module, sep, gym_id = env_id.partition(":")
        if sep:  # 'module:id': the module registers the id (the workers import it themselves)
            importlib.import_module(module)
        spec = gym.spec(gym_id if sep else env_id)
        vec = gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, context="forkserver")
        super().__init__(
            vec,
            env_id,
            autoreset=autoreset,
            success_key=success_key,
            hint="give the key the env uses (e.g. success_key='success' for MetaWorld)",
            max_steps=make_kwargs.get("max_episode_steps") or spec.max_episode_steps,
            task=env_id,
            seed=seed,
            probe=False,
        )
