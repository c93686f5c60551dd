"""Scripted demonstrations of the simulated robot's task as a local LeRobotDataset, and SFT on them.

The dataset has the features ``lerobot-record`` writes for a :class:`~lerobot_robot_pirl_sim.pirl_sim.PirlSim`
without cameras (``hw_to_dataset_features`` of its floats, the environment's state split off as
``observation.environment_state``), so a policy behaviour-cloned here drives the robot through the edge
and PI-RL fine-tunes it on :class:`~lerobot_robot_pirl_sim.vec_env.PirlSimVecEnv`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lerobot_robot_pirl_sim.expert import DEFAULT_CLOSE_MARGIN, scripted_expert
from lerobot_robot_pirl_sim.physics import ACTION_NAMES, ENV_STATE_NAMES, STATE_NAMES, TASK_DESCRIPTION
from lerobot_robot_pirl_sim.vec_env import DEFAULT_MAX_STEPS, PirlSimVecEnv

__all__ = ["REPO_ID", "dataset_features", "record_demos", "scripted_episodes", "train_sft"]

REPO_ID = "local/pirl_sim"
DEFAULT_FPS = 25  # the task's control rate (TaskParams.control_hz)


def dataset_features() -> dict:
    return {
        "observation.state": {"dtype": "float32", "shape": (len(STATE_NAMES),), "names": list(STATE_NAMES)},
        "observation.environment_state": {
            "dtype": "float32",
            "shape": (len(ENV_STATE_NAMES),),
            "names": list(ENV_STATE_NAMES),
        },
        "action": {"dtype": "float32", "shape": (len(ACTION_NAMES),), "names": list(ACTION_NAMES)},
    }


def scripted_episodes(
    num_episodes: int,
    *,
    seed: int,
    noise_std: float,
    close_margin: float = DEFAULT_CLOSE_MARGIN,
    max_steps: int = DEFAULT_MAX_STEPS,
    **task,
) -> list[list[dict]]:
    """Run the scripted expert on vec envs and keep the first ``num_episodes`` successful episodes
    (demonstrations are successes, as in the few-shot SFT sets of the paper and the built-in task)."""
    rng = np.random.default_rng(seed)
    kept: list[list[dict]] = []
    batch_seed = seed
    while len(kept) < num_episodes:
        n = max(8, 2 * (num_episodes - len(kept)))
        env = PirlSimVecEnv(n, autoreset=False, max_steps=max_steps, **task)
        obs, _ = env.reset(seed=batch_seed)
        batch_seed += n
        frames: list[list[dict]] = [[] for _ in range(n)]
        alive = np.ones(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        expert_kw = {k: task[k] for k in ("success_radius", "max_speed_at_grasp") if k in task}
        while alive.any():
            act = scripted_expert(
                obs["agent_pos"], obs["environment_state"], rng, noise_std, close_margin=close_margin, **expert_kw
            )
            for i in np.flatnonzero(alive):
                frames[i].append(
                    {
                        "observation.state": obs["agent_pos"][i],
                        "observation.environment_state": obs["environment_state"][i],
                        "action": act[i],
                    }
                )
            obs, _, term, trunc, info = env.step(act, active=alive)
            success |= alive & info["is_success"]
            alive &= ~(term | trunc)
        kept += [frames[i] for i in np.flatnonzero(success)]
    return kept[:num_episodes]


def record_demos(
    root: str | Path,
    num_episodes: int,
    *,
    seed: int = 0,
    noise_std: float = 0.02,
    fps: int = DEFAULT_FPS,
    repo_id: str = REPO_ID,
    close_margin: float = DEFAULT_CLOSE_MARGIN,
    max_steps: int = DEFAULT_MAX_STEPS,
    **task,
):
    """Write ``num_episodes`` successful scripted episodes to a new local LeRobotDataset at ``root`` (which
    must not exist; nothing goes to the hub). ``task``: TaskParams fields of a non-default task."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"dataset root {root} already exists; choose a new one or delete it")
    episodes = scripted_episodes(
        num_episodes, seed=seed, noise_std=noise_std, close_margin=close_margin, max_steps=max_steps, **task
    )
    ds = LeRobotDataset.create(
        repo_id=repo_id, fps=fps, features=dataset_features(), root=root, robot_type="pirl_sim", use_videos=False
    )
    for episode in episodes:
        for frame in episode:
            ds.add_frame({**frame, "task": TASK_DESCRIPTION})
        ds.save_episode()
    ds.finalize()
    return ds


def train_sft(dataset_root: str | Path, output_dir: str | Path, settings, repo_id: str = REPO_ID) -> Path:
    """``lerobot_policy_pi_rl.sft.train_sft`` on this task's dataset (``settings``: an ``SFTSettings``):
    behaviour-clone ``pi_rl`` with LeRobot's ``train()``; returns the last ``pretrained_model`` dir."""
    from lerobot_policy_pi_rl.sft import train_sft as train_pi_rl

    return train_pi_rl(dataset_root, output_dir, settings, repo_id=repo_id)
