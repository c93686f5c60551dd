"""``steer_update=q``: an off-policy critic that steers the initial noise (noise-space steering, as DSRL).

Under ``noise_steer`` the flow policy is frozen and the steering head chooses x_1, so the decision of a
macro-step is its steered x_1 (a few dozen numbers), and the prefix features of its observation never
change. That makes the DSRL recipe cheap: keep every steered macro-step the robot ran (features, x_1,
return) in a replay buffer, fit Q(o, x_1) on all of it at every update, and move the steering head
toward the x_1 that Q scores highest. PPO uses each macro-step for one update and weighs it by a noisy
advantage; here every macro-step keeps informing the head for as long as it stays in the buffer.

Two choices, for a robot's sparse success reward and short episodes:
* the critic's target is the discounted return-to-go of the macro-step's own episode (Monte Carlo, no
  bootstrapping): no target networks, no TD error to propagate; the price is a bias toward the policy that
  collected the buffer, small while the head moves slowly;
* an ensemble whose minimum the head maximises: Q is only trusted where members agree, which keeps the
  head from chasing one member's extrapolation into x_1 the buffer never saw.

What the critic reads beside the observation (``q_critic_input``) is the macro-step's decision: its steered
x_1 (``noise``), or the chunk the frozen flow policy made of it, the part the robot executed (``action``, the
idea of DSRL's noise-aliased critic). Many noises give nearly the same chunk, so an action critic shares what
it learns across them, and the chunk shows directly what the robot did (closing the gripper, say); the head
then climbs Q through the frozen flow's ODE, x_1 -> chunk, by backpropagation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lerobot_policy_pi_rl.backbones.mlp import mlp


class NoiseCritic(nn.Module):
    """An ensemble of MLPs Q_i(features, decision) -> ``[E, B]`` (the decision: steered x_1 or executed chunk). LayerNorm on the input: prefix features
    of another backbone have another scale, and a normalised critic extrapolates less (as in RLPD)."""

    def __init__(self, feature_dim: int, decision_dim: int, hidden_dims: list[int], ensemble: int):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim + decision_dim)
        self.members = nn.ModuleList(mlp([feature_dim + decision_dim, *hidden_dims, 1]) for _ in range(ensemble))

    def forward(self, features: Tensor, decisions: Tensor) -> Tensor:
        x = self.norm(torch.cat([features, decisions], dim=-1))
        return torch.stack([m(x).squeeze(-1) for m in self.members])


def return_to_go(rewards: Tensor, valid: Tensor, gamma: float) -> Tensor:
    """``[T, N]`` discounted sum of the macro-step rewards from each valid step to its episode's end (0 on
    invalid steps). An episode that ran out of time ends there too: nothing is bootstrapped past it."""
    out = torch.zeros_like(rewards)
    ahead = torch.zeros_like(rewards[0])
    for t in range(rewards.shape[0] - 1, -1, -1):
        ahead = torch.where(valid[t], rewards[t] + gamma * ahead, torch.zeros_like(ahead))
        out[t] = ahead
    return out


class NoiseReplay:
    """The newest ``capacity`` steered macro-steps: prefix features ``[M, F]``, decisions ``[M, S]`` (steered x_1
    or executed chunk) and return-to-go ``[M]``. Learner memory only: a restarted learner refills it from new
    episodes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.features: Tensor | None = None
        self.decisions: Tensor | None = None
        self.returns: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.returns is None else int(self.returns.shape[0])

    def add(self, features: Tensor, decisions: Tensor, returns: Tensor) -> None:
        new = (features.detach().float(), decisions.detach().float(), returns.detach().float())
        if self.returns is None:
            self.features, self.decisions, self.returns = new
        else:
            self.features = torch.cat([self.features, new[0]])
            self.decisions = torch.cat([self.decisions, new[1]])
            self.returns = torch.cat([self.returns, new[2]])
        self.features = self.features[-self.capacity :]
        self.decisions = self.decisions[-self.capacity :]
        self.returns = self.returns[-self.capacity :]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.randint(len(self), (batch_size,), generator=generator, device=self.returns.device)
        return self.features[idx], self.decisions[idx], self.returns[idx]
