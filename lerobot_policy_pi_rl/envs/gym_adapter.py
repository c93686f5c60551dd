"""Any gymnasium continuous-control env behind the same batched interface as ``ReachGraspVecEnv``.

The adapter keeps ``num_envs`` independent ``gymnasium.make(env_id)`` copies and loops over them in
Python (fine for the small envs this is meant for). Observations are flattened to float32 and served
as ``{"agent_pos": [num_envs, state_dim]}``; actions are clipped to the Box bounds; finished envs are
reset in the same ``step`` call and their terminal observation is kept in ``info["final_obs"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from lerobot_policy_pi_rl.envs.vector import active_mask, reset_targets

__all__ = ["GymVecAdapter"]


class GymVecAdapter:
    """``num_envs`` copies of a gymnasium env with a Box action space, in the vec-env protocol.

    Args:
        env_id: gymnasium id, e.g. ``"Pendulum-v1"``.
        num_envs: number of copies.
        seed: if given, the envs are reset at construction with ``seed + i``.
        autoreset: same-step autoreset (default); with ``False`` finished envs stay finished and
            stepping them is a no-op until :meth:`reset`.
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
        **make_kwargs: Any,
    ):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env_id = env_id
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
        self.single_observation_space = first.observation_space
        self.action_dim = int(np.prod(first.action_space.shape))
        self.state_dim = int(gym.spaces.flatdim(first.observation_space))
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
        self.task = self.task_description = env_id
        self.metadata = first.metadata

        n = self.num_envs
        self._obs = np.zeros((n, self.state_dim), dtype=np.float32)
        self._done = np.zeros(n, dtype=bool)
        self._t = np.zeros(n, dtype=np.int64)
        self.reset(seed=seed)

    def _flat(self, obs: Any) -> np.ndarray:
        return np.asarray(gym.spaces.flatten(self.single_observation_space, obs), dtype=np.float32)

    def _reset_one(self, i: int, seed: int | None) -> None:
        obs, _ = self.envs[i].reset(seed=seed)
        self._obs[i] = self._flat(obs)
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
        return {"agent_pos": self._obs.copy()}, {"is_success": np.zeros(n, dtype=bool)}

    def step(
        self, actions: np.ndarray, active: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        n = self.num_envs
        a = np.asarray(actions, dtype=np.float64)
        if a.shape != (n, self.action_dim):
            raise ValueError(f"actions must have shape ({n}, {self.action_dim}), got {a.shape}")
        a = np.clip(a, self.action_low, self.action_high).astype(self.single_action_space.dtype)
        m = active_mask(n, active)
        if not self.autoreset:
            m &= ~self._done

        reward = np.zeros(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        shape = self.single_action_space.shape
        for i in np.flatnonzero(m):
            obs, r, te, tr, info = self.envs[i].step(a[i].reshape(shape))
            self._obs[i] = self._flat(obs)
            self._t[i] += 1
            reward[i] = float(r)
            terminated[i] = bool(te)
            truncated[i] = bool(tr)
            success[i] = bool(info.get("is_success", False))
        done = terminated | truncated
        elapsed = self._t.copy()
        final_obs = {"agent_pos": self._obs.copy()}
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
        return {"agent_pos": self._obs.copy()}, reward, terminated, truncated, info_out

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.env_id!r}, num_envs={self.num_envs})"
