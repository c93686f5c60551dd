"""Tests for lerobot_policy_pi_rl.envs: the reach-and-grasp task, the gym adapter and the LeRobot env type."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from lerobot_policy_pi_rl.envs import (
    GYM_ID,
    GymVecAdapter,
    PiRLReachEnvConfig,
    ReachGraspEnv,
    ReachGraspVecEnv,
    make_vec_env,
    scripted_expert,
)


def _mixed_actions(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Expert (noisy) on even envs, random with occasional grasps on odd envs."""
    n = obs.shape[0]
    a = scripted_expert(obs, rng, noise_std=0.3)
    rand = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
    rand[:, 2] = np.where(rng.random(n) < 0.05, 1.0, -1.0)
    a[1::2] = rand[1::2]
    return a


def _assert_obs_equal(a: dict, b: dict, i: int | None = None):
    assert set(a) == set(b)
    for k in a:
        x = a[k] if i is None else a[k][i]
        np.testing.assert_array_equal(x, b[k], err_msg=k)


# ---------------------------------------------------------------------------- vectorisation and seeding
def test_vec_env_matches_loop_of_single_envs():
    """Vec env reset with seed s == N single envs reset with s + i, through grasps, truncations,
    same-step autoresets (the single env is reset with seed=None, continuing its own generator) and
    frozen (inactive) envs (the single env is simply not stepped)."""
    n, s = 8, 1234
    kw = {"max_steps": 15, "obs_type": "pixels_agent_pos", "image_size": 16}
    vec = ReachGraspVecEnv(n, **kw)
    singles = [ReachGraspEnv(**kw) for _ in range(n)]
    obs, _ = vec.reset(seed=s)
    single_obs = [env.reset(seed=s + i)[0] for i, env in enumerate(singles)]
    for i in range(n):
        _assert_obs_equal(obs, single_obs[i], i)

    rng = np.random.default_rng(0)
    n_done = n_success = n_trunc = n_frozen = 0
    for _ in range(80):
        actions = _mixed_actions(obs["agent_pos"], rng)
        active = rng.random(n) < 0.8
        obs, rew, term, trunc, info = vec.step(actions, active=active)
        for i, env in enumerate(singles):
            if not active[i]:
                n_frozen += 1
                assert rew[i] == 0 and not term[i] and not trunc[i] and not info["done"][i]
                _assert_obs_equal(obs, single_obs[i], i)
                continue
            o, r, te, tr, inf = env.step(actions[i])
            assert (r, te, tr, inf["is_success"]) == (rew[i], term[i], trunc[i], info["is_success"][i])
            if te or tr:
                _assert_obs_equal(info["final_obs"], o, i)
                o, _ = env.reset()
            _assert_obs_equal(obs, o, i)
            single_obs[i] = o
        n_done += int(info["done"].sum())
        n_success += int(info["is_success"].sum())
        n_trunc += int(trunc.sum())
    # the sequence really exercised every path
    assert n_done > 10 and n_success > 3 and n_trunc > 0 and n_frozen > 50


def _rollout(seed, n=6, steps=40):
    env = ReachGraspVecEnv(n, max_steps=20)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(7)
    out = [obs["agent_pos"]]
    for _ in range(steps):
        obs, r, te, tr, _ = env.step(_mixed_actions(obs["agent_pos"], rng))
        out += [obs["agent_pos"], r, te, tr]
    return out


