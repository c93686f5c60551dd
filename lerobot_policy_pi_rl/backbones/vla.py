"""LeRobot's own flow VLAs -- pi0, pi0.5 and SmolVLA -- as PI-RL backbones.

Every flow policy in LeRobot 0.6.1 splits a decision the same way, and so does PI-RL:

* ``embed_prefix`` (once per decision): the base policy's own image / state preparation, its
  ``model.embed_prefix`` and one prefix forward of the VLM that fills the KV cache. The cache is
  kept as plain per-layer key / value tensors (``VLACache``), not a transformers ``Cache`` object,
  so the learner can select rows of it, a frozen prefix can be reused across PPO epochs, and the
  ONNX export sees ordinary tensors.
* ``denoise_step`` (K times): the base model's own ``denoise_step`` gives the velocity. A forward
  pre-hook on its ``action_out_proj`` hands over that layer's input -- the action expert's hidden
  state per action token -- which the Flow-Noise head and the expert-side critic read.

No LeRobot model code is copied: the base ``PI0Policy`` / ``PI05Policy`` / ``SmolVLAPolicy`` is a
submodule (``backbone.base``), built by LeRobot (``from_pretrained`` for a checkpoint directory or hub
id, the real loading path) and called through its methods.

Parameter groups for RL (the paper's choice is a frozen VLM): the *prefix* is everything that only
the observation passes through (vision tower, VLM, and SmolVLA's state projection, which feeds its
prefix); the *expert* is the action expert and the projections around it (pi0's state projection
feeds its suffix). Language-model heads are in neither: no forward pass uses them.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import importlib
import logging
from dataclasses import dataclass

import torch
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS
from torch import Tensor, nn

from lerobot_policy_pi_rl.backbones.base import FlowBackbone, Prefix

log = logging.getLogger(__name__)

VLA_BACKBONES = ("pi0", "pi05", "smolvla")
# base-config fields the pi_rl config owns (one source of truth); everything else is backbone_config
OWNED_FIELDS = (
    "type",
    "input_features",
    "output_features",
    "device",
    "chunk_size",
    "n_action_steps",
    "max_action_dim",
    "pretrained_path",
)
# PaliGemma's tokenizer; SmolVLA tokenizes with its VLM's (``vlm_model_name``)
PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"

# Set while PiRLPolicy.from_pretrained rebuilds a saved pi_rl policy: its weights come from that
# checkpoint, so the base model is built from the saved ``backbone_config`` and nothing is fetched.
LOADING_PI_RL_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("loading_pi_rl_ckpt", default=False)


@dataclass
class VLACache:
    """A VLA's per-decision prefix state, as plain tensors."""

    keys: list[Tensor]  # per VLM layer [B, kv_heads, L, head_dim]
    values: list[Tensor]
    pad_masks: Tensor  # [B, L] bool: real prefix tokens
    state: Tensor | None = None  # [B, max_state_dim]: pi0 embeds the state in the suffix

    def select(self, rows: Tensor) -> VLACache:
        pick = lambda t: t.index_select(0, rows)  # noqa: E731
        return VLACache(
            [pick(k) for k in self.keys],
            [pick(v) for v in self.values],
            pick(self.pad_masks),
            None if self.state is None else pick(self.state),
        )

    @staticmethod
    def cat(caches: list[VLACache]) -> VLACache:
        layers = range(len(caches[0].keys))
        return VLACache(
            [torch.cat([c.keys[i] for c in caches]) for i in layers],
            [torch.cat([c.values[i] for c in caches]) for i in layers],
            torch.cat([c.pad_masks for c in caches]),
            None if caches[0].state is None else torch.cat([c.state for c in caches]),
        )

    def tensors(self) -> list[Tensor]:
        return [*self.keys, *self.values, self.pad_masks, *([] if self.state is None else [self.state])]

    def rebuild(self, tensors: list[Tensor]) -> VLACache:
        n = len(self.keys)
        return VLACache(
            list(tensors[:n]),
            list(tensors[n : 2 * n]),
            tensors[2 * n],
            None if self.state is None else tensors[2 * n + 1],
        )

    def detach(self) -> VLACache:
        return VLACache(
            [k.detach() for k in self.keys],
            [v.detach() for v in self.values],
            self.pad_masks,
            None if self.state is None else self.state.detach(),
        )

    def dynamic_cache(self):
        """A fresh transformers ``DynamicCache`` over these tensors (the base model may extend or crop
        it in place; our tensors are never modified: its updates concatenate into new ones)."""
        from transformers import DynamicCache

        return DynamicCache(tuple((k, v, None) for k, v in zip(self.keys, self.values, strict=True)))

    @staticmethod
    def from_cache(cache, pad_masks: Tensor, state: Tensor | None = None) -> VLACache:
        keys, values = [], []
        for layer in cache:  # DynamicCache iterates (keys, values, sliding_window) per layer
            keys.append(layer[0])
            values.append(layer[1])
        return VLACache(keys, values, pad_masks, state)


