"""A gymnasium vector env (same-step autoreset) behind the project's vector-env protocol.

What the protocol needs that a gymnasium vector env does not give:

* **Frozen envs.** Rollouts step only the envs still in their episode (``active``) and read the final
  observation of the others later (the critic's bootstrap). A gymnasium vector env steps every env, and
  resets a finished one in the same call. The adapter keeps its own copy of each env's observation and
  updates only the rows it stepped on purpose; with ``autoreset=False`` a finished env stays finished
  (its row frozen at the terminal observation) until :meth:`reset`.
* **Success where LeRobot reads it.** ``info[success_key]`` of the step, or, for an env that ended and
  was reset in that same call, ``info["final_info"][success_key]`` (the reset's own info would say False).
* **Seeds.** ``reset(seed=s)`` seeds env ``i`` with ``s + i``; a list seeds each env; ``reset_mask`` in
  ``options`` resets only some envs (gymnasium >= 1.1).

``LeRobotVecEnv`` (LeRobot env types) and ``AsyncGymVecEnv`` (a gymnasium id in subprocesses) build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from lerobot_policy_pi_rl.envs.vector import SuccessKeyWatch, reset_targets, step_inputs

__all__ = ["VectorEnvAdapter"]


def _rows(obs: Any, rows: np.ndarray) -> Any:
    """``obs`` (a batched dict of arrays, maybe nested) at ``rows``."""
    if isinstance(obs, dict):
        return {k: _rows(v, rows) for k, v in obs.items()}
    return np.asarray(obs)[rows]


def _assign(dst: Any, src: Any, rows: np.ndarray) -> None:
    """``dst[rows] = src[rows]`` through nested dicts of batched arrays."""
    if isinstance(dst, dict):
        for k in dst:
            _assign(dst[k], src[k], rows)
    else:
        dst[rows] = np.asarray(src)[rows]


def _assign_one(dst: Any, single: Any, i: int) -> None:
    """``dst[i] = single`` (one env's unbatched observation) through nested dicts."""
    if isinstance(dst, dict):
        for k in dst:
            _assign_one(dst[k], single[k], i)
    else:
        dst[i] = np.asarray(single)


def _copy(obs: Any) -> Any:
    return {k: _copy(v) for k, v in obs.items()} if isinstance(obs, dict) else np.array(obs, copy=True)


def _flag(info: dict, key: str, n: int) -> np.ndarray:
    """A per-env bool from a vector env's info (False where the env did not report it)."""
    if key not in info:
        return np.zeros(n, dtype=bool)
    value = np.asarray(info[key])
    reported = np.asarray(info.get(f"_{key}", np.ones(n, dtype=bool)), dtype=bool)
    return value.astype(bool) & reported if value.shape == (n,) else np.zeros(n, dtype=bool)


class VectorEnvAdapter:
    """``vec`` (a gymnasium vector env with same-step autoreset whose observations use LeRobot's raw keys) in
    the vec-env protocol (see ``envs/__init__.py``).

    Args:
        vec: the vector env (this adapter closes it).
        name: how messages name the env (``env.type=metaworld``, a gymnasium id).
        autoreset: same-step autoreset (the finished env's first observation is returned, its terminal one is in
            ``info["final_obs"]``); ``False`` (rollouts, evaluation): finished envs stay finished until reset.
        success_key: the info key that says an episode succeeded (LeRobot's ``is_success`` by default).
        hint: where the user sets ``success_key`` (the missing-key warning says it).
        max_steps: the episode step limit (None: the envs' ``_max_episode_steps``).
        task: the language instruction (None: the envs' ``task_description`` / ``task``).
        processor: the env's own observation processor (``PolicyRunner.for_env`` applies it), or None.
        seed: if given, the envs are reset at construction with ``seed + i``.
        probe: read a missing ``max_steps`` / ``task`` from the envs' attributes (off for subprocess envs: a
            missing attribute there shuts the worker down).
    """

    def __init__(
        self,
        vec: gym.vector.VectorEnv,
        name: str,
        *,
        autoreset: bool = True,
        success_key: str = "is_success",
        hint: str = "give the key the env uses",
        max_steps: int | None = None,
        task: str | None = None,
        processor=None,
        seed: int | None = None,
        probe: bool = True,
    ):
        self.vec, self.name, self.processor = vec, name, processor
        self.num_envs = int(vec.num_envs)
        self.autoreset = bool(autoreset)
        self.success_key = success_key
        self._success_watch = SuccessKeyWatch(name, success_key, hint)
        space = vec.single_action_space
        if not isinstance(space, gym.spaces.Box):
            vec.close()
            raise ValueError(f"{name}: needs a continuous (Box) action space, got {space!r}")
        self.single_action_space = space
        self.action_dim = int(np.prod(space.shape))
        self.action_low = np.broadcast_to(space.low, space.shape).reshape(-1).astype(np.float32)
        self.action_high = np.broadcast_to(space.high, space.shape).reshape(-1).astype(np.float32)
        obs_space = vec.single_observation_space
        keys = set(obs_space.spaces) if isinstance(obs_space, gym.spaces.Dict) else set()
        self.obs_type = "pixels_agent_pos" if "pixels" in keys else "state"
        self.state_dim = int(np.prod(obs_space["agent_pos"].shape)) if "agent_pos" in keys else 0
        self.max_steps = max_steps if max_steps or not probe else self._attr_max_steps()
        self.task = self.task_description = task or (self._attr_task() if probe else None)
        self.metadata = getattr(vec, "metadata", {})
        self._obs: Any = None
        self._done = np.zeros(self.num_envs, dtype=bool)
        self._t = np.zeros(self.num_envs, dtype=np.int64)
        self.reset(seed=seed)

    def _attr_max_steps(self) -> int | None:
        try:
            limits = self.vec.get_attr("_max_episode_steps")
            return int(limits[0]) if limits and limits[0] else None
        except AttributeError:
            return None

    def _attr_task(self) -> str | None:
        for name in ("task_description", "task"):
            try:
                value = self.vec.call(name)
            except AttributeError:
                continue
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, str) and value:
                return value
        return None

    def reset(
        self, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reset envs: ``seed=s`` seeds env ``i`` with ``s + i``, a sequence seeds env ``i`` with ``seed[i]``,
        ``None`` continues each env's generator; ``options["reset_mask"]`` resets only some envs."""
        n = self.num_envs
        mask, seeds = reset_targets(n, seed, options)
        if mask.all() or self._obs is None:
            obs, _ = self.vec.reset(seed=[None if s is None else int(s) for s in seeds])
            self._obs = _copy(obs)
            mask = np.ones(n, dtype=bool)
        else:
            obs, _ = self.vec.reset(
                seed=[None if s is None else int(s) for s in seeds], options={"reset_mask": mask.copy()}
            )
            _assign(self._obs, obs, mask)
        self._done[mask] = False
        self._t[mask] = 0
        return _copy(self._obs), {"is_success": np.zeros(n, dtype=bool)}

    def step(self, actions: np.ndarray, active: np.ndarray | None = None):
        n = self.num_envs
        a, m = step_inputs(self, actions, active)
        # every env steps (a vector env cannot hold one back); the frozen ones' results are dropped
        obs, r, te, tr, info = self.vec.step(a.reshape(n, *self.single_action_space.shape))
        te, tr = np.asarray(te, dtype=bool) & m, np.asarray(tr, dtype=bool) & m
        done = te | tr
        success = _flag(info, self.success_key, n) & m
        self._success_watch.observe([*info, *info.get("final_info", {})], bool(done.any()))
        final_obs = _copy(self._obs)
        _assign(final_obs, obs, m)
        if "final_info" in info:  # an env that ended in this call was already reset: its verdict is here
            ended = np.asarray(info.get("_final_info", np.zeros(n, dtype=bool)), dtype=bool) & m
            success = np.where(ended, _flag(info["final_info"], self.success_key, n), success)
            for i in np.flatnonzero(ended & np.asarray(info.get("_final_obs", ended), dtype=bool)):
                _assign_one(final_obs, info["final_obs"][i], int(i))
        self._t[m] += 1
        elapsed = self._t.copy()
        if self.autoreset:
            # the vector env reset the finished ones in this call: serve their new first observation
            _assign(self._obs, obs, m)
            self._t[done] = 0
        else:
            _assign(self._obs, final_obs, m)
            self._done |= done
        info_out = {"final_obs": final_obs, "is_success": success, "done": done, "elapsed_steps": elapsed}
        reward = np.where(m, np.asarray(r, dtype=np.float32), 0.0).astype(np.float32)
        return _copy(self._obs), reward, te, tr, info_out

    def close(self) -> None:
        self.vec.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, num_envs={self.num_envs})"