def test_same_seed_same_trajectory_different_seed_differs():
    a, b, c = _rollout(3), _rollout(3), _rollout(4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_identical_per_env_seeds_give_identical_groups():
    env = ReachGraspVecEnv(8)
    obs, _ = env.reset(seed=[5, 5, 5, 5, 9, 9, 9, 9])
    ap = obs["agent_pos"]
    assert np.all(ap[:4] == ap[0]) and np.all(ap[4:] == ap[4])
    assert not np.array_equal(ap[0], ap[4])
    # p, v, g layout; v = 0 at reset; start distance constraint
    assert np.all(ap[:, 2:4] == 0)
    assert np.all(np.linalg.norm(ap[:, 4:6] - ap[:, 0:2], axis=1) >= 0.4 - 1e-6)
    # same group, same actions -> same trajectory
    a = np.tile(np.array([[0.3, -0.2, -1.0]], np.float32), (8, 1))
    obs2, *_ = env.step(a)
    assert np.all(obs2["agent_pos"][:4] == obs2["agent_pos"][0])
    # a single env seeded 9 starts like the group (seed s + i semantics)
    single = ReachGraspEnv()
    np.testing.assert_array_equal(single.reset(seed=9)[0]["agent_pos"], ap[4])
    # reset_mask re-seeds only the masked envs
    before = env.get_state()
    obs3, _ = env.reset(seed=[1] * 8, options={"reset_mask": np.arange(8) < 2})
    np.testing.assert_array_equal(obs3["agent_pos"][2:], obs2["agent_pos"][2:])
    assert np.all(obs3["agent_pos"][:2] == obs3["agent_pos"][0])
    # get_state / set_state round trip (generators included)
    restored = env.set_state(before)
    np.testing.assert_array_equal(restored["agent_pos"], obs2["agent_pos"])
    first = env.reset()[0]["agent_pos"]
    env.set_state(before)
    np.testing.assert_array_equal(env.reset()[0]["agent_pos"], first)


# ---------------------------------------------------------------------------- task semantics
def _success_rate(policy, n_eps=200, seed=0, noise=0.0):
    env = ReachGraspVecEnv(n_eps, autoreset=False)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    success = np.zeros(n_eps, bool)
    finished = np.zeros(n_eps, bool)
    for _ in range(env.max_steps):
        if policy == "expert":
            a = scripted_expert(obs["agent_pos"], rng, noise_std=noise)
        else:
            a = rng.uniform(-1, 1, size=(n_eps, 3)).astype(np.float32)
        obs, rew, term, trunc, info = env.step(a)
        assert not np.any((term | trunc) & finished), "finished envs must stay finished"
        np.testing.assert_array_equal(rew, info["is_success"].astype(np.float32))
        success |= info["is_success"]
        finished |= info["done"]
    assert finished.all()
    return success.mean()


def test_scripted_expert_succeeds_and_random_fails():
    assert _success_rate("expert") >= 0.98
    assert _success_rate("expert", noise=0.3, seed=1) >= 0.9
    assert _success_rate("random") < 0.05


def _place(env, i, p, v, g, t=0):
    st = env.get_state()
    st["p"][i], st["v"][i], st["g"][i], st["t"][i] = p, v, g, t
    env.set_state(st)


def test_grasp_reward_success_and_autoreset():
    env = ReachGraspVecEnv(4, max_steps=10, seed=0)
    # env0: on target and still -> success; env1: far -> failed grasp; env2: on target but fast;
    # env3: does not grasp.
    _place(env, 0, [0.2, 0.2], [0.0, 0.0], [0.21, 0.2])
    _place(env, 1, [-0.5, 0.5], [0.0, 0.0], [0.5, -0.5])
    _place(env, 2, [0.0, 0.0], [0.09, 0.0], [0.05, 0.0])
    grips = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, -1]], np.float32)
    obs, rew, term, trunc, info = env.step(grips)
    assert rew.dtype == np.float32 and term.dtype == bool and trunc.dtype == bool
    np.testing.assert_array_equal(rew, [1, 0, 0, 0])
    np.testing.assert_array_equal(term, [True, True, True, False])
    np.testing.assert_array_equal(trunc, [False] * 4)
    np.testing.assert_array_equal(info["is_success"], [True, False, False, False])
    np.testing.assert_array_equal(info["done"], [True, True, True, False])
    # same-step autoreset: obs is a fresh episode (v = 0), final_obs the terminal state
    np.testing.assert_allclose(info["final_obs"]["agent_pos"][0, :2], [0.2, 0.2], atol=1e-6)
    assert not np.allclose(obs["agent_pos"][0], info["final_obs"]["agent_pos"][0])
    assert np.all(obs["agent_pos"][:3, 2:4] == 0)
    assert env.get_state()["t"].tolist() == [0, 0, 0, 1]


def test_truncation_at_max_steps_and_no_autoreset_mode():
    env = ReachGraspVecEnv(3, max_steps=7, seed=1, autoreset=False)
    hold = np.array([[0.0, 0.0, -1.0]] * 3, np.float32)
    for t in range(1, 8):
        obs, rew, term, trunc, info = env.step(hold)
        assert not term.any() and np.all(rew == 0)
        assert trunc.all() == (t == 7) and trunc.any() == (t == 7)
    # autoreset=False: finished envs stay finished and stepping them is a no-op
    state = env.get_state()
    obs2, rew, term, trunc, info = env.step(np.ones((3, 3), np.float32))
    assert not (term.any() or trunc.any() or rew.any() or info["is_success"].any())
    _assert_obs_equal(obs2, obs)
    np.testing.assert_array_equal(env.get_state()["p"], state["p"])
    env.reset()
    assert env.get_state()["t"].tolist() == [0, 0, 0]


