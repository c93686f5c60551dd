"""noise_steer: a steering head chooses the initial noise x_1 of the frozen flow policy (noise-space steering)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.policy import ACTION_DIM, SMALL_SIZES, STATE_DIM, builtin_policy, rollout_batch, save_checkpoint
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, PiRLAlgorithmConfig
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfigError
from lerobot_policy_pi_rl.noise_critic import return_to_go
from lerobot_policy_pi_rl.sft import load_policy

SMALL = {**SMALL_SIZES, "steer_hidden_dims": [16]}


def _obs(n: int, seed: int) -> dict:
    return {"observation.state": torch.randn(n, STATE_DIM, generator=torch.Generator().manual_seed(seed))}


def _perturb(module: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_a_fresh_steering_head_leaves_the_policy_unchanged():
    """x_1 ~ N(0, I) before any update: the same chunks as the ODE from the same noise."""
    steer, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    plain, _, _ = builtin_policy(0, noise_method="flow_ode", **SMALL)
    plain.load_state_dict({k: v for k, v in steer.state_dict().items() if not k.startswith("steer_head.")})
    obs = _obs(4, 0)
    noise = steer.draw_noise(4, generator=torch.Generator().manual_seed(2))
    assert not noise[2].any()  # every denoise step is the ODE step
    with torch.no_grad():
        a = steer.sample_chains(obs, *noise)
        b = plain.sample_chains(obs, *noise)
    torch.testing.assert_close(a.actions, b.actions, rtol=0, atol=0)
    torch.testing.assert_close(a.chain.chain[:, 0], noise[0], rtol=0, atol=0)
    # the decision's log-prob is that of x_1 under N(0, I), over every chunk position and real action dim
    steered = noise[0][..., :ACTION_DIM]
    want = (-0.5 * steered**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(-1)
    torch.testing.assert_close(a.chain.log_prob, want)


def test_the_learner_replays_a_steered_chain_to_ratio_one():
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", max_action_dim=5, **SMALL)
    _perturb(policy.steer_head)
    obs = _obs(6, 3)
    noise = policy.draw_noise(6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        sample = policy.sample_chains(obs, *noise)
        ev = policy.evaluate_chains(obs, sample.chain.chain, sample.chain.stochastic)
    torch.testing.assert_close(ev.log_prob, sample.chain.log_prob, rtol=0, atol=1e-5)
    # padded action dims are not steered: x_1 there is the drawn noise itself
    torch.testing.assert_close(sample.chain.chain[:, 0, :, ACTION_DIM:], noise[0][..., ACTION_DIM:], rtol=0, atol=0)
    assert not torch.allclose(sample.chain.chain[:, 0, :, :ACTION_DIM], noise[0][..., :ACTION_DIM])
    assert torch.all(ev.entropy > 0)


def test_ppo_trains_only_the_steering_head_and_the_critic():
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    T, N = 3, 16
    obs = torch.randn(T, N, STATE_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        noise = policy.draw_noise(T * N, generator=torch.Generator().manual_seed(1))
        s = policy.sample_chains({"observation.state": obs.reshape(T * N, STATE_DIM)}, *noise)
    # reward the chunks whose first action dim is large: a direction the steering can learn
    rewards = s.actions[:, :4, 0].mean(-1).reshape(T, N)
    batch = rollout_batch({"observation.state": obs}, s, rewards)
    assert {id(p) for p in policy.rl_actor_parameters()} == {id(p) for p in policy.steer_head.parameters()}
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(actor_lr=1e-2, critic_lr=1e-3))
    stats = algo.update_on(batch)
    assert stats.extra["approx_kl"] > 0 and stats.grad_norms["actor"] > 0
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("steer_head.", "value_head.")) for k in changed), changed
    assert any(k.startswith("steer_head.") for k in changed)
    # what a version publishes: the steering head and the critic, never the frozen flow policy
    assert all(n.startswith(("steer_head.", "value_head.")) for n in policy.rl_state_names())


def test_the_bc_term_under_noise_steering_imitates_initial_noises_and_leaves_the_flow_frozen():
    """noise_steer's BC term is the steering head's NLL of the given x_1 (reward-weighted regression in noise
    space when they come from successes): its law moves toward them; the flow policy does not change."""
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    obs = _obs(32, 5)
    target = torch.zeros(32, policy.config.chunk_size, ACTION_DIM)
    target[..., 0] = 1.0  # every success started from x_1 = 1 in the first action dim, 0 elsewhere
    demos = iter(lambda: {**obs, "initial_noise": target}, None)
    T, N = 2, 16
    with torch.no_grad():
        noise = policy.draw_noise(T * N, generator=torch.Generator().manual_seed(1))
        s = policy.sample_chains({"observation.state": obs["observation.state"]}, *noise)
    batch = rollout_batch(
        {"observation.state": obs["observation.state"].reshape(T, N, STATE_DIM)}, s, torch.zeros(T, N)
    )
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        nll_before = policy.steer_imitation_loss({**obs, "initial_noise": target}).item()
    cfg = PiRLAlgorithmConfig(ppo_coef=0.0, bc_coef=1.0, actor_lr=1e-2, update_epochs=4, entropy_coef=0.0)
    algo = PiRLAlgorithm(policy, cfg, demo_iterator=demos)
    stats = algo.update_on(batch)
    assert stats.losses["bc_loss"] > 0 and stats.extra["bc_samples"] > 0
    with torch.no_grad():
        nll_after = policy.steer_imitation_loss({**obs, "initial_noise": target}).item()
        mean, std = policy.steer_head(policy.backbone.embed_prefix(obs).features)
    assert nll_after < nll_before - 0.1
    assert mean[..., 0].mean() > 0.1 and std[..., :ACTION_DIM].max() < 1.0  # toward x_1 = 1, and narrower
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("steer_head.", "value_head.")) for k in changed), changed


def test_the_steering_bc_term_needs_initial_noises():
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    with pytest.raises(KeyError, match="initial_noise"):
        policy.steer_imitation_loss({**_obs(2, 0), "action": torch.zeros(2, policy.config.chunk_size, ACTION_DIM)})
    plain, _, _ = builtin_policy(0, **SMALL)
    with pytest.raises(ValueError, match="no steering head"):
        plain.steer_imitation_loss({**_obs(2, 0), "initial_noise": torch.zeros(2, 1, ACTION_DIM)})


def test_a_checkpoint_without_steering_loads_with_a_fresh_head(tmp_path):
    """An SFT checkpoint (flow_sde) run with noise_method=noise_steer: loaded strictly, then a fresh head."""
    policy, pre, post = builtin_policy(0, **SMALL)
    ckpt = save_checkpoint(tmp_path / "sft", policy, pre, post)
    steer, _, _ = load_policy(ckpt, noise_method="noise_steer")
    assert steer.config.noise_method == "noise_steer" and steer.steer_head is not None
    for k, v in policy.state_dict().items():
        torch.testing.assert_close(steer.state_dict()[k], v, rtol=0, atol=0)
    plain, _, _ = load_policy(ckpt)
    assert plain.steer_head is None
    # a steering run's own checkpoint keeps its trained head
    _perturb(steer.steer_head)
    again = save_checkpoint(tmp_path / "steer", steer, pre, post)
    reloaded, _, _ = load_policy(again)
    for k, v in steer.steer_head.state_dict().items():
        torch.testing.assert_close(reloaded.steer_head.state_dict()[k], v, rtol=0, atol=0)


def test_a_fresh_steering_head_is_the_same_whatever_the_global_generator(tmp_path):
    """Its weights come from a fixed seed (a policy is loaded before a run seeds the process), and making it leaves
    the global generator where it was."""
    policy, pre, post = builtin_policy(0, **SMALL)
    ckpt = save_checkpoint(tmp_path / "sft", policy, pre, post)
    heads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        steer, _, _ = load_policy(ckpt, noise_method="noise_steer")
        heads.append(steer.steer_head.state_dict())
    for k, v in heads[0].items():
        torch.testing.assert_close(heads[1][k], v, rtol=0, atol=0)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    policy.start_noise_steering()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "field,value",
    [("steer_bound", 0.0), ("steer_std_min", 2.0), ("steer_hidden_dims", [0])],
)
def test_steering_fields_are_validated(field, value):
    with pytest.raises(PiRLConfigError, match=f"policy.{field}"):
        builtin_policy(0, noise_method="noise_steer", **{field: value})


# --- steer_update=q: an off-policy critic over x_1 (DSRL-style) -------------------------------------------


def test_return_to_go_sums_discounted_rewards_to_each_episodes_end():
    rewards = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 5.0]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])  # env 1 ended at step 1
    want = torch.tensor([[0.81, 0.9], [0.9, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(return_to_go(rewards, valid, 0.9), want)


def _q_batch(policy, seed: int, T: int = 2, N: int = 64):
    """Steered decisions rewarded 1 where the first steered element of x_1 is positive (a direction the head can
    only find through the critic: the reward says nothing about the policy's actions themselves)."""
    obs = torch.randn(T, N, STATE_DIM, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        noise = policy.draw_noise(T * N, generator=torch.Generator().manual_seed(seed + 1))
        s = policy.sample_chains({"observation.state": obs.reshape(T * N, STATE_DIM)}, *noise)
    rewards = (s.chain.chain[:, 0, 0, 0] > 0).float().reshape(T, N)
    return rollout_batch({"observation.state": obs}, s, rewards), obs


def test_the_q_update_moves_the_head_to_the_noise_the_critic_scores_highest():
    torch.manual_seed(0)
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = PiRLAlgorithmConfig(
        steer_update="q", actor_lr=3e-3, q_lr=3e-3, q_steps=60, q_batch_size=64, q_warmup=0, q_hidden_dims=[32]
    )
    algo = PiRLAlgorithm(policy, cfg)
    for update in range(4):
        batch, obs = _q_batch(policy, seed=10 * update)
        stats = algo.update_on(batch)
    assert stats.extra["replay"] == 4 * 2 * 64 and stats.extra["optimizer_steps"] == 60
    assert stats.losses["q_loss"] < 0.6 * float(algo.noise_replay.returns.var()), (
        algo.noise_replay.returns.var()
    )  # beats a constant
    # the head now puts the rewarded element's mean above 0 on fresh observations
    with torch.no_grad():
        mean, _ = policy.steer_head(policy.backbone.embed_prefix(_obs(64, 99)).features)
    assert mean[:, 0, 0].mean() > 0.3, mean[:, 0, 0].mean()
    # only the steering head moved: the flow policy and the PPO critic stay as they were
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("steer_head.") for k in changed), changed
    # the noise critic goes into the algorithm's checkpoint tensors and comes back from them
    state = algo.state_dict()
    assert any(k.startswith("noise_critic.") for k in state)
    fresh = PiRLAlgorithm(builtin_policy(0, noise_method="noise_steer", **SMALL)[0], cfg)
    fresh.load_state_dict(state)
    steer_dim = int(policy.steer_head.steer_mask.sum())
    f = torch.randn(5, algo.noise_critic.norm.normalized_shape[0] - steer_dim)
    x1 = torch.randn(5, steer_dim)
    with torch.no_grad():
        torch.testing.assert_close(fresh.noise_critic(f, x1), algo.noise_critic(f, x1))


def test_the_q_update_needs_a_steering_policy():
    policy, _, _ = builtin_policy(0, noise_method="flow_sde", **SMALL)
    with pytest.raises(ValueError, match="noise_method must be noise_steer"):
        PiRLAlgorithm(policy, PiRLAlgorithmConfig(steer_update="q"))


@pytest.mark.parametrize(
    "field,value",
    [
        *[("steer_update", "sac"), ("q_steps", 0), ("q_hidden_dims", [0]), ("q_lr", -1.0)],
        *[("q_critic_input", "chunk"), ("q_target", "sarsa"), ("q_target_tau", 0.0), ("q_target_tau", 1.5)],
        ("q_td_steps", 0),
    ],
)
def test_q_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=f"algorithm.{field}"):
        PiRLAlgorithmConfig(**{field: value})


