"""Presets for the built-in reach-and-grasp task: PI-RL hyperparameters and backbone choices."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lerobot_policy_pi_rl.algorithm import PiRLAlgorithmConfig


@dataclass
class BuiltinTaskAlgorithmConfig(PiRLAlgorithmConfig):
    """PI-RL hyperparameters for the small MLP backbone on the built-in task: the paper's defaults but
    for the five fields below (see BENCHMARKS.md for the runs that chose them). pirl-learner's
    ``--algorithm.*`` fields start from these; every field can still be set."""

    # the paper's 5e-6 is for a 300 M-parameter action expert; the 0.4 M-parameter MLP needs a larger one
    # (3e-5 keeps the clip fraction around 0.1)
    actor_lr: float = 3e-5
    # the critic reads frozen prefix features and learns faster at 1e-3
    critic_lr: float = 1e-3
    # 2 epochs x 4 minibatches (8 optimizer steps per update) stays stable with 256 episodes per update
    update_epochs: int = 2
    # see update_epochs
    num_minibatches: int = 4
    # off: the paper's 0.01 pulls the small MLP's SFT weights toward zero
    weight_decay: float = 0.0

    def plain(self) -> PiRLAlgorithmConfig:
        """The same values as the registered ``pi_rl`` config class (what checkpoints save)."""
        return PiRLAlgorithmConfig(**{f.name: getattr(self, f.name) for f in fields(PiRLAlgorithmConfig)})


def builtin_task_algorithm_config(**overrides) -> PiRLAlgorithmConfig:
    """``BuiltinTaskAlgorithmConfig`` with ``overrides`` applied, as a plain PiRLAlgorithmConfig."""
    return BuiltinTaskAlgorithmConfig(**overrides).plain()


# off-policy noise steering (DSRL-style: algorithm.steer_update=q) on a policy loaded with noise_method=noise_steer:
# the flow policy stays frozen, a critic fits the return-to-go of every steered macro-step (replay buffer) and the
# steering head moves toward the initial noise it scores highest; the head learns at 3e-4 with no entropy bonus (it
# is held near N(0, I) by q_prior_coef instead). Applied on top of a preset; pirl-bench robot's and metaworld's.
NOISE_Q = {"steer_update": "q", "actor_lr": 3e-4, "entropy_coef": 0.0}
# NOISE_Q with the critic over the executed chunk instead of the noise (Q(o, a); the head climbs it through the
# frozen flow's ODE): the fastest learner on the simulated robot (BENCHMARKS.md) and on MetaWorld
NOISE_Q_ACTION = {**NOISE_Q, "q_critic_input": "action"}

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
