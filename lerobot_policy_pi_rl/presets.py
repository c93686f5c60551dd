"""Presets for the built-in reach-and-grasp task: PI-RL hyperparameters and backbone choices."""

from __future__ import annotations

from lerobot_policy_pi_rl.algorithm import PiRLAlgorithmConfig


def builtin_task_algorithm_config(**overrides) -> PiRLAlgorithmConfig:
    """PI-RL hyperparameters for the small MLP backbone on the built-in task.

    The paper's actor lr (5e-6) is for a 300 M-parameter action expert; the 0.4 M-parameter MLP
    needs a larger one (3e-5 keeps the clip fraction around 0.1), its critic reads frozen prefix
    features and learns faster at 1e-3, and 2 epochs x 4 minibatches (8 optimizer steps per
    update) stays stable with 256 episodes per update, and weight decay is off (0.01 in the paper
    pulls the small MLP's SFT weights toward zero). Everything else is the paper's default.
    See BENCHMARKS.md for the runs that chose these.
    """
    defaults = {"actor_lr": 3e-5, "critic_lr": 1e-3, "update_epochs": 2, "num_minibatches": 4, "weight_decay": 0.0}
    defaults.update(overrides)
    return PiRLAlgorithmConfig(**defaults)


BACKBONE_CHOICES = ("mlp", "pi0", "pi05", "smolvla")


def builtin_policy_overrides(backbone: str) -> dict:
    """pi_rl config fields for the built-in task. The MLP reads the state; a VLA backbone runs
    LeRobot's real modeling code at the reduced CPU size (``backbones/reduced.py``) and reads what a
    VLA reads: the rendered camera image, the state and the task instruction (16 tokens)."""
    if backbone == "mlp":
        return {}
    if backbone not in BACKBONE_CHOICES:
        raise ValueError(f"--backbone must be one of {BACKBONE_CHOICES}, got {backbone!r}")
    return {"backbone": backbone, "backbone_reduced": {}, "backbone_config": {"tokenizer_max_length": 16}}
