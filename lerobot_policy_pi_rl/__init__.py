"""PI-RL for LeRobot: online RL fine-tuning of flow-matching policies.

Importing this package registers the ``pi_rl`` policy type and the ``pirl_reach`` env type
with LeRobot's draccus registries; LeRobot's scripts do that import for us through
``register_third_party_plugins()`` because the distribution is named ``lerobot_policy_pi_rl``.
"""

from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig  # noqa: F401  (registers "pi_rl")
from lerobot_policy_pi_rl import envs  # noqa: F401  (registers "pirl_reach")

__version__ = "0.1.0"
