"""Pre/post-processors of the ``pi_rl`` policy (LeRobot's ``make_<type>_pre_post_processors`` convention).

Pre: rename -> add batch dim -> device -> normalise (state and action MEAN_STD, images as is) -> clamp the
normalised state to +-``state_clip`` (``input_stats``: few demos can leave a state dim nearly constant).
Post: un-normalise the action -> CPU. The RL chain lives in the normalised action space; only the
executed action is un-normalised.

VLA backbones also tokenize the task instruction (the env's / dataset's ``task`` string) with
LeRobot's own processor steps, in the order the base policy's processors use:

* pi0: newline-terminated prompt -> PaliGemma tokenizer;
* pi0.5: normalise first, then the state is discretised into the prompt
  (``Task: ..., State: ...;\\nAction: ``) -> PaliGemma tokenizer;
* SmolVLA: newline-terminated prompt -> the VLM's tokenizer.

The language length is always padded to ``tokenizer_max_length`` (SmolVLA's own default pads to the
longest prompt of a batch): records, learner batches and exported graphs need one fixed shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from lerobot.processor import (
    ObservationProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    ProcessorStepRegistry,
    TokenizerProcessorStep,
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
)

from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.input_stats import state_keys


@ProcessorStepRegistry.register(name="pi_rl_clamp_state")
@dataclass
class ClampStateProcessorStep(ObservationProcessorStep):
    """Clamp the normalised state features ``keys`` to [-limit, limit] (``policy.state_clip``).

    Saved with the pre-processor, so the edge, the learner and ``lerobot-eval`` all clamp alike; the records
    carry the clamped values the policy read.
    """

    keys: list[str] = field(default_factory=list)
    limit: float = 10.0

    def observation(self, observation):
        for key in self.keys:
            value = observation.get(key)
            if isinstance(value, torch.Tensor):
                observation[key] = value.clamp(-self.limit, self.limit)
        return observation

    def get_config(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "limit": self.limit}

    def transform_features(self, features):
        return features


def tokenizer_settings(config: PiRLConfig) -> tuple[str, int]:
    """(tokenizer name or directory, fixed language length) for a VLA backbone."""
    from lerobot_policy_pi_rl.backbones.vla import default_tokenizer

    return config.tokenizer_name or default_tokenizer(config), config.language_length


def make_pi_rl_pre_post_processors(
    config: PiRLConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    steps = make_default_policy_processor_steps(config, dataset_stats)
    normalize = [steps.normalize]
    if config.state_clip is not None and state_keys(config):
        normalize.append(ClampStateProcessorStep(keys=state_keys(config), limit=config.state_clip))
    input_steps = [steps.rename_observations, steps.add_batch_dim, steps.to_device, *normalize]
    if config.is_vla:
        input_steps = [steps.rename_observations, steps.add_batch_dim, *_language_steps(config, steps, normalize)]
    return make_policy_processor_pipelines(input_steps=input_steps, output_steps=[steps.unnormalize, steps.to_cpu])


def ensure_state_clamp(preprocessor, config: PiRLConfig) -> bool:
    """Give a pre-processor saved before the clamp existed the clamp its config asks for, right after its
    normalisation step (the edge and the learner then read the same inputs as a new checkpoint would).
    Returns whether a step was added."""
    from lerobot.processor import NormalizerProcessorStep

    steps = preprocessor.steps
    keys = state_keys(config)
    if config.state_clip is None or not keys or any(isinstance(s, ClampStateProcessorStep) for s in steps):
        return False
    at = next((i for i, s in enumerate(steps) if isinstance(s, NormalizerProcessorStep)), None)
    if at is None:
        return False
    steps.insert(at + 1, ClampStateProcessorStep(keys=keys, limit=config.state_clip))
    return True


def _language_steps(config: PiRLConfig, steps, normalize: list) -> list:
    """``normalize``: the normalisation step and the state clamp after it."""
    to_device = steps.to_device
    name, max_length = tokenizer_settings(config)
    tokenize = TokenizerProcessorStep(
        tokenizer_name=name, max_length=max_length, padding_side="right", padding="max_length"
    )
    if config.backbone == "pi05":
        from lerobot.policies.pi05.processor_pi05 import Pi05PrepareStateTokenizerProcessorStep

        max_state_dim = int((config.backbone_config or {}).get("max_state_dim", 32))
        # the state is discretised from its normalised value, so normalise before tokenizing
        return [
            *normalize,
            Pi05PrepareStateTokenizerProcessorStep(max_state_dim=max_state_dim),
            tokenize,
            to_device,
        ]
    if config.backbone == "pi0":
        from lerobot.policies.pi0.processor_pi0 import Pi0NewLineProcessor

        return [Pi0NewLineProcessor(), tokenize, to_device, *normalize]
    from lerobot.processor.newline_task_processor import NewLineTaskProcessorStep

    return [NewLineTaskProcessorStep(), tokenize, to_device, *normalize]
