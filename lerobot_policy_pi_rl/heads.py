"""The two small heads PI-RL adds to any flow backbone: the Flow-Noise std head and the critic."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lerobot_policy_pi_rl.backbones.mlp import mlp


class NoiseHead(nn.Module):
    """Per-element Flow-Noise std from the expert features of each action token.

    tanh squashes the output into [std_min, std_max] (the paper's bounds), so the policy can
    neither collapse nor blow up its exploration.
    """

    def __init__(self, expert_dim: int, action_dim: int, std_min: float, std_max: float):
        super().__init__()
        self.net = mlp([expert_dim, expert_dim, action_dim])
        self.std_min, self.std_max = std_min, std_max

    def forward(self, expert_features: Tensor) -> Tensor:
        unit = 0.5 * (torch.tanh(self.net(expert_features)) + 1.0)
        return self.std_min + (self.std_max - self.std_min) * unit


class ValueHead(nn.Module):
    """MLP critic V(o); its input is detached by the caller so the critic never shapes the actor."""

    def __init__(self, in_dim: int, hidden_dims: list[int]):
        super().__init__()
        self.net = mlp([in_dim, *hidden_dims, 1])
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(-1)


class SteerHead(nn.Module):
    """``noise_steer``: the law of the initial noise x_1 the frozen flow policy starts from.

    The mean reads the (detached) observation prefix features, bounded by ``bound * tanh``; the std is
    one learned value per steered element (state-independent, PPO's usual Gaussian), clamped to
    [std_min, std_max]. The output layer is zero-initialised and the std starts at 1, so before any
    update x_1 ~ N(0, I): exactly the sampling the policy was trained with.
    """

    def __init__(
        self,
        prefix_dim: int,
        steer_mask: Tensor,
        hidden_dims: list[int],
        bound: float,
        std_min: float,
        std_max: float,
    ):
        super().__init__()
        self.register_buffer("steer_mask", steer_mask.float(), persistent=False)
        self.net = mlp([prefix_dim, *hidden_dims, steer_mask.numel()])
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.log_std = nn.Parameter(torch.zeros(steer_mask.shape))
        self.bound, self.std_min, self.std_max = bound, std_min, std_max

    def forward(self, prefix_features: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std), each ``[B, H, D]``: mean 0 and std 1 outside the steered elements."""
        mask = self.steer_mask
        raw = self.net(prefix_features).reshape(-1, *mask.shape)
        mean = self.bound * torch.tanh(raw) * mask
        std = self.log_std.exp().clamp(self.std_min, self.std_max)
        std = (std * mask + (1.0 - mask)).expand_as(mean)
        return mean, std
