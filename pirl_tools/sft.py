"""pirl-sft: record scripted demonstrations as a LeRobotDataset, behaviour-clone ``pi_rl`` on it with
LeRobot's training loop, and report the deterministic success of the result.

    pirl-sft --out=DIR [--num_demos=10] [--steps=2000] [--seed=0] [--eval_episodes=200] [--backbone=mlp]

Writes DIR/data (the dataset), DIR/train (LeRobot checkpoints) and DIR/sft.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lerobot_policy_pi_rl.presets import BACKBONE_CHOICES, builtin_policy_overrides
from pirl.cli import parse_config, require, run_cli, write_json
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


@dataclass
class SFTConfig:
    """pirl-sft: record scripted demonstrations of the built-in task, behaviour-clone the pi_rl policy with
    LeRobot's train loop, report its deterministic success (OUT/sft.json)."""

    # output directory (a finished checkpoint there is reused) (required)
    out: str | None = None
    # scripted demonstrations to record
    num_demos: int = 10
    # std of the noise in the scripted expert's actions
    demo_noise: float = 0.1
    # flow-matching training steps
    steps: int = 2000
    # seed of the demonstrations, the training and the evaluation
    seed: int = 0
    # episodes of the deterministic evaluation
    eval_episodes: int = 200
    # velocity field: the small MLP (state), or LeRobot's pi0 / pi05 / smolvla at a reduced CPU size (camera
    # image + state + task instruction)
    backbone: str = "mlp"

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: required (the output directory)")
        require(self, at_least={"num_demos": 1, "steps": 1, "eval_episodes": 1, "demo_noise": 0})
        if self.backbone not in BACKBONE_CHOICES:
            raise ValueError(f"backbone: must be one of {BACKBONE_CHOICES} (got {self.backbone!r})")


def main() -> None:
    cfg = parse_config(SFTConfig, prog="pirl-sft")
    run_cli(lambda: _run(cfg))


if __name__ == "__main__":
    main()