def _remember_expert_features(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook on ``action_out_proj``: keep its input (expert hidden states, float32)."""
    module.pirl_expert_features = args[0]


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [B, L, W] over the positions where ``mask`` [B, L] is True (float32)."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp_min(1.0)


class LeRobotVLABackbone(FlowBackbone):
    """Common seam over LeRobot's flow VLAs; a subclass names the base policy type and its quirks."""

    base_type: str
    _state_in_suffix = False  # pi0 reads the (padded) state in each denoise step, so the cache keeps it

    def __init__(self, config):
        super().__init__()
        from lerobot_policy_pi_rl.backbones.reduced import ReducedSize

        self.reduced = ReducedSize.from_dict(config.backbone_reduced) if config.backbone_reduced is not None else None
        base_cfg = resolve_base_config(config, self.base_type, self.reduced)
        self.base = self._build_base_policy(base_cfg, config.base_model_path)
        model = self.base.model
        model.action_out_proj.register_forward_pre_hook(_remember_expert_features)
        _disable_attention_dropout(self.base)
        self.prefix_dim = self._vlm_width()
        self.expert_dim = model.action_out_proj.in_features
        self._prefix_modules, self._expert_modules = self._parameter_groups()

    # --- construction ------------------------------------------------------------------------------

    def _build_base_policy(self, base_cfg, base_model_path: str | None):
        from lerobot.policies.factory import get_policy_class

        cls = get_policy_class(self.base_type)
        path = base_model_path if not LOADING_PI_RL_CHECKPOINT.get() else None
        if self.reduced is not None:
            return self._build_reduced(cls, base_cfg, path)
        if path:
            log.info("loading %s weights from %s", self.base_type, path)
            return cls.from_pretrained(path, config=base_cfg)
        return cls(base_cfg)

    def _build_reduced(self, cls, base_cfg, path: str | None):
        return cls.from_pretrained(path, config=base_cfg) if path else cls(base_cfg)

    @property
    def vocab_size(self) -> int:
        """Size of the VLM's token embedding: token ids must lie below it."""
        return self._language_model_owner().get_input_embeddings().num_embeddings

    @abc.abstractmethod
    def _language_model_owner(self) -> nn.Module:
        """The module whose ``get_input_embeddings()`` embeds the instruction's tokens."""

    @property
    def model(self) -> nn.Module:
        """The base policy's core model (``PI0Pytorch`` / ``PI05Pytorch`` / ``VLAFlowMatching``)."""
        return self.base.model

    @abc.abstractmethod
    def _vlm_width(self) -> int:
        """Width of the VLM's hidden states (the prefix features)."""

    @abc.abstractmethod
    def _parameter_groups(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(prefix modules, expert modules) of the base model; see the module docstring."""

    # --- the seam ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def _prefix_inputs(self, batch: dict[str, Tensor]):
        """(images, img_masks, lang_tokens, lang_masks, state or None) through the base policy's own
        preparation (resize with padding, [-1, 1] pixels, state padding)."""

    @abc.abstractmethod
    def _prefix_forward(self, embs: Tensor, pad_masks: Tensor, att_masks: Tensor):
        """(prefix hidden states [B, L, W], filled transformers cache)."""

    @abc.abstractmethod
    def _velocity(self, cache: VLACache, x_t: Tensor, t: Tensor) -> Tensor:
        """The base model's own ``denoise_step`` on a fresh cache over ``cache``'s tensors."""

    def embed_prefix(self, batch: dict[str, Tensor]) -> Prefix:
        for key in (OBS_LANGUAGE_TOKENS, OBS_LANGUAGE_ATTENTION_MASK):
            if key not in batch:
                raise KeyError(
                    f"the {self.base_type} backbone needs '{key}' (the pi_rl pre-processor tokenizes the task "
                    f"instruction); got {sorted(batch)}"
                )
        images, img_masks, tokens, masks, state = self._prefix_inputs(batch)
        embs, pad_masks, att_masks = self._embed(images, img_masks, tokens, masks, state)
        hidden, cache = self._prefix_forward(embs, pad_masks, att_masks)
        kept = VLACache.from_cache(cache, pad_masks, state if self._state_in_suffix else None)
        return Prefix(features=masked_mean(hidden, pad_masks), cache=kept)

    def _embed(self, images, img_masks, tokens, masks, state):
        return self.model.embed_prefix(images, img_masks, tokens, masks)

    def denoise_step(self, prefix: Prefix, x_t: Tensor, t: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        cache = prefix.cache.select(rows)
        out_proj = self.model.action_out_proj
        velocity = self._velocity(cache, x_t, t)
        expert = out_proj.__dict__.pop("pirl_expert_features")
        return velocity.to(x_t.dtype), expert.to(torch.float32)

    def prefix_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._prefix_modules for p in m.parameters()]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._expert_modules for p in m.parameters()]


class PI0Backbone(LeRobotVLABackbone):
    """LeRobot's pi0: PaliGemma prefix (images + language), Gemma-300M action expert; the state is
    projected into the expert's suffix."""

    base_type = "pi0"
    _state_in_suffix = True

    def _build_reduced(self, cls, base_cfg, path):
        import lerobot_policy_pi_rl.backbones.reduced as reduced
        from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfigError

        if path:  # LeRobot's loader builds the 257k-token vocabulary before loading: sizes cannot match
            raise PiRLConfigError(
                f"policy.base_model_path: a reduced {self.base_type} cannot load a checkpoint "
                "(supported for smolvla only)"
            )

        with reduced.reduced_paligemma(importlib.import_module(cls.__module__), self.reduced):
            policy = cls(base_cfg)
        reduced.finish_reduced_paligemma(policy.model.paligemma_with_expert, self.reduced)
        return policy

    def _vlm_width(self) -> int:
        return self.model.paligemma_with_expert.paligemma.config.text_config.hidden_size

    def _language_model_owner(self) -> nn.Module:
        return self.model.paligemma_with_expert.paligemma

    def _parameter_groups(self):
        pwe = self.model.paligemma_with_expert
        pg = pwe.paligemma.model
        prefix = [pg.vision_tower, pg.multi_modal_projector, pg.language_model]
        expert = [pwe.gemma_expert.model, self.model.action_in_proj, self.model.action_out_proj]
        expert += [
            getattr(self.model, n)
            for n in ("state_proj", "action_time_mlp_in", "action_time_mlp_out", "time_mlp_in", "time_mlp_out")
            if hasattr(self.model, n)
        ]
        return prefix, expert

    def _prefix_inputs(self, batch):
        images, img_masks = self.base._preprocess_images(batch)
        state = self.base.prepare_state(batch) if self._state_in_suffix else None
        return images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK], state

    def _prefix_forward(self, embs, pad_masks, att_masks):
        from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

        att_4d = prepare_attention_masks_4d(make_att_2d_masks(pad_masks, att_masks))
        positions = torch.cumsum(pad_masks, dim=1) - 1
        pwe = self.model.paligemma_with_expert
        pwe.paligemma.model.language_model.config._attn_implementation = "eager"  # noqa: SLF001  (as LeRobot does)
        with _without_gradient_checkpointing(pwe.paligemma.model.language_model):
            (hidden, _), cache = pwe.forward(
                attention_mask=att_4d,
                position_ids=positions,
                past_key_values=None,
                inputs_embeds=[embs, None],
                use_cache=True,
            )
        return hidden, cache

    def _velocity(self, cache, x_t, t):
        return self.model.denoise_step(
            state=cache.state,
            prefix_pad_masks=cache.pad_masks,
            past_key_values=cache.dynamic_cache(),
            x_t=x_t,
            timestep=t,
        )


class PI05Backbone(PI0Backbone):
    """LeRobot's pi0.5: like pi0, but the state enters as discretised tokens in the language prompt
    (the pre-processor writes them) and the time conditions the expert through adaptive RMSNorm."""

    base_type = "pi05"
    _state_in_suffix = False

    def _velocity(self, cache, x_t, t):
        return self.model.denoise_step(
            prefix_pad_masks=cache.pad_masks, past_key_values=cache.dynamic_cache(), x_t=x_t, timestep=t
        )


class SmolVLABackbone(LeRobotVLABackbone):
    """LeRobot's SmolVLA: SmolVLM prefix (images + language + the projected state), a narrower
    expert that cross-attends to the VLM's keys and values."""

    base_type = "smolvla"

    def _vlm_width(self) -> int:
        return self.model.vlm_with_expert.config.text_config.hidden_size

    def _language_model_owner(self) -> nn.Module:
        return self.model.vlm_with_expert.vlm

    def _parameter_groups(self):
        m = self.model
        prefix = [m.vlm_with_expert.get_vlm_model(), m.state_proj]
        expert = [
            m.vlm_with_expert.lm_expert,
            m.action_in_proj,
            m.action_out_proj,
            m.action_time_mlp_in,
            m.action_time_mlp_out,
        ]
        return prefix, expert

    def _prefix_inputs(self, batch):
        batch = self.base._prepare_batch(dict(batch))
        images, img_masks = self.base.prepare_images(batch)
        state = self.base.prepare_state(batch)
        return images, img_masks, batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK], state

    def _embed(self, images, img_masks, tokens, masks, state):
        return self.model.embed_prefix(images, img_masks, tokens, masks, state=state)

    def _prefix_forward(self, embs, pad_masks, att_masks):
        from lerobot.policies.common.vla_utils import make_att_2d_masks

        att_2d = make_att_2d_masks(pad_masks, att_masks)
        positions = torch.cumsum(pad_masks, dim=1) - 1
        (hidden, _), cache = self.model.vlm_with_expert.forward(
            attention_mask=att_2d,
            position_ids=positions,
            past_key_values=None,
            inputs_embeds=[embs, None],
            use_cache=True,
        )
        return hidden, cache

    def _velocity(self, cache, x_t, t):
        return self.model.denoise_step(
            prefix_pad_masks=cache.pad_masks, past_key_values=cache.dynamic_cache(), x_t=x_t, timestep=t
        )

    @contextlib.contextmanager
    def export_context(self):
        """While tracing for ONNX: hand SmolVLM's vision encoder a ready 4-D patch mask.

        Its 2-D patch mask goes through transformers' ``create_bidirectional_mask``, which under the
        ONNX tracer sees the (traced, tensor) sequence length and takes the deprecated
        ``cache_position`` branch. A mask that is already 4-D is passed through unchanged, so we
        expand it here: the same mask, built from plain tensor ops.
        """
        from unittest import mock

        from transformers.models.smolvlm import modeling_smolvlm

        original = modeling_smolvlm.create_bidirectional_mask

        def four_d(config, inputs_embeds, attention_mask, *args, **kwargs):
            if attention_mask is not None and attention_mask.dim() == 2:
                keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, inputs_embeds.shape[1], -1)
                if config._attn_implementation == "sdpa":  # noqa: SLF001
                    attention_mask = keep
                else:  # eager attention adds the mask to the scores
                    attention_mask = torch.zeros(keep.shape, dtype=inputs_embeds.dtype, device=keep.device)
                    attention_mask = attention_mask.masked_fill(~keep, torch.finfo(inputs_embeds.dtype).min)
            return original(config, inputs_embeds, attention_mask, *args, **kwargs)

        with mock.patch.object(modeling_smolvlm, "create_bidirectional_mask", four_d):
            yield


