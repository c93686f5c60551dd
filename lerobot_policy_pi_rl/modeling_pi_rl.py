"""PiRLPolicy: a LeRobot ``PreTrainedPolicy`` whose action sampler PI-RL can fine-tune online.

* ``forward(batch)`` is the flow-matching (SFT / behaviour-cloning) loss, so ``lerobot-train``
  trains it like any LeRobot policy.
* ``predict_action_chunk`` / ``select_action`` run the deterministic ODE sampler (evaluation and
  deployment).
* ``sample_chains`` (rollouts) and ``evaluate_chains`` (learner) run the stochastic PI-RL samplers
  of ``samplers.py`` and return log-probs, entropies and values.

All tensors here are in the normalised space the processors produce; the post-processor
un-normalises executed actions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from lerobot.policies.common.flow_matching import sample_time_beta
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION
from torch import Tensor, nn

from lerobot_policy_pi_rl.backbones import Prefix, make_backbone
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.heads import NoiseHead, SteerHead, ValueHead
from lerobot_policy_pi_rl.samplers import (
    INITIAL_NOISE,
    NOISE_STEER,
    ChainSample,
    Steering,
    draw_sampling_noise,
    evaluate_chain,
    gaussian_log_prob,
    make_action_mask,
    sample_chain,
    stochastic_step_mask,
)

# the seed of a fresh steering head's initial weights (PiRLPolicy.start_noise_steering)
STEER_HEAD_INIT_SEED = 0


@dataclass
class PolicySample:
    """One stochastic decision per batch row: the sampler's outputs plus the critic's value."""

    chain: ChainSample
    value: Tensor  # [B]
    noise_level: Tensor  # [B] Flow-SDE ``a`` used (stored so the learner replays the same law)

    @property
    def actions(self) -> Tensor:
        return self.chain.actions


@dataclass
class PolicyEvaluation:
    log_prob: Tensor  # [B]
    entropy: Tensor  # [B]
    value: Tensor  # [B]


class PiRLPolicy(PreTrainedPolicy):
    config_class = PiRLConfig
    name = "pi_rl"

    def __init__(self, config: PiRLConfig, **kwargs):
        # ``make_policy`` also passes dataset_stats / dataset_meta: normalisation lives in the
        # processors (LeRobot >= 0.4 convention), so the model itself does not need them.
        super().__init__(config)
        config.validate_features()
        self.config = config
        self.backbone = make_backbone(config)
        self.noise_head = NoiseHead(
            self.backbone.expert_dim, config.model_action_dim, config.noise_std_min, config.noise_std_max
        )
        critic_in = self.backbone.prefix_dim if config.critic_placement == "prefix" else self.backbone.expert_dim
        self.value_head = ValueHead(critic_in, list(config.critic_hidden_dims))
        mask = make_action_mask(config.chunk_size, config.model_action_dim, config.n_action_steps, config.action_dim)
        self.register_buffer("action_mask", mask, persistent=False)
        self.steer_head: SteerHead | None = None
        if config.noise_method == NOISE_STEER:
            self.start_noise_steering()
        self.reset()

    def start_noise_steering(self) -> None:
        """Give the policy a steering head (``noise_steer``) if it has none: a fresh one leaves the policy's
        behaviour unchanged (x_1 ~ N(0, I)) until RL trains it. Steered: every chunk position, real dims."""
        c = self.config
        c.noise_method = NOISE_STEER
        if self.steer_head is None:
            steer_mask = make_action_mask(c.chunk_size, c.model_action_dim, c.chunk_size, c.action_dim)
            # A fresh head's hidden weights come from a fixed seed, not from the process's global generator: that
            # is seeded from entropy at import and a policy is loaded before a run seeds it, so two runs with one
            # seed started from different heads and went apart (measured: BENCHMARKS.md). The global generator is
            # left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(STEER_HEAD_INIT_SEED)
                head = SteerHead(
                    self.backbone.prefix_dim,
                    steer_mask,
                    list(c.steer_hidden_dims),
                    c.steer_bound,
                    c.steer_std_min,
                    c.steer_std_max,
                )
            self.steer_head = head.to(self.action_mask.device)

    def steering(self, prefix: Prefix) -> Steering | None:
        """The law of x_1 for this prefix under ``noise_steer`` (None otherwise)."""
        if self.steer_head is None:
            return None
        mean, std = self.steer_head(prefix.features.detach())
        return Steering(mean=mean, std=std, mask=self.steer_head.steer_mask)

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, **kwargs):
        """LeRobot's loader; a VLA backbone is rebuilt from the saved ``backbone_config`` (its weights
        come from this checkpoint, so ``base_model_path`` is not fetched again)."""
        from lerobot_policy_pi_rl.backbones.vla import LOADING_PI_RL_CHECKPOINT

        token = LOADING_PI_RL_CHECKPOINT.set(True)
        try:
            return super().from_pretrained(pretrained_name_or_path, **kwargs)
        finally:
            LOADING_PI_RL_CHECKPOINT.reset(token)

    # --- LeRobot PreTrainedPolicy API -------------------------------------------------------------

    def get_optim_params(self) -> list[nn.Parameter]:
        """Parameters trained by flow-matching SFT: the whole backbone (the heads are RL-only)."""
        return list(self.backbone.parameters())

    def reset(self) -> None:
        self._action_queue: deque[Tensor] = deque(maxlen=self.config.n_action_steps)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        loss = self.flow_matching_loss(batch)
        return loss, {"flow_matching_loss": loss.item()}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        """Deterministic ODE chunk ``[B, H, action_dim]``; kwarg ``noise`` sets the initial x_1."""
        c = self.config
        batch_size = next(v for k, v in batch.items() if k.startswith("observation.")).shape[0]
        noise = kwargs.get("noise")
        if noise is None:
            noise = torch.randn(batch_size, c.chunk_size, c.model_action_dim, device=self.action_mask.device)
        no_step_noise = noise.new_zeros(batch_size, c.num_denoise_steps, *noise.shape[1:])
        deterministic = torch.zeros(batch_size, c.num_denoise_steps, dtype=torch.bool, device=noise.device)
        sample = self.sample_chains(batch, noise, no_step_noise, deterministic, noise_method="flow_ode")
        return sample.actions[..., : c.action_dim]

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        if len(self._action_queue) == 0:
            chunk = self.predict_action_chunk(batch, **kwargs)[:, : self.config.n_action_steps]
            self._action_queue.extend(chunk.transpose(0, 1))
        return self._action_queue.popleft()

    # --- flow-matching loss (SFT, and the optional BC term of hybrid online+offline RL) -----------

    def pad_actions(self, actions: Tensor) -> Tensor:
        pad = self.config.model_action_dim - actions.shape[-1]
        return nn.functional.pad(actions, (0, pad)) if pad > 0 else actions

    def flow_matching_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """E_t,eps || v(x_t, t) - (eps - A) ||^2 over real action dims and non-padded chunk positions."""
        if ACTION not in batch:
            raise KeyError(f"the flow-matching loss needs '{ACTION}' in the batch; got {sorted(batch)}")
        actions = self.pad_actions(batch[ACTION])
        if actions.dim() != 3 or actions.shape[1] != self.config.chunk_size:
            raise ValueError(
                f"'{ACTION}' must be [batch, chunk_size={self.config.chunk_size}, dim]; got {tuple(actions.shape)}. "
                "Load the dataset with delta_timestamps from policy.action_delta_indices."
            )
        batch_size = actions.shape[0]
        noise = torch.randn_like(actions)
        t = sample_time_beta(
            batch_size,
            actions.device,
            alpha=self.config.time_beta_alpha,
            beta=self.config.time_beta_beta,
            scale=0.999,
            offset=0.001,
        )
        x_t = t[:, None, None] * noise + (1.0 - t[:, None, None]) * actions
        prefix = self.backbone.embed_prefix(batch)
        velocity, _ = self.backbone.denoise_step(prefix, x_t, t, torch.arange(batch_size, device=actions.device))
        err = (velocity - (noise - actions)) ** 2
        mask = torch.zeros_like(err)
        mask[..., : self.config.action_dim] = 1.0
        if "action_is_pad" in batch:
            mask = mask * (~batch["action_is_pad"]).unsqueeze(-1).to(err.dtype)
        return (err * mask).sum() / mask.sum().clamp_min(1.0)

    def steer_imitation_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """``noise_steer``'s BC term: the steering head's negative log-likelihood of ``batch[INITIAL_NOISE]``
        (``[B, H, D]``, the x_1 each row's chunk was sampled from), per steered element. Fed with the initial
        noises of successful episodes it is reward-weighted regression in noise space: the head's law of x_1
        moves toward the noises that succeeded, and the frozen flow policy maps them onto its own chunks, so
        imitation can narrow what it does but never push it off the demonstrations' manifold."""
        if self.steer_head is None:
            raise ValueError("steer_imitation_loss: the policy has no steering head (noise_method is not noise_steer)")
        if INITIAL_NOISE not in batch:
            raise KeyError(f"the steering BC term needs '{INITIAL_NOISE}' in the batch; got {sorted(batch)}")
        steer = self.steering(self.backbone.embed_prefix(batch))
        target = self.pad_actions(batch[INITIAL_NOISE].to(steer.mean.dtype))
        mask = steer.mask.expand_as(target)
        return -gaussian_log_prob(target, steer.mean, steer.std, mask).sum() / mask.sum().clamp_min(1.0)

    # --- PI-RL: stochastic rollouts and learner-side re-evaluation -------------------------------

    def _denoise_fn(self, prefix: Prefix):
        return lambda x_t, t, rows: self.backbone.denoise_step(prefix, x_t, t, rows)

    def _run_sampler(self, prefix, initial_noise, step_noise, stochastic, noise_method, noise_level) -> ChainSample:
        return sample_chain(
            self._denoise_fn(prefix),
            initial_noise,
            step_noise,
            stochastic,
            self.action_mask,
            noise_method=noise_method,
            num_steps=self.config.num_denoise_steps,
            noise_level=noise_level,
            noise_std_fn=self.noise_head,
            steer=self.steering(prefix),
        )

    def _value(self, prefix: Prefix, expert_features: Tensor | None) -> Tensor:
        """Critic on detached features: prefix features, or expert features averaged over the
        action tokens and the K denoise steps (``expert_features`` is ``[B, K, H, E]``)."""
        if self.config.critic_placement == "prefix":
            return self.value_head(prefix.features.detach())
        return self.value_head(expert_features.detach().mean(dim=2)).mean(dim=1)

    def draw_noise(
        self, batch_size: int, generator: torch.Generator | None = None, device=None, noise_method: str | None = None
    ):
        """(initial_noise, step_noise, stochastic) for ``batch_size`` decisions with this config (``noise_method``:
        draw for another sampler, e.g. ``flow_ode`` for an evaluation that must see the same noise whatever the
        policy's training sampler is)."""
        c = self.config
        return draw_sampling_noise(
            batch_size,
            c.chunk_size,
            c.model_action_dim,
            c.num_denoise_steps,
            noise_method=noise_method or c.noise_method,
            hybrid=c.hybrid,
            generator=generator,
            device=device if device is not None else self.action_mask.device,
        )

    def sample_chains(
        self,
        batch: dict[str, Tensor],
        initial_noise: Tensor,
        step_noise: Tensor,
        stochastic: Tensor,
        noise_level: float | Tensor | None = None,
        noise_method: str | None = None,
    ) -> PolicySample:
        """One stochastic decision per row, as a pure function of the given noise tensors."""
        return self.sample_from_prefix(
            self.backbone.embed_prefix(batch), initial_noise, step_noise, stochastic, noise_level, noise_method
        )

    def sample_from_prefix(
        self,
        prefix: Prefix,
        initial_noise: Tensor,
        step_noise: Tensor,
        stochastic: Tensor,
        noise_level: float | Tensor | None = None,
        noise_method: str | None = None,
        denoise_fn=None,
    ) -> PolicySample:
        """``sample_chains`` after the prefix; ``denoise_fn`` replaces the backbone's velocity (the
        split ONNX export runs its velocity graph there, the loop and every head stay here)."""
        noise_method = noise_method or self.config.noise_method
        batch_size = initial_noise.shape[0]
        level = self.config.noise_level if noise_level is None else noise_level
        level = torch.as_tensor(level, dtype=initial_noise.dtype, device=initial_noise.device).expand(batch_size)
        chain = sample_chain(
            denoise_fn or self._denoise_fn(prefix),
            initial_noise,
            step_noise,
            stochastic,
            self.action_mask,
            noise_method=noise_method,
            num_steps=self.config.num_denoise_steps,
            noise_level=level,
            noise_std_fn=self.noise_head,
            steer=self.steering(prefix),
        )
        return PolicySample(chain=chain, value=self._value(prefix, chain.expert_features), noise_level=level.clone())

    def ode_chunk(self, prefix: Prefix, initial_noise: Tensor) -> Tensor:
        """The flow's deterministic (ODE) chunk ``[B, H, D]`` from the given x_1, with no steering law applied:
        differentiable in ``initial_noise``, for a critic over chunks that steers the noise (``q_critic_input``)."""
        c = self.config
        batch = initial_noise.shape[0]
        chain = sample_chain(
            self._denoise_fn(prefix),
            initial_noise,
            initial_noise.new_zeros(batch, c.num_denoise_steps, *initial_noise.shape[1:]),
            stochastic_step_mask("flow_ode", c.num_denoise_steps, batch, device=initial_noise.device),
            self.action_mask,
            noise_method="flow_ode",
            num_steps=c.num_denoise_steps,
        )
        return chain.actions

    def rl_prefix(self, batch: dict[str, Tensor]) -> Prefix:
        """The observation prefix for RL re-evaluation: without gradient when the prefix is frozen
        (``rl_train_prefix=False``, the paper's default), so no activations are kept for it."""
        if self.config.rl_train_prefix:
            return self.backbone.embed_prefix(batch)
        with torch.no_grad():
            return self.backbone.embed_prefix(batch)

    def evaluate_chains(
        self,
        batch: dict[str, Tensor],
        chain: Tensor,
        stochastic: Tensor,
        noise_level: Tensor | float | None = None,
        noise_method: str | None = None,
        prefix: Prefix | None = None,
    ) -> PolicyEvaluation:
        """Log-prob, entropy and value of stored chains under the current parameters (with grad).

        ``prefix``: the batch's precomputed (frozen) prefix, reused across PPO epochs; computed here
        when None.
        """
        noise_method = noise_method or self.config.noise_method
        level = self.config.noise_level if noise_level is None else noise_level
        prefix = prefix if prefix is not None else self.rl_prefix(batch)
        expert_critic = self.config.critic_placement == "expert"
        ev = evaluate_chain(
            self._denoise_fn(prefix),
            chain,
            stochastic,
            self.action_mask,
            noise_method=noise_method,
            num_steps=self.config.num_denoise_steps,
            noise_level=level,
            noise_std_fn=self.noise_head,
            all_steps=expert_critic,
            steer=self.steering(prefix),
        )
        return PolicyEvaluation(log_prob=ev.log_prob, entropy=ev.entropy, value=self._value(prefix, ev.expert_features))

    @torch.no_grad()
    def predict_value(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """V(o) ``[B]``. The expert-side critic reads the features of a freshly sampled chain."""
        prefix = self.backbone.embed_prefix(batch)
        if self.config.critic_placement == "prefix":
            return self._value(prefix, None)
        n = self.draw_noise(prefix.features.shape[0], generator=generator)
        return self._value(
            prefix, self._run_sampler(prefix, *n, self.config.noise_method, self.config.noise_level).expert_features
        )

    def rl_actor_parameters(self) -> list[nn.Parameter]:
        """What the PPO/GRPO actor loss trains (see PiRLConfig ``rl_train_*``)."""
        if self.steer_head is not None:  # noise-space steering: the flow policy stays frozen
            return list(self.steer_head.parameters())
        params: list[nn.Parameter] = []
        if self.config.rl_train_expert:
            params += self.backbone.expert_parameters()
        if self.config.rl_train_prefix:
            params += self.backbone.prefix_parameters()
        if self.config.noise_method == "flow_noise":
            params += list(self.noise_head.parameters())
        return params

    def rl_critic_parameters(self) -> list[nn.Parameter]:
        return list(self.value_head.parameters())

    # --- what a policy version changes (the learner publishes only that) -------------------------

    def rl_state_names(self) -> list[str]:
        """State-dict names of the tensors PI-RL trains (actor and critic parameters), sorted."""
        ids = {id(p) for p in self.rl_actor_parameters() + self.rl_critic_parameters()}
        return sorted(n for n, p in self.named_parameters() if id(p) in ids)

    def rl_state_dict(self) -> dict[str, Tensor]:
        """The tensors PI-RL trains, detached on CPU: what one policy version changes."""
        params = dict(self.named_parameters())
        return {n: params[n].detach().cpu().contiguous() for n in self.rl_state_names()}

    def frozen_sha256(self) -> str:
        """sha256 over every state-dict tensor PI-RL does not train (name, dtype, shape, bytes).

        A robot that applies a trained-only update checks its own frozen weights against the
        learner's with this: a different base model would otherwise silently mix with new experts.
        """
        import hashlib

        trained = set(self.rl_state_names())
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            if name in trained:
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()