def test_frozen_envs_are_unchanged():
    env = ReachGraspVecEnv(4, max_steps=5, seed=2)
    state = env.get_state()
    active = np.array([True, False, True, False])
    for _ in range(6):  # past max_steps: active envs truncate and reset, frozen ones do not move
        obs, rew, term, trunc, info = env.step(np.ones((4, 3), np.float32) * [1, 1, -1], active=active)
        assert not (term[~active].any() or trunc[~active].any() or rew[~active].any())
    after = env.get_state()
    for k in ("p", "v", "g", "t"):
        np.testing.assert_array_equal(after[k][~active], state[k][~active])
        assert not np.array_equal(after[k][active], state[k][active]) or k == "v"


def test_actions_are_validated_and_clipped():
    env = ReachGraspVecEnv(2, seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="obs_type"):
        ReachGraspVecEnv(1, obs_type="rgb")
    s0 = env.get_state()
    o_big, *_ = env.step(np.array([[50.0, 50.0, -3.0]] * 2))
    env.set_state(s0)
    o_one, *_ = env.step(np.array([[1.0, 1.0, -1.0]] * 2))
    _assert_obs_equal(o_big, o_one)


def test_pixels_observation():
    env = ReachGraspVecEnv(3, obs_type="pixels_agent_pos", image_size=24, seed=0)
    obs, _ = env.reset(seed=0)
    px = obs["pixels"]
    assert px.shape == (3, 24, 24, 3) and px.dtype == np.uint8
    assert obs["agent_pos"].shape == (3, 6) and obs["agent_pos"].dtype == np.float32
    assert (px[..., 0] > 150).any() and (px[..., 1] > 150).any()  # red ee and green target visible
    obs2, *_ = env.step(np.array([[1, 0, -1], [0, 0, -1], [0, 1, -1]], np.float32))
    changed = np.any(obs2["pixels"] != px, axis=(1, 2, 3))
    assert changed.tolist() == [True, False, True]
    assert env.render().shape == (3, 128, 128, 3)


# ---------------------------------------------------------------------------- gymnasium single env
def test_single_gym_env_api():
    from gymnasium.utils.env_checker import check_env

    env = gym.make(GYM_ID, obs_type="pixels_agent_pos", image_size=16)
    check_env(env.unwrapped, skip_render_check=False)
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert env.action_space.shape == (3,)
    assert env.unwrapped.task_description == "reach the target and grasp it"
    assert env.unwrapped._max_episode_steps == 60
    assert env.metadata["render_fps"] == 50
    assert env.render().shape == (128, 128, 3)
    _, r, te, tr, info = env.step(np.array([0, 0, -1], np.float32))
    assert info["is_success"] is False and isinstance(r, float)


# ---------------------------------------------------------------------------- LeRobot integration
def test_lerobot_env_config_factory_and_preprocessing():
    import torch
    from lerobot.envs.configs import EnvConfig
    from lerobot.envs.factory import make_env, make_env_config
    from lerobot.envs.utils import env_to_policy_features, preprocess_observation

    assert EnvConfig.get_choice_class("pirl_reach") is PiRLReachEnvConfig
    cfg = make_env_config("pirl_reach", obs_type="pixels_agent_pos", image_size=16, episode_length=30)
    assert cfg.gym_id == "pirl/ReachGrasp-v0" and cfg.type == "pirl_reach"
    feats = env_to_policy_features(cfg)
    assert feats["observation.state"].shape == (6,)
    assert feats["observation.image"].shape == (3, 16, 16)
    assert feats["action"].shape == (3,)
    assert "observation.image" not in env_to_policy_features(PiRLReachEnvConfig())

    envs = make_env(cfg, n_envs=2, use_async_envs=False)
    vec = envs["pirl_reach"][0]
    try:
        obs, _ = vec.reset(seed=[11, 11])
        np.testing.assert_array_equal(obs["agent_pos"][0], obs["agent_pos"][1])
        batch = preprocess_observation(obs)
        state = batch["observation.state"]
        assert state.shape == (2, 6) and state.dtype == torch.float32
        assert batch["observation.image"].shape == (2, 3, 16, 16)
        assert batch["observation.image"].min() >= 0.0 and batch["observation.image"].max() <= 1.0
        assert vec.call("task_description") == ("reach the target and grasp it",) * 2
        assert vec.call("_max_episode_steps") == (30, 30)
        # expert through LeRobot's vector env: success is reported in final_info, where LeRobot's eval
        # reads it (both envs have the same seed, so they finish on the same step)
        successes = np.zeros(2, bool)
        for _ in range(30):
            act = scripted_expert(obs["agent_pos"])
            obs, rew, term, trunc, info = vec.step(act)
            if "final_info" in info:
                successes |= info["final_info"]["is_success"] & info["_final_info"]
            if (term | trunc).any():
                break
        assert successes.all()
    finally:
        vec.close()


