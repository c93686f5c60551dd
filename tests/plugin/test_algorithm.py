"""PI-RL algorithm: GAE, GRPO advantages, PPO losses, lr-0 invariants, state dicts, checkpoints, NaN batches."""

import logging

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.rl.algorithms.configs import RLAlgorithmConfig

from helpers.policy import rollout_batch
from lerobot_policy_pi_rl.advantages import compute_gae, explained_variance, grpo_advantages, normalize_advantages
from lerobot_policy_pi_rl.algorithm import (
    PiRLAlgorithm,
    PiRLAlgorithmConfig,
    clipped_surrogate_loss,
    clipped_value_loss,
    load_checkpoint,
    save_checkpoint,
)
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_hand_computed_with_truncation_and_termination():
    # one env, 4 macro-steps: steps 0-1 form an episode that is TRUNCATED at step 1 (bootstrap 0.5),
    # steps 2-3 a new episode that TERMINATES at step 3 (no bootstrap).
    gamma, lam = 0.9, 0.8
    rewards = t([[0.0], [1.0], [0.0], [1.0]])
    values = t([[0.2], [0.4], [0.1], [0.3]])
    terminated = torch.tensor([[False], [False], [False], [True]])
    truncated = torch.tensor([[False], [True], [False], [False]])
    bootstrap = t([[0.0], [0.5], [0.0], [0.0]])
    valid = torch.ones(4, 1, dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, terminated, truncated, bootstrap, valid, gamma, lam)
    # by hand
    d1 = 1.0 + 0.9 * 0.5 - 0.4  # truncated: bootstrap from V(final obs)
    d0 = 0.0 + 0.9 * 0.4 - 0.2
    a1 = d1
    a0 = d0 + 0.9 * 0.8 * a1
    d3 = 1.0 + 0.0 - 0.3  # terminated: no bootstrap
    d2 = 0.0 + 0.9 * 0.3 - 0.1
    a3 = d3
    a2 = d2 + 0.9 * 0.8 * a3
    torch.testing.assert_close(adv.squeeze(1), t([a0, a1, a2, a3]))
    torch.testing.assert_close(ret, adv + values)


def test_gae_ignores_invalid_steps_and_bootstraps_at_horizon():
    rewards = t([[0.0, 1.0], [0.0, 0.0]])
    values = t([[0.5, 0.5], [0.7, 9.0]])
    terminated = torch.tensor([[False, True], [False, False]])
    truncated = torch.zeros(2, 2, dtype=torch.bool)
    valid = torch.tensor([[True, True], [True, False]])  # env 1 finished at step 0, frozen after
    bootstrap = t([[0.0, 0.0], [0.25, 0.0]])  # env 0 is still running at the horizon end
    adv, _ = compute_gae(rewards, values, terminated, truncated, bootstrap, valid, 1.0, 1.0)
    assert adv[1, 1] == 0
    torch.testing.assert_close(adv[:, 1], t([1.0 - 0.5, 0.0]))
    torch.testing.assert_close(adv[1, 0], torch.tensor(0.25 - 0.7))
    torch.testing.assert_close(adv[0, 0], torch.tensor((0.7 - 0.5) + (0.25 - 0.7)))
    norm = normalize_advantages(adv, valid)
    assert abs(norm[valid].mean()) < 1e-6 and norm[1, 1] == 0


def test_grpo_advantages_hand_made_group():
    returns = t([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, mean, std = grpo_advantages(returns, groups)
    # group 0: mean .75, population std sqrt(.1875)
    s = 0.1875**0.5
    torch.testing.assert_close(adv[:4], t([0.25 / s, -0.75 / s, 0.25 / s, 0.25 / s]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # all-fail group: no signal
    torch.testing.assert_close(mean, t([0.75] * 4 + [0.0] * 4))


def test_value_clipping_takes_the_pessimistic_branch():
    old, target = t([0.0, 0.0]), t([1.0, 1.0])
    # the new value moved 0.5 toward the target: the clipped value (0.2) is further -> its loss counts
    loss = clipped_value_loss(t([0.5, 0.5]), old, target, clip=0.2, huber_delta=10.0)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 0.8**2))
    # moving away from the target is not hidden by the clip
    loss_away = clipped_value_loss(t([-0.5, -0.5]), old, target, clip=0.2, huber_delta=10.0)
    torch.testing.assert_close(loss_away, torch.tensor(0.5 * 1.5**2))
    # Huber: linear beyond delta
    big = clipped_value_loss(t([0.0]), t([0.0]), t([30.0]), clip=100.0, huber_delta=10.0)
    torch.testing.assert_close(big, torch.tensor(10.0 * (30.0 - 5.0)))


def test_clipped_surrogate_clips_positive_and_negative_advantages():
    old = torch.zeros(2)
    loss, ratio, _ = clipped_surrogate_loss(torch.log(t([1.5, 0.5])), old, t([1.0, -1.0]), clip_eps=0.2)
    torch.testing.assert_close(ratio, t([1.5, 0.5]))
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.8) / 2))


