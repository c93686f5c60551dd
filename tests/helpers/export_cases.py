"""The export test cases (noise methods, padding, images, critic placements) and their small policies,
shared by the ONNX Runtime tests (tests/pirl/test_export.py) and the TensorRT GPU tests."""

from __future__ import annotations

import torch
from lerobot.configs.types import FeatureType, PolicyFeature

from helpers.policy import ACTION_DIM, SMALL_SIZES, STATE_DIM
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy

STATE = STATE_DIM
SMALL = {**SMALL_SIZES, "image_channels": [4, 8]}  # the backend tests' sizes, with the image encoder's

# (id, config overrides, image feature?)
CASES = [
    ("flow_ode", {"noise_method": "flow_ode"}, False),
    ("flow_noise_padded", {"noise_method": "flow_noise", "max_action_dim": 5, "critic_placement": "expert"}, False),
    ("flow_sde_hybrid_image", {"noise_method": "flow_sde", "hybrid": True}, True),
    ("flow_sde", {"noise_method": "flow_sde", "hybrid": False, "critic_placement": "expert"}, False),
    ("noise_steer_padded", {"noise_method": "noise_steer", "max_action_dim": 5}, False),
]


def make_policy(overrides: dict, with_image: bool, seed: int = 0) -> PiRLPolicy:
    torch.manual_seed(seed)
    feats = {"observation.state": PolicyFeature(FeatureType.STATE, (STATE,))}
    if with_image:
        feats["observation.image"] = PolicyFeature(FeatureType.VISUAL, (3, 16, 16))
    cfg = PiRLConfig(
        device="cpu",
        push_to_hub=False,
        input_features=feats,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        **SMALL,
        **overrides,
    )
    policy = PiRLPolicy(cfg)
    with torch.no_grad():  # move off the init (the value head starts at exactly 0)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval()


def random_inputs(policy: PiRLPolicy, batch_size: int, seed: int):
    """Fresh normalised observations, noise, mask and per-sample noise levels."""
    g = torch.Generator().manual_seed(seed)
    obs = {"observation.state": torch.randn(batch_size, STATE, generator=g)}
    for key, ft in policy.config.image_features.items():
        obs[key] = torch.rand(batch_size, *ft.shape, generator=g)
    initial, steps, stochastic = policy.draw_noise(batch_size, generator=g)
    level = 0.2 + 0.8 * torch.rand(batch_size, generator=g)
    return obs, initial, steps, stochastic, level
