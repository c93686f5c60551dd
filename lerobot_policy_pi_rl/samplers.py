"""PI-RL samplers: the deterministic ODE, Flow-Noise and Flow-SDE, and the exact chain log-prob.

This module is the single home of the sampler math. The policy (rollouts), the learner
(re-evaluation of stored chains), the edge and the ONNX export all call these functions, so a
rollout-time log-prob and a learner-time log-prob are computed by the same code.

Conventions (LeRobot / openpi): time runs from t = 1 (pure noise) to t = 0 (action);
x_t = t * eps + (1 - t) * A and the network predicts the velocity v ~ eps - A. With K denoise
steps the grid is t_k = 1 - k / K (k = 0..K) and the step is delta = 1 / K.

Every transition x_{t_k} -> x_{t_{k+1}} is Gaussian with a mean and a per-element std:

* ``flow_ode``   mean = x_t - delta * v,  std = 0 (deterministic; evaluation and deployment).
* ``flow_noise`` mean = x_t - delta * v,  std = sigma from a learnable noise head (one-layer MDP).
* ``flow_sde``   sigma_t = a * sqrt(t / (1 - t')), t' = t except t' = 1 - 1/K at t = 1,
                 mean = x_t - delta * (v + sigma_t^2 / (2 t) * (x_t + (1 - t) v)),
                 std = sigma_t * sqrt(delta)     (two-layer MDP, same marginals as the ODE).
* ``noise_steer`` every step is the ODE step; the randomness is in the initial noise instead:
                 x_1 = mean(o) + std * eps from a small steering head, so the policy's action is
                 the noise it hands the frozen flow policy (noise-space steering, as in DSRL).

With ``hybrid`` Flow-SDE, one denoise index per sample is stochastic and every other step is the
ODE step. Which steps are stochastic is an explicit ``[B, K]`` boolean mask, so the same
functions serve every method.

All randomness enters as tensors (initial noise ``[B, H, D]``, per-step noise ``[B, K, H, D]``
and the stochastic-step mask), so sampling is a pure function of its inputs: identical on
PyTorch, ONNX Runtime and TensorRT, and replayable by the learner.

Log-prob: the sum over stochastic steps (and, for ``noise_steer``, the steered initial noise),
executed chunk positions and real action dimensions of log N(x_{k+1}; mean_k, std_k). Two deliberate choices (see docs/method.md):
* the initial-noise term log N(x_1; 0, I) is left out: it does not depend on the parameters,
  so it cancels in every PPO ratio and contributes no gradient (``noise_steer`` is the exception:
  there x_1 is what the policy chooses, and log N(x_1; mean(o), std) over the steered elements is
  the whole log-prob);
* steps are summed, not averaged (the reference implementation averages the K + 1 terms,
  which scales the log-ratio by 1 / (K + 1) and with it the effective clip range).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

NOISE_STEER = "noise_steer"
NOISE_METHODS = ("flow_ode", "flow_noise", "flow_sde", NOISE_STEER)
RL_NOISE_METHODS = ("flow_noise", "flow_sde", NOISE_STEER)  # the stochastic ones: what rollouts for RL sample with
# the batch key of the initial noises ``noise_steer``'s BC term imitates (PiRLPolicy.steer_imitation_loss)
INITIAL_NOISE = "initial_noise"

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# denoise_fn(x_t [N, H, D], t [N], rows [N]) -> (velocity [N, H, D], expert_features [N, H, E])
# ``rows`` says which batch element (observation / prefix) each of the N inputs belongs to; the
# learner evaluates a gathered set of (sample, step) pairs in one call with it.
DenoiseFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
# noise_std_fn(expert_features [N, H, E]) -> std [N, H, D]   (Flow-Noise only)
NoiseStdFn = Callable[[Tensor], Tensor]


def check_noise_method(noise_method: str) -> None:
    if noise_method not in NOISE_METHODS:
        raise ValueError(f"noise_method must be one of {NOISE_METHODS}, got {noise_method!r}")


def time_grid(num_steps: int, device=None, dtype=torch.float32) -> Tensor:
    """t_k = 1 - k / K for k = 0..K (``[K + 1]``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps (K) must be >= 1, got {num_steps}")
    return 1.0 - torch.arange(num_steps + 1, device=device, dtype=dtype) / num_steps


def sde_sigma(t: Tensor, num_steps: int, noise_level: Tensor | float) -> Tensor:
    """Flow-SDE diffusion scale sigma_t = a * sqrt(t / (1 - t')).

    At t = 1 the denominator would vanish; like the reference we use t' = 1 - 1/K there
    (the numerator keeps t = 1), which gives per-step stds of about 0.50, 0.43, 0.25, 0.14 for
    K = 4, a = 0.5.
    """
    t_safe = torch.where(t >= 1.0, torch.full_like(t, 1.0 - 1.0 / num_steps), t)
    return noise_level * torch.sqrt(t / (1.0 - t_safe).clamp_min(1e-6))


def _per_sample(x: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or ``[N]`` tensor against ``like`` ``[N, H, D]``."""
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return x.reshape(-1, *([1] * (like.dim() - 1))) if x.dim() == 1 else x


def transition(
    x_t: Tensor,
    velocity: Tensor,
    t: Tensor,
    stochastic: Tensor,
    *,
    noise_method: str,
    num_steps: int,
    noise_level: Tensor | float = 0.5,
    noise_std: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std of p(x_{t - delta} | x_t) for one denoise step.

    Args:
        x_t: ``[N, H, D]`` current chain state.
        velocity: ``[N, H, D]`` velocity predicted at (x_t, t).
        t: ``[N]`` time of x_t.
        stochastic: ``[N]`` bool; False rows take the deterministic ODE step (std 0).
        noise_method: one of NOISE_METHODS.
        num_steps: K.
        noise_level: Flow-SDE ``a`` (scalar or ``[N]``).
        noise_std: ``[N, H, D]`` Flow-Noise std from the noise head.
    """
    check_noise_method(noise_method)
    delta = 1.0 / num_steps
    tt = _per_sample(t, x_t)
    ode_mean = x_t - delta * velocity
    zeros = torch.zeros_like(x_t)
    if noise_method in ("flow_ode", NOISE_STEER):
        return ode_mean, zeros
    if noise_method == "flow_noise":
        if noise_std is None:
            raise ValueError("flow_noise needs noise_std from the noise head")
        mean, std = ode_mean, noise_std
    else:  # flow_sde
        sigma = sde_sigma(tt, num_steps, _per_sample(noise_level, x_t))
        mean = x_t - delta * (velocity + sigma**2 / (2.0 * tt) * (x_t + (1.0 - tt) * velocity))
        std = (sigma * math.sqrt(delta)).expand_as(x_t)
    sto = _per_sample(stochastic, x_t).bool()
    return torch.where(sto, mean, ode_mean), torch.where(sto, std, zeros)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, mask: Tensor) -> Tensor:
    """Element-wise log N(x; mean, std^2) * mask, with std == 0 elements contributing 0."""
    active = (std > 0).to(x.dtype) * mask
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    lp = -torch.log(safe_std) - LOG_SQRT_2PI - 0.5 * ((x - mean) / safe_std) ** 2
    return lp * active


def gaussian_entropy(std: Tensor, mask: Tensor) -> Tensor:
    """Element-wise entropy 0.5 * log(2 pi e std^2) * mask, 0 where std == 0."""
    active = (std > 0).to(std.dtype) * mask
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    return (torch.log(safe_std) + LOG_SQRT_2PI + 0.5) * active


def stochastic_step_mask(
    noise_method: str, num_steps: int, batch_size: int, hybrid_index: Tensor | None = None, device=None
) -> Tensor:
    """``[B, K]`` bool: which denoise steps are stochastic for each sample.

    flow_ode and noise_steer: none. flow_noise: all. flow_sde: all, or only ``hybrid_index[b]`` when given
    (hybrid ODE-SDE: one step per sample is an SDE step, the rest are ODE steps).
    """
    check_noise_method(noise_method)
    if noise_method in ("flow_ode", NOISE_STEER):
        return torch.zeros(batch_size, num_steps, dtype=torch.bool, device=device)
    if noise_method == "flow_sde" and hybrid_index is not None:
        if hybrid_index.shape != (batch_size,):
            raise ValueError(f"hybrid_index must have shape [{batch_size}], got {tuple(hybrid_index.shape)}")
        steps = torch.arange(num_steps, device=hybrid_index.device)
        return steps.unsqueeze(0) == hybrid_index.long().unsqueeze(1)
    return torch.ones(batch_size, num_steps, dtype=torch.bool, device=device)


@dataclass
class Steering:
    """``noise_steer``: the law of the initial noise x_1 the steering head chose for each row.

    ``mask`` ``[H, D]`` marks the steered elements (every chunk position, real action dims); the
    others keep mean 0 and std 1, a law with no parameters, so they are left out of the log-prob
    like the initial noise of the other methods.
    """

    mean: Tensor  # [B, H, D]
    std: Tensor  # [B, H, D]
    mask: Tensor  # [H, D] float

    def log_prob(self, x_1: Tensor) -> Tensor:
        return gaussian_log_prob(x_1, self.mean, self.std, self.mask.expand_as(x_1)).flatten(1).sum(-1)

    def entropy_sum_and_count(self) -> tuple[Tensor, Tensor]:
        mask = self.mask.expand_as(self.std)
        return gaussian_entropy(self.std, mask).flatten(1).sum(-1), mask.flatten(1).sum(-1)


@dataclass
class ChainSample:
    """Everything one stochastic sampling pass produced; the rollout stores what the learner needs."""

    actions: Tensor  # [B, H, D] final chain state x_0 (normalised action chunk)
    chain: Tensor  # [B, K + 1, H, D] x_{t_0} = initial noise ... x_{t_K} = actions
    means: Tensor  # [B, K, H, D]
    stds: Tensor  # [B, K, H, D] (0 on deterministic steps)
    stochastic: Tensor  # [B, K] bool
    log_prob: Tensor  # [B] masked chain log-prob
    expert_features: Tensor  # [B, K, H, E] features of every denoise step (critic / noise head)


def sample_chain(
    denoise_fn: DenoiseFn,
    initial_noise: Tensor,
    step_noise: Tensor,
    stochastic: Tensor,
    action_mask: Tensor,
    *,
    noise_method: str,
    num_steps: int,
    noise_level: Tensor | float = 0.5,
    noise_std_fn: NoiseStdFn | None = None,
    steer: Steering | None = None,
) -> ChainSample:
    """Run the K-step sampler as a pure function of its noise tensors.

    x_{k+1} = mean_k + std_k * step_noise[:, k]. With ``noise_method="flow_ode"`` (or an all-False
    ``stochastic`` mask) this is exactly LeRobot's Euler integration. With ``steer`` the chain
    starts from x_1 = steer.mean + steer.std * initial_noise and its log-prob counts in the total.
    """
    batch = initial_noise.shape[0]
    if step_noise.shape[:2] != (batch, num_steps) or step_noise.shape[2:] != initial_noise.shape[1:]:
        raise ValueError(
            f"step_noise must have shape {(batch, num_steps, *initial_noise.shape[1:])}, got {tuple(step_noise.shape)}"
        )
    rows = torch.arange(batch, device=initial_noise.device)
    grid = time_grid(num_steps, device=initial_noise.device, dtype=initial_noise.dtype)
    x = initial_noise if steer is None else steer.mean + steer.std * initial_noise
    chain, means, stds, feats = [x], [], [], []
    for k in range(num_steps):
        t = grid[k].expand(batch)
        velocity, expert = denoise_fn(x, t, rows)
        noise_std = noise_std_fn(expert) if noise_method == "flow_noise" else None
        mean, std = transition(
            x,
            velocity,
            t,
            stochastic[:, k],
            noise_method=noise_method,
            num_steps=num_steps,
            noise_level=noise_level,
            noise_std=noise_std,
        )
        x = mean + std * step_noise[:, k]
        chain.append(x)
        means.append(mean)
        stds.append(std)
        feats.append(expert)
    chain_t = torch.stack(chain, dim=1)
    means_t, stds_t = torch.stack(means, dim=1), torch.stack(stds, dim=1)
    log_prob = gaussian_log_prob(chain_t[:, 1:], means_t, stds_t, action_mask.unsqueeze(-3)).flatten(1).sum(-1)
    if steer is not None:
        log_prob = log_prob + steer.log_prob(chain_t[:, 0])
    return ChainSample(
        actions=x,
        chain=chain_t,
        means=means_t,
        stds=stds_t,
        stochastic=stochastic,
        log_prob=log_prob,
        expert_features=torch.stack(feats, dim=1),
    )


@dataclass
class ChainEvaluation:
    """Learner-side re-evaluation of stored chains under the current parameters."""

    log_prob: Tensor  # [B]
    entropy: Tensor  # [B] mean per stochastic, masked element (0 where none)
    expert_features: Tensor | None  # [B, K, H, E] when all steps were evaluated, else None


def evaluate_chain(
    denoise_fn: DenoiseFn,
    chain: Tensor,
    stochastic: Tensor,
    action_mask: Tensor,
    *,
    noise_method: str,
    num_steps: int,
    noise_level: Tensor | float = 0.5,
    noise_std_fn: NoiseStdFn | None = None,
    all_steps: bool = False,
    steer: Steering | None = None,
) -> ChainEvaluation:
    """Recompute log pi(chain | obs), the entropy and (optionally) every step's expert features.

    Only the (sample, step) pairs that are stochastic are evaluated (hybrid Flow-SDE: one expert
    pass per sample instead of K), all gathered into ONE ``denoise_fn`` call. ``all_steps=True``
    evaluates every pair, for a critic that reads the expert features of all K steps. ``steer``
    adds the steered initial noise's log-prob and entropy (``noise_steer``).
    """
    batch = chain.shape[0]
    if chain.shape[1] != num_steps + 1:
        raise ValueError(f"chain has {chain.shape[1] - 1} steps, the policy uses K={num_steps}")
    grid = time_grid(num_steps, device=chain.device, dtype=chain.dtype)
    pairs = torch.ones_like(stochastic) if all_steps else stochastic
    b_idx, k_idx = pairs.nonzero(as_tuple=True)
    log_prob = chain.new_zeros(batch)
    entropy_sum = chain.new_zeros(batch)
    count = chain.new_zeros(batch)
    features = None
    if b_idx.numel() > 0:
        x_t, x_next, t = chain[b_idx, k_idx], chain[b_idx, k_idx + 1], grid[k_idx]
        velocity, expert = denoise_fn(x_t, t, b_idx)
        noise_std = noise_std_fn(expert) if noise_method == "flow_noise" else None
        level = noise_level[b_idx] if isinstance(noise_level, Tensor) and noise_level.dim() == 1 else noise_level
        mean, std = transition(
            x_t,
            velocity,
            t,
            stochastic[b_idx, k_idx],
            noise_method=noise_method,
            num_steps=num_steps,
            noise_level=level,
            noise_std=noise_std,
        )
        mask = action_mask if action_mask.dim() == 2 else action_mask[b_idx]
        mask = mask.expand_as(x_t)
        log_prob = log_prob.index_add(0, b_idx, gaussian_log_prob(x_next, mean, std, mask).flatten(1).sum(-1))
        entropy_sum = entropy_sum.index_add(0, b_idx, gaussian_entropy(std, mask).flatten(1).sum(-1))
        count = count.index_add(0, b_idx, ((std > 0).to(mask.dtype) * mask).flatten(1).sum(-1))
        if all_steps:
            features = expert.reshape(batch, num_steps, *expert.shape[1:])
    if steer is not None:
        log_prob = log_prob + steer.log_prob(chain[:, 0])
        steer_entropy, steer_count = steer.entropy_sum_and_count()
        entropy_sum, count = entropy_sum + steer_entropy, count + steer_count
    entropy = entropy_sum / count.clamp_min(1.0)
    return ChainEvaluation(log_prob=log_prob, entropy=entropy, expert_features=features)


def make_action_mask(
    chunk_size: int, action_dim: int, n_executed: int, real_action_dim: int | None = None, device=None
) -> Tensor:
    """``[H, D]`` float mask of the executed chunk positions and real (unpadded) action dims."""
    if not 1 <= n_executed <= chunk_size:
        raise ValueError(f"executed steps must be in [1, chunk_size={chunk_size}], got {n_executed}")
    real = action_dim if real_action_dim is None else real_action_dim
    mask = torch.zeros(chunk_size, action_dim, device=device)
    mask[:n_executed, :real] = 1.0
    return mask


def draw_sampling_noise(
    batch_size: int,
    chunk_size: int,
    action_dim: int,
    num_steps: int,
    *,
    noise_method: str,
    hybrid: bool,
    generator: torch.Generator | None = None,
    device=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw (initial_noise, step_noise, stochastic mask) for one batch of decisions.

    The only place randomness is drawn; everything downstream is a pure function of these. Draws
    happen on the generator's device (a seeded CPU generator gives the same noise whatever device
    the policy runs on) and are then moved to ``device``.
    """
    at = generator.device if generator is not None else device
    initial = torch.randn(batch_size, chunk_size, action_dim, generator=generator, device=at).to(device)
    steps = torch.randn(batch_size, num_steps, chunk_size, action_dim, generator=generator, device=at).to(device)
    hybrid_index = None
    if hybrid and noise_method == "flow_sde":
        hybrid_index = torch.randint(0, num_steps, (batch_size,), generator=generator, device=at).to(device)
    stochastic = stochastic_step_mask(noise_method, num_steps, batch_size, hybrid_index, device=device)
    return initial, steps, stochastic
