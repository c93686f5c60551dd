"""Chunk-level rollouts of a ``pi_rl`` policy on a vector env, and deterministic evaluation.

A rollout runs every env for one episode (``autoreset=False``): at each macro-step the policy
samples one chunk per env from the observation at the decision time, the first
``n_action_steps`` actions are executed, and the env rewards are summed into the macro-step
reward. An env that finishes mid-chunk is frozen (the env's ``active`` mask) and its later
macro-steps are marked invalid. The executed actions are exactly the sampled chain's actions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from lerobot.envs.utils import preprocess_observation
from torch import Tensor


class NonFiniteBatchError(ValueError):
    """A rollout batch holds NaN/inf; the update is refused before anything reaches the optimizer."""


@dataclass
class RolloutBatch:
    """One batch of on-policy data, time-major ``[T, N, ...]`` (T macro-steps, N envs)."""

    observations: dict[str, Tensor]  # normalised policy inputs [T, N, ...]
    chains: Tensor  # [T, N, K + 1, H, D]
    stochastic: Tensor  # [T, N, K] bool
    noise_level: Tensor  # [T, N]
    log_probs: Tensor  # [T, N]
    values: Tensor  # [T, N]
    rewards: Tensor  # [T, N] macro-step reward (sum over the executed chunk)
    terminated: Tensor  # [T, N] bool
    truncated: Tensor  # [T, N] bool
    valid: Tensor  # [T, N] bool
    bootstrap_values: Tensor  # [T, N] V(o_{t+1}) at each env's last valid step when it did not terminate
    episode_returns: Tensor  # [N]
    episode_success: Tensor  # [N] bool
    group_ids: Tensor  # [N] (GRPO groups: same reset state)
    env_steps: int = 0  # environment steps executed
    # "final_observation": normalised obs [N, ...] each env ended on; "step_env_steps": [T, N]
    info: dict = field(default_factory=dict)
    # [T, N] bool: a person's teleoperator drove (part of) this macro-step, so its sampled chunk is not what
    # ran: GAE runs through it (its reward and value still count) but no loss term uses it. None: all False
    # (simulation, in-process run_pirl).
    intervened: Tensor | None = None
    # [T, N, H, D] the actions that ran on intervened macro-steps (the teleoperator's ticks and the policy's before
    # it took over, after the safety layer), normalised as the chain's last state is and zero-padded past the
    # ticks that ran; zeros on the other steps. Read by the chunk critic (steer_update=q, q_critic_input=action),
    # which can learn from any action that ran. None: no intervened step carries them.
    executed_actions: Tensor | None = None

    def __post_init__(self) -> None:
        if self.intervened is None:
            self.intervened = torch.zeros_like(self.valid, dtype=torch.bool)
        elif self.intervened.shape != self.valid.shape:
            raise ValueError(
                f"intervened has shape {tuple(self.intervened.shape)}; it must match valid {tuple(self.valid.shape)}"
            )

    @property
    def trainable(self) -> Tensor:
        """``[T, N]`` bool: the steps whose sampled chunk ran (valid and not intervened): the loss samples."""
        return self.valid & ~self.intervened

    def check_finite(self) -> None:
        """Refuse NaN/inf anywhere the update reads, naming the field."""
        tensors = {f"observations[{k}]": v for k, v in self.observations.items()}
        tensors.update(
            {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor) and getattr(self, f.name).is_floating_point()
            }
        )
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise NonFiniteBatchError(f"rollout batch field '{name}' has {bad} non-finite value(s); update skipped")

    def to(self, device) -> RolloutBatch:
        """The tensors the update reads on ``device`` (the policy's)."""
        moved = {
            f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, observations={k: v.to(device) for k, v in self.observations.items()}, **moved)

    def flatten(self, mask: Tensor) -> dict:
        """Samples where ``mask`` ``[T, N]`` is True, as ``[M, ...]`` tensors."""
        out = {k: getattr(self, k)[mask] for k in ("chains", "stochastic", "noise_level", "log_probs", "values")}
        out["observations"] = {k: v[mask] for k, v in self.observations.items()}
        return out

    @property
    def success_rate(self) -> float:
        return float(self.episode_success.float().mean())


def env_task(env) -> str | None:
    """The env's language instruction (LeRobot / gymnasium envs call it ``task_description`` or ``task``)."""
    for name in ("task_description", "task"):
        task = getattr(env, name, None)
        if isinstance(task, str) and task:
            return task
    return None


class PolicyRunner:
    """Runs a ``pi_rl`` policy on raw env observations: LeRobot preprocessing, the policy's own
    processors (normalisation; for VLA backbones the task instruction is tokenized there), and
    un-normalisation of the executed actions.

    ``task``: the language instruction handed to the pre-processor with every observation (what
    LeRobot's env wrappers put in ``complementary_data["task"]``); VLA backbones need one.
    ``PolicyRunner.for_env`` also takes the env's own observation processor (LeRobot env types).
    """

    def __init__(self, policy, preprocessor, postprocessor, task: str | None = None, env_processor=None):
        self.policy, self.pre, self.post = policy, preprocessor, postprocessor
        self.task = task
        # a LeRobot env type's own observation processor (``make_env_pre_post_processors``, e.g. LIBERO's),
        # applied after LeRobot's raw-key mapping and before the policy's pre-processor, as lerobot-eval does
        self.env_processor = env_processor

    @classmethod
    def for_env(cls, policy, preprocessor, postprocessor, env, task: str | None = None) -> PolicyRunner:
        """A runner for ``env``: its task instruction (unless ``task`` is given) and its observation processor."""
        return cls(policy, preprocessor, postprocessor, task or env_task(env), getattr(env, "processor", None))

    def observe(self, raw_obs: dict[str, np.ndarray], task: str | None = None) -> dict[str, Tensor]:
        batch = preprocess_observation(raw_obs)
        task = task or self.task
        if task is not None:
            batch["task"] = [task] * next(iter(batch.values())).shape[0]
        elif self.policy.config.is_vla:
            raise ValueError(
                f"the {self.policy.config.backbone} backbone needs a language instruction: the env has no "
                "task_description and none was given"
            )
        if self.env_processor is not None:
            batch = self.env_processor(batch)
        batch = self.pre(batch)
        # what the policy reads: its input features, and the tokenized instruction of a VLA. A robot or
        # env may observe more (a camera only recorded in the dataset): that stays out of the records.
        reads = set(self.policy.config.input_features or {})
        return {
            k: v
            for k, v in batch.items()
            if (k in reads or k.startswith("observation.language")) and isinstance(v, Tensor)
        }

    def to_env_actions(self, normalised_chunk: Tensor) -> np.ndarray:
        """``[N, H, D_model]`` normalised chunk -> ``[N, H, action_dim]`` env actions."""
        real = normalised_chunk[..., : self.policy.config.action_dim]
        return self.post(real).detach().cpu().numpy()


def collect_rollouts(
    runner: PolicyRunner,
    env,
    *,
    deterministic: bool = False,
    noise_level: float | None = None,
    seeds: int | list[int] | None = None,
    group_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> RolloutBatch:
    """Run one episode in every env of ``env`` (created with ``autoreset=False``).

    ``deterministic=True`` runs the ODE sampler (evaluation); otherwise the policy's configured
    stochastic sampler. ``seeds`` is passed to ``env.reset`` (a list with repeats makes GRPO groups).
    """
    policy = runner.policy
    cfg = policy.config
    n = env.num_envs
    if not env.max_steps:
        raise ValueError(f"{type(env).__name__} has no episode step limit (max_steps); PI-RL rollouts need one")
    horizon = math.ceil(env.max_steps / cfg.n_action_steps)
    task = env_task(env)
    raw, _ = env.reset(seed=seeds)
    alive = np.ones(n, dtype=bool)
    ep_return = np.zeros(n, dtype=np.float32)
    ep_success = np.zeros(n, dtype=bool)
    steps: list[dict] = []
    env_steps = 0
    policy.eval()
    with torch.no_grad():
        for _ in range(horizon):
            if not alive.any():
                break
            obs = runner.observe(raw, task)
            # deterministic: drawn as the ODE draws (no hybrid-step index), so every noise method is evaluated on
            # the same initial noise x_1 from the same generator
            initial, step_noise, stochastic = policy.draw_noise(
                n, generator=generator, noise_method="flow_ode" if deterministic else None
            )
            method = None
            if deterministic:
                step_noise, stochastic, method = torch.zeros_like(step_noise), torch.zeros_like(stochastic), "flow_ode"
            sample = policy.sample_chains(
                obs, initial, step_noise, stochastic, noise_level=noise_level, noise_method=method
            )
            actions = runner.to_env_actions(sample.actions)
            valid = alive.copy()
            executed = np.zeros(n, dtype=np.int64)
            reward = np.zeros(n, dtype=np.float32)
            term = np.zeros(n, dtype=bool)
            trunc = np.zeros(n, dtype=bool)
            for j in range(cfg.n_action_steps):
                if not alive.any():
                    break
                env_steps += int(alive.sum())
                executed += alive
                raw, r, te, tr, info = env.step(actions[:, j], active=alive)
                reward += np.where(alive, r, 0.0).astype(np.float32)
                ep_success |= alive & np.asarray(info.get("is_success", np.zeros(n, dtype=bool)), dtype=bool)
                te, tr = te & alive, tr & alive
                term |= te
                trunc |= tr & ~te
                alive &= ~(te | tr)
            ep_return += reward
            steps.append(
                {
                    "obs": obs,
                    "sample": sample,
                    "reward": reward,
                    "term": term,
                    "trunc": trunc,
                    "valid": valid,
                    "executed": executed,
                }
            )
        # V(o) where an env stopped without terminating (time limit, or the horizon ran out)
        final_obs = runner.observe(raw, task)
        bootstrap = policy.predict_value(final_obs, generator=generator)

    T = len(steps)
    stack = lambda xs: torch.stack(list(xs)).cpu()  # noqa: E731  (batches live on the CPU; update_on moves them)
    as_t = lambda key, dtype: torch.as_tensor(np.stack([s[key] for s in steps]), dtype=dtype)  # noqa: E731
    valid = as_t("valid", torch.bool)
    # each env's last valid step gets the bootstrap value of its final observation
    last_valid = torch.zeros_like(valid)
    last_idx = valid.long().cumsum(0).argmax(0)
    last_valid[last_idx, torch.arange(n)] = True
    batch = RolloutBatch(
        observations={k: stack(s["obs"][k] for s in steps) for k in steps[0]["obs"]},
        chains=stack(s["sample"].chain.chain for s in steps),
        stochastic=stack(s["sample"].chain.stochastic for s in steps),
        noise_level=stack(s["sample"].noise_level for s in steps),
        log_probs=stack(s["sample"].chain.log_prob for s in steps),
        values=stack(s["sample"].value for s in steps),
        rewards=as_t("reward", torch.float32),
        terminated=as_t("term", torch.bool),
        truncated=as_t("trunc", torch.bool),
        valid=valid,
        bootstrap_values=torch.where(last_valid, bootstrap.cpu().unsqueeze(0).expand(T, n), torch.zeros(T, n)),
        episode_returns=torch.as_tensor(ep_return),
        episode_success=torch.as_tensor(ep_success),
        group_ids=group_ids if group_ids is not None else torch.arange(n),
        env_steps=env_steps,
        info={
            "final_observation": {k: v.cpu() for k, v in final_obs.items()},
            "step_env_steps": as_t("executed", torch.int64),
        },
    )
    # the horizon can end before max_steps only through ceil(); an env still alive is cut there
    batch.truncated |= last_valid & ~batch.terminated & torch.as_tensor(alive).unsqueeze(0)
    return batch


def env_mismatch(runner: PolicyRunner, env) -> str | None:
    """Why ``env`` cannot run ``runner``'s policy (None when it can): its first observation, pre-processed,
    must hold every input the policy reads with the policy's shapes, and its actions the policy's width. A
    user who points a policy at another task gets this reason at start-up instead of a traceback mid-run."""
    cfg = runner.policy.config
    if getattr(env, "action_dim", cfg.action_dim) != cfg.action_dim:
        return f"the env's actions have {env.action_dim} dims, the policy's {cfg.action_dim}"
    raw, _ = env.reset(seed=0)
    try:
        obs = runner.observe(
            {k: v[:1] if not isinstance(v, dict) else {c: a[:1] for c, a in v.items()} for k, v in raw.items()},
            env_task(env),
        )
    except (KeyError, ValueError, RuntimeError) as e:
        return f"its observation ({sorted(raw)}) cannot be pre-processed for the policy: {e}"
    want = {k: shape for k, (_dtype, shape) in cfg.observation_spec().items()}
    got = {k: tuple(v.shape[1:]) for k, v in obs.items()}
    missing = sorted(set(want) - set(got))
    if missing:
        return f"its observation gives {sorted(got)}, the policy also reads {missing}"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if wrong:
        return "shapes differ (env, policy): " + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(wrong.items()))
    return None


def evaluate_success(runner: PolicyRunner, env, *, episodes: int, seed: int) -> float:
    """Deterministic (ODE) success rate over ``episodes`` episodes, ``env.num_envs`` at a time.

    The episodes (reset seeds) and the ODE's initial noise are both fixed by ``seed``, so the same
    policy always gets the same score and two policies are compared on the same episodes.
    """
    # counted, then divided in float64: a float32 mean makes 180 of 200 0.89999998, below a 0.9 target
    return int(episode_successes(runner, env, episodes=episodes, seed=seed).sum()) / episodes


def episode_successes(
    runner: PolicyRunner, env, *, episodes: int, seed: int, noise_seed: int | None = None
) -> torch.Tensor:
    """``evaluate_success``'s episodes one by one: ``[episodes]`` bool. ``noise_seed`` draws other initial
    noises for the same episodes (default ``seed``: the evaluation's own)."""
    done, k, parts = 0, 0, []
    generator = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    while done < episodes:
        batch = collect_rollouts(runner, env, deterministic=True, seeds=seed + k * env.num_envs, generator=generator)
        take = min(env.num_envs, episodes - done)
        parts.append(batch.episode_success[:take].bool())
        done += take
        k += 1
    return torch.cat(parts)


__all__ = [
    "RolloutBatch",
    "PolicyRunner",
    "collect_rollouts",
    "env_mismatch",
    "env_task",
    "episode_successes",
    "evaluate_success",
]
