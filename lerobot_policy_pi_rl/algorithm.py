"""PiRLAlgorithm: PPO and GRPO updates of a ``pi_rl`` flow policy over chunk-level macro-steps.

Read ``update_on`` top to bottom: advantages -> minibatches -> re-evaluate the stored chains ->
clipped surrogate + clipped Huber value loss (+ Flow-Noise entropy bonus, + optional BC term) ->
per-group gradient clipping -> step. Diagnostics (approx KL, clip fraction, entropy, value loss,
explained variance, grad norms) come back in LeRobot's ``TrainingStats``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from lerobot.rl.algorithms.base import RLAlgorithm
from lerobot.rl.algorithms.configs import RLAlgorithmConfig, TrainingStats
from torch import Tensor, nn
from torch.optim import Optimizer

from lerobot_policy_pi_rl.advantages import compute_gae, explained_variance, grpo_advantages, normalize_advantages
from lerobot_policy_pi_rl.backbones.base import Prefix
from lerobot_policy_pi_rl.noise_critic import NoiseCritic, NoiseReplay, n_step, return_to_go
from lerobot_policy_pi_rl.rollout import NonFiniteBatchError, RolloutBatch
from lerobot_policy_pi_rl.samplers import NOISE_STEER

ADVANTAGE_ESTIMATORS = ("ppo", "grpo")
STEER_UPDATES = ("ppo", "q")  # how noise_steer's steering head learns (PiRLAlgorithmConfig.steer_update)
Q_CRITIC_INPUTS = ("noise", "action")  # what steer_update=q's critic reads beside the observation
Q_TARGETS = ("return", "td")  # what steer_update=q's critic regresses (PiRLAlgorithmConfig.q_target)
logger = logging.getLogger(__name__)


@RLAlgorithmConfig.register_subclass("pi_rl")
@dataclass
class PiRLAlgorithmConfig(RLAlgorithmConfig):
    """Hyperparameters of a PI-RL update. Defaults are the paper's (pi0 on LIBERO) where they transfer.

    Each field is documented beside it (``--help`` of a draccus CLI shows it; docs/configuration.md is
    generated from these comments). Groups: advantages, PPO, optimisation, hybrid online + offline
    (``bc_coef``, off by default), memory / speed.
    """

    # `ppo`: GAE with a critic (a critic optimiser and the value loss are added). `grpo`: group-normalised episode
    # returns, no critic optimiser, no value loss.
    advantage_estimator: str = "ppo"
    # discount per macro-step (one executed chunk). PPO only.
    gamma: float = 0.99
    # GAE lambda per macro-step. PPO only.
    gae_lambda: float = 0.95
    # normalise advantages to zero mean, unit std over the valid macro-steps of the batch. PPO only.
    normalize_advantages: bool = True
    # G, rollouts per reset state. `run_pirl` requires `num_envs` to be a multiple of it.
    grpo_group_size: int = 8
    # GRPO keeps only groups whose mean success (`info["is_success"]`) is `>= grpo_filter_low` ...
    grpo_filter_low: float = 0.1
    # ... and `<= grpo_filter_high`. `0` / `1` keeps all groups.
    grpo_filter_high: float = 0.9

    # PPO ratio clip range; also the threshold of the logged clip fraction.
    clip_eps: float = 0.2
    # the value is clipped to +-`value_clip` around the rollout value; the value loss is the larger of the clipped
    # and unclipped Huber losses.
    value_clip: float = 0.2
    # Huber delta of the value loss.
    huber_delta: float = 10.0
    # weight of the value loss.
    value_coef: float = 1.0
    # entropy bonus, applied only when the policy's `noise_method` is `flow_noise` or `noise_steer` (the methods with
    # a learned std).
    entropy_coef: float = 0.005
    # passes over the batch per update.
    update_epochs: int = 4
    # the batch of n samples is split into minibatches of `ceil(n / num_minibatches)`; one optimiser step per
    # minibatch.
    num_minibatches: int = 4
    # if set, the update stops (all remaining epochs) after the first minibatch step whose approx KL exceeds it.
    target_kl: float | None = None

    # AdamW learning rate of the actor: velocity network (`rl_train_expert`), observation encoder
    # (`rl_train_prefix`), noise head (`flow_noise`).
    actor_lr: float = 5e-6
    # AdamW learning rate of the value head (PPO).
    critic_lr: float = 1e-4
    # AdamW betas, both optimisers.
    adam_betas: tuple[float, float] = (0.9, 0.95)
    # AdamW eps, both optimisers.
    adam_eps: float = 1e-8
    # AdamW weight decay, both optimisers.
    weight_decay: float = 0.01
    # gradient-norm clip, applied to actor and critic parameters separately.
    max_grad_norm: float = 1.0
    # `constant`, or `cosine`: lr * (r + (1 - r) * 0.5 * (1 + cos(pi * min(u / total_updates, 1)))) with r =
    # `lr_min_ratio`, u = updates done.
    lr_schedule: str = "constant"
    # final fraction of the lr under `cosine`.
    lr_min_ratio: float = 0.1
    # length of the cosine schedule in updates (not the loop length; that is `LearnSettings.iterations`).
    total_updates: int = 500

    # weight of the PPO clipped surrogate in the actor loss. 1: PI-RL. 0: the actor gets no RL gradient and learns
    # only from the BC term (with teleoperated interventions as its data: HG-DAgger); the critic still trains.
    ppo_coef: float = 1.0
    # weight of a flow-matching BC loss on batches from `demo_iterator`, added to the actor loss (a batch of None:
    # no BC term for that minibatch). `run_pirl` passes no `demo_iterator`, so it only works when `PiRLAlgorithm`
    # is built directly; `pirl-learner` builds one from teleoperator interventions and `--offline_dataset`. Under
    # noise_steer (flow policy frozen) the term is the steering head's NLL of batches' `initial_noise` instead.
    bc_coef: float = 0.0

    # how `noise_steer`'s steering head learns. `ppo`: the clipped surrogate above, on this batch only. `q`:
    # off-policy, as DSRL: a critic Q(o, x_1) fitted on every steered macro-step kept in a replay buffer, and the
    # head moved to maximise it (lerobot_policy_pi_rl/noise_critic.py); no PPO surrogate, value loss or BC term.
    steer_update: str = "ppo"
    # `steer_update=q`: gradient steps per update (one critic step and one head step each).
    q_steps: int = 200
    # `steer_update=q`: macro-steps per gradient step, drawn from the replay buffer.
    q_batch_size: int = 256
    # `steer_update=q`: the replay buffer keeps the newest this many steered macro-steps.
    q_replay_size: int = 50_000
    # `steer_update=q`: the head moves only once the buffer holds this many macro-steps (the critic trains from the
    # first update).
    q_warmup: int = 256
    # `steer_update=q`: AdamW learning rate of the noise critic (the head's is `actor_lr`).
    q_lr: float = 3e-4
    # `steer_update=q`: weight of the prior term in the head's objective: the mean log-density of its x_1 under the
    # N(0, I) the flow policy was trained from. It keeps x_1 where the frozen policy's outputs were trained and the
    # critic has data; 0 lets the head go wherever the critic extrapolates highest.
    q_prior_coef: float = 1.0
    # `steer_update=q`: critics in the ensemble; the head maximises their minimum.
    q_ensemble: int = 5
    # `steer_update=q`: hidden widths of each critic.
    q_hidden_dims: list[int] = field(default_factory=lambda: [256, 256])
    # `steer_update=q`: what the critic reads beside the observation. `noise`: the steered x_1, Q(o, x_1). `action`:
    # the chunk the frozen flow policy made of it, its executed part, Q(o, a); the head climbs Q through the flow's
    # ODE (x_1 -> chunk), so noises that give the same chunk share what Q learned (DSRL's noise-aliased idea). Needs a
    # backbone whose prefix is its features (`mlp`): the replay keeps features, not a VLA's KV cache.
    q_critic_input: str = "noise"
    # `steer_update=q` with `q_critic_input=action`: a macro-step a person's teleoperator drove joins the replay too,
    # with the actions that ran (RolloutBatch.executed_actions): the critic learns what the takeover was worth, and
    # the head climbs toward chunks like it where the frozen flow can make them. Off: takeovers are left out, as
    # under `noise` (a teleoperated chunk has no x_1).
    q_interventions: bool = True
    # `steer_update=q`: what the critic regresses. `return`: each macro-step's discounted return-to-go in its own
    # episode (Monte Carlo). `td`: its reward plus gamma times the next observation's value under the current head,
    # from a slowly moving copy of the critic (one-step TD, as DSRL's SAC): lower-variance targets that differ
    # between two chunks tried in one state only through where each put the robot (noise_critic.py). An episode's
    # end (success, failure, time limit) is not bootstrapped past, as under `return`.
    q_target: str = "return"
    # `steer_update=q` with `q_target=td`: each critic step moves the target copy this fraction toward the critic
    # (Polyak averaging); 1 copies it outright.
    q_target_tau: float = 0.005
    # `steer_update=q` with `q_target=td`: the target sums this many macro-steps' rewards before it bootstraps
    # (n-step TD). 1: the next observation's value. More carries a reward back directly over steps whose
    # observations may not show what decided it (a person labels a grasp a reaction time after it), at the price
    # of more of the later chunks' luck in the target (BENCHMARKS.md, "People in the loop").
    q_td_steps: int = 1

    # with the prefix frozen (`rl_train_prefix=False`), compute every sample's prefix (a VLA's KV cache) once per
    # update, in minibatch-sized chunks, and reuse it across epochs and minibatches. It holds one prefix per batch
    # sample at once (pi0 in bf16 with three cameras: about 15 MB per sample); turn it off when that does not fit.
    reuse_frozen_prefix: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"algorithm.{name}: {why} (got {getattr(self, name)!r})")

        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise bad("advantage_estimator", f"must be one of {ADVANTAGE_ESTIMATORS}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise bad("lr_schedule", "must be 'constant' or 'cosine'")
        if self.steer_update not in STEER_UPDATES:
            raise bad("steer_update", f"must be one of {STEER_UPDATES}")
        if self.q_critic_input not in Q_CRITIC_INPUTS:
            raise bad("q_critic_input", f"must be one of {Q_CRITIC_INPUTS}")
        if self.q_target not in Q_TARGETS:
            raise bad("q_target", f"must be one of {Q_TARGETS}")
        if not 0.0 < self.q_target_tau <= 1.0:
            raise bad("q_target_tau", "must be in (0, 1]")
        if any(d < 1 for d in self.q_hidden_dims):
            raise bad("q_hidden_dims", "every width must be >= 1")
        for name in (
            *("update_epochs", "num_minibatches", "grpo_group_size", "total_updates"),
            *("q_steps", "q_batch_size", "q_replay_size", "q_ensemble", "q_td_steps"),
        ):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        for name in ("clip_eps", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be > 0")
        for name in (
            "actor_lr",
            "critic_lr",
            "value_clip",
            "entropy_coef",
            "bc_coef",
            "ppo_coef",
            "q_lr",
            "q_warmup",
            "q_prior_coef",
        ):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")

    @property
    def chunk_critic(self) -> bool:
        """Off-policy steering with a critic over actions (it can learn from takeovers and demonstrations)."""
        return self.steer_update == "q" and self.q_critic_input == "action"

    @classmethod
    def from_policy_config(cls, policy_cfg: Any) -> PiRLAlgorithmConfig:
        return cls()


def disable_dropout(module: nn.Module) -> None:
    """Dropout during RL makes the rollout and learner log-probs differ (ratio != 1): switch it off."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def clipped_surrogate_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_eps: float):
    """PPO's clipped surrogate on the chunk log-prob; returns (loss, ratio, log_ratio)."""
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)).mean()
    return loss, ratio, log_ratio


