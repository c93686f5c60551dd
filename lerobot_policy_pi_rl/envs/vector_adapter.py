"""A gymnasium vector env (same-step or next-step autoreset) behind the project's vector-env protocol.

What the protocol needs that a gymnasium vector env does not give:

* **Frozen envs.** Rollouts step only the envs still in their episode (``active``) and read the final
  observation of the others later (the critic's bootstrap). A gymnasium vector env steps every env, and
  resets a finished one in the same call. The adapter keeps its own copy of each env's observation and
  updates only the rows it stepped on purpose; with ``autoreset=False`` a finished env stays finished
  (its row frozen at the terminal observation) until :meth:`reset`.
* **Success where LeRobot reads it.** ``info[success_key]`` of the step, or, for an env that ended and
  was reset in that same call, ``info["final_info"][success_key]`` (the reset's own info would say False).
* **Next-step autoreset.** LeRobot builds some env types' vector envs (MetaWorld, LIBERO) with gymnasium's
  default ``NEXT_STEP`` autoreset: a finished env is reset by the *following* ``step`` call, which ignores
  its action. The adapter resets such an env itself (``reset_mask``) in the call that finished it, so every
  step it makes is a real one; every reset also carries LeRobot's ``lerobot_new_rollout`` option, which thaws
  the ``FreezeAfterEpisodeEnd`` wrapper of LeRobot's subprocess envs (without it they would replay their
  terminal step for ever).
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

# lerobot.envs.utils.NEW_ROLLOUT_OPTION: an explicit reset (not gymnasium's autoreset) of a LeRobot env
NEW_ROLLOUT_OPTION = "lerobot_new_rollout"


def _autoreset_mode(vec: Any) -> Any:
    """The vector env's autoreset mode (LeRobot's lazy subprocess env keeps the real one in ``_env``)."""
    for env in (vec, getattr(vec, "_env", None)):
        mode = getattr(env, "autoreset_mode", None)
        if mode is not None:
            return mode
    return (getattr(vec, "metadata", None) or {}).get("autoreset_mode")


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
        max_steps: the episode step limit (None: the envs' ``_max_episode_steps``); an episode still running
            at it is truncated here (a LeRobot env config's ``episode_length`` where the env's own limit is longer).
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
        self._next_step_autoreset = None  # known after the first reset (a lazy env builds its vector env then)
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
            obs, _ = self.vec.reset(
                seed=[None if s is None else int(s) for s in seeds], options={NEW_ROLLOUT_OPTION: True}
            )
            self._obs = _copy(obs)
            mask = np.ones(n, dtype=bool)
        else:
            obs, _ = self.vec.reset(
                seed=[None if s is None else int(s) for s in seeds],
                options={"reset_mask": mask.copy(), NEW_ROLLOUT_OPTION: True},
            )
            _assign(self._obs, obs, mask)
        if self._next_step_autoreset is None:
            self._next_step_autoreset = _autoreset_mode(self.vec) == gym.vector.AutoresetMode.NEXT_STEP
        self._done[mask] = False
        self._t[mask] = 0
        return _copy(self._obs), {"is_success": np.zeros(n, dtype=bool)}

    def step(self, actions: np.ndarray, active: np.ndarray | None = None):
        n = self.num_envs
        a, m = step_inputs(self, actions, active)
        # every env steps (a vector env cannot hold one back); the frozen ones' results are dropped
        obs, r, te, tr, info = self.vec.step(a.reshape(n, *self.single_action_space.shape))
        ended_raw = np.asarray(te, dtype=bool) | np.asarray(tr, dtype=bool)
        te, tr = np.asarray(te, dtype=bool) & m, np.asarray(tr, dtype=bool) & m
        self._t[m] += 1
        if self.max_steps:  # the step limit the config states, where the env's own is longer (MetaWorld's: 500)
            capped = m & ~(te | tr) & (self._t >= self.max_steps)
            tr |= capped
        else:
            capped = np.zeros(n, dtype=bool)
        done = te | tr
        success = _flag(info, self.success_key, n) & m
        self._success_watch.observe([*info, *info.get("final_info", {})], bool(done.any()))
        final_obs = _copy(self._obs)
        _assign(final_obs, obs, m)
        if "final_info" in info:  # an env that ended in this call was already reset: its verdict is here
            ended = np.asarray(info.get("_final_info", np.zeros(n, dtype=bool)), dtype=bool) & m
            success = np.where(ended, _flag(info["final_info"], self.success_key, n), success)
            if "final_obs" in info:  # same-step autoreset (next-step: the step's obs is the terminal one)
                for i in np.flatnonzero(ended & np.asarray(info.get("_final_obs", ended), dtype=bool)):
                    _assign_one(final_obs, info["final_obs"][i], int(i))
        # reset now what the vector env will not reset in this call: envs cut at the step limit, and under
        # next-step autoreset the finished ones (else the next step would be spent on gymnasium's autoreset)
        reset_now = capped | (ended_raw if self._next_step_autoreset else np.zeros(n, dtype=bool))
        if reset_now.any():
            obs = _copy(obs)
            fresh, _ = self.vec.reset(options={"reset_mask": reset_now.copy(), NEW_ROLLOUT_OPTION: True})
            _assign(obs, fresh, reset_now)
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
