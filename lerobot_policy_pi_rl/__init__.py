"""PI-RL for LeRobot: online RL fine-tuning of flow-matching policies.

Importing this package registers the ``pi_rl`` policy type, the ``pirl_reach`` env type and the
``pi_rl`` RL algorithm config with LeRobot's draccus registries; LeRobot's scripts do that import for us through
``register_third_party_plugins()`` because the distribution is named ``lerobot_policy_pi_rl``.
"""

from lerobot_policy_pi_rl import (
    algorithm,  # noqa: F401  (registers the "pi_rl" RLAlgorithmConfig)
    envs,  # noqa: F401  (registers "pirl_reach")
    processor_pi_rl,  # noqa: F401  (registers the "pi_rl_clamp_state" processor step saved pre-processors name)
)
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig  # noqa: F401  (registers "pi_rl")

__version__ = "0.1.0"
