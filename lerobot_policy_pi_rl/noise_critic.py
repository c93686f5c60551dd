"""``steer_update=q``: an off-policy critic that steers the initial noise (noise-space steering, as DSRL).

Under ``noise_steer`` the flow policy is frozen and the steering head chooses x_1, so the decision of a
macro-step is its steered x_1 (a few dozen numbers), and the prefix features of its observation never
change. That makes the DSRL recipe cheap: keep every steered macro-step the robot ran (features, x_1,
return) in a replay buffer, fit Q(o, x_1) on all of it at every update, and move the steering head
toward the x_1 that Q scores highest. PPO uses each macro-step for one update and weighs it by a noisy
advantage; here every macro-step keeps informing the head for as long as it stays in the buffer.

Two choices, for a robot's sparse success reward and short episodes:
* the critic's target (``q_target``). ``return``: the discounted return-to-go of the macro-step's own episode
  (Monte Carlo, no bootstrapping): no target networks, no TD error to propagate; the price is a bias toward the
  policy that collected the buffer, and a target that carries the luck of every later chunk of the episode, so
  two chunks tried in one state differ in their targets mostly by what came after them. ``td``: the macro-step's
  reward plus the discounted value of the next observation under the current head, read from a slowly moving
  copy of the critic (one-step TD, as DSRL's SAC; ``q_td_steps`` sums more rewards first): a chunk's target then
  changes only through where it put the robot, which is what ranking chunks within a state needs, as long as
  that observation shows what the outcome depends on (a person's label that comes steps after the grasp is the
  case where it did worse: BENCHMARKS.md);
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


def n_step(rewards: Tensor, valid: Tensor, gamma: float, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For a ``[T, N]`` batch's valid steps (one episode per column, as a batch holds them), the pieces of an
    ``n``-step TD target, each ``[T, N]``: each step's row in ``observations[valid]`` (-1 where invalid); the row
    of the step ``n`` ahead in its episode (-1 where the episode ended before it); the discounted sum of the
    rewards of the ``n`` steps from it (fewer where the episode ended first); and gamma^n where the episode goes
    on to that step, else 0 (as in ``return_to_go``, nothing is bootstrapped past an episode's end, whatever
    ended it). The target is then ``rewards + discount * V(observation n ahead)``."""
    T = valid.shape[0]
    row = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
    row[valid] = torch.arange(int(valid.sum()), device=valid.device)
    summed = torch.zeros_like(rewards)
    for k in range(min(n, T)):  # step t + k's reward, where it is in the episode
        summed[: T - k] += torch.where(valid[k:], gamma**k * rewards[k:], torch.zeros_like(rewards[k:]))
    ahead = torch.full_like(row, -1)
    if n < T:
        ahead[: T - n] = torch.where(valid[: T - n] & valid[n:], row[n:], ahead[: T - n])
    discount = torch.where(ahead >= 0, torch.full_like(rewards, gamma**n), torch.zeros_like(rewards))
    return row, ahead, summed, discount


class NoiseReplay:
    """The newest ``capacity`` replayed macro-steps: prefix features ``[M, F]``, decisions ``[M, S]`` (steered x_1
    or executed chunk) and return-to-go ``[M]``; under ``q_target=td`` also the discounted reward of the ``n``
    steps from it ``[M]``, the features of the observation ``n`` steps ahead ``[M, F]`` and the discount of its
    value ``[M]`` (gamma^n, 0 where the episode ended first: a demonstration's rows are all such, their reward
    their return). Learner memory only: a restarted learner refills it from new episodes."""

    COLUMNS = ("features", "decisions", "returns", "rewards", "next_features", "discounts")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.features: Tensor | None = None
        self.decisions: Tensor | None = None
        self.returns: Tensor | None = None
        self.rewards: Tensor | None = None
        self.next_features: Tensor | None = None
        self.discounts: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.returns is None else int(self.returns.shape[0])

    def add(
        self,
        features: Tensor,
        decisions: Tensor,
        returns: Tensor,
        step: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        """Rows of one kind: ``step`` (n-step rewards, features n ahead, discounts) on every add, or on none."""
        if len(self) and (step is None) != (self.rewards is None):
            raise ValueError("a replay holds TD rows (q_target=td) or return rows only, never both")
        new = dict(zip(self.COLUMNS, (features, decisions, returns, *(step or (None, None, None))), strict=True))
        for name, value in new.items():
            if value is None:
                continue
            value = value.detach().float()
            old = getattr(self, name)
            setattr(self, name, (value if old is None else torch.cat([old, value]))[-self.capacity :])

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        idx = torch.randint(len(self), (batch_size,), generator=generator, device=self.returns.device)
        return {name: getattr(self, name)[idx] for name in self.COLUMNS if getattr(self, name) is not None}
