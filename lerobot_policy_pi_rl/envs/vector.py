"""Argument handling shared by the vector envs (ReachGraspVecEnv, GymVecAdapter, LeRobotVecEnv)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np


def reset_targets(
    num_envs: int, seed: int | Sequence[int | None] | None, options: dict[str, Any] | None
) -> tuple[np.ndarray, list[int | None]]:
    """(mask of envs to reset, per-env seed or None) for ``reset(seed, options)``.

    ``seed=s`` seeds env ``i`` with ``s + i``; a sequence seeds env ``i`` with ``seed[i]`` (equal
    seeds give identical starts: GRPO groups); ``None`` continues each env's generator.
    ``options["reset_mask"]`` (bool [num_envs]) restricts the reset to some envs.
    """
    mask = np.ones(num_envs, dtype=bool)
    if options and options.get("reset_mask") is not None:
        mask = np.asarray(options["reset_mask"], dtype=bool).reshape(-1)
        if mask.shape != (num_envs,):
            raise ValueError(f"reset_mask must have shape ({num_envs},), got {mask.shape}")
    if seed is None:
        seeds: list[int | None] = [None] * num_envs
    elif isinstance(seed, (int, np.integer)):
        seeds = [int(seed) + i for i in range(num_envs)]
    else:
        seeds = [None if s is None else int(s) for s in seed]
        if len(seeds) != num_envs:
            raise ValueError(f"got {len(seeds)} seeds for {num_envs} envs")
    return mask, seeds


def active_mask(num_envs: int, active: np.ndarray | None) -> np.ndarray:
    """``step(..., active)``'s mask as a fresh bool [num_envs] array (all True when None)."""
    if active is None:
        return np.ones(num_envs, dtype=bool)
    m = np.asarray(active, dtype=bool).reshape(-1).copy()
    if m.shape != (num_envs,):
        raise ValueError(f"active must have shape ({num_envs},), got {m.shape}")
    return m


def step_inputs(env, actions: np.ndarray, active: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(actions clipped to ``env``'s Box in its dtype, mask of the envs this step moves) for an adapter with
    ``num_envs``, ``action_dim``, ``action_low`` / ``action_high``, ``single_action_space``, ``autoreset`` and
    ``_done`` (finished envs stay still until reset when ``autoreset`` is off)."""
    n = env.num_envs
    a = np.asarray(actions, dtype=np.float64)
    if a.shape != (n, env.action_dim):
        raise ValueError(f"actions must have shape ({n}, {env.action_dim}), got {a.shape}")
    a = np.clip(a, env.action_low, env.action_high).astype(env.single_action_space.dtype)
    m = active_mask(n, active)
    if not env.autoreset:
        m &= ~env._done
    return a, m


class SuccessKeyWatch:
    """Warns once when an env ends an episode without ever having reported its success key: its successes
    would otherwise all read False with no word (MetaWorld says ``success``, LeRobot reads ``is_success``)."""

    def __init__(self, env_name: str, key: str, hint: str):
        self.env_name, self.key, self.hint = env_name, key, hint
        self.reported = self.warned = False

    def observe(self, info_keys, episode_ended: bool) -> None:
        keys = set(info_keys)
        if self.key in keys:
            self.reported = True
        elif episode_ended and not self.reported and not self.warned:
            self.warned = True
            logging.getLogger(__name__).warning(
                "%s ended an episode without ever reporting info[%r] (its info has %s): success is never counted; %s",
                self.env_name,
                self.key,
                sorted(k for k in keys if not k.startswith("_")),
                self.hint,
            )
