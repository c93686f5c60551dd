"""pirl-init: make a pi_rl policy from a LeRobot pi0 / pi0.5 / SmolVLA checkpoint, ready for PI-RL.

    pirl-init --out DIR --backbone pi0 --base-model-path lerobot/pi0_base \\
              --dataset-repo-id YOU/your_dataset [--dataset-root PATH] \\
              [--policy-overrides '{"n_action_steps": 5, "num_denoise_steps": 4}']

The base policy's weights are loaded by LeRobot's own ``from_pretrained`` (a local checkpoint directory
or a hub id); the features and normalisation statistics come from your LeRobot dataset, the way
``lerobot-train`` builds a policy (``make_policy`` with the dataset's metadata). The value and noise
heads are new (the critic's output layer starts at zero). DIR is a LeRobot ``pretrained_model``
directory (config.json with the resolved base config, model.safetensors, the pre/post processors) for
``pirl-learner --policy-path DIR`` and ``pirl-edge --policy-path DIR``; no SFT is run. For few-shot SFT
first, use ``lerobot-train --policy.type=pi_rl --policy.backbone=pi0 --policy.base_model_path=...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lerobot_policy_pi_rl.presets import BACKBONE_CHOICES
from pirl.cli import run_cli


def build(args) -> int:
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors

    import lerobot_policy_pi_rl  # noqa: F401  registers the pi_rl policy type with LeRobot's factory

    out = Path(args.out)
    if (out / "model.safetensors").exists():
        raise FileExistsError(f"{out} already holds a policy; choose a new --out")
    overrides = json.loads(args.policy_overrides) if args.policy_overrides else {}
    if not isinstance(overrides, dict):
        raise ValueError("--policy-overrides must be a JSON object of pi_rl config fields")
    for key in ("backbone", "base_model_path", "device"):
        if key in overrides:
            raise ValueError(f"--policy-overrides: set {key} with its own flag")
    if args.reduced is not None:
        overrides["backbone_reduced"] = json.loads(args.reduced)
    if args.dataset_root is not None and not (Path(args.dataset_root) / "meta" / "info.json").is_file():
        # LeRobot would take a folder without metadata for a download target and call the hub
        raise ValueError(f"--dataset-root {args.dataset_root} is not a LeRobotDataset (no meta/info.json there)")
    meta = LeRobotDatasetMetadata(args.dataset_repo_id, root=args.dataset_root)
    cfg = make_policy_config(
        "pi_rl",
        device=args.device,
        push_to_hub=False,
        backbone=args.backbone,
        base_model_path=args.base_model_path,
        **overrides,
    )
    print(
        f"[init] building pi_rl with the {args.backbone} backbone"
        + (f" from {args.base_model_path}" if args.base_model_path else " (random initialisation)")
    )
    policy = make_policy(cfg, ds_meta=meta)
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    trained = sum(p.numel() for p in policy.rl_actor_parameters() + policy.rl_critic_parameters())
    total = sum(p.numel() for p in policy.parameters())
    print(
        f"[init] {total:,} parameters, {trained:,} trained by PI-RL ({cfg.noise_method}, critic on the "
        f"{cfg.critic_placement}); K={cfg.num_denoise_steps}, chunk {cfg.chunk_size}, executing {cfg.n_action_steps}"
    )
    print(f"[init] wrote {out} (use it as --policy-path of pirl-learner and pirl-edge)")
    return 0


def main() -> None:
    p = argparse.ArgumentParser(
        prog="pirl-init", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output pretrained_model directory")
    p.add_argument("--backbone", required=True, choices=[b for b in BACKBONE_CHOICES if b != "mlp"])
    p.add_argument(
        "--base-model-path",
        help="LeRobot checkpoint directory or hub id of the base policy (omit only for a randomly initialised model)",
    )
    p.add_argument("--dataset-repo-id", required=True, help="LeRobot dataset: features and normalisation stats")
    p.add_argument("--dataset-root", help="local dataset directory (default: LeRobot's cache for the repo id)")
    p.add_argument("--policy-overrides", help="JSON object of other pi_rl config fields")
    p.add_argument("--reduced", help="JSON ReducedSize fields: build the modeling code at a reduced size (tests)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    run_cli(lambda: build(args))


if __name__ == "__main__":
    main()
