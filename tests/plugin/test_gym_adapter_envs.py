"""The gymnasium adapter on envs that are not the built-in task: another success key, Dict observations in
LeRobot's raw keys, and an env that ignores reset(seed=...)."""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np
import pytest

from lerobot_policy_pi_rl.envs import GymVecAdapter


class _Toy(gym.Env):
    """A 1-D reach: success when the position passes 1; 5 steps at most. Options below change how it reports."""

    def __init__(self, report_key="is_success", dict_obs=False, honour_seed=True):
        self.report_key, self.dict_obs, self.honour_seed = report_key, dict_obs, honour_seed
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        state = gym.spaces.Box(-10.0, 10.0, (2,), np.float32)
        if dict_obs:
            self.observation_space = gym.spaces.Dict(
                {"agent_pos": state, "pixels": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)}
            )
        else:
            self.observation_space = state
        self._free = np.random.default_rng()

    def _obs(self):
        state = np.array([self.x, self.t], np.float32)
        if not self.dict_obs:
            return state
        return {"agent_pos": state, "pixels": np.full((8, 8, 3), int(self.t) * 10, np.uint8)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        rng = self.np_random if self.honour_seed else self._free
        self.x, self.t = float(rng.uniform(-0.5, 0.5)), 0
        return self._obs(), {}

    def step(self, action):
        self.x += float(action[0])
        self.t += 1
        ok = self.x > 1.0
        info = {self.report_key: ok}
        return self._obs(), float(ok), ok, self.t >= 5, info


gym.register("pirl_test/Toy-v0", entry_point=_Toy, max_episode_steps=5)


def _run_episode(env, action):
    env.reset(seed=0)
    success = np.zeros(env.num_envs, bool)
    for _ in range(5):
        _, _, te, tr, info = env.step(np.full((env.num_envs, 1), action, np.float32))
        success |= info["is_success"]
        if (te | tr).all():
            break
    return success


def test_success_is_read_from_the_configured_key_and_a_missing_key_warns(caplog):
    # the env reports success under "success" (MetaWorld's key)
    env = GymVecAdapter("pirl_test/Toy-v0", 2, autoreset=False, success_key="success", report_key="success")
    assert _run_episode(env, 1.0).all()
    assert not _run_episode(env, -1.0).any()
    # with the default key nothing is counted, and the first ended episode says why
    quiet = GymVecAdapter("pirl_test/Toy-v0", 2, autoreset=False, report_key="success")
    with caplog.at_level(logging.WARNING):
        assert not _run_episode(quiet, 1.0).any()
    (msg,) = [r.getMessage() for r in caplog.records if "never" in r.getMessage()]
    assert "info['is_success']" in msg and "'success'" in msg and "success_key='success'" in msg


def test_dict_observations_pass_through_in_lerobots_raw_keys():
    from lerobot.envs.utils import preprocess_observation

    env = GymVecAdapter("pirl_test/Toy-v0", 3, autoreset=False, dict_obs=True)
    assert env.passthrough and env.state_dim == 2 and env.obs_type == "pixels_agent_pos"
    obs, _ = env.reset(seed=1)
    assert set(obs) == {"agent_pos", "pixels"}
    assert obs["agent_pos"].shape == (3, 2) and obs["agent_pos"].dtype == np.float32
    assert obs["pixels"].shape == (3, 8, 8, 3) and obs["pixels"].dtype == np.uint8  # not flattened into the state
    obs, *_ = env.step(np.zeros((3, 1), np.float32))
    assert (obs["pixels"] == 10).all() and (obs["agent_pos"][:, 1] == 1).all()
    batch = preprocess_observation(obs)  # what the policy runner does
    assert set(batch) == {"observation.state", "observation.image"}
    assert tuple(batch["observation.image"].shape) == (3, 3, 8, 8)
    # a flat Box keeps the old behaviour: one float32 state vector
    flat = GymVecAdapter("pirl_test/Toy-v0", 2, autoreset=False)
    assert not flat.passthrough and set(flat.reset(seed=0)[0]) == {"agent_pos"}


def test_an_env_that_ignores_the_reset_seed_is_reported(caplog):
    with caplog.at_level(logging.WARNING):
        honest = GymVecAdapter("pirl_test/Toy-v0", 1)
        assert honest.seed_honoured is True and not caplog.records
        careless = GymVecAdapter("pirl_test/Toy-v0", 1, honour_seed=False)
    assert careless.seed_honoured is False
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "does not honour reset(seed=...)" in msg and "pirl_test/Toy-v0" in msg
    assert GymVecAdapter("pirl_test/Toy-v0", 1, honour_seed=False, check_seed=False).seed_honoured is None


@pytest.mark.parametrize("autoreset", [True, False])
def test_final_observations_keep_their_dict_layout(autoreset):
    env = GymVecAdapter("pirl_test/Toy-v0", 2, autoreset=autoreset, dict_obs=True)
    env.reset(seed=0)
    for _ in range(5):
        obs, _, te, tr, info = env.step(np.full((2, 1), 0.05, np.float32))
    assert (te | tr).all() and set(info["final_obs"]) == {"agent_pos", "pixels"}
    assert (info["final_obs"]["agent_pos"][:, 1] == 5).all()
    if autoreset:  # the next first observation is already there
        assert (obs["agent_pos"][:, 1] == 0).all()
