"""Few-shot demonstrations of any env: a scripted expert run in a vector env, its successful episodes written
as a local LeRobotDataset that ``lerobot-train`` (and ``sft.train_sft``) reads.

The expert is a callable ``expert(obs, env) -> actions``: ``obs`` is the vector env's raw observation dict
(LeRobot's raw keys, a leading ``num_envs`` axis), ``actions`` a ``[num_envs, action_dim]`` array. It is
given on the command line as ``module:callable`` (``--expert=lerobot_policy_pi_rl.demos:builtin_expert``).

Dataset features follow LeRobot's env-to-policy naming (``lerobot.envs.utils.preprocess_observation``):
``agent_pos`` -> ``observation.state``, ``environment_state`` -> ``observation.environment_state``, an image
``pixels`` -> ``observation.image``, a dict of images -> ``observation.images.<camera>``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Expert = Callable[[dict[str, Any], Any], np.ndarray]


def load_expert(spec: str) -> Expert:
    """The callable named by ``module:callable``; a ValueError that says what is wrong otherwise."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"expert: give it as module:callable (got {spec!r})")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"expert: cannot import {module!r}: {e}") from e
    except AttributeError:
        raise ValueError(f"expert: {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ValueError(f"expert: {spec} is not callable")
    return fn


def builtin_expert(obs: dict[str, Any], env) -> np.ndarray:
    """The built-in task's scripted expert in the ``expert(obs, env)`` form."""
    from lerobot_policy_pi_rl.envs.reach_grasp import scripted_expert

    return scripted_expert(obs["agent_pos"])


def _frame_features(obs: dict[str, Any], action_dim: int) -> tuple[dict, Callable[[dict, int], dict]]:
    """(LeRobotDataset features, a function from (batched raw obs, env index) to one frame's observation)."""
    feats: dict[str, dict] = {}
    getters: list[Callable[[dict, int], tuple[str, Any]]] = []
    for raw, key in (("agent_pos", "observation.state"), ("environment_state", "observation.environment_state")):
        if raw in obs:
            dim = int(np.prod(obs[raw].shape[1:]))
            feats[key] = {"dtype": "float32", "shape": (dim,), "names": [f"{raw}_{i}" for i in range(dim)]}
            getters.append(lambda o, i, raw=raw, key=key: (key, np.asarray(o[raw][i], np.float32).reshape(-1)))
    pixels = obs.get("pixels")
    cams = pixels.items() if isinstance(pixels, dict) else ([(None, pixels)] if pixels is not None else [])
    for cam, images in cams:
        key = "observation.image" if cam is None else f"observation.images.{cam}"
        feats[key] = {"dtype": "image", "shape": tuple(images.shape[1:]), "names": ["height", "width", "channels"]}
        getters.append(lambda o, i, cam=cam, key=key: (key, (o["pixels"] if cam is None else o["pixels"][cam])[i]))
    if not getters:
        raise ValueError(f"the env's observation has none of agent_pos / environment_state / pixels: {sorted(obs)}")
    feats["action"] = {"dtype": "float32", "shape": (action_dim,), "names": [f"a{i}" for i in range(action_dim)]}
    return feats, lambda o, i: dict(g(o, i) for g in getters)


def record_env_demos(
    root: str | Path,
    env,
    expert: Expert,
    num_episodes: int,
    *,
    repo_id: str,
    seed: int = 0,
    noise_std: float = 0.0,
    fps: int = 50,
    max_batches: int = 50,
    start_states: int = 0,
    progress: Callable[[str], None] | None = print,
):
    """Run ``expert`` in ``env`` (``autoreset=False``) batch after batch and write its first ``num_episodes``
    successful episodes to a new LeRobotDataset at ``root``. Gaussian noise of std ``noise_std`` (in action
    units) is added to the expert's actions, which are clipped to the env's bounds. Stops with a ValueError
    after ``max_batches`` batches without enough successes (an expert that does not solve the task).

    With ``start_states`` > 0 the env is reset that many more times and the dataset's state statistics are
    widened to cover the observations at those start states (``input_stats.widen_stats``: a few demos leave
    an object's start position nearly constant); the widened dims, with their demos-only and widened std, are
    kept in ``meta/pirl_start_states.json``."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"dataset root {root} already exists; choose a new --out or delete it")
    rng = np.random.default_rng(seed)
    n = env.num_envs
    task = getattr(env, "task_description", None) or "demonstration"
    kept: list[list[dict]] = []
    features = frame_of = None
    tried = 0
    for batch in range(max_batches):
        obs, _ = env.reset(seed=seed + batch * n)
        if features is None:
            features, frame_of = _frame_features(obs, env.action_dim)
        frames: list[list[dict]] = [[] for _ in range(n)]
        alive, success = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
        while alive.any():
            act = np.asarray(expert(obs, env), dtype=np.float32).reshape(n, env.action_dim)
            if noise_std > 0:
                act = act + rng.normal(0.0, noise_std, act.shape).astype(np.float32)
            act = np.clip(act, env.action_low, env.action_high)
            for i in np.flatnonzero(alive):
                frames[i].append({**frame_of(obs, int(i)), "action": act[i]})
            obs, _, term, trunc, info = env.step(act, active=alive)
            success |= alive & info["is_success"]
            alive &= ~(term | trunc)
        tried += n
        kept += [frames[i] for i in np.flatnonzero(success)]
        if progress:
            progress(f"[demos] {min(len(kept), num_episodes)}/{num_episodes} successful episodes ({tried} run)")
        if len(kept) >= num_episodes:
            break
    else:
        raise ValueError(
            f"expert: {len(kept)} of {tried} episodes succeeded, fewer than the {num_episodes} demos asked for"
        )
    ds = LeRobotDataset.create(repo_id, fps=fps, features=features, root=root, robot_type="sim", use_videos=False)
    for episode in kept[:num_episodes]:
        for frame in episode:
            ds.add_frame({**frame, "task": task})
        ds.save_episode()
    ds.finalize()
    if start_states > 0:
        states = _start_states(env, frame_of, start_states, seed=seed + 1_000_003, features=features)
        _widen_dataset_stats(ds, states, seed + 1_000_003, progress)
    return ds


def _start_states(env, frame_of, count: int, *, seed: int, features: dict) -> dict[str, np.ndarray]:
    """The state features' observations right after ``count`` resets (seeds seed, seed + 1, ...): {key: [count, dim]}."""
    keys = [k for k, f in features.items() if k != "action" and f["dtype"] == "float32"]
    got: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    n = env.num_envs
    for first in range(0, count, n):
        obs, _ = env.reset(seed=seed + first)
        for i in range(min(n, count - first)):
            frame = frame_of(obs, i)
            for k in keys:
                got[k].append(frame[k])
    return {k: np.stack(v) for k, v in got.items()}


def _widen_dataset_stats(ds, states: dict[str, np.ndarray], seed: int, progress) -> None:
    """Widen ``ds``'s statistics (meta/stats.json, which lerobot-train normalises with) to the start states'."""
    import json

    from lerobot.datasets.io_utils import write_stats

    from lerobot_policy_pi_rl.input_stats import start_state_stats, widen_stats

    stats = {k: dict(v) for k, v in ds.meta.stats.items()}
    record: dict[str, dict] = {}
    for key, x in states.items():
        new, dims = widen_stats(stats[key], start_state_stats(x))
        if len(dims):
            record[key] = {
                "dims": dims.tolist(),
                "demo_std": np.asarray(stats[key]["std"], dtype=np.float64).reshape(-1)[dims].tolist(),
                "std": np.asarray(new["std"]).reshape(-1)[dims].tolist(),
            }
            stats[key] = {k: v.astype(np.asarray(stats[key][k]).dtype) for k, v in new.items()}
    write_stats(stats, ds.meta.root)
    ds.meta.stats = stats
    info = {"start_states": len(next(iter(states.values()))), "seed": seed, "widened": record}
    (Path(ds.meta.root) / "meta" / "pirl_start_states.json").write_text(json.dumps(info, indent=2) + "\n")
    if progress:
        n = sum(len(r["dims"]) for r in record.values())
        progress(
            f"[demos] normalisation: {n} state dims vary more across {info['start_states']} start states than in "
            f"the demos; their spread was widened to cover them (meta/pirl_start_states.json)"
        )
