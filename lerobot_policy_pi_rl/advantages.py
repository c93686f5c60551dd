"""Advantage estimators over chunk-level macro-steps: GAE (PPO) and group-normalised returns (GRPO).

One macro-step = one policy decision = one executed action chunk; its reward is the sum of the
environment rewards over the executed chunk. All arrays are time-major ``[T, N]`` float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    bootstrap_values: Tensor,
    valid: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation per macro-step.

    Args:
        rewards, values: ``[T, N]`` macro-step reward and V(o_t) from the rollout.
        terminated: ``[T, N]`` bool, the episode ended in a terminal state at this step: no bootstrap.
        truncated: ``[T, N]`` bool, the episode was cut (time limit) at this step: bootstrap from
            ``bootstrap_values[t]`` = V(final observation).
        bootstrap_values: ``[T, N]`` V(o_{t+1}) where the rollout stops without the episode ending
            (truncation, or the end of the collected horizon); ignored elsewhere.
        valid: ``[T, N]`` bool, the step exists (an env that finished earlier is frozen afterwards).
        gamma, lam: discount and GAE lambda per macro-step.

    Returns:
        (advantages, returns) ``[T, N]``; both 0 where ``valid`` is False.
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(T)):
        # value of the next state: 0 if terminal, V(final obs) if cut here, else the next step's value
        has_next = valid[t + 1] if t + 1 < T else torch.zeros_like(valid[t])
        continues = ~(terminated[t] | truncated[t]) & has_next
        next_value = torch.where(
            terminated[t],
            torch.zeros_like(values[t]),
            torch.where(continues, values[t + 1] if t + 1 < T else bootstrap_values[t], bootstrap_values[t]),
        )
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * continues.to(rewards.dtype) * last
        last = torch.where(valid[t], last, torch.zeros_like(last))
        adv[t] = last
    returns = torch.where(valid, adv + values, torch.zeros_like(adv))
    return adv, returns


def normalize_advantages(adv: Tensor, valid: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero-mean, unit-std over the valid entries of the batch."""
    sel = adv[valid]
    if sel.numel() < 2:
        return adv
    return torch.where(valid, (adv - sel.mean()) / (sel.std() + eps), torch.zeros_like(adv))


def grpo_advantages(episode_returns: Tensor, group_ids: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Group-normalised episode returns: A_i = (R_i - mean_g) / (std_g + eps).

    Args:
        episode_returns: ``[N]`` return of each rollout.
        group_ids: ``[N]`` int, rollouts of one group started from the same reset state.

    Returns:
        (advantages ``[N]``, group mean ``[N]``, group std ``[N]``), mean and std broadcast back to
        members so a caller can filter groups (e.g. keep 0.1 <= mean success <= 0.9).
        std is the population std (the group is the whole population it is normalised over).
    """
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(len(groups), dtype=episode_returns.dtype).index_add(
        0, inverse, torch.ones_like(episode_returns)
    )
    total = torch.zeros(len(groups), dtype=episode_returns.dtype).index_add(0, inverse, episode_returns)
    mean = (total / count)[inverse]
    sq = torch.zeros(len(groups), dtype=episode_returns.dtype).index_add(0, inverse, (episode_returns - mean) ** 2)
    std = torch.sqrt(sq / count)[inverse]
    return (episode_returns - mean) / (std + eps), mean, std


def explained_variance(pred: Tensor, target: Tensor) -> float:
    """1 - Var[target - pred] / Var[target] (1 = perfect critic, 0 = no better than a constant)."""
    var = target.var()
    if target.numel() < 2 or var == 0:
        return float("nan")
    return float(1.0 - (target - pred).var() / var)