def clipped_value_loss(value: Tensor, old_value: Tensor, target: Tensor, clip: float, huber_delta: float) -> Tensor:
    """Huber loss of the value and of the value clipped to +-clip around the rollout value; the max of the two."""
    clipped = old_value + (value - old_value).clamp(-clip, clip)
    huber = nn.functional.huber_loss
    return torch.max(
        huber(value, target, delta=huber_delta, reduction="none"),
        huber(clipped, target, delta=huber_delta, reduction="none"),
    ).mean()


def _mean(xs: list[float]) -> float:
    """A logged diagnostic's mean over an update's optimizer steps (nan when it had none)."""
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _grad_norm_and_clip(params: list[nn.Parameter], max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


class WholeMinibatch:
    """How the update sees its data-parallel group: here, one process that holds every minibatch whole.

    ``learner/distributed.py``'s ``RankSlice`` has the same three methods for ``torch.distributed``: each rank
    takes a contiguous slice of every minibatch, weights its losses by its share of it, and sums gradients and
    diagnostics over the ranks, so that each optimizer step is the one-process step on the whole minibatch."""

    def part(self, idx: Tensor) -> tuple[Tensor, float]:
        """(the rows of minibatch ``idx`` this process evaluates, their share of the minibatch's mean)."""
        return idx, 1.0

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum every rank's (share-weighted) gradients: nothing to sum in one process."""

    def sum(self, values: list[float]) -> list[float]:
        """Sum share-weighted diagnostics over the ranks: one process holds the whole sum."""
        return values


class PiRLAlgorithm(RLAlgorithm):
    config_class = PiRLAlgorithmConfig
    name = "pi_rl"

    def __init__(self, policy, config: PiRLAlgorithmConfig, demo_iterator: Iterator[dict[str, Tensor]] | None = None):
        self.policy = policy
        self.config = config
        self.demo_iterator = demo_iterator
        self.optimizers: dict[str, Optimizer] = {}
        self._optimization_step = 0
        self.num_updates = 0
        self.shard = WholeMinibatch()  # learner/distributed.py sets a RankSlice under torch.distributed
        disable_dropout(policy)
        if config.bc_coef > 0 and demo_iterator is None:
            raise ValueError("algorithm.bc_coef > 0 needs demonstration data (demo_iterator)")
        # steer_update=q: the noise critic and its replay buffer (learner-side only: never pushed to an edge)
        self.noise_critic: NoiseCritic | None = None
        self.noise_critic_target: NoiseCritic | None = None  # q_target=td: the slowly moving copy that bootstraps
        self.noise_replay: NoiseReplay | None = None
        if config.steer_update == "q":
            head = getattr(policy, "steer_head", None)
            if head is None:
                raise ValueError(
                    "algorithm.steer_update=q trains a steering head: the policy's noise_method must be noise_steer"
                )
            if config.q_critic_input == "action" and policy.config.backbone != "mlp":
                raise ValueError(
                    "algorithm.q_critic_input=action backpropagates through the frozen flow policy from the replayed"
                    f" prefix features; the {policy.config.backbone} backbone's prefix also holds a KV cache the"
                    " replay does not keep. Use algorithm.q_critic_input=noise"
                )
            decided = head.steer_mask if config.q_critic_input == "noise" else policy.action_mask
            self.noise_critic = NoiseCritic(
                head.net[0].in_features, int(decided.sum()), list(config.q_hidden_dims), config.q_ensemble
            )
            self.noise_critic.to(policy.action_mask.device)
            if config.q_target == "td":
                self.noise_critic_target = copy.deepcopy(self.noise_critic).requires_grad_(False)
            self.noise_replay = NoiseReplay(config.q_replay_size)
        self.make_optimizers_and_scheduler()

    # --- optimisers ------------------------------------------------------------------------------

    def make_optimizers_and_scheduler(self) -> dict[str, Optimizer]:
        c = self.config

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=lr, betas=c.adam_betas, eps=c.adam_eps, weight_decay=c.weight_decay)

        self.optimizers = {"actor": adamw(self.policy.rl_actor_parameters(), c.actor_lr)}
        if c.advantage_estimator == "ppo":
            self.optimizers["critic"] = adamw(self.policy.rl_critic_parameters(), c.critic_lr)
        if self.noise_critic is not None:
            self.optimizers["noise_critic"] = adamw(self.noise_critic.parameters(), c.q_lr)
        return self.optimizers

    def get_optimizers(self) -> dict[str, Optimizer]:
        return self.optimizers

    def _set_learning_rates(self) -> None:
        """Cosine decay per update (the paper: it curbs KL creep on long tasks)."""
        c = self.config
        scale = 1.0
        if c.lr_schedule == "cosine":
            frac = min(self.num_updates / c.total_updates, 1.0)
            scale = c.lr_min_ratio + (1 - c.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        base = {"actor": c.actor_lr, "critic": c.critic_lr, "noise_critic": c.q_lr}
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = base[name] * scale

    # --- the update ------------------------------------------------------------------------------

    def update(self, batch_iterator: Iterator[RolloutBatch]) -> TrainingStats:
        """LeRobot's entry point: one on-policy batch -> one PI-RL update."""
        return self.update_on(next(batch_iterator))

    def compute_advantages(self, rollouts: RolloutBatch) -> tuple[Tensor, Tensor, Tensor]:
        """(advantages, returns, sample weight mask) ``[T, N]`` for the configured estimator.

        GAE runs over every valid step, intervened ones included (their rewards and values are part of the
        episode); the mask, and the advantage normalisation, keep only the steps whose sampled chunk ran
        (``rollouts.trainable``): a chunk a teleoperator overrode has no ratio to clip."""
        c = self.config
        valid = rollouts.valid
        trainable = rollouts.trainable
        if c.advantage_estimator == "ppo":
            adv, ret = compute_gae(
                rollouts.rewards,
                rollouts.values,
                rollouts.terminated,
                rollouts.truncated,
                rollouts.bootstrap_values,
                valid,
                c.gamma,
                c.gae_lambda,
            )
            if c.normalize_advantages:
                adv = normalize_advantages(adv, trainable)
            return adv, ret, trainable
        # GRPO: one advantage per episode, broadcast to its macro-steps
        adv_ep, _, _ = grpo_advantages(rollouts.episode_returns, rollouts.group_ids)
        _, group_success, _ = grpo_advantages(rollouts.episode_success.float(), rollouts.group_ids)
        keep = (group_success >= c.grpo_filter_low) & (group_success <= c.grpo_filter_high)
        mask = trainable & keep.unsqueeze(0)
        adv = torch.where(mask, adv_ep.unsqueeze(0).expand_as(valid), torch.zeros_like(rollouts.rewards))
        return adv, torch.zeros_like(adv), mask

    def update_on(self, rollouts: RolloutBatch) -> TrainingStats:
        c = self.config
        policy = self.policy
        try:
            rollouts.check_finite()
        except NonFiniteBatchError as e:  # refuse the batch before anything reaches the optimizer
            logger.warning("PI-RL update skipped: %s", e)
            return TrainingStats(extra={"skipped": 1.0, "skipped_nonfinite": 1.0})

        rollouts = rollouts.to(self.policy.action_mask.device)
        if self.noise_critic is not None:
            return self.noise_q_update(rollouts)
        with torch.no_grad():
            adv, ret, mask = self.compute_advantages(rollouts)
        data = rollouts.flatten(mask)
        data["advantages"], data["returns"] = adv[mask], ret[mask]
        n = data["advantages"].shape[0]
        stats = TrainingStats(extra={"samples": float(n), "num_updates": float(self.num_updates)})
        stats.extra["intervened"] = float((rollouts.valid & rollouts.intervened).sum())  # left out of the loss
        if n == 0:  # e.g. GRPO with every group filtered out
            stats.extra["skipped"] = 1.0
            self.num_updates += 1
            return stats

        self._set_learning_rates()
        policy.train()
        mb_size = max(1, math.ceil(n / c.num_minibatches))
        prefixes = self._frozen_prefixes(data["observations"], n, mb_size)
        logs: dict[str, list[float]] = {
            k: []
            for k in (
                "policy_loss",
                "value_loss",
                "entropy",
                "approx_kl",
                "clip_fraction",
                "bc_loss",
                "bc_samples",
                "actor",
                "critic",
            )
        }
        stop = False
        for _ in range(c.update_epochs):
            perm = torch.randperm(n)
            for start in range(0, n, mb_size):
                # this process's rows of the minibatch and their share of its mean (all of it, 1.0, in one
                # process; a slice per rank under torch.distributed: see WholeMinibatch)
                idx, share = self.shard.part(perm[start : start + mb_size])
                mb = {k: v[idx] for k, v in data.items() if k != "observations"}
                obs = {k: v[idx] for k, v in data["observations"].items()}
                ev = policy.evaluate_chains(
                    obs,
                    mb["chains"],
                    mb["stochastic"],
                    mb["noise_level"],
                    prefix=None if prefixes is None else prefixes.select(idx),
                )

                # clipped surrogate on the chunk log-prob (float32)
                policy_loss, ratio, log_ratio = clipped_surrogate_loss(
                    ev.log_prob, mb["log_probs"], mb["advantages"], c.clip_eps
                )
                loss = c.ppo_coef * policy_loss
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    clip_fraction = ((ratio - 1).abs() > c.clip_eps).float().mean()

                # critic: Huber loss with the value clipped around the rollout value, max of the two
                value_loss = None
                if c.advantage_estimator == "ppo":
                    value_loss = clipped_value_loss(ev.value, mb["values"], mb["returns"], c.value_clip, c.huber_delta)
                    loss = loss + c.value_coef * value_loss

                # entropy bonus where the std is learned (Flow-SDE's is fixed by a: no gradient to gain)
                entropy = ev.entropy.mean()
                if policy.config.noise_method in ("flow_noise", NOISE_STEER) and c.entropy_coef > 0:
                    loss = loss - c.entropy_coef * entropy

                # hybrid online + offline: flow-matching BC on demonstrations. An iterator that has no
                # data yet (a learner before the first intervention, with no offline set) yields None:
                # this minibatch has no BC term. Under noise_steer the flow policy is frozen, so the term
                # imitates initial noises instead (the steering head's NLL of successful episodes' x_1)
                if c.bc_coef > 0:
                    demo = next(self.demo_iterator, None)
                    if demo is not None:
                        steered = policy.config.noise_method == NOISE_STEER
                        bc_loss = policy.steer_imitation_loss(demo) if steered else policy.flow_matching_loss(demo)
                        loss = loss + c.bc_coef * bc_loss
                        logs["bc_loss"].append(bc_loss.item())
                        logs["bc_samples"].append(float(next(iter(demo.values())).shape[0]))

                for opt in self.optimizers.values():
                    opt.zero_grad(set_to_none=True)
                (share * loss).backward()
                self.shard.sum_grads([*policy.rl_actor_parameters(), *policy.rl_critic_parameters()])
                logs["actor"].append(_grad_norm_and_clip(policy.rl_actor_parameters(), c.max_grad_norm))
                if "critic" in self.optimizers:
                    logs["critic"].append(_grad_norm_and_clip(policy.rl_critic_parameters(), c.max_grad_norm))
                for opt in self.optimizers.values():
                    opt.step()
                self._optimization_step += 1

                # the whole minibatch's means (share-weighted sums over the ranks under torch.distributed):
                # every rank gets the same approx KL, so all stop (target_kl) together
                means = {"policy_loss": policy_loss, "entropy": entropy, "approx_kl": approx_kl}
                means.update(clip_fraction=clip_fraction, **({} if value_loss is None else {"value_loss": value_loss}))
                for k, x in zip(means, self.shard.sum([share * v.item() for v in means.values()]), strict=True):
                    logs[k].append(x)
                approx_kl = logs["approx_kl"][-1]
                if c.target_kl is not None and approx_kl > c.target_kl:
                    stop = True
                    break
            if stop:
                break
        policy.eval()
        self.num_updates += 1

        stats.losses = {k: _mean(logs[k]) for k in ("policy_loss", "value_loss", "bc_loss") if logs[k]}
        stats.grad_norms = {k: _mean(logs[k]) for k in ("actor", "critic") if logs[k]}
        stats.extra.update(
            approx_kl=_mean(logs["approx_kl"]),
            clip_fraction=_mean(logs["clip_fraction"]),
            entropy=_mean(logs["entropy"]),
            optimizer_steps=float(len(logs["policy_loss"])),
            early_stopped=float(stop),
            actor_lr=self.optimizers["actor"].param_groups[0]["lr"],
        )
        if c.bc_coef > 0:  # demonstration samples the BC term saw over the update (0: none yet)
            stats.extra["bc_samples"] = float(sum(logs["bc_samples"]))
        if c.advantage_estimator == "ppo":
            stats.extra["explained_variance"] = explained_variance(data["values"], data["returns"])
        return stats

    def noise_q_update(self, rollouts: RolloutBatch) -> TrainingStats:
        """``steer_update=q`` (DSRL-style, see noise_critic.py): this batch's steered macro-steps (under
        ``q_critic_input=action`` with ``q_interventions``, its takeovers too) join the replay buffer; then
        ``q_steps`` times: one critic step toward the target of replayed macro-steps (``q_target``: their
        return-to-go, or ``q_td_steps``-step TD), and one head step up the ensemble's minimum Q of a
        reparameterised x_1 = mean(o) + std * eps."""
        c, policy = self.config, self.policy
        if not isinstance(self.shard, WholeMinibatch):
            raise ValueError("algorithm.steer_update=q runs in one learner process (no torch.distributed group)")
        head, critic, replay = policy.steer_head, self.noise_critic, self.noise_replay
        steer_mask, executed = head.steer_mask.bool(), policy.action_mask.bool()
        mask = rollouts.trainable  # a chunk a person's teleoperator overrode was not chosen by the head
        returns = return_to_go(rollouts.rewards, rollouts.valid, c.gamma)
        # a takeover is an action that ran with a return like any other: the chunk critic can learn from it
        taken = rollouts.valid & rollouts.intervened
        from_takeovers = c.chunk_critic and c.q_interventions and rollouts.executed_actions is not None
        if c.q_target == "td" and rollouts.valid.any():  # every valid step's features: each is some step's next
            row, ahead, n_rewards, discounts = n_step(rollouts.rewards, rollouts.valid, c.gamma, c.q_td_steps)
            with torch.no_grad():
                valid_features = policy.backbone.embed_prefix(
                    {k: v[rollouts.valid] for k, v in rollouts.observations.items()}
                ).features

        def rows(where: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
            """The replay's columns of the steps ``where`` but their decisions: features, and under td the step."""
            if c.q_target != "td":
                with torch.no_grad():
                    return policy.backbone.embed_prefix(
                        {k: v[where] for k, v in rollouts.observations.items()}
                    ).features, None
            step = (n_rewards[where], valid_features[ahead[where].clamp(min=0)], discounts[where])
            return valid_features[row[where]], step

        if mask.any():  # a batch a person drove throughout adds nothing (and a backbone is never asked for 0 rows)
            features, step = rows(mask)
            if c.q_critic_input == "noise":  # the steered x_1
                decisions = rollouts.chains[mask][:, 0][:, steer_mask]
            else:  # the executed part of the chunk the flow made of it (chain's last state)
                decisions = rollouts.chains[mask][:, -1][:, executed]
            replay.add(features, decisions, returns[mask], step)
        if from_takeovers and taken.any():
            features, step = rows(taken)
            replay.add(features, rollouts.executed_actions[taken][:, executed], returns[taken], step)
        stats = TrainingStats(extra={"samples": float(mask.sum()), "num_updates": float(self.num_updates)})
        stats.extra.update(
            intervened=float(taken.sum()),
            replay_takeovers=float(taken.sum()) if from_takeovers else 0.0,
            replay=float(len(replay)),
        )
        if len(replay) == 0:
            stats.extra["skipped"] = 1.0
            self.num_updates += 1
            return stats

        self._set_learning_rates()
        move_head = len(replay) >= c.q_warmup
        head_params = list(head.parameters())
        logs: dict[str, list[float]] = {k: [] for k in ("q_loss", "q_target", "head_q", "actor", "noise_critic")}
        for _ in range(c.q_steps):
            # critic: every member regresses the replayed macro-steps' target
            batch = replay.sample(c.q_batch_size)
            f, x1 = batch["features"], batch["decisions"]
            target = batch["returns"] if c.q_target == "return" else self._td_target(batch)
            q_loss = ((critic(f, x1) - target) ** 2).mean()
            self.optimizers["noise_critic"].zero_grad(set_to_none=True)
            q_loss.backward()
            logs["noise_critic"].append(_grad_norm_and_clip(list(critic.parameters()), c.max_grad_norm))
            self.optimizers["noise_critic"].step()
            if self.noise_critic_target is not None:
                with torch.no_grad():
                    for t, p in zip(self.noise_critic_target.parameters(), critic.parameters(), strict=True):
                        t.lerp_(p, c.q_target_tau)
            logs["q_loss"].append(q_loss.item())
            logs["q_target"].append(target.mean().item())
            if not move_head:
                continue
            # head: maximise min_i Q_i(o, x_1) over the head's own law of x_1 (reparameterised), plus the
            # entropy bonus on its std; only the head's optimizer steps (the critic's grads are cleared above)
            mean, std = head(f)
            x = mean + std * torch.randn_like(mean)
            steered = x[:, steer_mask]
            # under `action`, the frozen flow's chunk from x (differentiable in x), its executed part
            decisions = self._steered_decisions(f, x)
            head_q = critic(f, decisions).min(dim=0).values.mean()
            entropy = std[:, steer_mask].log().mean()
            prior = -0.5 * (steered**2).mean()  # log N(x_1; 0, I) per element, up to a constant
            head_loss = -head_q - c.q_prior_coef * prior - c.entropy_coef * entropy
            self.optimizers["actor"].zero_grad(set_to_none=True)
            # only the head's gradients: the frozen flow and the critic are differentiated through, never trained
            for p, g in zip(head_params, torch.autograd.grad(head_loss, head_params), strict=True):
                p.grad = g
            logs["actor"].append(_grad_norm_and_clip(head_params, c.max_grad_norm))
            self.optimizers["actor"].step()
            logs["head_q"].append(head_q.item())
            self._optimization_step += 1
        self.num_updates += 1

        with torch.no_grad():
            _, std = head(replay.features[:1])  # the std is one learned value per element, whatever the state
        stats.losses = {"q_loss": _mean(logs["q_loss"])}
        stats.grad_norms = {k: _mean(logs[k]) for k in ("actor", "noise_critic") if logs[k]}
        stats.extra.update(
            q_target=_mean(logs["q_target"]),
            head_q=_mean(logs["head_q"]),
            steer_std=float(std[0][steer_mask].mean()),
            optimizer_steps=float(len(logs["head_q"])),
            actor_lr=self.optimizers["actor"].param_groups[0]["lr"],
        )
        return stats

    def _steered_decisions(self, features: Tensor, noise: Tensor) -> Tensor:
        """What the critic reads of a steered x_1 ``noise`` in the states of ``features``: the steered elements,
        or (``q_critic_input=action``) the executed part of the chunk the frozen flow makes of it."""
        policy = self.policy
        if self.config.q_critic_input == "noise":
            return noise[:, policy.steer_head.steer_mask.bool()]
        return policy.ode_chunk(Prefix(features), noise)[:, policy.action_mask.bool()]

    def _td_target(self, batch: dict[str, Tensor]) -> Tensor:
        """``q_target=td``: the n-step reward + gamma^n * V(o_{t+n}), V the target critics' mean Q of one x_1 the head
        draws there (the mean, not the minimum the head climbs: a minimum of five taken at every bootstrap
        compounds its pessimism along the episode). Rows whose episode ended first keep their rewards alone."""
        with torch.no_grad():
            nf = batch["next_features"]
            mean, std = self.policy.steer_head(nf)
            value = self.noise_critic_target(nf, self._steered_decisions(nf, mean + std * torch.randn_like(mean)))
            return batch["rewards"] + batch["discounts"] * value.mean(dim=0)

    def replay_demonstrations(
        self, observations: dict[str, Tensor], actions: Tensor, action_is_pad: Tensor, returns: Tensor
    ) -> int:
        """Demonstrated macro-steps into the chunk critic's replay (``steer_update=q``, ``q_critic_input=action``):
        normalised observations, normalised action chunks ``[M, chunk_size, action_dim]`` with their padding
        ``[M, chunk_size]`` (past the episode's end: zero, as a takeover's ticks that never ran) and return-to-go
        ``[M]``. A demonstration is an action that ran with a return like a takeover, so the critic can start
        from it; the noise critic cannot (a demonstrated chunk has no x_1). How many joined."""
        c, policy = self.config, self.policy
        if not c.chunk_critic:
            raise ValueError(
                "demonstrations join the replay only of a chunk critic: algorithm.steer_update=q with "
                f"algorithm.q_critic_input=action (got steer_update={c.steer_update!r}, "
                f"q_critic_input={c.q_critic_input!r})"
            )
        m = actions.shape[0]
        device = policy.action_mask.device
        chunks = torch.zeros(m, *policy.action_mask.shape, device=device)
        chunks[:, : actions.shape[1], : actions.shape[2]] = actions.to(device).float()
        chunks[:, : actions.shape[1]] *= ~action_is_pad.to(device)[..., None]
        with torch.no_grad():
            features = policy.backbone.embed_prefix({k: v.to(device) for k, v in observations.items()}).features
        returns = returns.to(device).float()
        # under q_target=td a demonstration's row is a Monte Carlo one (its reward is its return, no next step):
        # the demonstrations' next observations are not replayed
        step = (returns, features, torch.zeros_like(returns)) if c.q_target == "td" else None
        self.noise_replay.add(features, chunks[:, policy.action_mask.bool()], returns, step)
        return m

    def _frozen_prefixes(self, observations: dict[str, Tensor], n: int, chunk: int):
        """Every sample's prefix, computed once (in minibatch-sized chunks) when it is frozen."""
        if not self.config.reuse_frozen_prefix or self.policy.config.rl_train_prefix:
            return None
        from lerobot_policy_pi_rl.backbones import Prefix

        with torch.no_grad():
            parts = [
                self.policy.backbone.embed_prefix({k: v[i : i + chunk] for k, v in observations.items()})
                for i in range(0, n, chunk)
            ]
        return Prefix.cat(parts)

    # --- weights and checkpoints (LeRobot's RLAlgorithm contract) ---------------------------------

    def get_weights(self) -> dict[str, Any]:
        """The policy state dict pushed to actors (edges)."""
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def load_weights(self, weights: dict[str, Any], device: str | torch.device = "cpu") -> None:
        with torch.no_grad():
            own = self.policy.state_dict()
            for k, v in weights.items():
                own[k].copy_(v.to(own[k].device))

    def state_dict(self) -> dict[str, Tensor]:
        """Algorithm-trained tensors beyond SFT: the value and noise heads, plus the update counter."""
        out = {f"value_head.{k}": v for k, v in self.policy.value_head.state_dict().items()}
        out.update({f"noise_head.{k}": v for k, v in self.policy.noise_head.state_dict().items()})
        if self.noise_critic is not None:
            out.update({f"noise_critic.{k}": v for k, v in self.noise_critic.state_dict().items()})
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        out["optimization_step"] = torch.tensor(self._optimization_step, dtype=torch.int64)
        return out

    def load_state_dict(self, state_dict: dict[str, Tensor], device: str | torch.device = "cpu") -> None:
        """In place (``copy_``): optimisers keep referencing the same Parameter objects."""
        heads = {"value_head": self.policy.value_head, "noise_head": self.policy.noise_head}
        with torch.no_grad():
            for prefix, module in heads.items():
                own = module.state_dict()
                for k, v in own.items():
                    key = f"{prefix}.{k}"
                    if key not in state_dict:
                        raise KeyError(f"algorithm state is missing '{key}'")
                    v.copy_(state_dict[key].to(v.device))
        if self.noise_critic is not None:
            saved = {k.removeprefix("noise_critic."): v for k, v in state_dict.items() if k.startswith("noise_critic.")}
            if saved:
                self.noise_critic.load_state_dict(saved)
                if self.noise_critic_target is not None:  # not saved: it restarts as a copy of the critic
                    self.noise_critic_target.load_state_dict(saved)
            else:  # a checkpoint of a run that steered with PPO: the critic starts fresh on new episodes
                logger.warning("algorithm state has no noise critic (steer_update was not q): it starts untrained")
        self.num_updates = int(state_dict.get("num_updates", torch.tensor(0)))
        self._optimization_step = int(state_dict.get("optimization_step", torch.tensor(0)))


# --- checkpoints: LeRobot layout plus the algorithm folder --------------------------------------


def save_checkpoint(directory, algorithm: PiRLAlgorithm, preprocessor=None, postprocessor=None) -> None:
    """``directory/{pretrained_model, algorithm, training_state}`` written to a temp dir then renamed
    into place, so a crash never leaves a half-written checkpoint under the final name."""
    import json
    import shutil
    from pathlib import Path

    from lerobot.optim.optimizers import save_optimizer_state
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    algorithm.policy.save_pretrained(tmp / "pretrained_model")
    for proc in (preprocessor, postprocessor):
        if proc is not None:
            proc.save_pretrained(tmp / "pretrained_model")
    algorithm.save_pretrained(tmp / "algorithm")
    (tmp / "training_state").mkdir(parents=True)
    save_optimizer_state(algorithm.get_optimizers(), tmp / "training_state")
    (tmp / "training_state" / "pirl_state.json").write_text(
        json.dumps({"num_updates": algorithm.num_updates, "optimization_step": algorithm.optimization_step})
    )
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "training_state" / "pirl_rng.safetensors"))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_checkpoint(directory, algorithm: PiRLAlgorithm) -> None:
    """Restore policy weights, algorithm tensors, optimizer states and the torch RNG in place."""
    from pathlib import Path

    from lerobot.optim.optimizers import load_optimizer_state
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = load_file(str(directory / "pretrained_model" / "model.safetensors"))
    algorithm.load_weights(weights)
    algorithm.load_state_dict(load_file(str(directory / "algorithm" / "model.safetensors")))
    load_optimizer_state(algorithm.get_optimizers(), directory / "training_state")
    torch.set_rng_state(load_file(str(directory / "training_state" / "pirl_rng.safetensors"))["torch_rng"])
