"""PiRLConfig: the ``pi_rl`` policy type (a flow-matching policy that PI-RL can fine-tune online).

Registered with LeRobot's ``PreTrainedConfig`` draccus registry, so ``--policy.type=pi_rl`` works
in ``lerobot-train`` / ``lerobot-eval`` once LeRobot has imported this plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lerobot.configs import FeatureType, NormalizationMode, PreTrainedConfig
from lerobot.optim import AdamWConfig, CosineDecayWithWarmupSchedulerConfig
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS, OBS_STATE

from lerobot_policy_pi_rl.samplers import NOISE_METHODS, NOISE_STEER

BACKBONES = ("mlp", "pi0", "pi05", "smolvla")
CRITIC_PLACEMENTS = ("prefix", "expert")
# the paper's placements: pi0 reads the action expert, pi0.5 the VLM prefix; SmolVLA follows pi0
DEFAULT_CRITIC_PLACEMENT = {"mlp": "prefix", "pi0": "expert", "pi05": "prefix", "smolvla": "expert"}


def base_config_class(backbone: str) -> type[PreTrainedConfig]:
    """LeRobot's config class of a VLA backbone (``PI0Config``, ``PI05Config``, ``SmolVLAConfig``)."""
    import importlib

    importlib.import_module(f"lerobot.policies.{backbone}.configuration_{backbone}")  # registers the type
    return PreTrainedConfig.get_choice_class(backbone)


class PiRLConfigError(ValueError):
    """A user-facing configuration mistake; the message names the offending field."""


