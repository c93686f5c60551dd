"""pirl-sft: record scripted demonstrations as a LeRobotDataset, behaviour-clone ``pi_rl`` on it with
LeRobot's training loop, and report the deterministic success of the result.

    pirl-sft --out DIR [--num-demos 10] [--steps 2000] [--seed 0] [--eval-episodes 200] [--backbone mlp]

Writes DIR/data (the dataset), DIR/train (LeRobot checkpoints) and DIR/sft.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lerobot_policy_pi_rl.presets import BACKBONE_CHOICES, builtin_policy_overrides
from pirl.cli import run_cli, write_json
from pirl_tools.common import sft_checkpoint


def _run(args) -> int:
    from lerobot_policy_pi_rl.envs import ReachGraspVecEnv, builtin_obs_kwargs
    from lerobot_policy_pi_rl.rollout import PolicyRunner, evaluate_success
    from lerobot_policy_pi_rl.sft import load_policy

    out = Path(args.out)
    ckpt = sft_checkpoint(
        out,
        seed=args.seed,
        num_demos=args.num_demos,
        steps=args.steps,
        noise_std=args.demo_noise,
        policy_overrides=builtin_policy_overrides(args.backbone),
    )
    policy, pre, post = load_policy(ckpt)
    env = ReachGraspVecEnv(min(args.eval_episodes, 500), autoreset=False, **builtin_obs_kwargs(policy.config))
    success = evaluate_success(PolicyRunner(policy, pre, post), env, episodes=args.eval_episodes, seed=1_000_000)
    print(f"SFT deterministic success over {args.eval_episodes} episodes: {success:.3f}")
    print(f"checkpoint: {ckpt}")
    write_json(
        out / "sft.json",
        {
            "checkpoint": str(ckpt),
            "sft_success": success,
            "backbone": args.backbone,
            "num_demos": args.num_demos,
            "steps": args.steps,
            "seed": args.seed,
            "eval_episodes": args.eval_episodes,
        },
    )
    return 0


def main() -> None:
    p = argparse.ArgumentParser(
        prog="pirl-sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output directory (a finished checkpoint there is reused)")
    p.add_argument("--num-demos", type=int, default=10, help="scripted demonstrations to record")
    p.add_argument("--demo-noise", type=float, default=0.1, help="std of the noise in the scripted expert's actions")
    p.add_argument("--steps", type=int, default=2000, help="flow-matching training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument(
        "--backbone",
        choices=BACKBONE_CHOICES,
        default="mlp",
        help="velocity field: the small MLP (state), or LeRobot's pi0 / pi05 / smolvla at a reduced "
        "CPU size (camera image + state + task instruction)",
    )
    args = p.parse_args()
    for name in ("num_demos", "steps", "eval_episodes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    run_cli(lambda: _run(args))


if __name__ == "__main__":
    main()
