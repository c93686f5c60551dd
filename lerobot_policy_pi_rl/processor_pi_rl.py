"""Pre/post-processors of the ``pi_rl`` policy (LeRobot's ``make_<type>_pre_post_processors`` convention).

Pre: rename -> add batch dim -> device -> normalise (state and action MEAN_STD, images as is).
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

from typing import Any

import torch
from lerobot.processor import (
    PolicyAction,
    PolicyProcessorPipeline,
    TokenizerProcessorStep,
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
)

from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig


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
    input_steps = [steps.rename_observations, steps.add_batch_dim, steps.to_device, steps.normalize]
    if config.is_vla:
        input_steps = [steps.rename_observations, steps.add_batch_dim, *_language_steps(config, steps)]
    return make_policy_processor_pipelines(input_steps=input_steps, output_steps=[steps.unnormalize, steps.to_cpu])


def _language_steps(config: PiRLConfig, steps) -> list:
    name, max_length = tokenizer_settings(config)
    tokenize = TokenizerProcessorStep(
        tokenizer_name=name, max_length=max_length, padding_side="right", padding="max_length"
    )
    if config.backbone == "pi05":
        from lerobot.policies.pi05.processor_pi05 import Pi05PrepareStateTokenizerProcessorStep

        max_state_dim = int((config.backbone_config or {}).get("max_state_dim", 32))
        # the state is discretised from its normalised value, so normalise before tokenizing
        return [
            steps.normalize,
            Pi05PrepareStateTokenizerProcessorStep(max_state_dim=max_state_dim),
            tokenize,
            steps.to_device,
        ]
    if config.backbone == "pi0":
        from lerobot.policies.pi0.processor_pi0 import Pi0NewLineProcessor

        return [Pi0NewLineProcessor(), tokenize, steps.to_device, steps.normalize]
    from lerobot.processor.newline_task_processor import NewLineTaskProcessorStep

    return [NewLineTaskProcessorStep(), tokenize, steps.to_device, steps.normalize]
