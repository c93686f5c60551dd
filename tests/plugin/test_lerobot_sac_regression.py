"""Regression check: installing the PI-RL plugin leaves LeRobot's own SAC path working.

The method's plan asks for this check. The plugin adds entries to LeRobot's global draccus registries
(``pi_rl`` in ``PreTrainedConfig`` and ``RLAlgorithmConfig``, ``pirl_reach`` in ``EnvConfig``), and
LeRobot's scripts import it automatically through ``register_third_party_plugins()``. So a plugin bug
(a clobbered or duplicate registry key, a failing import that LeRobot only logs, a global torch
side effect) would break users who never asked for PI-RL and only run ``lerobot-train-rl`` with SAC.

With the plugin imported and LeRobot's plugin discovery run, this test builds SAC the way
``lerobot/rl/learner.py`` does (``make_policy`` -> ``make_algorithm`` -> ``make_pre_post_processors``
-> ``RLTrainer``) with a small state-only ``gaussian_actor``, runs ONE training step on transitions from
LeRobot's own ``ReplayBuffer``, and checks the losses are finite and the networks moved.
CPU only, seeded, no images, no hub access.
"""

import importlib.metadata
import logging
import math
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig, HILSerlRobotEnvConfig
from lerobot.policies.factory import get_policy_class, make_policy, make_policy_config, make_pre_post_processors
from lerobot.policies.gaussian_actor.configuration_gaussian_actor import (
    ActorNetworkConfig,
    CriticNetworkConfig,
    GaussianActorConfig,
)
from lerobot.policies.gaussian_actor.modeling_gaussian_actor import GaussianActorPolicy
from lerobot.rl.algorithms.configs import RLAlgorithmConfig
from lerobot.rl.algorithms.factory import get_algorithm_class, make_algorithm, make_algorithm_config
from lerobot.rl.algorithms.sac import SACAlgorithm, SACAlgorithmConfig
from lerobot.rl.buffer import ReplayBuffer
from lerobot.rl.data_sources.data_mixer import DataMixer
from lerobot.rl.trainer import RLTrainer
from lerobot.utils.constants import ACTION, OBS_STATE
from lerobot.utils.import_utils import register_third_party_plugins

# The plugin, in full: importing the package registers the "pi_rl" policy, the "pirl_reach" env and the
# "pi_rl" RLAlgorithmConfig (test_plugin_discovery_alone_registers_everything checks a fresh process).
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithmConfig
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.envs.configs import PiRLReachEnvConfig

PLUGIN_DIST = "lerobot_policy_pi_rl"
STATE_DIM, ACTION_DIM = 4, 2
HIDDEN = [32, 32]  # small networks: the test is about wiring, not learning
BATCH_SIZE = 16


class _SyncMixer(DataMixer):
    """Sample straight from one replay buffer, in the calling thread.

    LeRobot's ``OnlineOfflineMixer`` prefetches from a background thread, which would race the main
    thread for torch's global RNG and make the seeded step nondeterministic; its ``sample`` is this.
    """

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer

    def sample(self, batch_size: int):
        return self.buffer.sample(batch_size)


