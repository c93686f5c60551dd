"""The in-process PI-RL loop: stochastic rollouts -> update -> periodic deterministic evaluation.

No network: this is what ``pirl-bench learn`` and the demo run, and what the learner service
runs per batch once rollouts arrive from robots instead of from a local vector env.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from math import nan
from typing import Any

import torch

from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, PiRLAlgorithmConfig
from lerobot_policy_pi_rl.envs import BUILTIN_NAMES, builtin_obs_kwargs, open_sim_env
from lerobot_policy_pi_rl.rollout import PolicyRunner, collect_rollouts, env_mismatch, evaluate_success


@dataclass
class LearnSettings:
    """Settings of the in-process loop ``run_pirl`` (the algorithm's hyperparameters live in
    PiRLAlgorithmConfig). Each field is documented beside it; docs/configuration.md is generated from these."""

    # maximum number of PI-RL updates.
    iterations: int = 200
    # training envs = episodes per update. For GRPO, a multiple of `grpo_group_size`.
    num_envs: int = 256
    # deterministic (ODE) evaluation every this many updates, plus one before the first update (the SFT score),
    # after the last update and when the time limit is hit.
    eval_every: int = 20
    # episodes per evaluation, run `min(eval_episodes, 500)` envs at a time.
    eval_episodes: int = 200
    # evaluation episode j is reset with seed `eval_seed + j`; it also seeds the ODE's initial noise, so every
    # evaluation uses the same episodes and noise.
    eval_seed: int = 1_000_000
    # `torch.manual_seed`, the rollout noise generator, and the training reset seeds: at update `it` (0-based) the
    # base seed is `(seed + 1) * 10**9 + it * num_envs` (disjoint across seeds and from the evaluation seeds); PPO
    # resets env i with `base + i`, GRPO resets every env of group g with `base + g`.
    seed: int = 0
    # stop after an evaluation reaches this success rate.
    target_success: float | None = None
    # stop once this much wall time (counted from before the first evaluation) has passed; checked after each
    # update, which is then evaluated.
    time_limit_s: float | None = None
    # the vector env to learn on: the built-in task 'pirl_reach', a name registered with
    # `lerobot_policy_pi_rl.envs.register_vec_env` (e.g. 'pirl_sim'), a gymnasium id, or (from Python) a LeRobot
    # `EnvConfig` such as `make_env_config("metaworld", task=...)`.
    env: Any = "pirl_reach"
    # keyword arguments for both envs (training and evaluation), e.g. `max_steps`, `obs_type`.
    env_kwargs: dict = field(default_factory=dict)


@dataclass
class LearnResult:
    sft_success: float
    final_success: float
    best_success: float
    env_steps: int
    updates: int
    wall_seconds: float
    curve: list[tuple[int, float]]  # (env_steps, deterministic success)
    history: list[dict]  # per-update diagnostics


def run_pirl(
    policy,
    preprocessor,
    postprocessor,
    algo_config: PiRLAlgorithmConfig,
    settings: LearnSettings,
    progress: Callable[[str], None] | None = print,
) -> LearnResult:
    """Fine-tune ``policy`` in place with PI-RL on ``settings.env`` (the built-in task by default)."""
    torch.manual_seed(settings.seed)
    algo = PiRLAlgorithm(policy, algo_config)
    env_kwargs = dict(settings.env_kwargs)
    if not env_kwargs and isinstance(settings.env, str) and settings.env in BUILTIN_NAMES:
        env_kwargs = builtin_obs_kwargs(policy.config)
    env = open_sim_env(settings.env, settings.num_envs, "env", autoreset=False, **env_kwargs)
    eval_env = open_sim_env(settings.env, min(settings.eval_episodes, 500), "env", autoreset=False, **env_kwargs)
    runner = PolicyRunner.for_env(policy, preprocessor, postprocessor, env)
    why = env_mismatch(runner, env)
    if why is not None:
        raise ValueError(f"env: {settings.env!r} does not fit the policy: {why}")
    generator = torch.Generator().manual_seed(settings.seed)
    grpo = algo_config.advantage_estimator == "grpo"
    G = algo_config.grpo_group_size
    if grpo and settings.num_envs % G:
        raise ValueError(f"num_envs={settings.num_envs} must be a multiple of algorithm.grpo_group_size={G}")

    def evaluate() -> float:
        return evaluate_success(runner, eval_env, episodes=settings.eval_episodes, seed=settings.eval_seed)

    start = time.monotonic()
    sft_success = evaluate()
    curve = [(0, sft_success)]
    history: list[dict] = []
    env_steps = 0
    if progress:
        progress(f"  update 0: deterministic success {sft_success:.3f} (SFT)")
    for it in range(settings.iterations):
        # training reset seeds: disjoint across seeds and from the evaluation seeds (< 10^9)
        base = (settings.seed + 1) * 10**9 + it * settings.num_envs
        if grpo:  # G envs per group share one reset state
            seeds = [base + g for g in range(settings.num_envs // G) for _ in range(G)]
            groups = torch.arange(settings.num_envs) // G
        else:
            seeds, groups = base, None
        level = policy.config.noise_level_at(it)
        batch = collect_rollouts(runner, env, noise_level=level, seeds=seeds, group_ids=groups, generator=generator)
        env_steps += batch.env_steps
        stats = algo.update_on(batch)
        row = {
            "update": it + 1,
            "env_steps": env_steps,
            "rollout_success": batch.success_rate,
            "noise_level": level,
            **stats.to_log_dict(),
        }
        history.append(row)
        last = it + 1 == settings.iterations
        out_of_time = settings.time_limit_s is not None and time.monotonic() - start > settings.time_limit_s
        if (it + 1) % settings.eval_every == 0 or last or out_of_time:
            success = evaluate()
            curve.append((env_steps, success))
            row["eval_success"] = success
            if progress:
                progress(
                    f"  update {it + 1}: deterministic success {success:.3f}  rollout success "
                    f"{batch.success_rate:.3f}  {_diagnostics(row)}  [{time.monotonic() - start:.0f}s]"
                )
            if settings.target_success is not None and success >= settings.target_success:
                break
        if out_of_time:
            break
    return LearnResult(
        sft_success=sft_success,
        final_success=curve[-1][1],
        best_success=max(s for _, s in curve),
        env_steps=env_steps,
        updates=len(history),
        wall_seconds=time.monotonic() - start,
        curve=curve,
        history=history,
    )


def _diagnostics(row: dict) -> str:
    """The update's health at a glance: PPO's trust-region figures, or under off-policy steering
    (``steer_update=q``, which has no ratio or value head) its critic's loss, the Q its head reaches and the
    steered noise's std."""
    if "q_loss" in row:
        return f"q_loss {row['q_loss']:.4f}  head_q {row.get('head_q', nan):.3f}  steer_std {row.get('steer_std', nan):.3f}"
    return (
        f"approx_kl {row.get('approx_kl', nan):.4f}  clip_frac {row.get('clip_fraction', nan):.3f}  "
        f"expl_var {row.get('explained_variance', nan):.2f}"
    )
