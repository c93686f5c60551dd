"""Few-shot SFT: record scripted demonstrations as a LeRobotDataset, behaviour-clone ``pi_rl`` on it
with LeRobot's own training loop, and load the resulting checkpoint with its processors.

Everything stays local: the dataset lives under a local root (no hub), and ``lerobot-train``'s
``train()`` writes the usual ``checkpoints/<step>/pretrained_model`` layout.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lerobot_policy_pi_rl.envs.reach_grasp import TASK_DESCRIPTION, ReachGraspVecEnv, scripted_expert

REPO_ID = "local/pirl_reach"
STATE_NAMES = ["ee_x", "ee_y", "ee_vx", "ee_vy", "target_x", "target_y"]
ACTION_NAMES = ["vx", "vy", "grip"]


def dataset_features(obs_type: str, image_size: int) -> dict:
    feats = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": STATE_NAMES},
        "action": {"dtype": "float32", "shape": (3,), "names": ACTION_NAMES},
    }
    if obs_type == "pixels_agent_pos":
        feats["observation.image"] = {
            "dtype": "image",
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channels"],
        }
    return feats


def scripted_episodes(
    num_episodes: int,
    *,
    seed: int,
    noise_std: float,
    obs_type: str = "state",
    image_size: int = 32,
    max_steps: int = 60,
) -> list[list[dict]]:
    """Run the scripted expert in a vector env and keep the first ``num_episodes`` successful episodes
    (demonstrations are successes, as in the paper's few-shot SFT sets)."""
    rng = np.random.default_rng(seed)
    kept: list[list[dict]] = []
    batch_seed = seed
    while len(kept) < num_episodes:
        n = max(8, 2 * (num_episodes - len(kept)))
        env = ReachGraspVecEnv(n, autoreset=False, obs_type=obs_type, image_size=image_size, max_steps=max_steps)
        obs, _ = env.reset(seed=batch_seed)
        batch_seed += n
        frames: list[list[dict]] = [[] for _ in range(n)]
        alive = np.ones(n, dtype=bool)
        success = np.zeros(n, dtype=bool)
        while alive.any():
            act = scripted_expert(obs["agent_pos"], rng, noise_std).astype(np.float32)
            for i in np.flatnonzero(alive):
                frame = {"observation.state": obs["agent_pos"][i].astype(np.float32), "action": act[i]}
                if "pixels" in obs:
                    frame["observation.image"] = obs["pixels"][i]
                frames[i].append(frame)
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
    noise_std: float = 0.1,
    obs_type: str = "state",
    image_size: int = 32,
    fps: int = 50,
):
    """Write ``num_episodes`` scripted demos to a new LeRobotDataset at ``root`` (must not exist)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"dataset root {root} already exists; choose a new --out or delete it")
    episodes = scripted_episodes(num_episodes, seed=seed, noise_std=noise_std, obs_type=obs_type, image_size=image_size)
    ds = LeRobotDataset.create(
        REPO_ID,
        fps=fps,
        features=dataset_features(obs_type, image_size),
        root=root,
        robot_type="pirl_reach",
        use_videos=False,
    )
    for ep in episodes:
        for frame in ep:
            ds.add_frame({**frame, "task": TASK_DESCRIPTION})
        ds.save_episode()
    ds.finalize()
    return ds


@dataclass
class SFTSettings:
    """LeRobot training settings for few-shot SFT (with 10 demos these land SFT in the 30-60% band)."""

    steps: int = 2000
    batch_size: int = 64
    seed: int = 0
    policy_overrides: dict = field(default_factory=dict)


def train_sft(dataset_root: str | Path, output_dir: str | Path, settings: SFTSettings, repo_id: str = REPO_ID) -> Path:
    """Behaviour-clone ``pi_rl`` on the local dataset ``repo_id`` at ``dataset_root`` with LeRobot's
    ``train()``; returns the last ``pretrained_model`` dir."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
    from lerobot.configs.default import DatasetConfig
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.policies.factory import make_policy_config
    from lerobot.scripts.lerobot_train import train

    policy_cfg = make_policy_config("pi_rl", device="cpu", push_to_hub=False, **settings.policy_overrides)
    cfg = TrainPipelineConfig(
        dataset=DatasetConfig(repo_id=repo_id, root=str(dataset_root)),
        policy=policy_cfg,
        output_dir=Path(output_dir),
        steps=settings.steps,
        batch_size=settings.batch_size,
        num_workers=0,
        seed=settings.seed,
        save_freq=settings.steps,
        log_freq=max(1, settings.steps // 10),
    )
    cfg.policy.scheduler_decay_steps = settings.steps
    logging.getLogger().setLevel(logging.WARNING)
    _warn_near_constant_demos(policy_cfg, Path(dataset_root), repo_id)
    train(cfg)
    return Path(output_dir) / "checkpoints" / "last" / "pretrained_model"


def _warn_near_constant_demos(policy_cfg, dataset_root: Path, repo_id: str) -> None:
    """Before SFT: the dataset's state dims that barely vary (the policy's features come from the dataset)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.utils.feature_utils import dataset_to_policy_features

    from lerobot_policy_pi_rl.input_stats import warn_near_constant

    meta = LeRobotDatasetMetadata(repo_id, root=dataset_root)
    features = dataset_to_policy_features(meta.features)
    cfg = copy.copy(policy_cfg)
    cfg.input_features = {k: ft for k, ft in features.items() if k.startswith("observation.")}
    warn_near_constant(cfg, meta.stats or {}, f"SFT on {dataset_root}")


def load_policy(pretrained_dir: str | Path, device: str = "cpu", **config_overrides):
    """(policy, preprocessor, postprocessor) from a ``pretrained_model`` directory, on ``device``
    (the pre-processor moves observations there), eval mode."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import make_pre_post_processors

    from lerobot_policy_pi_rl.input_stats import normalizer_stats, warn_near_constant
    from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy
    from lerobot_policy_pi_rl.processor_pi_rl import ensure_state_clamp
    from lerobot_policy_pi_rl.samplers import NOISE_STEER

    pretrained_dir = Path(pretrained_dir)
    if not (pretrained_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors in {pretrained_dir}: not a LeRobot pretrained_model directory")
    config = PreTrainedConfig.from_pretrained(pretrained_dir)
    config.device = device
    saved_noise_method = config.noise_method
    for k, v in config_overrides.items():
        if not hasattr(config, k):
            raise ValueError(f"policy.{k}: unknown pi_rl config field")
        setattr(config, k, v)
    config.validate()
    # noise_steer on a checkpoint that never steered (an SFT policy): load it as saved, then add a fresh
    # steering head (it leaves the behaviour unchanged until RL trains it)
    fresh_steering = config.noise_method == NOISE_STEER and saved_noise_method != NOISE_STEER
    if fresh_steering:
        config.noise_method = saved_noise_method
    policy = PiRLPolicy.from_pretrained(pretrained_dir, config=config, strict=True)
    if fresh_steering:
        policy.start_noise_steering()
    policy.eval()
    overrides = {}
    if config.is_vla and config.tokenizer_name is None:
        # the default tokenizer (PaliGemma's, the VLM's, or the reduced sizes' stand-in generated on
        # this machine) is resolved here, not taken from a path saved on another machine
        from lerobot_policy_pi_rl.processor_pi_rl import tokenizer_settings

        overrides = {"tokenizer_processor": {"tokenizer_name": tokenizer_settings(config)[0]}}
    pre, post = make_pre_post_processors(config, pretrained_path=str(pretrained_dir), preprocessor_overrides=overrides)
    ensure_state_clamp(pre, config)
    warn_near_constant(config, normalizer_stats(pre), f"policy {pretrained_dir}")
    return policy, pre, post
