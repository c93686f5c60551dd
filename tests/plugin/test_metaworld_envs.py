"""MetaWorld in the loop: the full-state env and its scripted expert under the installed MuJoCo, LeRobot's
``--env.type=metaworld`` env (480x480 image + 4-dim state) with success read where MetaWorld says it, and the
vector-env handling that env type needs (next-step autoreset, an env that resets inside ``step``, LeRobot's
frozen subprocess envs, the config's step limit)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from lerobot_policy_pi_rl.envs import make_vec_env
from lerobot_policy_pi_rl.envs.vector_adapter import VectorEnvAdapter

pytest.importorskip("metaworld", reason="MetaWorld is part of the test extra (pip install -e '.[test]')")

from lerobot_policy_pi_rl.envs.metaworld import GYM_ID, MetaWorldStateEnv, expert  # noqa: E402

# handle-press with the hand pushed straight down: MetaWorld says success from some starts within 30 steps
# (the handle under the hand) and never from others
PUSH_DOWN = np.array([0.0, 0.0, -1.0, 0.0], np.float32)


def _outcome(env, seed: int, action: np.ndarray, limit: int) -> tuple[bool, int]:
    """(success, steps) of one episode of a 1-env vector env from reset(seed=[seed]) under a constant action."""
    env.reset(seed=[seed])
    for t in range(1, limit + 1):
        _, _, te, tr, info = env.step(action[None])
        if te[0] or tr[0]:
            return bool(info["is_success"][0]), t
    raise AssertionError(f"no episode end in {limit} steps")


def test_the_state_env_builds_honours_seeds_and_its_expert_succeeds():
    env = make_vec_env(GYM_ID, 2, autoreset=False, task="reach-v3", max_episode_steps=150)
    assert env.state_dim == 39 and env.action_dim == 4 and env.max_steps == 150
    assert env.seed_honoured is True and env.task_description == "Reach a goal position"
    obs, _ = env.reset(seed=5)
    again, _ = env.reset(seed=5)
    np.testing.assert_array_equal(obs["agent_pos"], again["agent_pos"])
    other, _ = env.reset(seed=6)
    assert not np.array_equal(obs["agent_pos"], other["agent_pos"])  # seeds draw different goals
    alive, success, reward = np.ones(2, bool), np.zeros(2, bool), np.zeros(2)
    while alive.any():
        obs, r, te, tr, info = env.step(expert(obs, env), active=alive)
        success |= alive & info["is_success"]
        reward += r
        alive &= ~(te | tr)
    assert success.all()
    np.testing.assert_array_equal(reward, 1.0)  # 'success' reward: 1 at the step it succeeds, the episode ends


def test_mt1_variants_are_the_benchmarks_fifty_and_seeded():
    env = MetaWorldStateEnv("push-v3", max_episode_steps=5)
    goals = {tuple(np.round(env.reset(seed=s)[0][36:39], 5)) for s in range(500)}
    assert len(goals) == 50  # the task's 50 MT1 train variants, no others
    np.testing.assert_array_equal(env.reset(seed=7)[0], env.reset(seed=7)[0])
    free = MetaWorldStateEnv("push-v3", max_episode_steps=5, variants="random")
    assert len({tuple(np.round(free.reset(seed=s)[0][36:39], 5)) for s in range(60)}) == 60


def test_dense_reward_and_bad_arguments():
    dense = MetaWorldStateEnv("push-v3", max_episode_steps=5, reward="dense")
    dense.reset(seed=0)
    _, r, *_ = dense.step(np.zeros(4, np.float32))
    assert 0.0 < r <= 1.0
    with pytest.raises(ValueError, match="unknown MetaWorld task 'push-v9'"):
        MetaWorldStateEnv("push-v9")
    with pytest.raises(ValueError, match="reward"):
        MetaWorldStateEnv("push-v3", reward="shaped")
    with pytest.raises(ValueError, match="variants"):
        MetaWorldStateEnv("push-v3", variants="mt50")
    with pytest.raises(ValueError, match=r"max_episode_steps must be in \[1, 500\]"):
        MetaWorldStateEnv("push-v3", max_episode_steps=501)


@pytest.mark.slow
def test_lerobots_metaworld_env_type_reads_metaworlds_own_success():
    """LeRobot's env renders a 480x480 camera at every step (software GL here): short episodes. Its start states
    come from the same MT1 variant and seeded generator as the state env's with ``variants="random"``, so that env
    is the reference."""
    from lerobot.envs.factory import make_env_config

    cfg = make_env_config("metaworld", task="handle-press-v3", episode_length=30)
    env = make_vec_env(cfg, 1, autoreset=False)
    reference = make_vec_env(
        GYM_ID, 1, autoreset=False, task="handle-press-v3", max_episode_steps=30, variants="random"
    )
    assert env.obs_type == "pixels_agent_pos" and env.state_dim == 4 and env.max_steps == 30
    assert env.task_description == "Press a handle down"
    obs, _ = env.reset(seed=[0])
    assert obs["pixels"].shape == (1, 480, 480, 3) and obs["agent_pos"].shape == (1, 4)
    outcomes = [_outcome(env, s, PUSH_DOWN, 30) for s in range(4)]
    expected = [_outcome(reference, s, PUSH_DOWN, 30) for s in range(4)]
    assert outcomes == expected
    assert {ok for ok, _ in outcomes} == {True, False}  # some succeed, some run into the 30-step limit
    assert all(t == 30 for ok, t in outcomes if not ok)
    env.close()


class _ResetsInStep(gym.Env):
    """LeRobot's MetaworldEnv's pattern: a success terminates the episode, puts the verdict in
    ``info["final_info"]`` and resets the env inside ``step``. An episode whose actions are all positive succeeds
    at its 3rd step; any other never ends by itself. The observation is (resets so far, step within the episode);
    every action it is stepped with is kept."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.observation_space = gym.spaces.Dict({"agent_pos": gym.spaces.Box(-1e6, 1e6, (2,), np.float32)})
        self.episode, self.t, self.actions, self.positive = -1, 0, [], True

    def _obs(self):
        return {"agent_pos": np.array([self.episode, self.t], np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.t, self.positive = self.episode + 1, 0, True
        return self._obs(), {"is_success": False}

    def step(self, action):
        self.actions.append(float(action[0]))
        self.t += 1
        self.positive &= float(action[0]) > 0
        ok = self.positive and self.t >= 3
        obs, info = self._obs(), {"is_success": ok}
        if ok:
            info["final_info"] = {"is_success": True}
            self.reset()
        return obs, float(ok), ok, False, info


@pytest.mark.parametrize("frozen_subprocess_wrapper", [False, True])
def test_next_step_autoreset_costs_no_step_and_the_step_limit_applies(frozen_subprocess_wrapper):
    from lerobot.envs.utils import FreezeAfterEpisodeEnd

    inner = _ResetsInStep()
    wrapped = FreezeAfterEpisodeEnd(inner) if frozen_subprocess_wrapper else inner
    vec = gym.vector.SyncVectorEnv([lambda: wrapped], autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    env = VectorEnvAdapter(vec, "resets-in-step", autoreset=True, max_steps=6)
    events = []
    sign = [1] * 3 + [-1] * 6 + [1] * 3  # episodes meant to succeed, run into the limit, succeed
    for k in range(1, 13):
        obs, _, te, tr, info = env.step(np.array([[sign[k - 1] * k / 100]], np.float32))
        if info["done"][0]:
            events.append((k, bool(te[0]), bool(tr[0]), bool(info["is_success"][0]), int(info["elapsed_steps"][0])))
            assert obs["agent_pos"][0, 1] == 0  # the new episode's first observation is served at once
    # episode 0 succeeds at its 3rd step, episode 1 is cut at the 6-step limit, episode 2 succeeds at its 3rd
    assert events == [(3, True, False, True, 3), (9, False, True, False, 6), (12, True, False, True, 3)]
    # every adapter step was a real env step with its own action (none spent on gymnasium's autoreset)
    assert inner.actions == pytest.approx([sign[k - 1] * k / 100 for k in range(1, 13)])
