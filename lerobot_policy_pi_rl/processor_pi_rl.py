"""Pre/post-processors of the ``pi_rl`` policy (LeRobot's ``make_<type>_pre_post_processors`` convention).

Pre: rename -> add batch dim -> device -> normalise (state and action MEAN_STD, images as is).
Post: un-normalise the action -> CPU. The RL chain lives in the normalised action space; only the
executed action is un-normalised.
"""

from __future__ import annotations

from typing import Any

import torch

from lerobot.processor import (
    PolicyAction,
    PolicyProcessorPipeline,
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
)

from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig


def make_pi_rl_pre_post_processors(
    config: PiRLConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    steps = make_default_policy_processor_steps(config, dataset_stats)
    return make_policy_processor_pipelines(
        input_steps=[steps.rename_observations, steps.add_batch_dim, steps.to_device, steps.normalize],
        output_steps=[steps.unnormalize, steps.to_cpu],
    )
