"""pirl-bench: measured runs whose figures go into BENCHMARKS.md.

    pirl-bench learn --out DIR [--noise-method flow_sde flow_noise] [--seeds 0 1 2] [--grpo]
                     [--denoise-steps 4] [--noise-levels 0.5] [--iterations 200] ...

``learn``: in one process (no network) SFT from scripted demos (LeRobot's train loop), then PI-RL
with periodic deterministic evaluation; writes DIR/learn.json and DIR/learn.png.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from lerobot_policy_pi_rl.scripts.common import (
    builtin_task_algorithm_config,
    plot_curves,
    run_cli,
    sft_checkpoint,
    write_json,
)


def _learn(args) -> int:
    from lerobot_policy_pi_rl.learn import LearnSettings, run_pirl
    from lerobot_policy_pi_rl.sft import load_policy

    out = Path(args.out)
    estimators = ["ppo"] + (["grpo"] if args.grpo else [])
    grid = list(itertools.product(args.seeds, estimators, args.noise_method, args.denoise_steps, args.noise_levels))
    runs = []
    started = time.monotonic()
    for i, (seed, estimator, method, k, level) in enumerate(grid, 1):
        ckpt = sft_checkpoint(out / "sft" / f"seed{seed}", seed=seed, num_demos=args.num_demos,
                              steps=args.sft_steps, noise_std=args.demo_noise)
        policy, pre, post = load_policy(ckpt, noise_method=method, num_denoise_steps=k, noise_level=level)
        label = f"{method}" + (f" {estimator}" if estimator != "ppo" else "")
        print(f"[{i}/{len(grid)}] {label} seed={seed} K={k} a={level}")
        algo_cfg = builtin_task_algorithm_config(advantage_estimator=estimator, actor_lr=args.actor_lr)
        settings = LearnSettings(iterations=args.iterations, num_envs=args.num_envs, eval_every=args.eval_every,
                                 eval_episodes=args.eval_episodes, seed=seed, time_limit_s=args.time_limit)
        res = run_pirl(policy, pre, post, algo_cfg, settings)
        runs.append({
            "label": label, "noise_method": method, "estimator": estimator, "seed": seed,
            "num_denoise_steps": k, "noise_level": level,
            "sft_success": res.sft_success, "final_success": res.final_success, "best_success": res.best_success,
            "env_steps": res.env_steps, "updates": res.updates, "wall_seconds": round(res.wall_seconds, 2),
            "curve": [[s, v] for s, v in res.curve],
        })
        print(f"[{i}/{len(grid)}] done: SFT {res.sft_success:.3f} -> final {res.final_success:.3f} "
              f"(best {res.best_success:.3f}) in {res.wall_seconds:.0f}s, {res.env_steps} env steps")
        write_json(out / "learn.json", _report(args, runs))
    plot_curves(out / "learn.png", runs, "PI-RL on pirl_reach (deterministic eval)")
    print(f"wrote {out / 'learn.json'} and {out / 'learn.png'} ({time.monotonic() - started:.0f}s)")
    return 0


def _report(args, runs) -> dict:
    return {
        "command": "pirl-bench " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {_cpus()} CPUs, {platform.python_version()}".strip(),
        "runs": runs,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(prog="pirl-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("learn", help="SFT from scripted demos, then PI-RL; writes learn.json and learn.png")
    p.add_argument("--out", required=True, help="output directory (SFT checkpoints under OUT/sft are reused)")
    p.add_argument("--noise-method", nargs="+", default=["flow_sde", "flow_noise"], choices=["flow_sde", "flow_noise"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--grpo", action="store_true", help="also run the critic-free GRPO variant")
    p.add_argument("--denoise-steps", nargs="+", type=int, default=[4], help="K values (ablation grid)")
    p.add_argument("--noise-levels", nargs="+", type=float, default=[0.5], help="Flow-SDE a values (ablation grid)")
    p.add_argument("--iterations", type=int, default=400, help="PI-RL updates per run")
    p.add_argument("--num-envs", type=int, default=256, help="episodes per update")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument("--actor-lr", type=float, default=3e-5)
    p.add_argument("--time-limit", type=float, default=600.0, help="wall-time cap per run, seconds")
    p.add_argument("--num-demos", type=int, default=10)
    p.add_argument("--demo-noise", type=float, default=0.1)
    p.add_argument("--sft-steps", type=int, default=2000)
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    for name in ("iterations", "num_envs", "eval_every", "eval_episodes", "num_demos", "sft_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(k < 1 for k in args.denoise_steps):
        parser.error("--denoise-steps: K must be >= 1")
    run_cli(lambda: _learn(args))


if __name__ == "__main__":
    main()
