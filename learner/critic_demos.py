"""Offline demonstrations as the chunk critic's first data (``--algorithm.steer_update=q
--algorithm.q_critic_input=action --offline_dataset.root=DIR``).

Each episode of the dataset is cut into the macro-steps the edge would have run: a decision every
``n_action_steps`` frames, its chunk the demonstrated actions from that frame on (the policy's pre-processor
normalises them as it normalised the SFT data; past the episode's end they are padding). Its return-to-go is the
discounted sum of the macro-step rewards to the episode's end, as the learner computes it for the robot's own
episodes. Demonstrations are successes: with a ``next.reward`` column its frames are summed per macro-step;
without one the last macro-step gets the success reward 1, what the simulated robot, the built-in tasks and an
operator's success label give.

They join the replay before the first update (``PiRLAlgorithm.replay_demonstrations``), so the critic knows what
the demonstrated chunks were worth before the robot has run any; the robot's own macro-steps then join beside them
(the replay keeps the newest ``q_replay_size``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from learner.bc_data import ACTION, PAD, OfflineDatasetConfig, OfflineDemos

REWARD = "next.reward"


def demonstrated_macro_steps(
    cfg: OfflineDatasetConfig, policy, preprocessor, gamma: float
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """(observations, actions [M, chunk_size, action_dim], action_is_pad [M, chunk_size], returns [M]) of every
    demonstrated macro-step, normalised as the policy reads them."""
    obs_keys = list(policy.config.observation_spec())
    demos = OfflineDemos(cfg, policy, preprocessor, [*obs_keys, ACTION, PAD], torch.Generator())
    n = policy.config.n_action_steps
    rewards = None
    if REWARD in demos.dataset.meta.features:
        rewards = np.asarray(demos.dataset.hf_dataset.with_format("numpy")[REWARD], dtype=np.float64).reshape(-1)
    starts, returns = [], []
    for frames in demos.episodes():
        decisions = frames[::n]
        if rewards is None:  # a success: reward 1 at the last macro-step
            step_rewards = np.zeros(len(decisions))
            step_rewards[-1] = 1.0
        else:
            step_rewards = np.array([rewards[frames[i : i + n]].sum() for i in range(0, len(frames), n)])
        ahead = 0.0
        episode_returns = np.zeros(len(decisions))
        for k in range(len(decisions) - 1, -1, -1):
            ahead = step_rewards[k] + gamma * ahead
            episode_returns[k] = ahead
        starts += decisions.tolist()
        returns += episode_returns.tolist()
    batch = demos.frames(starts)
    observations = {k: batch[k] for k in obs_keys}
    return observations, batch[ACTION], batch[PAD].bool(), torch.tensor(returns, dtype=torch.float32)
