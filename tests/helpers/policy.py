"""The small default ``pi_rl`` policy for the built-in task's shapes, as most tests build it."""

from __future__ import annotations

from pathlib import Path

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_pre_post_processors

from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy

STATE_DIM, ACTION_DIM = 6, 3  # pirl_reach: state 6, action 3


def builtin_config(**overrides) -> PiRLConfig:
    return PiRLConfig(
        **{
            "device": "cpu",
            "push_to_hub": False,
            "input_features": {"observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
            "output_features": {"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
            **overrides,
        }
    )


def builtin_stats(action_std: float = 1.0) -> dict:
    """Normalisation stats (identity for the state, ``action_std`` for actions)."""
    return {
        "observation.state": {"mean": torch.zeros(STATE_DIM), "std": torch.ones(STATE_DIM)},
        "action": {"mean": torch.zeros(ACTION_DIM), "std": action_std * torch.ones(ACTION_DIM)},
    }


def builtin_policy(seed: int = 0, *, action_std: float = 1.0, **overrides):
    """(policy, preprocessor, postprocessor), freshly initialised from ``seed``; the policy in train mode."""
    torch.manual_seed(seed)
    cfg = builtin_config(**overrides)
    policy = PiRLPolicy(cfg)
    pre, post = make_pre_post_processors(cfg, dataset_stats=builtin_stats(action_std))
    return policy, pre, post


def save_checkpoint(path: Path, policy, pre, post) -> Path:
    """Saved like a LeRobot ``pretrained_model`` directory (what pirl-learner / pirl-edge load)."""
    for part in (policy, pre, post):
        part.save_pretrained(path)
    return path


def sampled_decision(policy, seed: int = 0):
    """One real sampled chunk of ``policy`` at version 0, as an edge records it (edge.records.Decision)."""
    from edge.backends import TorchBackend
    from edge.records import Decision

    obs = {"observation.state": torch.randn(1, STATE_DIM, generator=torch.Generator().manual_seed(seed))}
    with torch.no_grad():
        noise = policy.draw_noise(1, generator=torch.Generator().manual_seed(seed + 1))
        sample = TorchBackend(policy).sample(obs, *noise, torch.full((1,), policy.config.noise_level))
    return Decision.from_sample(0, obs, sample, sample.actions.detach().cpu().numpy(), 0, policy.config.n_action_steps)


# a smaller network for the backend tests (TensorRT, hot swap), moved off its init
SMALL_SIZES = {
    "hidden_dim": 32,
    "num_layers": 2,
    "expert_token_dim": 8,
    "prefix_dim": 16,
    "time_embed_dim": 8,
    "critic_hidden_dims": [16],
}


def small_policy(seed=0, **overrides):
    policy, pre, post = builtin_policy(seed, **SMALL_SIZES, **overrides)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval(), pre, post


def shifted(policy, delta, seed):
    """A copy of ``policy``'s weights moved by ``delta`` * noise (a 'new version')."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + delta * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in policy.state_dict().items()
    }


def other_task_policy():
    """(policy, pre, post) for another task than the built-in one: MetaWorld's 39-dim state, 4-dim actions."""
    cfg = PiRLConfig(
        device="cpu",
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (39,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
        **SMALL_SIZES,
    )
    pre, post = make_pre_post_processors(cfg, dataset_stats=None)
    return PiRLPolicy(cfg), pre, post


def rollout_batch(observations: dict, sample, rewards, success_threshold: float = 0.0, groups: int = 1):
    """A ``RolloutBatch`` of ``T x N`` decisions: ``sample`` (a ``PolicySample`` of ``T * N`` rows) taken on
    ``observations`` (``{key: [T, N, ...]}``), ``rewards`` ``[T, N]``; every episode ends at step T, succeeds
    when its return exceeds ``success_threshold``; ``groups`` consecutive envs share a group id."""
    from lerobot_policy_pi_rl.rollout import RolloutBatch

    T, N = rewards.shape
    chain = sample.chain
    terminated = torch.zeros(T, N, dtype=torch.bool)
    terminated[-1] = True
    return RolloutBatch(
        observations=observations,
        chains=chain.chain.reshape(T, N, *chain.chain.shape[1:]),
        stochastic=chain.stochastic.reshape(T, N, -1),
        noise_level=sample.noise_level.reshape(T, N),
        log_probs=chain.log_prob.reshape(T, N),
        values=sample.value.reshape(T, N),
        rewards=rewards,
        terminated=terminated,
        truncated=torch.zeros(T, N, dtype=torch.bool),
        valid=torch.ones(T, N, dtype=torch.bool),
        bootstrap_values=torch.zeros(T, N),
        episode_returns=rewards.sum(0),
        episode_success=rewards.sum(0) > success_threshold,
        group_ids=torch.arange(N) // groups,
    )


def constant_action_policy(state_dim: int, action: list[float]):
    """(policy, pre, post) whose actions are ``action`` whatever it observes: the action statistics centre on it
    with a spread of 1e-6, so the flow policy's bounded output moves it by micro-units. For tests that need a
    known behaviour in a real env (a fixed push that succeeds from some starts and not others)."""
    a = torch.tensor(action, dtype=torch.float32)
    cfg = PiRLConfig(
        device="cpu",
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (state_dim,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (len(action),))},
        **SMALL_SIZES,
    )
    stats = {
        "observation.state": {"mean": torch.zeros(state_dim), "std": torch.ones(state_dim)},
        "action": {"mean": a, "std": torch.full_like(a, 1e-6)},
    }
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    return PiRLPolicy(cfg), pre, post


def constant_action_vla(backbone: str, action: list[float], image_shape=(3, 480, 480), state_dim: int = 4):
    """(policy, pre, post): a reduced-size LeRobot VLA backbone (``backbones/reduced.py``, randomly initialised)
    that reads a camera image, the state and the task instruction, with the action statistics of
    :func:`constant_action_policy`: it runs the VLA's whole pipeline and its actions are ``action``."""
    a = torch.tensor(action, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = PiRLConfig(
        device="cpu",
        backbone=backbone,
        backbone_reduced={},
        backbone_config={"tokenizer_max_length": 16},
        chunk_size=8,
        n_action_steps=4,
        max_action_dim=len(action),
        input_features={
            "observation.image": PolicyFeature(FeatureType.VISUAL, tuple(image_shape)),
            "observation.state": PolicyFeature(FeatureType.STATE, (state_dim,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (len(action),))},
    )
    stats = {
        "observation.state": {"mean": torch.zeros(state_dim), "std": torch.ones(state_dim)},
        "action": {"mean": a, "std": torch.full_like(a, 1e-6)},
    }
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    return PiRLPolicy(cfg).eval(), pre, post


def sim_robot_policy(seed: int = 0, *, gripper_open: bool = False):
    """(policy, pre, post): a small random policy with the simulated robot's shapes and statistics (pirl_sim:
    state 5, cube 2, action 3), in eval mode. Its random gripper commands close the gripper early (an episode
    that terminates); ``gripper_open``: its gripper statistics pin the command at 100 (never closes: every
    episode runs to the step limit)."""
    torch.manual_seed(seed)
    cfg = PiRLConfig(
        device="cpu",
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (5,)),
            "observation.environment_state": PolicyFeature(FeatureType.ENV, (2,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (3,))},
        **SMALL_SIZES,
    )
    stats = {
        "observation.state": {
            "mean": torch.tensor([0.0, 0.0, 0.0, 0.0, 50.0]),
            "std": torch.tensor([0.1, 0.1, 0.2, 0.2, 40.0]),
        },
        "observation.environment_state": {"mean": torch.zeros(2), "std": torch.full((2,), 0.1)},
        "action": {
            "mean": torch.tensor([0.0, 0.0, 100.0 if gripper_open else 50.0]),
            "std": torch.tensor([0.1, 0.1, 1e-3 if gripper_open else 50.0]),
        },
    }
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    return PiRLPolicy(cfg).eval(), pre, post