def test_a_batch_a_person_drove_throughout_adds_nothing_to_the_replay():
    """Every macro-step intervened: no x_1 the head chose, so nothing joins the buffer; with an empty buffer the
    update is skipped, and with an earlier batch in it the update trains on that."""
    torch.manual_seed(0)
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    algo = PiRLAlgorithm(policy, PiRLAlgorithmConfig(steer_update="q", q_steps=2, q_batch_size=8, q_hidden_dims=[8]))
    driven, _ = _q_batch(policy, seed=1, N=4)
    driven.intervened = torch.ones_like(driven.valid)
    stats = algo.update_on(driven)
    assert stats.extra["skipped"] == 1.0 and len(algo.noise_replay) == 0
    algo.update_on(_q_batch(policy, seed=2, N=4)[0])
    stats = algo.update_on(driven)
    assert "skipped" not in stats.extra and len(algo.noise_replay) == 8 and stats.extra["intervened"] == 8
    assert 0 < stats.extra["steer_std"] <= 1


def _chunk_batch(policy, seed: int, T: int = 2, N: int = 64):
    """Steered decisions rewarded 1 where the first executed action's first dim is above the batch median: a
    property of the chunk the frozen flow made, which the head can reach only through the flow."""
    obs = torch.randn(T, N, STATE_DIM, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        noise = policy.draw_noise(T * N, generator=torch.Generator().manual_seed(seed + 1))
        s = policy.sample_chains({"observation.state": obs.reshape(T * N, STATE_DIM)}, *noise)
    first = s.chain.actions[:, 0, 0]
    rewards = (first > first.median()).float().reshape(T, N)
    return rollout_batch({"observation.state": obs}, s, rewards), s


def test_an_action_critic_replays_the_executed_chunk_and_steers_the_noise_through_the_flow():
    """q_critic_input=action: the replay holds the executed part of each chunk (the ODE of its steered x_1), and
    the head moves x_1 so the frozen flow's chunks score higher, while the flow itself stays untouched."""
    torch.manual_seed(0)
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = PiRLAlgorithmConfig(
        steer_update="q",
        q_critic_input="action",
        actor_lr=3e-3,
        q_lr=3e-3,
        q_steps=60,
        q_batch_size=64,
        q_warmup=0,
        q_hidden_dims=[32],
        q_prior_coef=0.1,
    )
    algo = PiRLAlgorithm(policy, cfg)
    executed = policy.action_mask.bool()
    assert algo.noise_critic.norm.normalized_shape[0] == policy.backbone.prefix_dim + int(executed.sum())
    batch, sample = _chunk_batch(policy, seed=0)
    algo.update_on(batch)
    # what joined the replay: the executed chunk elements, the same as the flow's ODE from the steered x_1
    with torch.no_grad():
        prefix = policy.backbone.embed_prefix(
            {"observation.state": batch.observations["observation.state"].flatten(0, 1)}
        )
        again = policy.ode_chunk(prefix, sample.chain.chain[:, 0])
    torch.testing.assert_close(algo.noise_replay.decisions, sample.chain.actions[:, executed])
    torch.testing.assert_close(again[:, executed], sample.chain.actions[:, executed], rtol=0, atol=1e-6)

    probe = _obs(128, 99)
    with torch.no_grad():
        prefix = policy.backbone.embed_prefix(probe)
        start = policy.ode_chunk(prefix, policy.steer_head(prefix.features)[0])[:, 0, 0].mean()
    for update in range(1, 5):
        algo.update_on(_chunk_batch(policy, seed=10 * update)[0])
    with torch.no_grad():
        end = policy.ode_chunk(prefix, policy.steer_head(prefix.features)[0])[:, 0, 0].mean()
    assert end > start + 0.1, (start, end)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("steer_head.") for k in changed), changed
    assert all(p.grad is None for p in policy.backbone.parameters())  # differentiated through, never trained


