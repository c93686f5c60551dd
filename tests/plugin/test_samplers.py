"""The sampler math: log-probs against torch.distributions, ratio == 1 on replay, masking,
marginal preservation of Flow-SDE, determinism, and equality with LeRobot's Euler loop."""

import math

import pytest
import torch
from lerobot.policies.common.flow_matching import euler_integrate
from torch.distributions import Normal

from lerobot_policy_pi_rl.samplers import (
    draw_sampling_noise,
    evaluate_chain,
    make_action_mask,
    sample_chain,
    sde_sigma,
    stochastic_step_mask,
    time_grid,
    transition,
)

B, H, D, K = 16, 6, 4, 4


class TinyField(torch.nn.Module):
    """A small nonlinear velocity field conditioned on a per-row observation."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(H * D + 1 + 3, 32, generator=g) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(32, H * 8, generator=g) * 0.3)
        self.w3 = torch.nn.Parameter(torch.randn(8, D, generator=g) * 0.3)
        self.noise = torch.nn.Linear(8, D)
        self.obs = torch.randn(B, 3, generator=g)

    def denoise(self, x, t, rows):
        h = torch.tanh(torch.cat([x.flatten(1), t[:, None], self.obs[rows]], -1) @ self.w1)
        feats = torch.tanh(h @ self.w2).reshape(x.shape[0], H, 8)
        return feats @ self.w3, feats

    def std(self, feats):
        return 0.08 + 0.08 * 0.5 * (torch.tanh(self.noise(feats)) + 1)


def _sample(field, method, hybrid, mask=None, seed=1, level=0.5):
    g = torch.Generator().manual_seed(seed)
    x1, eps, sto = draw_sampling_noise(B, H, D, K, noise_method=method, hybrid=hybrid, generator=g)
    mask = make_action_mask(H, D, n_executed=3, real_action_dim=3) if mask is None else mask
    out = sample_chain(
        field.denoise, x1, eps, sto, mask, noise_method=method, num_steps=K, noise_level=level, noise_std_fn=field.std
    )
    return out, mask


def _reference_log_prob(field, out, mask, method, level=0.5):
    """Independent computation: re-run each step's mean/std by hand, score with Normal."""
    total = torch.zeros(B)
    grid = time_grid(K)
    rows = torch.arange(B)
    for k in range(K):
        x, x_next, t = out.chain[:, k], out.chain[:, k + 1], grid[k].expand(B)
        v, feats = field.denoise(x, t, rows)
        tk, delta = grid[k].item(), 1.0 / K
        if method == "flow_noise":
            mean, std = x - delta * v, field.std(feats)
        else:
            t_den = 1 - 1 / K if tk == 1.0 else tk
            sigma = level * math.sqrt(tk / (1 - t_den))
            mean = x - delta * (v + sigma**2 / (2 * tk) * (x + (1 - tk) * v))
            std = torch.full_like(x, sigma * math.sqrt(delta))
        lp = Normal(mean, std).log_prob(x_next) * mask
        total += torch.where(out.stochastic[:, k], lp.flatten(1).sum(-1), torch.zeros(B))
    return total


@pytest.mark.parametrize("method,hybrid", [("flow_noise", False), ("flow_sde", False), ("flow_sde", True)])
def test_log_prob_matches_torch_distributions(method, hybrid):
    field = TinyField()
    with torch.no_grad():
        out, mask = _sample(field, method, hybrid)
        ref = _reference_log_prob(field, out, mask, method)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-4)
    if hybrid:
        assert (out.stochastic.sum(1) == 1).all()


