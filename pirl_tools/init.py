"""pirl-init: make a pi_rl policy from a LeRobot pi0 / pi0.5 / SmolVLA checkpoint, ready for PI-RL.

    pirl-init --out=DIR --backbone=pi0 --base_model_path=lerobot/pi0_base \\
              --dataset_repo_id=YOU/your_dataset [--dataset_root=PATH] \\
              [--policy_overrides='{"n_action_steps": 5, "num_denoise_steps": 4}']

The base policy's weights are loaded by LeRobot's own ``from_pretrained`` (a local checkpoint directory
or a hub id); the features and normalisation statistics come from your LeRobot dataset, the way
``lerobot-train`` builds a policy (``make_policy`` with the dataset's metadata). The value and noise
heads are new (the critic's output layer starts at zero). DIR is a LeRobot ``pretrained_model``
directory (config.json with the resolved base config, model.safetensors, the pre/post processors) for
``pirl-learner --policy_path=DIR`` and ``pirl-edge --policy.path=DIR``; no SFT is run. For few-shot SFT
first, use ``lerobot-train --policy.type=pi_rl --policy.backbone=pi0 --policy.base_model_path=...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lerobot_policy_pi_rl.presets import BACKBONE_CHOICES
from pirl.cli import parse_config, run_cli


def build(args) -> int:
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors

    import lerobot_policy_pi_rl  # noqa: F401  registers the pi_rl policy type with LeRobot's factory

    out = Path(args.out)
    if (out / "model.safetensors").exists():
        raise FileExistsError(f"{out} already holds a policy; choose a new out")
    overrides = dict(args.policy_overrides)
    for key in ("backbone", "base_model_path", "device"):
        if key in overrides:
            raise ValueError(f"policy_overrides: set {key} with its own field")
    if args.reduced is not None:
        overrides["backbone_reduced"] = dict(args.reduced)
    if args.dataset_root is not None and not (Path(args.dataset_root) / "meta" / "info.json").is_file():
        # LeRobot would take a folder without metadata for a download target and call the hub
        raise ValueError(f"dataset_root: {args.dataset_root} is not a LeRobotDataset (no meta/info.json there)")
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
    print(f"[init] wrote {out} (use it as policy_path of pirl-learner and policy.path of pirl-edge)")
    return 0


@dataclass
class InitConfig:
    """pirl-init: a pi_rl policy from a LeRobot pi0 / pi0.5 / SmolVLA checkpoint and a LeRobot dataset's
    features and normalisation stats (docs/pi0_guide.md)."""

    # output pretrained_model directory (required)
    out: str | None = None
    # the base policy's type: pi0, pi05 or smolvla (required)
    backbone: str | None = None
    # LeRobot checkpoint directory or hub id of the base policy (omit only for a randomly initialised model)
    base_model_path: str | None = None
    # LeRobot dataset whose features and normalisation stats the policy takes (required)
    dataset_repo_id: str | None = None
    # local dataset directory (default: LeRobot's cache for the repo id)
    dataset_root: str | None = None
    # other pi_rl config fields, e.g. --policy_overrides='{chunk_size: 50, n_action_steps: 5}' (YAML / JSON)
    policy_overrides: dict[str, Any] = field(default_factory=dict)
    # ReducedSize fields: build the modeling code at a reduced size (tests); '{}' for its defaults
    reduced: dict[str, int] | None = None
    # torch device the policy is built on
    device: str = "cpu"

    def __post_init__(self):
        for name in ("out", "backbone", "dataset_repo_id"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        vlas = tuple(b for b in BACKBONE_CHOICES if b != "mlp")
        if self.backbone not in vlas:
            raise ValueError(f"backbone: must be one of {vlas} (got {self.backbone!r})")


def main() -> None:
    cfg = parse_config(InitConfig, prog="pirl-init")
    run_cli(lambda: build(cfg))


if __name__ == "__main__":
    main()
