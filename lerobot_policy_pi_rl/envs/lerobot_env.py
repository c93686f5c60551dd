"""Any LeRobot env type (``--env.type=...``) behind the project's vector-env protocol.

``LeRobotVecEnv(env_cfg, num_envs)`` builds the env exactly as ``lerobot-eval`` does: LeRobot's
``make_env`` (the config's own ``create_envs``: gymnasium ``SyncVectorEnv`` / ``AsyncVectorEnv`` with
same-step autoreset, or a multi-task suite) and the env's processors (``make_env_pre_post_processors``,
e.g. LIBERO's state processor), after ``register_third_party_plugins()`` so ``lerobot_env_*`` plugins work.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from lerobot_policy_pi_rl.envs.vector import SuccessKeyWatch, reset_targets, step_inputs

__all__ = ["LeRobotVecEnv"]


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


class LeRobotVecEnv:
    """``num_envs`` envs of a LeRobot ``EnvConfig`` in the vec-env protocol (see ``envs/__init__.py``).

    Args:
        env_cfg: a LeRobot ``EnvConfig`` (``--env.type=...``), e.g. ``make_env_config("pirl_reach")``.
        num_envs: number of envs.
        autoreset: same-step autoreset (the finished env's first observation is returned, its terminal one is in
            ``info["final_obs"]``); ``False`` (rollouts, evaluation): finished envs stay finished until reset.
        success_key: the info key that says an episode succeeded (LeRobot's ``is_success`` by default).
        use_async: run the envs in subprocesses (gymnasium's ``AsyncVectorEnv``): for envs whose step or
            construction is slow in Python.
        seed: if given, the envs are reset at construction with ``seed + i``.
    """

    def __init__(
        self,
        env_cfg,
        num_envs: int = 1,
        *,
        autoreset: bool = True,
        success_key: str = "is_success",
        use_async: bool = False,
        seed: int | None = None,
    ):
        from lerobot.envs.factory import make_env, make_env_pre_post_processors

        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env_cfg = env_cfg
        self.num_envs = int(num_envs)
        self.autoreset = bool(autoreset)
        self.success_key = success_key
        self._success_watch = SuccessKeyWatch(
            f"env.type={env_cfg.type}",
            success_key,
            "give the key the env uses (--control.success_key / --trainer.eval_success_key)",
        )
        suites = make_env(env_cfg, n_envs=self.num_envs, use_async_envs=use_async)
        vec_envs = [env for tasks in suites.values() for env in tasks.values()]
        if len(vec_envs) != 1:
            for env in vec_envs:
                env.close()
            raise ValueError(
                f"env.type={env_cfg.type}: task {getattr(env_cfg, 'task', None)!r} gives {len(vec_envs)} tasks; "
                "PI-RL runs one task per env: give --env.task=<one task>"
            )
        self.vec: gym.vector.VectorEnv = vec_envs[0]
        self.processor, _ = make_env_pre_post_processors(env_cfg, None)
        space = self.vec.single_action_space
        if not isinstance(space, gym.spaces.Box):
            self.vec.close()
            raise ValueError(f"env.type={env_cfg.type}: needs a continuous (Box) action space, got {space!r}")
        self.single_action_space = space
        self.action_dim = int(np.prod(space.shape))
        self.action_low = np.broadcast_to(space.low, space.shape).reshape(-1).astype(np.float32)
        self.action_high = np.broadcast_to(space.high, space.shape).reshape(-1).astype(np.float32)
        obs_space = self.vec.single_observation_space
        keys = set(obs_space.spaces) if isinstance(obs_space, gym.spaces.Dict) else set()
        self.obs_type = "pixels_agent_pos" if "pixels" in keys else "state"
        self.state_dim = int(np.prod(obs_space["agent_pos"].shape)) if "agent_pos" in keys else 0
        self.max_steps = self._max_steps()
        self.task = self.task_description = self._task()
        self.metadata = getattr(self.vec, "metadata", {})
        self._obs: Any = None
        self._done = np.zeros(self.num_envs, dtype=bool)
        self._t = np.zeros(self.num_envs, dtype=np.int64)
        self.reset(seed=seed)

    def _max_steps(self) -> int | None:
        length = getattr(self.env_cfg, "episode_length", None)
        if length:
            return int(length)
        try:
            limits = self.vec.get_attr("_max_episode_steps")
            return int(limits[0]) if limits and limits[0] else None
        except AttributeError:
            return None

    def _task(self) -> str | None:
        for name in ("task_description", "task"):
            try:
                value = self.vec.call(name)
            except AttributeError:
                continue
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, str) and value:
                return value
        task = getattr(self.env_cfg, "task", None)
        return task if isinstance(task, str) else None

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
        return f"{type(self).__name__}({self.env_cfg.type!r}, num_envs={self.num_envs})"