def test_ode_has_zero_log_prob_and_equals_lerobot_euler():
    field = TinyField()
    with torch.no_grad():
        out, _ = _sample(field, "flow_ode", False)
        assert torch.all(out.log_prob == 0)
        ref = euler_integrate(lambda x, t: field.denoise(x, t, torch.arange(B))[0], out.chain[:, 0], K)
    torch.testing.assert_close(out.actions, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,hybrid", [("flow_noise", False), ("flow_sde", False), ("flow_sde", True)])
def test_replayed_chain_gives_ratio_one(method, hybrid):
    field = TinyField()
    with torch.no_grad():
        out, mask = _sample(field, method, hybrid)
    ev = evaluate_chain(
        field.denoise,
        out.chain,
        out.stochastic,
        mask,
        noise_method=method,
        num_steps=K,
        noise_level=0.5,
        noise_std_fn=field.std,
    )
    ratio = torch.exp(ev.log_prob - out.log_prob)
    torch.testing.assert_close(ratio, torch.ones(B), rtol=0, atol=1e-5)
    # and the replay is differentiable
    ev.log_prob.sum().backward()
    assert field.w1.grad is not None and field.w1.grad.abs().sum() > 0


def test_per_sample_noise_level_replays():
    field = TinyField()
    level = torch.linspace(0.2, 0.8, B)
    with torch.no_grad():
        out, mask = _sample(field, "flow_sde", False, level=level)
        ev = evaluate_chain(
            field.denoise, out.chain, out.stochastic, mask, noise_method="flow_sde", num_steps=K, noise_level=level
        )
    torch.testing.assert_close(ev.log_prob, out.log_prob, rtol=1e-5, atol=1e-4)


def test_masking_ignores_unexecuted_positions_and_padded_dims():
    field = TinyField()
    mask = make_action_mask(H, D, n_executed=2, real_action_dim=3)
    assert mask.sum() == 2 * 3 and mask[2:].sum() == 0 and mask[:, 3:].sum() == 0
    with torch.no_grad():
        out, _ = _sample(field, "flow_sde", False, mask=mask)
        # The last transition's target is the action; changing it where the mask is 0 must not
        # change the log-prob, changing it at an executed real dim must.
        chain = out.chain.clone()
        chain[:, -1, 2:, :] += 5.0
        chain[:, -1, :, 3:] -= 5.0
        ev_masked = evaluate_chain(field.denoise, chain, out.stochastic, mask, noise_method="flow_sde", num_steps=K)
        chain[:, -1, 0, 0] += 1.0
        ev_exec = evaluate_chain(field.denoise, chain, out.stochastic, mask, noise_method="flow_sde", num_steps=K)
    torch.testing.assert_close(ev_masked.log_prob, out.log_prob, rtol=1e-5, atol=1e-4)
    assert (ev_exec.log_prob - out.log_prob).abs().min() > 1e-2


def test_make_action_mask_rejects_bad_executed_steps():
    with pytest.raises(ValueError, match="executed steps"):
        make_action_mask(4, 2, n_executed=5)


def test_determinism_given_noise_tensors():
    field = TinyField()
    with torch.no_grad():
        a, _ = _sample(field, "flow_sde", True, seed=3)
        b, _ = _sample(field, "flow_sde", True, seed=3)
        c, _ = _sample(field, "flow_sde", True, seed=4)
    assert torch.equal(a.chain, b.chain) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.chain, c.chain)


def test_sde_sigma_reference_values():
    # K = 4, a = 0.5: per-step std sigma_t * sqrt(delta) at t = 1, .75, .5, .25 (the Flow-SDE noise schedule, docs/method.md).
    t = time_grid(4)[:-1]
    std = sde_sigma(t, 4, 0.5) * math.sqrt(1 / 4)
    torch.testing.assert_close(std, torch.tensor([0.50, 0.433, 0.25, 0.144]), rtol=0, atol=2e-3)


def test_stochastic_mask_shapes():
    idx = torch.tensor([0, 3, 1])
    m = stochastic_step_mask("flow_sde", 4, 3, idx)
    assert m.tolist() == [[True, False, False, False], [False, False, False, True], [False, True, False, False]]
    assert stochastic_step_mask("flow_ode", 4, 3).sum() == 0
    assert stochastic_step_mask("flow_noise", 4, 3).all()
    with pytest.raises(ValueError, match="noise_method"):
        stochastic_step_mask("flow_magic", 4, 3)
    with pytest.raises(ValueError, match="K"):
        time_grid(0)


def test_transition_flow_noise_needs_std():
    x = torch.zeros(2, H, D)
    with pytest.raises(ValueError, match="noise_std"):
        transition(x, x, torch.ones(2), torch.ones(2, dtype=torch.bool), noise_method="flow_noise", num_steps=K)


@pytest.mark.parametrize("hybrid", [False, True])
def test_flow_sde_preserves_ode_marginals(hybrid):
    """Gaussian data A ~ N(m, s^2) has the analytic marginal velocity
    v(x, t) = (x - (1-t) m) (t - (1-t) s^2) / (t^2 + (1-t)^2 s^2) - m.
    With a fine grid, ODE and SDE samples must both have mean m and variance s^2."""
    m, s = torch.tensor([0.7, -1.2]), torch.tensor([0.5, 1.5])
    n, steps = 20000, 100

    def velocity(x, t, rows):
        tt = t[:, None, None]
        var = tt**2 + (1 - tt) ** 2 * s**2
        return (x - (1 - tt) * m) * (tt - (1 - tt) * s**2) / var - m, x

    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(n, 1, 2, generator=g)
    eps = torch.randn(n, steps, 1, 2, generator=g)
    mask = torch.ones(1, 2)
    ode = sample_chain(
        velocity, x1, eps, stochastic_step_mask("flow_ode", steps, n), mask, noise_method="flow_ode", num_steps=steps
    ).actions.squeeze(1)
    idx = torch.randint(0, steps, (n,), generator=g) if hybrid else None
    sde = sample_chain(
        velocity,
        x1,
        eps,
        stochastic_step_mask("flow_sde", steps, n, idx),
        mask,
        noise_method="flow_sde",
        num_steps=steps,
        noise_level=0.5,
    ).actions.squeeze(1)
    se_mean = s / math.sqrt(n)
    for samples in (ode, sde):
        assert torch.all((samples.mean(0) - m).abs() < 4 * se_mean + 0.01)
        assert torch.all((samples.std(0) / s - 1).abs() < 0.04)
    # and the SDE actually injected noise: its samples are not the ODE's
    assert (sde - ode).abs().mean() > 0.01
