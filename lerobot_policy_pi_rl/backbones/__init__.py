"""Velocity-field backbones behind one seam: ``embed_prefix`` once per decision, then
``denoise_step`` per denoise step (the same split LeRobot's pi0 / pi05 / smolvla use)."""

from lerobot_policy_pi_rl.backbones.base import FlowBackbone, Prefix
from lerobot_policy_pi_rl.backbones.mlp import MLPFlowBackbone


def make_backbone(config) -> FlowBackbone:
    """Build the backbone named by ``config.backbone``."""
    if config.backbone == "mlp":
        return MLPFlowBackbone(config)
    if config.backbone in ("pi0", "pi05", "smolvla"):
        from lerobot_policy_pi_rl.backbones.vla import BACKBONE_CLASSES  # needs transformers (lerobot[pi])

        return BACKBONE_CLASSES[config.backbone](config)
    raise ValueError(f"policy.backbone: unknown backbone {config.backbone!r}")


__all__ = ["FlowBackbone", "Prefix", "MLPFlowBackbone", "make_backbone"]
