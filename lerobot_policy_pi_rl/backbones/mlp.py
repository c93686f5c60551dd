"""A small MLP velocity field for CPU: fast enough that a PPO minibatch takes milliseconds."""

from __future__ import annotations

import math

import torch
from lerobot.utils.constants import OBS_ENV_STATE, OBS_STATE
from torch import Tensor, nn

from lerobot_policy_pi_rl.backbones.base import FlowBackbone, Prefix


def sinusoidal_time_embedding(t: Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Tensor:
    """``[N] -> [N, dim]`` sin/cos features of t over log-spaced periods (the openpi choice)."""
    half = dim // 2
    fraction = torch.linspace(0.0, 1.0, half, device=t.device, dtype=t.dtype)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.unsqueeze(-1) * (2.0 * math.pi / period)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def mlp(sizes: list[int], activate_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or activate_last:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ImageEncoder(nn.Module):
    """A few strided convs + global average pool; images arrive as float [B, C, H, W] in [0, 1]."""

    def __init__(self, in_channels: int, channels: list[int], out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [nn.Conv2d(prev, ch, kernel_size=3, stride=2, padding=1), nn.SiLU()]
            prev = ch
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(prev, out_dim)

    def forward(self, image: Tensor) -> Tensor:
        return self.proj(self.convs(image).mean(dim=(-2, -1)))


class MLPFlowBackbone(FlowBackbone):
    """Prefix: MLP over the state (+ a conv encoder per camera). Expert: an MLP over
    (flattened x_t, time embedding, prefix) whose output layer of ``chunk_size * expert_token_dim``
    units is read as one ``expert_token_dim`` feature vector per action token; a shared linear map
    turns each token's features into its velocity."""

    def __init__(self, config):
        super().__init__()
        self.chunk_size = config.chunk_size
        self.action_dim = config.model_action_dim
        self.time_embed_dim = config.time_embed_dim
        self.prefix_dim = config.prefix_dim
        self.expert_dim = config.expert_token_dim
        self.state_key = OBS_STATE if config.robot_state_feature is not None else None
        self.image_keys = sorted(config.image_features)
        env_state = config.env_state_feature
        self.env_state_key = OBS_ENV_STATE if env_state is not None else None

        parts = 0
        if self.state_key is not None:
            self.state_encoder = mlp([config.robot_state_feature.shape[0], config.prefix_dim, config.prefix_dim])
            parts += 1
        if self.env_state_key is not None:  # an object's pose: its own encoder, like a camera's
            self.env_state_encoder = mlp([env_state.shape[0], config.prefix_dim, config.prefix_dim])
            parts += 1
        self.image_encoders = nn.ModuleDict(
            {
                key.replace(".", "_"): ImageEncoder(ft.shape[0], list(config.image_channels), config.prefix_dim)
                for key, ft in sorted(config.image_features.items())
            }
        )
        parts += len(self.image_keys)
        self.prefix_proj = mlp([parts * config.prefix_dim, config.prefix_dim], activate_last=True)

        flat = self.chunk_size * self.action_dim
        in_dim = flat + config.time_embed_dim + config.prefix_dim
        hidden = [config.hidden_dim] * config.num_layers
        self.trunk = mlp([in_dim, *hidden, self.chunk_size * self.expert_dim], activate_last=True)
        self.velocity_head = nn.Linear(self.expert_dim, self.action_dim)

    def embed_prefix(self, batch: dict[str, Tensor]) -> Prefix:
        feats = []
        if self.state_key is not None:
            feats.append(self.state_encoder(batch[self.state_key]))
        if self.env_state_key is not None:
            feats.append(self.env_state_encoder(batch[self.env_state_key]))
        for key in self.image_keys:
            feats.append(self.image_encoders[key.replace(".", "_")](batch[key]))
        return Prefix(features=self.prefix_proj(torch.cat(feats, dim=-1)))

    def denoise_step(self, prefix: Prefix, x_t: Tensor, t: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        cond = prefix.features.index_select(0, rows)
        h = torch.cat([x_t.flatten(1), sinusoidal_time_embedding(t, self.time_embed_dim), cond], dim=-1)
        expert = self.trunk(h).reshape(x_t.shape[0], self.chunk_size, self.expert_dim)
        return self.velocity_head(expert), expert

    def prefix_parameters(self) -> list[nn.Parameter]:
        mods = [self.prefix_proj, self.image_encoders] + ([self.state_encoder] if self.state_key else [])
        mods += [self.env_state_encoder] if self.env_state_key else []
        return [p for m in mods for p in m.parameters()]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.velocity_head.parameters()]