@PreTrainedConfig.register_subclass("pi_rl")
@dataclass
class PiRLConfig(PreTrainedConfig):
    """Configuration of the ``pi_rl`` flow-matching policy.

    Each field is documented beside it (``lerobot-train --help`` shows it; docs/configuration.md is
    generated from these comments). Groups: action chunking, sampler (``samplers.py``), backbone
    (``backbones/``), critic, what trains during RL (SFT trains the whole backbone), the small CPU
    backbone (``backbone="mlp"``), flow-matching SFT.
    """

    # observations per decision. Only `1` is supported.
    n_obs_steps: int = 1
    # normalisation per feature type, applied by the processors (pre: rename, add batch dim, to device, normalise;
    # post: un-normalise action, to CPU). The RL chain lives in the normalised action space.
    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MEAN_STD,
            "ENV": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )

    # velocity-field backbone: `mlp` (the small CPU MLP), or LeRobot's own `pi0`, `pi05`, `smolvla` modeling code
    # driven through its `embed_prefix` / `denoise_step` seam (`backbones/vla.py`; guide:
    # [pi0_guide.md](pi0_guide.md)).
    backbone: str = "mlp"
    # VLA backbones: a LeRobot checkpoint directory or hub id of the base `pi0` / `pi05` / `smolvla` policy; its
    # `config.json` starts `backbone_config` and its weights are loaded by the base policy's own `from_pretrained`.
    # LeRobot's `pretrained_path` already names *this* policy's checkpoint, hence the other name. Not read when a
    # saved `pi_rl` checkpoint is loaded (its weights and `backbone_config` are in it).
    base_model_path: str | None = None
    # VLA backbones: fields of the base LeRobot config (`PI0Config` / `PI05Config` / `SmolVLAConfig`), e.g.
    # `{"dtype": "bfloat16", "gradient_checkpointing": true}` or `'{"tokenizer_max_length": 16}'` on the CLI. When
    # the policy is built it is filled with every resolved field and saved with the checkpoint, so the architecture
    # rebuilds offline. `chunk_size`, `n_action_steps`, `max_action_dim`, the features and the device are this
    # config's own and may not appear here.
    backbone_config: dict[str, Any] = field(default_factory=dict)
    # VLA backbones: build the real modeling code at a reduced size for CPU tests and benchmarks, with a stand-in
    # word-level tokenizer (`backbones/reduced.py`). A mapping of `ReducedSize` fields (`vlm_width` 64, `vlm_depth`
    # 2, `expert_width` 32, `num_heads` 8, `head_dim` 8, `vision_width` 32, `vision_depth` 1, `vision_heads` 2,
    # `patch_size` 8, `image_size` 32); `{}` takes those defaults. With `base_model_path` only for `smolvla`
    # (LeRobot's pi0 loader builds the full 257k-token vocabulary before loading).
    backbone_reduced: dict[str, int] | None = None
    # VLA backbones: tokenizer of the task instruction. Default: `google/paligemma-3b-pt-224` for pi0 / pi05, the
    # VLM's (`vlm_model_name`) for SmolVLA, the stand-in for reduced sizes. Prompts are always padded to the base
    # config's `tokenizer_max_length` (48 for pi0 / SmolVLA, 200 for pi0.5), so records and exported graphs have one
    # shape.
    tokenizer_name: str | None = None

    # H, actions predicted per decision. SFT loads H future actions per sample (`action_delta_indices =
    # range(chunk_size)`).
    chunk_size: int = 8
    # actions executed per decision (by `select_action` and by RL rollouts). Only these chunk positions count in the
    # RL log-prob.
    n_action_steps: int = 4
    # pad actions to this many dims inside the model; `None` keeps the dataset's action dim. Padded dims count
    # neither in the flow-matching loss nor in the log-prob.
    max_action_dim: int | None = None

    # the pre-processor clamps normalised state inputs (state and environment state) to +-this many standard
    # deviations; `None` turns the clamp off. It keeps a state dim that barely varied in a few demos from reaching
    # hundreds of sigmas once RL moves it (docs/method.md). 10 is Stable-Baselines3's VecNormalize default.
    state_clip: float | None = 10.0

    # K, denoise steps per chunk, for every sampler including the deterministic ODE.
    num_denoise_steps: int = 4
    # sampler for RL rollouts: `flow_ode` (deterministic), `flow_noise` (learned per-element std), `flow_sde`
    # (ODE-to-SDE), `noise_steer` (noise-space steering: a small head chooses the initial noise x_1, the flow policy
    # stays frozen and runs the ODE; docs/method.md). `select_action` / `predict_action_chunk` (evaluation,
    # `lerobot-eval`) always run the ODE, from the steering head's x_1 under `noise_steer`.
    noise_method: str = "flow_sde"
    # `flow_sde` only: each sample draws one denoise index uniformly from `0..K-1`; that step is stochastic, the
    # others are ODE steps. Ignored by the other methods.
    hybrid: bool = True
    # Flow-SDE noise level `a`.
    noise_level: float = 0.5
    # if set (and `noise_anneal_updates > 0`), `a` goes linearly from `noise_level` to this value over
    # `noise_anneal_updates` updates (`noise_level_at(update)`, queried by `run_pirl` at every update).
    noise_level_final: float | None = None
    # length of that anneal in updates; `<= 0` means no anneal.
    noise_anneal_updates: int = 0
    # Flow-Noise: lower bound of the noise head's std. std = min + (max - min) * (tanh(h) + 1) / 2.
    noise_std_min: float = 0.08
    # Flow-Noise: upper bound of that std.
    noise_std_max: float = 0.16
    # `noise_steer`: the steering head's mean of x_1 is `steer_bound * tanh(.)` per element.
    steer_bound: float = 2.0
    # `noise_steer`: lower bound of the steering std (it starts at `steer_std_max`).
    steer_std_min: float = 0.05
    # `noise_steer`: upper bound and initial value of the steering std; 1 starts from the N(0, I) the policy was
    # trained with.
    steer_std_max: float = 1.0
    # `noise_steer`: hidden widths of the steering head's MLP (it reads the detached prefix features).
    steer_hidden_dims: list[int] = field(default_factory=lambda: [256, 256])

    # critic input: `prefix` (pooled observation features; for a VLA the mean of the VLM's prefix hidden states over
    # real image and language tokens) or `expert` (action-expert features averaged over action tokens and over the K
    # denoise steps; the learner then re-evaluates all K steps). The input is always detached. Default: `prefix` for
    # `mlp` and `pi05`, `expert` for `pi0` and `smolvla` (the paper's pi0 / pi0.5 choices).
    critic_placement: str | None = None
    # hidden widths of the value MLP (its output layer is zero-initialised).
    critic_hidden_dims: list[int] = field(default_factory=lambda: [256, 256, 128])

    # RL also trains the observation encoder (prefix; for a VLA: vision tower, VLM, and SmolVLA's state projection).
    # Frozen (the paper's choice), the prefix runs without gradient in the learner and is computed once per update
    # (`reuse_frozen_prefix`).
    rl_train_prefix: bool = False
    # RL trains the velocity network (MLP: trunk and velocity head; VLA: the action expert with its
    # action/time/state projections; never the unused language-model heads). The value head (PPO) and the noise head
    # (`flow_noise`) always train.
    rl_train_expert: bool = True

    # width of the velocity MLP's hidden layers.
    hidden_dim: int = 256
    # number of hidden layers of width `hidden_dim` in the velocity MLP.
    num_layers: int = 3
    # per-action-token width E of the expert features: the velocity MLP's output layer has `chunk_size *
    # expert_token_dim` units, reshaped to `[H, E]`; a shared linear map turns each token into its velocity. The
    # noise head and the `expert` critic read these features.
    expert_token_dim: int = 32
    # width of the observation encoder output (state MLP, one conv encoder per camera, projection).
    prefix_dim: int = 128
    # width of the sinusoidal flow-time embedding.
    time_embed_dim: int = 32
    # channel widths of the per-camera conv encoder (3x3, stride 2, then global average pool). Used only with image
    # inputs.
    image_channels: list[int] = field(default_factory=lambda: [16, 32, 32])

    # SFT flow time t ~ Beta(alpha, beta) * 0.999 + 0.001.
    time_beta_alpha: float = 1.5
    # see `time_beta_alpha`.
    time_beta_beta: float = 1.0

    # AdamW learning rate of LeRobot's training preset (`lerobot-train`, SFT) and peak of its scheduler.
    optimizer_lr: float = 1e-3
    # AdamW betas (SFT).
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    # AdamW eps (SFT).
    optimizer_eps: float = 1e-8
    # AdamW weight decay (SFT).
    optimizer_weight_decay: float = 1e-4
    # gradient-norm clip (SFT).
    optimizer_grad_clip_norm: float = 1.0
    # warm-up steps of the cosine-decay-with-warm-up scheduler (SFT).
    scheduler_warmup_steps: int = 100
    # decay steps of that scheduler. `pirl-sft` / `train_sft` set it to the number of training steps.
    scheduler_decay_steps: int = 5000
    # learning rate at the end of the decay.
    scheduler_decay_lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.critic_placement is None and self.backbone in DEFAULT_CRITIC_PLACEMENT:
            self.critic_placement = DEFAULT_CRITIC_PLACEMENT[self.backbone]
        self.validate()

    @property
    def is_vla(self) -> bool:
        """A LeRobot VLA backbone: observations include a tokenized task instruction."""
        return self.backbone != "mlp"

    def base_field(self, name: str):
        """A field of the VLA backbone's LeRobot config: ``backbone_config``'s value, else the
        base config class's default (before the policy is built, ``backbone_config`` may hold only
        the user's overrides)."""
        if name in (self.backbone_config or {}):
            return self.backbone_config[name]
        import dataclasses

        base_cls = base_config_class(self.backbone)
        return next(f.default for f in dataclasses.fields(base_cls) if f.name == name)

    @property
    def language_length(self) -> int:
        """Tokens of the task instruction (fixed: prompts are padded to it); 0 without a VLA backbone."""
        return int(self.base_field("tokenizer_max_length")) if self.is_vla else 0

    def observation_spec(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor one decision reads after pre-processing, by key (sorted): (dtype, shape).

        The one description of a decision's inputs that records, the learner's validation and the
        ONNX export share: the input features (float32), and for VLA backbones the tokenized task.
        """
        spec = {k: ("float32", tuple(ft.shape)) for k, ft in (self.input_features or {}).items()}
        if self.is_vla:
            spec[OBS_LANGUAGE_TOKENS] = ("int64", (self.language_length,))
            spec[OBS_LANGUAGE_ATTENTION_MASK] = ("bool", (self.language_length,))
        return dict(sorted(spec.items()))

    def validate(self) -> None:
        """Check every field a user can set; raise PiRLConfigError naming the field."""

        def bad(name: str, why: str) -> PiRLConfigError:
            return PiRLConfigError(f"policy.{name}: {why} (got {getattr(self, name)!r})")

        if self.backbone not in BACKBONES:
            raise bad("backbone", f"must be one of {BACKBONES}")
        if self.noise_method not in NOISE_METHODS:
            raise bad("noise_method", f"must be one of {NOISE_METHODS}")
        if self.critic_placement not in CRITIC_PLACEMENTS:
            raise bad("critic_placement", f"must be one of {CRITIC_PLACEMENTS}")
        if self.num_denoise_steps < 1:
            raise bad("num_denoise_steps", "the number of denoise steps K must be >= 1")
        if self.chunk_size < 1:
            raise bad("chunk_size", "must be >= 1")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise bad("n_action_steps", f"must be between 1 and chunk_size={self.chunk_size}")
        if self.n_obs_steps != 1:
            raise bad("n_obs_steps", "only 1 observation step is supported")
        if self.noise_level < 0:
            raise bad("noise_level", "the Flow-SDE noise level a must be >= 0")
        if self.noise_level_final is not None and self.noise_level_final < 0:
            raise bad("noise_level_final", "the final Flow-SDE noise level must be >= 0")
        if self.noise_anneal_updates < 0:
            raise bad("noise_anneal_updates", "must be >= 0")
        if not (self.rl_train_expert or self.rl_train_prefix or self.noise_method in ("flow_noise", NOISE_STEER)):
            raise bad("rl_train_expert", "nothing would train during RL: enable rl_train_expert or rl_train_prefix")
        if self.time_beta_alpha <= 0 or self.time_beta_beta <= 0:
            raise bad("time_beta_alpha", "Beta parameters must be > 0")
        if any(ch < 1 for ch in self.image_channels):
            raise bad("image_channels", "every width must be >= 1")
        if not 0 < self.noise_std_min <= self.noise_std_max:
            raise bad("noise_std_min", f"need 0 < noise_std_min <= noise_std_max={self.noise_std_max}")
        if not 0 < self.steer_std_min <= self.steer_std_max:
            raise bad("steer_std_min", f"need 0 < steer_std_min <= steer_std_max={self.steer_std_max}")
        if self.state_clip is not None and self.state_clip <= 0:
            raise bad("state_clip", "must be > 0, or None to turn the clamp off")
        if self.steer_bound <= 0:
            raise bad("steer_bound", "must be > 0")
        if any(d < 1 for d in self.steer_hidden_dims):
            raise bad("steer_hidden_dims", "every width must be >= 1")
        if self.max_action_dim is not None and self.max_action_dim < 1:
            raise bad("max_action_dim", "must be >= 1 or None")
        for name in ("hidden_dim", "num_layers", "expert_token_dim", "prefix_dim", "time_embed_dim"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if any(d < 1 for d in self.critic_hidden_dims):
            raise bad("critic_hidden_dims", "every width must be >= 1")
        if not isinstance(self.backbone_config, dict):
            raise bad("backbone_config", "must be a mapping of base-config fields")
        if self.backbone == "mlp" and (
            self.base_model_path or self.backbone_config or self.backbone_reduced is not None
        ):
            raise bad(
                "backbone",
                "base_model_path / backbone_config / backbone_reduced apply to the pi0, pi05 and "
                "smolvla backbones only",
            )

    def noise_level_at(self, update: int) -> float:
        """Flow-SDE noise level ``a`` after ``update`` PI-RL updates (linear anneal when configured)."""
        if self.noise_level_final is None or self.noise_anneal_updates <= 0:
            return self.noise_level
        frac = min(max(update, 0) / self.noise_anneal_updates, 1.0)
        return self.noise_level + frac * (self.noise_level_final - self.noise_level)

    # --- LeRobot's PreTrainedConfig contract -------------------------------------------------

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(
            lr=self.optimizer_lr,
            betas=self.optimizer_betas,
            eps=self.optimizer_eps,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> CosineDecayWithWarmupSchedulerConfig:
        return CosineDecayWithWarmupSchedulerConfig(
            peak_lr=self.optimizer_lr,
            decay_lr=self.scheduler_decay_lr,
            num_warmup_steps=self.scheduler_warmup_steps,
            num_decay_steps=self.scheduler_decay_steps,
        )

    def validate_features(self) -> None:
        """Called by ``make_policy`` once features are known: say which feature is missing or wrong."""
        if self.action_feature is None:
            raise PiRLConfigError(
                f"policy.output_features: the pi_rl policy needs an '{ACTION}' feature of type ACTION; "
                f"got {sorted((self.output_features or {}).keys())}"
            )
        if len(self.action_feature.shape) != 1:
            raise PiRLConfigError(
                f"policy.output_features['{ACTION}']: expected a 1-D action vector, got shape {self.action_feature.shape}"
            )
        if self.max_action_dim is not None and self.action_feature.shape[0] > self.max_action_dim:
            raise PiRLConfigError(
                f"policy.max_action_dim: {self.max_action_dim} is smaller than the action dim "
                f"{self.action_feature.shape[0]}"
            )
        if self.robot_state_feature is None and not self.image_features:
            raise PiRLConfigError(
                f"policy.input_features: need '{OBS_STATE}' (STATE) and/or image features; "
                f"got {sorted((self.input_features or {}).keys())}"
            )
        if self.robot_state_feature is not None and len(self.robot_state_feature.shape) != 1:
            raise PiRLConfigError(
                f"policy.input_features['{OBS_STATE}']: expected a 1-D state vector, got shape "
                f"{self.robot_state_feature.shape}"
            )
        for key, ft in self.image_features.items():
            if len(ft.shape) != 3:
                raise PiRLConfigError(f"policy.input_features['{key}']: expected (C, H, W), got {ft.shape}")
        if self.is_vla and (self.robot_state_feature is None or not self.image_features):
            raise PiRLConfigError(
                f"policy.input_features: the {self.backbone} backbone needs '{OBS_STATE}' and at least one image "
                f"feature; got {sorted((self.input_features or {}).keys())}"
            )
        # the MLP backbone also reads the environment's state (observation.environment_state: an object's
        # pose, as LeRobot's gym-hil and PushT datasets carry it); the VLAs read the robot's state and images
        supported = (FeatureType.STATE, FeatureType.VISUAL) + ((FeatureType.ENV,) if not self.is_vla else ())
        for key, ft in (self.input_features or {}).items():
            if ft.type not in supported:
                raise PiRLConfigError(
                    f"policy.input_features['{key}']: type {ft.type} is not supported by the {self.backbone} backbone"
                )

    @property
    def action_dim(self) -> int:
        return self.action_feature.shape[0]

    @property
    def model_action_dim(self) -> int:
        """Action dim inside the model (padded to ``max_action_dim`` when set)."""
        return self.max_action_dim or self.action_dim

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None