def _filled_replay_buffer(n_transitions: int = 32) -> ReplayBuffer:
    """LeRobot's own buffer, so the batch has exactly the keys and shapes the learner feeds SAC."""
    # use_drq=False and an identity augmentation: there are no images (and no torch.compile wrapper).
    buffer = ReplayBuffer(
        capacity=64,
        device="cpu",
        storage_device="cpu",
        state_keys=[OBS_STATE],
        use_drq=False,
        image_augmentation_function=lambda images: images,
    )
    for i in range(n_transitions):
        buffer.add(
            state={OBS_STATE: torch.rand(1, STATE_DIM) * 2 - 1},
            action=torch.rand(1, ACTION_DIM) * 2 - 1,
            reward=float(i % 2),
            next_state={OBS_STATE: torch.rand(1, STATE_DIM) * 2 - 1},
            done=i % 8 == 7,
            truncated=False,
        )
    return buffer


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters, without the observation encoder.

    With ``shared_encoder=True`` (the default) the actor, the critics and the target critics all hold the same
    encoder, which only the critic optimizer steps; leaving it out means a change we see in, e.g., the actor
    really came from the actor's optimizer and not from the shared encoder.
    """
    return {name: p.detach().clone() for name, p in module.named_parameters() if not name.startswith("encoder.")}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    params = dict(module.named_parameters())
    return [name for name, value in before.items() if not torch.equal(params[name].detach(), value)]


def test_plugin_leaves_lerobot_sac_path_working(monkeypatch, caplog):
    # No network here: make any accidental hub call fail fast. huggingface_hub reads the env var once at
    # import, so patch its constant as well as the environment (for anything spawned or imported later).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)

    # --- LeRobot's plugin discovery sees the plugin and imports it without error -------------------------
    # register_third_party_plugins() imports distributions by name and only *logs* a failing import, so a
    # broken plugin would pass silently unless we look at the log.
    dist_names = {dist.metadata.get("Name") for dist in importlib.metadata.distributions()}
    assert PLUGIN_DIST in dist_names, "the plugin must be installed (pip install -e .) for LeRobot to find it"
    with caplog.at_level(logging.INFO):
        register_third_party_plugins()
    failures = [r.getMessage() for r in caplog.records if "Could not import third-party plugin" in r.getMessage()]
    assert not failures, failures

    # --- the registries hold LeRobot's choices untouched, next to the plugin's ----------------------------
    assert RLAlgorithmConfig.get_choice_class("sac") is SACAlgorithmConfig
    assert RLAlgorithmConfig.get_choice_class("pi_rl") is PiRLAlgorithmConfig
    assert PreTrainedConfig.get_choice_class("gaussian_actor") is GaussianActorConfig
    assert PreTrainedConfig.get_choice_class("pi_rl") is PiRLConfig
    assert EnvConfig.get_choice_class("gym_manipulator") is HILSerlRobotEnvConfig
    assert EnvConfig.get_choice_class("pirl_reach") is PiRLReachEnvConfig
    assert get_algorithm_class("sac") is SACAlgorithm
    assert get_policy_class("gaussian_actor") is GaussianActorPolicy
    # TrainRLServerPipelineConfig.validate() falls back to make_algorithm_config("sac") with no arguments.
    assert type(make_algorithm_config("sac")) is SACAlgorithmConfig

    # --- build SAC the way lerobot/rl/learner.py does -----------------------------------------------------
    # A HIL-SERL env config (LeRobot's own SAC env type) declaring state-only features; make_policy derives
    # the policy's input/output features from it. No robot is built: only the config is read.
    env_cfg = HILSerlRobotEnvConfig(
        features={
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,)),
        },
        features_map={"agent_pos": OBS_STATE, ACTION: ACTION},
    )
    policy_cfg = make_policy_config(
        "gaussian_actor",
        device="cpu",
        # Min/max stats matching our feature sizes (the defaults are sized for a 2-d state, 3-d action).
        dataset_stats={
            OBS_STATE: {"min": [-1.0] * STATE_DIM, "max": [1.0] * STATE_DIM},
            ACTION: {"min": [-1.0] * ACTION_DIM, "max": [1.0] * ACTION_DIM},
        },
        state_encoder_hidden_dim=16,
        latent_dim=16,
        actor_network_kwargs=ActorNetworkConfig(hidden_dims=HIDDEN),
        discrete_critic_network_kwargs=CriticNetworkConfig(hidden_dims=HIDDEN),
    )
    assert type(policy_cfg) is GaussianActorConfig
    policy = make_policy(cfg=policy_cfg, env_cfg=env_cfg)
    assert type(policy) is GaussianActorPolicy
    assert policy_cfg.input_features[OBS_STATE].shape == (STATE_DIM,)
    assert policy_cfg.output_features[ACTION].shape == (ACTION_DIM,)
    policy.train()

    algo_cfg = make_algorithm_config(
        "sac", policy_config=policy_cfg, critic_network_kwargs=CriticNetworkConfig(hidden_dims=HIDDEN)
    )
    assert type(algo_cfg) is SACAlgorithmConfig and algo_cfg.type == "sac"
    algorithm = make_algorithm(cfg=algo_cfg, policy=policy)
    assert type(algorithm) is SACAlgorithm

    preprocessor, _ = make_pre_post_processors(policy_cfg=policy_cfg, dataset_stats=policy_cfg.dataset_stats)
    # RLTrainer builds the optimizers and, per step, hands algorithm.update() an iterator of preprocessed
    # batches ({state, action, reward, next_state, done, truncated, complementary_info}).
    trainer = RLTrainer(
        algorithm=algorithm,
        data_mixer=_SyncMixer(_filled_replay_buffer()),
        batch_size=BATCH_SIZE,
        preprocessor=preprocessor,
    )
    assert set(algorithm.get_optimizers()) == {"actor", "critic", "temperature"}

    actor_before = _snapshot(policy.actor)
    critic_before = _snapshot(algorithm.critic_ensemble)
    target_before = _snapshot(algorithm.critic_target)
    temperature_before = algorithm.temperature

    # --- ONE update ---------------------------------------------------------------------------------------
    stats = trainer.training_step()

    # policy_update_freq=1, so the first step updates the critics, the actor and the temperature.
    assert {"loss_critic", "loss_actor", "loss_temperature"} <= set(stats.losses)
    assert {"critic", "actor", "temperature"} <= set(stats.grad_norms)
    log = stats.to_log_dict()
    assert all(math.isfinite(value) for value in log.values()), log
    assert algorithm.optimization_step == 1

    # Every network SAC owns moved: an update that silently trained nothing would still return finite losses.
    assert _changed(policy.actor, actor_before), "no actor parameter changed"
    assert _changed(algorithm.critic_ensemble, critic_before), "no critic parameter changed"
    assert _changed(algorithm.critic_target, target_before), "the Polyak target update did nothing"
    assert algorithm.temperature != temperature_before

    # The learner pushes these weights to actors; they must still be plain finite tensors.
    weights = algorithm.get_weights()["policy"]
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow  # a fresh interpreter
def test_plugin_discovery_alone_registers_everything():
    """What a LeRobot script sees: nothing of ours imported, only register_third_party_plugins()."""
    code = (
        "from lerobot.utils.import_utils import register_third_party_plugins\n"
        "register_third_party_plugins()\n"
        "from lerobot.configs.policies import PreTrainedConfig\n"
        "from lerobot.envs.configs import EnvConfig\n"
        "from lerobot.rl.algorithms.configs import RLAlgorithmConfig\n"
        "print(PreTrainedConfig.get_choice_class('pi_rl').__name__, EnvConfig.get_choice_class('pirl_reach').__name__,"
        " RLAlgorithmConfig.get_choice_class('pi_rl').__name__, RLAlgorithmConfig.get_choice_class('sac').__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["PiRLConfig", "PiRLReachEnvConfig", "PiRLAlgorithmConfig", "SACAlgorithmConfig"]