def test_n_step_sums_rewards_up_to_n_ahead_and_bootstraps_only_where_the_episode_goes_on():
    from lerobot_policy_pi_rl.noise_critic import n_step

    rewards = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [4.0, 7.0]])
    valid = torch.tensor([[True, True], [True, True], [True, True], [True, False]])  # env 1 ended at step 2
    row, ahead, summed, discount = n_step(rewards, valid, 0.5, 1)
    torch.testing.assert_close(row, torch.tensor([[0, 1], [2, 3], [4, 5], [6, -1]]))
    torch.testing.assert_close(ahead, torch.tensor([[2, 3], [4, 5], [6, -1], [-1, -1]]))
    torch.testing.assert_close(summed, rewards * valid)
    torch.testing.assert_close(discount, torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.0], [0.0, 0.0]]))
    row, ahead, summed, discount = n_step(rewards, valid, 0.5, 2)
    torch.testing.assert_close(ahead, torch.tensor([[4, 5], [6, -1], [-1, -1], [-1, -1]]))
    want = torch.tensor([[1 + 0.5 * 2, 0.0], [2 + 0.5 * 3, 0.5], [3 + 0.5 * 4, 1.0], [4.0, 0.0]])
    torch.testing.assert_close(summed, want)
    torch.testing.assert_close(discount, torch.tensor([[0.25, 0.25], [0.25, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    # n past the batch: every step keeps its return-to-go, nothing is bootstrapped
    _, ahead, summed, discount = n_step(rewards, valid, 0.5, 9)
    torch.testing.assert_close(summed, return_to_go(rewards, valid, 0.5))
    assert (ahead == -1).all() and not discount.any()


def _td_algo(policy, **overrides):
    cfg = {"steer_update": "q", "q_critic_input": "action", "q_target": "td", "q_steps": 2, "q_batch_size": 8}
    return PiRLAlgorithm(policy, PiRLAlgorithmConfig(**{**cfg, "q_hidden_dims": [8], **overrides}))


def test_a_td_replay_keeps_each_steps_reward_and_where_its_episode_went_next():
    """q_target=td: each replayed macro-step carries its own reward, the features of its episode's next
    observation, and the discount of its value (0 after its episode's last step, whatever ended it)."""
    torch.manual_seed(0)
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    algo = _td_algo(policy)
    batch, obs = _q_batch(policy, seed=1, T=3, N=4)
    batch.rewards = torch.arange(12.0).reshape(3, 4)
    batch.valid[2, 3] = False  # env 3 ended at step 1
    batch.terminated[1, 3] = True
    algo.update_on(batch)
    replay, valid = algo.noise_replay, batch.valid
    with torch.no_grad():
        features = policy.backbone.embed_prefix({"observation.state": obs[valid]}).features
    torch.testing.assert_close(replay.features, features)
    torch.testing.assert_close(replay.rewards, batch.rewards[valid])
    torch.testing.assert_close(replay.discounts, torch.tensor([algo.config.gamma] * 7 + [0.0] * 4))
    torch.testing.assert_close(replay.next_features[:7], features[4:])  # (t, j) -> (t + 1, j), row-major
    torch.testing.assert_close(replay.returns, return_to_go(batch.rewards, valid, algo.config.gamma)[valid])
    with pytest.raises(ValueError, match="never both"):  # a replay's rows are of one kind
        replay.add(features, replay.decisions, replay.returns)
    # two steps ahead: the rewards of two steps, the features two ahead, gamma^2 where the episode got there
    two = _td_algo(policy, q_td_steps=2)
    two.update_on(batch)
    g = two.config.gamma
    r = batch.rewards
    torch.testing.assert_close(two.noise_replay.rewards[:4], r[0] + g * r[1])
    torch.testing.assert_close(two.noise_replay.next_features[:3], features[8:])
    torch.testing.assert_close(two.noise_replay.discounts, torch.tensor([g * g] * 3 + [0.0] * 8))


def test_the_td_target_is_the_reward_plus_the_discounted_value_where_the_episode_goes_on():
    torch.manual_seed(0)
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    algo = _td_algo(policy, gamma=0.9)
    with torch.no_grad():  # every target member says 2.0 of any state and chunk
        for member in algo.noise_critic_target.members:
            member[-1].weight.zero_()
            member[-1].bias.fill_(2.0)
    f = torch.randn(3, policy.backbone.prefix_dim)
    batch = {"next_features": f, "rewards": torch.tensor([1.0, 0.0, 0.5]), "discounts": torch.tensor([0.0, 0.9, 0.81])}
    torch.testing.assert_close(algo._td_target(batch), torch.tensor([1.0, 1.8, 2.12]))


@pytest.mark.parametrize("tau", [1.0, 0.005])
def test_the_td_target_critic_follows_the_critic_by_tau_per_step(tau):
    torch.manual_seed(0)
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    algo = _td_algo(policy, q_target_tau=tau, q_steps=1, q_warmup=10_000)
    start = [p.clone() for p in algo.noise_critic_target.parameters()]
    algo.update_on(_q_batch(policy, seed=1, N=4)[0])
    for before, target, critic in zip(
        start, algo.noise_critic_target.parameters(), algo.noise_critic.parameters(), strict=True
    ):
        torch.testing.assert_close(target, before + tau * (critic - before))
    assert not all(torch.equal(t, c) for t, c in zip(start, algo.noise_critic.parameters(), strict=True))


def test_an_action_critic_needs_a_backbone_whose_prefix_is_its_features():
    policy, _, _ = builtin_policy(0, noise_method="noise_steer", **SMALL)
    policy.config.backbone = "pi0"  # what the check reads; building a real pi0 is not needed to refuse it
    with pytest.raises(ValueError, match="q_critic_input=noise"):
        PiRLAlgorithm(policy, PiRLAlgorithmConfig(steer_update="q", q_critic_input="action"))