def test_explained_variance():
    y = t([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(y, y) == 1.0
    assert abs(explained_variance(torch.full_like(y, 2.5), y)) < 1e-6


# --- updates on a synthetic batch -----------------------------------------------------------------

STATE = 6


def make_policy(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = PiRLConfig(
        device="cpu",
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (STATE,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (3,))},
        **kw,
    )
    return PiRLPolicy(cfg)


def make_batch(policy, T=3, N=32, seed=0, reward_fn=None):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(T, N, STATE, generator=g)
    with torch.no_grad():
        noise = policy.draw_noise(T * N, generator=g)
        sample = policy.sample_chains({"observation.state": obs.reshape(T * N, STATE)}, *noise)
    actions = sample.chain.actions.reshape(T, N, *sample.chain.actions.shape[1:])
    rewards = reward_fn(actions) if reward_fn else torch.rand(T, N, generator=g)
    return rollout_batch({"observation.state": obs}, sample, rewards, groups=8)


@pytest.mark.parametrize("method", ["flow_sde", "flow_noise"])
def test_lr_zero_keeps_ratio_one_and_weights_fixed(method):
    policy = make_policy(noise_method=method)
    batch = make_batch(policy)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(actor_lr=0.0, critic_lr=0.0, weight_decay=0.0))
    stats = algo.update_on(batch)
    assert stats.extra["approx_kl"] < 1e-10
    assert stats.extra["clip_fraction"] == 0.0
    assert stats.extra["optimizer_steps"] == 16
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the gradient itself is not zero (lr 0 is what holds the weights): the test can fail
    assert stats.grad_norms["actor"] > 0


def test_ppo_update_lowers_the_surrogate_on_a_fixed_batch():
    policy = make_policy(noise_method="flow_sde", hybrid=False)
    # reward chunks whose first action dim is large: a learnable direction
    batch = make_batch(policy, reward_fn=lambda a: a[:, :, :4, 0].mean(-1))
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(actor_lr=3e-4, critic_lr=1e-3, update_epochs=1, num_minibatches=1))

    def surrogate():
        with torch.no_grad():
            adv, _, mask = algo.compute_advantages(batch)
            data = batch.flatten(mask)
            ev = policy.evaluate_chains(data["observations"], data["chains"], data["stochastic"], data["noise_level"])
            return -(torch.exp(ev.log_prob - data["log_probs"]) * adv[mask]).mean().item()

    first = surrogate()
    for _ in range(5):
        algo.update_on(batch)
    assert surrogate() < first - 1e-3


def test_grpo_update_runs_without_critic():
    policy = make_policy(noise_method="flow_sde")
    batch = make_batch(policy)
    algo = PiRLAlgorithm(
        policy,
        PiRLAlgorithmConfig(advantage_estimator="grpo", actor_lr=1e-4, grpo_filter_low=0.0, grpo_filter_high=1.0),
    )
    assert set(algo.get_optimizers()) == {"actor"}
    stats = algo.update_on(batch)
    assert "value_loss" not in stats.losses and stats.extra["samples"] == batch.valid.sum()


def test_nonfinite_batch_is_rejected_before_the_optimizer(caplog):
    policy = make_policy()
    batch = make_batch(policy)
    batch.rewards[1, 3] = float("nan")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(actor_lr=1e-3))
    with caplog.at_level(logging.WARNING):
        stats = algo.update_on(batch)
    assert stats.extra["skipped_nonfinite"] == 1.0
    assert "'rewards' has 1 non-finite" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())
    assert algo.optimization_step == 0


def test_algorithm_config_registered_with_lerobot_and_validated():
    assert RLAlgorithmConfig.get_choice_class("pi_rl") is PiRLAlgorithmConfig
    with pytest.raises(ValueError, match="algorithm.advantage_estimator"):
        PiRLAlgorithmConfig(advantage_estimator="a2c")
    with pytest.raises(ValueError, match="algorithm.update_epochs"):
        PiRLAlgorithmConfig(update_epochs=0)