def test_lerobot_eval_rollout_with_expert_policy():
    """LeRobot's own eval rollout loop runs our env and counts the expert's successes."""
    import torch
    from lerobot.envs.factory import make_env
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.scripts.lerobot_eval import rollout

    class ExpertPolicy(torch.nn.Module):
        def reset(self):
            pass

        def select_action(self, batch):
            return torch.from_numpy(scripted_expert(batch["observation.state"].numpy()))

    vec = make_env(PiRLReachEnvConfig(), n_envs=4, use_async_envs=False)["pirl_reach"][0]
    identity = PolicyProcessorPipeline(steps=[])
    try:
        ret = rollout(vec, ExpertPolicy(), identity, identity, lambda x: x, lambda x: x, seeds=[0, 1, 2, 3])
    finally:
        vec.close()
    assert ret["success"].any(dim=1).all()
    assert ret["reward"].sum(dim=1).tolist() == [1.0] * 4


# ---------------------------------------------------------------------------- gym adapter
def test_gym_adapter_pendulum():
    env = make_vec_env("Pendulum-v1", 3, seed=0)
    assert isinstance(env, GymVecAdapter)
    dims = (env.num_envs, env.action_dim, env.state_dim, env.max_steps, env.obs_type)
    assert dims == (3, 1, 3, 200, "state")
    np.testing.assert_array_equal(env.action_low, [-2.0])
    np.testing.assert_array_equal(env.action_high, [2.0])
    obs, _ = env.reset(seed=10)
    assert obs["agent_pos"].shape == (3, 3) and obs["agent_pos"].dtype == np.float32
    ref = gym.make("Pendulum-v1")
    np.testing.assert_allclose(obs["agent_pos"][2], ref.reset(seed=12)[0])
    obs_g, _ = env.reset(seed=[4, 4, 5])
    np.testing.assert_array_equal(obs_g["agent_pos"][0], obs_g["agent_pos"][1])

    active = np.array([True, True, False])
    frozen = obs_g["agent_pos"][2].copy()
    for t in range(1, 201):
        obs, rew, term, trunc, info = env.step(np.full((3, 1), 5.0), active=active)  # clipped to 2.0
        assert rew.dtype == np.float32 and rew[2] == 0
        assert not term.any() and not info["is_success"].any()
        assert trunc[:2].all() == (t == 200) and not trunc[2]
    np.testing.assert_array_equal(obs["agent_pos"][2], frozen)
    # truncated at 200 and reset in the same step
    assert not np.array_equal(obs["agent_pos"][0], info["final_obs"]["agent_pos"][0])
    assert info["done"].tolist() == [True, True, False]
    env.close()


def test_gym_adapter_rejects_discrete_actions():
    with pytest.raises(ValueError, match=r"CartPole-v1.*Discrete"):
        GymVecAdapter("CartPole-v1", 2)


def test_make_vec_env_builtin():
    env = make_vec_env("pirl_reach", 4, max_steps=25, seed=0)
    assert isinstance(env, ReachGraspVecEnv)
    dims = (env.num_envs, env.action_dim, env.state_dim, env.max_steps, env.obs_type)
    assert dims == (4, 3, 6, 25, "state")
    np.testing.assert_array_equal(env.action_low, -np.ones(3))
    np.testing.assert_array_equal(env.action_high, np.ones(3))
