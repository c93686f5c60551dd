"""Few-demo statistics: a state dim that barely varied in the demos is clamped after normalisation, and
reported when SFT starts and when a policy is loaded."""

from __future__ import annotations

import logging

import pytest
import torch
from lerobot.policies.factory import make_pre_post_processors

from helpers.policy import ACTION_DIM, STATE_DIM, builtin_config, rollout_batch, save_checkpoint
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, PiRLAlgorithmConfig
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfigError
from lerobot_policy_pi_rl.input_stats import near_constant_dims, normalizer_stats
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy
from lerobot_policy_pi_rl.processor_pi_rl import ClampStateProcessorStep
from lerobot_policy_pi_rl.sft import load_policy


def few_demo_stats() -> dict:
    """Dim 0 of the state barely varied in the demos (an orientation no demo disturbed): std 1e-4."""
    std = torch.ones(STATE_DIM)
    std[0] = 1e-4
    return {
        "observation.state": {"mean": torch.zeros(STATE_DIM), "std": std},
        "action": {"mean": torch.zeros(ACTION_DIM), "std": torch.ones(ACTION_DIM)},
    }


def rl_states(n: int, seed: int) -> torch.Tensor:
    """Raw states once RL moves that dim by up to 5 cm: up to 500 standard deviations out."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, STATE_DIM, generator=g)
    raw[:, 0] = 0.05 * (2 * torch.rand(n, generator=g) - 1)
    return raw


def first_update_kl(state_clip: float | None) -> tuple[float, float, float]:
    """(max |normalised input|, approx KL, clip fraction) of one PPO update on states RL has moved."""
    torch.manual_seed(0)
    cfg = builtin_config(state_clip=state_clip)
    policy = PiRLPolicy(cfg)
    pre, _ = make_pre_post_processors(cfg, dataset_stats=few_demo_stats())
    T, N = 4, 64
    obs = pre({"observation.state": rl_states(T * N, 0)})["observation.state"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        s = policy.sample_chains({"observation.state": obs}, *policy.draw_noise(T * N, generator=g))
    rewards = torch.rand(T, N, generator=g)
    batch = rollout_batch({"observation.state": obs.reshape(T, N, STATE_DIM)}, s, rewards, success_threshold=2)
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(actor_lr=1e-4, critic_lr=1e-3, update_epochs=4, weight_decay=0.0))
    stats = algo.update_on(batch)
    return obs.abs().max().item(), stats.extra["approx_kl"], stats.extra["clip_fraction"]


def test_clamped_inputs_keep_ppos_kl_sane_where_unclamped_ones_do_not():
    reach, kl, clip_frac = first_update_kl(state_clip=10.0)
    assert reach == pytest.approx(10.0)
    assert kl < 2e-3 and clip_frac < 0.01
    # the same update without the clamp: the dim sits ~500 sigmas out and the first update jumps
    reach_off, kl_off, clip_off = first_update_kl(state_clip=None)
    assert reach_off > 400
    assert kl_off > 10 * kl and clip_off > 0.05


def test_the_clamp_is_saved_with_the_preprocessor_and_reloaded(tmp_path, caplog):
    cfg = builtin_config(state_clip=3.0)
    policy = PiRLPolicy(cfg)
    pre, post = make_pre_post_processors(cfg, dataset_stats=few_demo_stats())
    ckpt = save_checkpoint(tmp_path / "ckpt", policy, pre, post)
    with caplog.at_level(logging.WARNING):
        _, pre2, _ = load_policy(ckpt)
    steps = [s for s in pre2.steps if isinstance(s, ClampStateProcessorStep)]
    assert len(steps) == 1 and steps[0].keys == ["observation.state"] and steps[0].limit == 3.0
    out = pre2({"observation.state": rl_states(8, 2)})["observation.state"]
    assert out.abs().max().item() == pytest.approx(3.0)
    # loading reports the near-constant dim, with its key and index, and what guards it
    (msg,) = [r.getMessage() for r in caplog.records if "barely vary" in r.getMessage()]
    assert "observation.state[0]" in msg and "clamped to +-3" in msg and "observation.state[1]" not in msg


def test_a_checkpoint_saved_without_the_clamp_gets_it_at_load(tmp_path):
    cfg = builtin_config(state_clip=None)
    policy = PiRLPolicy(cfg)
    pre, post = make_pre_post_processors(cfg, dataset_stats=few_demo_stats())
    ckpt = save_checkpoint(tmp_path / "old", policy, pre, post)
    _, pre_off, _ = load_policy(ckpt)  # its config turns the clamp off: none is added
    assert pre_off({"observation.state": rl_states(8, 3)})["observation.state"].abs().max() > 400
    # the same pipeline under a config that asks for the clamp (a checkpoint from before it existed)
    _, pre_on, _ = load_policy(ckpt, state_clip=10.0)
    names = [type(s).__name__ for s in pre_on.steps]
    assert names.index("ClampStateProcessorStep") == names.index("NormalizerProcessorStep") + 1
    assert pre_on({"observation.state": rl_states(8, 3)})["observation.state"].abs().max() == pytest.approx(10.0)


def test_near_constant_dims_follow_the_normalisation_mode():
    cfg = builtin_config()
    stats = {k: {n: v.numpy() for n, v in s.items()} for k, s in few_demo_stats().items()}
    assert [(d.key, d.index) for d in near_constant_dims(cfg, stats)] == [("observation.state", 0)]
    # relative to the centre: a std of 0.5 around 1000 barely varies; a std of 0.5 around 0 does not
    stats["observation.state"]["mean"][1] = 1000.0
    stats["observation.state"]["std"][1] = 0.5
    stats["observation.state"]["std"][2] = 0.5
    assert [d.index for d in near_constant_dims(cfg, stats)] == [0, 1]
    # healthy stats: nothing to report
    pre, _ = make_pre_post_processors(
        cfg,
        dataset_stats={
            **few_demo_stats(),
            "observation.state": {"mean": torch.zeros(STATE_DIM), "std": torch.ones(STATE_DIM)},
        },
    )
    assert near_constant_dims(cfg, normalizer_stats(pre)) == []


def test_state_clip_off_and_validated():
    cfg = builtin_config(state_clip=None)
    pre, _ = make_pre_post_processors(cfg, dataset_stats=few_demo_stats())
    assert not any(isinstance(s, ClampStateProcessorStep) for s in pre.steps)
    with pytest.raises(PiRLConfigError, match="policy.state_clip"):
        builtin_config(state_clip=0.0)
