"""Measure the simulated task's few-shot SFT -> PI-RL figures in one process (no network).

    python -m lerobot_robot_pirl_sim.tune --out=outputs/sim_tune [--seeds='[0,1,2]'] [--num_demos=20]
        [--demo_noise=0.02] [--sft_steps=2000] [--num_envs=128] [--time_limit=300] [--task='{success_radius: 0.02}']

For each seed: records scripted demonstrations on :class:`~lerobot_robot_pirl_sim.vec_env.PirlSimVecEnv` as a
local LeRobotDataset (OUT/seed<S>/data), behaviour-clones ``pi_rl`` with LeRobot's ``train()``
(OUT/seed<S>/train; a finished checkpoint is reused), then runs PI-RL in process (``run_pirl`` on
``env="pirl_sim"``, 128 envs) with the built-in task's algorithm preset and policy overrides, evaluating the
deterministic policy on 200 fixed episodes every 10 updates. Prints each run's curve and a summary (SFT
success, final and best success, seconds to the first evaluation at or above 0.85 and 0.9); writes
OUT/tune.json. Needs the PI-RL plugin (``lerobot_policy_pi_rl``) installed.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import draccus

from lerobot_robot_pirl_sim.demos import record_demos, train_sft
from lerobot_robot_pirl_sim.expert import DEFAULT_CLOSE_MARGIN
from lerobot_robot_pirl_sim.vec_env import DEFAULT_MAX_STEPS, register

DEFAULT_NUM_DEMOS = 20  # the tuned few-shot set (see README.md for the figures)
DEFAULT_DEMO_NOISE = 0.02


@dataclass
class TuneConfig:
    # output directory: OUT/seed<S>/data (demos), OUT/seed<S>/train (SFT, reused when finished), OUT/tune.json
    out: str = "outputs/sim_tune"
    # one SFT + PI-RL run per seed (demos, SFT and PI-RL all use it)
    seeds: list[int] = field(default_factory=lambda: [0])
    # scripted demonstrations recorded for SFT (successful episodes only)
    num_demos: int = DEFAULT_NUM_DEMOS
    # noise of the scripted expert, as a fraction of each action's half-range (see expert.scripted_expert)
    demo_noise: float = DEFAULT_DEMO_NOISE
    # the scripted expert closes once within close_margin x the success radius and speed (see expert.scripted_expert)
    close_margin: float = DEFAULT_CLOSE_MARGIN
    # SFT training steps (LeRobot's train loop)
    sft_steps: int = 2000
    # PI-RL: envs per update (= episodes per update)
    num_envs: int = 128
    # PI-RL: maximum number of updates (the time limit usually stops the run first)
    iterations: int = 100_000
    # PI-RL: stop after this much wall time, seconds (0: SFT and its evaluation only)
    time_limit: float = 300.0
    # PI-RL: deterministic evaluation every this many updates
    eval_every: int = 10
    # PI-RL: stop once the deterministic success reaches this (None: run to the time limit)
    target: float | None = None
    # PI-RL: sampler (flow_sde, flow_noise)
    noise_method: str = "flow_sde"
    # PI-RL: actor learning rate (None: the built-in task preset's)
    actor_lr: float | None = None
    # episode step limit of the task
    max_steps: int = DEFAULT_MAX_STEPS
    # TaskParams fields for a non-default task, e.g. {success_radius: 0.015}
    task: dict = field(default_factory=dict)
    # also save each fine-tuned policy (with its processors) to OUT/seed<S>/pirl/pretrained_model
    save_policy: bool = False
    # torch intra-op threads (None: torch's default, one per core). On a machine other jobs share, 1 avoids OpenMP
    # threads spin-waiting for a core (measured here: 40x slower updates with 2 threads next to a busy process)
    threads: int | None = None


def sft_checkpoint(cfg: TuneConfig, out: Path, seed: int) -> tuple[Path, dict]:
    """Record demos and behaviour-clone (reusing what a previous run finished); returns (checkpoint, timings)."""
    from lerobot_policy_pi_rl.presets import builtin_policy_overrides
    from lerobot_policy_pi_rl.sft import SFTSettings

    ckpt = out / "train" / "checkpoints" / "last" / "pretrained_model"
    timings = {}
    if (ckpt / "model.safetensors").is_file():
        return ckpt, timings
    if not (out / "data" / "meta" / "info.json").is_file():
        t = time.monotonic()
        task = {"max_steps": cfg.max_steps, **cfg.task}
        record_demos(
            out / "data", cfg.num_demos, seed=seed, noise_std=cfg.demo_noise, close_margin=cfg.close_margin, **task
        )
        timings["record_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    settings = SFTSettings(steps=cfg.sft_steps, seed=seed, policy_overrides=builtin_policy_overrides("mlp"))
    ckpt = train_sft(out / "data", out / "train", settings)
    timings["sft_s"] = round(time.monotonic() - t, 1)
    print(f"[tune] seed {seed}: {cfg.num_demos} demos, SFT ({cfg.sft_steps} steps) in {timings['sft_s']}s", flush=True)
    return ckpt, timings


def run_seed(cfg: TuneConfig, seed: int) -> dict:
    from lerobot_policy_pi_rl.learn import LearnSettings, run_pirl
    from lerobot_policy_pi_rl.presets import builtin_task_algorithm_config
    from lerobot_policy_pi_rl.sft import load_policy

    out = Path(cfg.out) / f"seed{seed}"
    ckpt, timings = sft_checkpoint(cfg, out, seed)
    policy, pre, post = load_policy(ckpt, noise_method=cfg.noise_method)
    algo = builtin_task_algorithm_config(**({"actor_lr": cfg.actor_lr} if cfg.actor_lr is not None else {}))
    learn = LearnSettings(
        iterations=cfg.iterations if cfg.time_limit > 0 else 0,
        num_envs=cfg.num_envs,
        eval_every=cfg.eval_every,
        seed=seed,
        target_success=cfg.target,
        time_limit_s=cfg.time_limit,
        env="pirl_sim",
        env_kwargs={"max_steps": cfg.max_steps, **cfg.task},
    )
    # run_pirl reports after each evaluation (the SFT one first): time-stamp the reports for a curve in seconds
    start, stamps = time.monotonic(), []

    def progress(line: str) -> None:
        stamps.append(round(time.monotonic() - start, 1))
        print(f"[seed {seed}]{line}", flush=True)

    res = run_pirl(policy, pre, post, algo, learn, progress=progress)
    curve = [[steps, t, success] for (steps, success), t in zip(res.curve, stamps, strict=True)]
    if cfg.save_policy:
        for part in (policy, pre, post):
            part.save_pretrained(out / "pirl" / "pretrained_model")
    return {
        "seed": seed,
        "sft_success": res.sft_success,
        "final_success": res.final_success,
        "best_success": res.best_success,
        "first_0.85_s": next((t for _, t, s in curve if s >= 0.85), None),
        "first_0.9_s": next((t for _, t, s in curve if s >= 0.9), None),
        "updates": res.updates,
        "env_steps": res.env_steps,
        "rl_wall_s": round(res.wall_seconds, 1),
        **timings,
        "curve": curve,  # [env steps, seconds since PI-RL started, deterministic success] per evaluation
    }


def summary_lines(runs: list[dict]) -> list[str]:
    lines = ["seed  SFT    final  best   >=0.85 at  >=0.9 at  updates  RL wall"]
    for r in runs:
        at = [f"{r[k]:.0f}s" if r[k] is not None else "-" for k in ("first_0.85_s", "first_0.9_s")]
        lines.append(
            f"{r['seed']:<5} {r['sft_success']:.3f}  {r['final_success']:.3f}  {r['best_success']:.3f}  "
            f"{at[0]:>9}  {at[1]:>8}  {r['updates']:>7}  {r['rl_wall_s']:.0f}s"
        )
    if len(runs) > 1:
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("sft_success", "final_success", "best_success")}
        lines.append(f"mean  {mean['sft_success']:.3f}  {mean['final_success']:.3f}  {mean['best_success']:.3f}")
    return lines


def run(cfg: TuneConfig) -> dict:
    register()  # the vec env "pirl_sim" (importing the package did it too)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    runs = []
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in cfg.seeds:
        runs.append(run_seed(cfg, seed))
        report = {
            "config": asdict(cfg),
            "machine": f"{platform.machine()} {platform.processor()} {_cpus()} CPUs, Python {platform.python_version()}",
            "wall_s": round(time.monotonic() - started, 1),
            "runs": runs,
        }
        (out / "tune.json").write_text(json.dumps(report, indent=2))
    print("\n".join(["[tune] summary", *summary_lines(runs), f"[tune] wrote {out / 'tune.json'}"]), flush=True)
    return report


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main() -> None:
    run(draccus.parse(TuneConfig))


if __name__ == "__main__":
    main()