BACKBONE_CLASSES = {"pi0": PI0Backbone, "pi05": PI05Backbone, "smolvla": SmolVLABackbone}


# --- helpers ---------------------------------------------------------------------------------------


def resolve_base_config(config, base_type: str, reduced=None):
    """The base policy's LeRobot config: the checkpoint's own (``base_model_path``) or the type's
    defaults, then ``backbone_config`` overrides, then the fields the pi_rl config owns.

    The resolved fields are written back to ``config.backbone_config``, so a saved pi_rl
    checkpoint rebuilds the same architecture offline.
    """
    import draccus
    from lerobot.configs import PreTrainedConfig

    from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfigError, base_config_class

    cls = base_config_class(base_type)
    fields: dict = {}
    if config.base_model_path and not LOADING_PI_RL_CHECKPOINT.get():
        loaded = PreTrainedConfig.from_pretrained(config.base_model_path)
        if loaded.type != base_type:
            raise PiRLConfigError(
                f"policy.base_model_path: {config.base_model_path} holds a '{loaded.type}' policy, "
                f"but policy.backbone is '{base_type}'"
            )
        if config.max_action_dim is not None and config.max_action_dim != loaded.max_action_dim:
            raise PiRLConfigError(
                f"policy.max_action_dim: {config.max_action_dim}, but the weights in {config.base_model_path} "
                f"pad actions to {loaded.max_action_dim} (leave max_action_dim unset to use theirs)"
            )
        if loaded.chunk_size != config.chunk_size:
            log.warning(
                "policy.chunk_size=%d but %s was trained with chunks of %d",
                config.chunk_size,
                config.base_model_path,
                loaded.chunk_size,
            )
        fields = {k: v for k, v in draccus.encode(loaded).items() if k not in OWNED_FIELDS}
        fields["max_action_dim"] = loaded.max_action_dim
    user = config.backbone_config or {}
    owned = sorted(set(user) & set(OWNED_FIELDS))
    if owned:
        raise PiRLConfigError(f"policy.backbone_config: {owned} are set by the pi_rl config itself (policy.<field>)")
    fields.update(user)
    if reduced is not None:
        fields.update(_reduced_fields(base_type, reduced))
    fields.update(chunk_size=config.chunk_size, n_action_steps=config.n_action_steps, device=config.device)
    if config.max_action_dim is not None:
        fields["max_action_dim"] = config.max_action_dim
    try:
        base = draccus.decode(cls, fields)
    except Exception as e:  # noqa: BLE001  draccus raises several types; the message names the field
        raise PiRLConfigError(f"policy.backbone_config: not a valid {cls.__name__}: {e}") from None
    base.input_features = dict(config.input_features or {})
    base.output_features = dict(config.output_features or {})
    if config.max_action_dim is None:  # the model's action width is the base model's padded width
        config.max_action_dim = base.max_action_dim
    config.backbone_config = {k: v for k, v in draccus.encode(base).items() if k not in OWNED_FIELDS}
    return base


