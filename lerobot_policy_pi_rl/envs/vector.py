"""Argument handling shared by the vector envs (ReachGraspVecEnv, GymVecAdapter)."""

from __future__ import annotations

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