def test_state_dict_round_trip_keeps_optimizer_parameter_identity():
    policy = make_policy(noise_method="flow_noise")
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(actor_lr=1e-3))
    algo.update_on(make_batch(policy))
    state = {k: v.clone() for k, v in algo.state_dict().items()}
    ids = [id(p) for opt in algo.get_optimizers().values() for g in opt.param_groups for p in g["params"]]
    with torch.no_grad():
        for p in policy.value_head.parameters():
            p.zero_()
    algo.load_state_dict(state)
    ids_after = [id(p) for opt in algo.get_optimizers().values() for g in opt.param_groups for p in g["params"]]
    assert ids == ids_after
    assert all(torch.equal(v, state[k]) for k, v in algo.state_dict().items())
    # the optimizer still drives the loaded tensors
    critic_param = next(policy.value_head.parameters())
    assert any(critic_param is p for g in algo.optimizers["critic"].param_groups for p in g["params"])


def test_checkpoint_resume_gives_identical_next_update(tmp_path):
    policy = make_policy(noise_method="flow_sde")
    cfg = PiRLAlgorithmConfig(actor_lr=1e-3, critic_lr=1e-3, lr_schedule="cosine", total_updates=10)
    algo = PiRLAlgorithm(policy, cfg)
    algo.update_on(make_batch(policy, seed=1))
    save_checkpoint(tmp_path / "ckpt", algo)
    assert (tmp_path / "ckpt" / "pretrained_model" / "model.safetensors").is_file()
    assert not (tmp_path / "ckpt.tmp").exists()
    next_batch = make_batch(policy, seed=2)
    algo.update_on(next_batch)
    expected = {k: v.clone() for k, v in policy.state_dict().items()}

    fresh_policy = make_policy(seed=123, noise_method="flow_sde")
    fresh = PiRLAlgorithm(fresh_policy, cfg)
    load_checkpoint(tmp_path / "ckpt", fresh)
    assert fresh.num_updates == 1 and fresh.optimization_step == algo.optimization_step - 16
    fresh.update_on(next_batch)
    for k, v in fresh_policy.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


def test_grpo_filters_all_success_and_all_failure_groups():
    policy = make_policy(noise_method="flow_sde")
    batch = make_batch(policy, N=24)
    # groups of 8: group 0 all succeed, group 1 all fail, group 2 mixed
    success = torch.tensor([1.0] * 8 + [0.0] * 8 + [1.0, 0.0] * 4)
    batch.episode_returns, batch.episode_success = success, success > 0
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(advantage_estimator="grpo"))
    adv, _, mask = algo.compute_advantages(batch)
    assert not mask[:, :16].any() and mask[:, 16:].all()
    torch.testing.assert_close(adv[0, 16:], torch.tensor([1.0, -1.0] * 4), rtol=1e-4, atol=1e-4)


def test_hybrid_bc_term_uses_demonstrations():
    policy = make_policy()
    with pytest.raises(ValueError, match="bc_coef"):
        PiRLAlgorithm(policy, PiRLAlgorithmConfig(bc_coef=0.5))
    g = torch.Generator().manual_seed(0)

    def demos():
        while True:
            yield {"observation.state": torch.randn(8, STATE, generator=g), "action": torch.randn(8, 8, 3, generator=g)}

    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(bc_coef=0.5, actor_lr=1e-4), demo_iterator=demos())
    stats = algo.update_on(make_batch(policy))
    assert stats.losses["bc_loss"] > 0


def test_ppo_coef_zero_leaves_the_actor_to_the_bc_term():
    """HG-DAgger: with ppo_coef 0 the surrogate gives the actor no gradient (without BC its weights stay put, the
    critic still learns); with a BC term the actor follows the demonstrations only."""
    policy = make_policy()
    actor_before = [p.detach().clone() for p in policy.rl_actor_parameters()]
    critic_before = [p.detach().clone() for p in policy.rl_critic_parameters()]
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(ppo_coef=0.0, weight_decay=0.0, actor_lr=1e-3))
    stats = algo.update_on(make_batch(policy))
    assert stats.grad_norms["actor"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(policy.rl_actor_parameters(), actor_before, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(policy.rl_critic_parameters(), critic_before, strict=True))
    with pytest.raises(ValueError, match="algorithm.ppo_coef: must be >= 0"):
        PiRLAlgorithmConfig(ppo_coef=-1.0)