def _reduced_fields(base_type: str, size) -> dict:
    """Base-config fields a reduced size implies (image size; SmolVLA's local tiny VLM)."""
    import lerobot_policy_pi_rl.backbones.reduced as reduced

    if base_type in ("pi0", "pi05"):
        return {"image_resolution": [size.image_size, size.image_size]}
    return {
        "vlm_model_name": str(reduced.smolvlm_dir(size)),
        "load_vlm_weights": False,
        "resize_imgs_with_padding": [size.image_size, size.image_size],
        "num_vlm_layers": size.vlm_depth,
        "self_attn_every_n_layers": 2 if size.vlm_depth > 1 else -1,
    }


def default_tokenizer(config) -> str:
    """What the pi_rl pre-processor tokenizes the task with, when ``policy.tokenizer_name`` is unset."""
    if config.backbone_reduced is not None:
        from lerobot_policy_pi_rl.backbones.reduced import tokenizer_dir

        return str(tokenizer_dir())
    if config.backbone == "smolvla":
        return (config.backbone_config or {}).get("vlm_model_name", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct")
    return PALIGEMMA_TOKENIZER


def _disable_attention_dropout(module: nn.Module) -> None:
    """Dropout breaks the PPO ratio; transformers' attention applies it functionally from a float."""
    for m in module.modules():
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
        if isinstance(m, nn.Dropout):
            m.p = 0.0


@contextlib.contextmanager
def _without_gradient_checkpointing(model: nn.Module):
    """The prefix forward must fill the KV cache, which transformers refuses under gradient
    checkpointing in training mode; the prefix runs once per decision (and without gradient when
    frozen), so checkpointing it saves nothing."""
    saved = getattr(model, "gradient_checkpointing", False)
    model.gradient_checkpointing = False
    try:
        yield
    finally:
        model.gradient_checkpointing = saved
