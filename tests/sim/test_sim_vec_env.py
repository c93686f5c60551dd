"""PirlSimVecEnv: the project's vector-env protocol, seeding, and the same trajectory as the robot in lock-step."""

from __future__ import annotations

import numpy as np
import pytest
from lerobot_robot_pirl_sim import ACTION_NAMES, OBS_NAMES, PirlSim, PirlSimConfig, PirlSimVecEnv, scripted_expert
from lerobot_robot_pirl_sim.physics import GRASP_THRESHOLD
from lerobot_robot_pirl_sim.vec_env import DEFAULT_MAX_STEPS


def expert(obs, rng=None, noise=0.0):
    return scripted_expert(obs["agent_pos"], obs["environment_state"], rng, noise)


def test_protocol_attributes_and_shapes():
    env = PirlSimVecEnv(4, seed=0)
    assert (env.num_envs, env.action_dim, env.state_dim, env.obs_type) == (4, 3, 5, "state")
    assert env.max_steps == DEFAULT_MAX_STEPS and env.task_description
    assert env.action_low.dtype == env.action_high.dtype == np.float32
    np.testing.assert_array_equal(env.action_low, np.float32([-0.2, -0.2, 0.0]))
    np.testing.assert_array_equal(env.action_high, np.float32([0.2, 0.2, 100.0]))
    obs, info = env.reset(seed=0)
    assert obs["agent_pos"].shape == (4, 5) and obs["agent_pos"].dtype == np.float32
    assert obs["environment_state"].shape == (4, 2) and obs["environment_state"].dtype == np.float32
    assert info["is_success"].shape == (4,)
    obs, rew, term, trunc, info = env.step(expert(obs))
    assert rew.shape == (4,) and rew.dtype == np.float32
    assert term.dtype == trunc.dtype == bool and set(info) >= {"final_obs", "done", "is_success"}
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((3, 3)))
    with pytest.raises(TypeError, match="unknown"):
        PirlSimVecEnv(1, radius=0.1)


def test_registered_as_a_vec_env():
    from lerobot_policy_pi_rl.envs import make_vec_env

    env = make_vec_env("pirl_sim", 2, autoreset=False, max_steps=7)
    assert isinstance(env, PirlSimVecEnv) and env.max_steps == 7 and not env.autoreset


def test_seeding_equal_seeds_equal_starts():
    a, _ = PirlSimVecEnv(3).reset(seed=5)
    b, _ = PirlSimVecEnv(3).reset(seed=5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    env = PirlSimVecEnv(4)
    obs, _ = env.reset(seed=[9, 9, 9, 10])
    assert np.array_equal(obs["environment_state"][0], obs["environment_state"][2])
    assert not np.array_equal(obs["environment_state"][0], obs["environment_state"][3])
    single, _ = PirlSimVecEnv(1).reset(seed=6)  # seed s -> env i gets s + i
    np.testing.assert_array_equal(a["environment_state"][1], single["environment_state"][0])
    # identical starts and actions -> identical trajectories (the whole group)
    for _ in range(20):
        obs, *_ = env.step(np.repeat(expert(obs)[:1], 4, axis=0))
    np.testing.assert_array_equal(obs["agent_pos"][0], obs["agent_pos"][1])


def test_expert_succeeds_and_autoreset_reports_final_obs():
    env = PirlSimVecEnv(8, seed=0, max_steps=60)
    obs, _ = env.reset(seed=0)
    finished = 0
    for _ in range(60):
        obs, rew, term, trunc, info = env.step(expert(obs))
        done = info["done"]
        np.testing.assert_array_equal(done, term | trunc)
        np.testing.assert_array_equal(rew, info["is_success"].astype(np.float32))
        for i in np.flatnonzero(done):
            finished += 1
            assert term[i] and info["is_success"][i]
            assert info["final_obs"]["agent_pos"][i, 4] <= GRASP_THRESHOLD  # ended with the gripper closed
            assert obs["agent_pos"][i, 4] == 100.0 and np.all(obs["agent_pos"][i, 2:4] == 0)  # a fresh start
    assert finished >= 8


def test_random_grasps_fail_and_truncation_at_max_steps():
    env = PirlSimVecEnv(4, seed=1, max_steps=6, autoreset=False)
    obs, _ = env.reset(seed=1)
    hold = np.concatenate([obs["agent_pos"][:, :2], np.full((4, 1), 100.0)], axis=1)
    close = hold.copy()
    close[:2, 2] = 0.0  # envs 0, 1 close where they start, far from the cube
    terminated = np.zeros(4, dtype=bool)
    for t in range(6):
        obs, rew, term, trunc, info = env.step(close)
        assert not info["is_success"].any()
        terminated |= term
        if t < 5:
            assert not trunc.any()
    assert terminated[:2].all() and not terminated[2:].any()
    assert trunc[2:].all() and not trunc[:2].any()
    # finished envs stay frozen without autoreset
    before = obs["agent_pos"].copy()
    obs, rew, term, trunc, info = env.step(hold)
    np.testing.assert_array_equal(obs["agent_pos"], before)
    assert not info["done"].any() and not rew.any()


def test_inactive_envs_are_frozen_and_reset_mask():
    env = PirlSimVecEnv(3, seed=2)
    obs0, _ = env.reset(seed=2)
    active = np.array([True, False, True])
    obs = obs0
    for _ in range(10):
        obs, rew, term, trunc, info = env.step(expert(obs), active=active)
        assert rew[1] == 0 and not info["done"][1]
    for k in obs:
        np.testing.assert_array_equal(obs[k][1], obs0[k][1])
    assert not np.array_equal(obs["agent_pos"][0], obs0["agent_pos"][0])
    moved = obs["agent_pos"].copy()
    obs, _ = env.reset(seed=[None, None, 2 + 2], options={"reset_mask": np.array([False, False, True])})
    np.testing.assert_array_equal(obs["agent_pos"][0], moved[0])
    np.testing.assert_array_equal(obs["agent_pos"][2], obs0["agent_pos"][2])  # same seed, same start


def test_explicit_starts_put_the_arm_and_the_cube_where_given():
    env = PirlSimVecEnv(2, seed=5)
    seeded, _ = env.reset(seed=[11, 12])
    ee, cube = seeded["agent_pos"][0, :2].astype(np.float64), seeded["environment_state"][0].astype(np.float64)
    # env 0 from the first env's seeded start, env 1 drawn from its generator (seed 12 again: the same start)
    obs, _ = env.reset(seed=[None, 12], options={"starts": [(ee, cube), None]})
    for k in obs:
        np.testing.assert_array_equal(obs[k], seeded[k])
    assert obs["agent_pos"][0, 4] == 100.0  # gripper open, at rest
    with pytest.raises(ValueError, match="2 envs"):
        env.reset(options={"starts": [(ee, cube)]})
    with pytest.raises(ValueError, match=r"starts'\]\[1\] must be \(ee, cube\)"):
        env.reset(options={"starts": [None, (ee, np.zeros(3))]})


def test_actions_are_clipped_and_nan_keeps_the_target():
    env = PirlSimVecEnv(2, seed=3, max_steps=100)
    obs, _ = env.reset(seed=3)
    start = obs["agent_pos"][:, :2].copy()
    obs, *_ = env.step(np.array([[np.nan, np.nan, np.nan], [np.nan, np.nan, np.nan]]))
    np.testing.assert_allclose(obs["agent_pos"][:, :2], start, atol=1e-6)  # held where it was
    assert np.all(obs["agent_pos"][:, 4] == 100.0)
    for _ in range(60):
        obs, *_ = env.step(np.array([[5.0, 5.0, 500.0], [-5.0, -5.0, 100.0]]))
    np.testing.assert_allclose(
        obs["agent_pos"][:, :2], [[0.2, 0.2], [-0.2, -0.2]], atol=5e-3
    )  # near the clipped targets, still settling


def test_robot_in_lock_step_and_vec_env_follow_the_same_trajectory(tmp_path):
    """Same seed and same actions: the robot reports exactly the vec env's observations, step by step, up to
    the same end of episode."""
    seed, i = 40, 2
    env = PirlSimVecEnv(3, autoreset=False)
    obs, _ = env.reset(seed=seed - i)  # env i is reset with seed - i + i
    robot = PirlSim(PirlSimConfig(id="twin", calibration_dir=tmp_path, realtime=False, cameras={}))
    robot.connect()
    try:
        robot.reset_scene(seed=seed)
        rng = np.random.default_rng(0)
        for t in range(DEFAULT_MAX_STEPS):
            robot_obs = robot.get_observation()
            np.testing.assert_array_equal(
                np.array([robot_obs[k] for k in OBS_NAMES], dtype=np.float32),
                np.concatenate([obs["agent_pos"][i], obs["environment_state"][i]]),
                err_msg=f"step {t}",
            )
            actions = expert(obs, rng, noise=0.05)
            robot.send_action(dict(zip(ACTION_NAMES, actions[i].astype(float).tolist(), strict=True)))
            obs, rew, term, trunc, info = env.step(actions)
            status = robot.episode_status()
            assert (status is not None) == bool(info["done"][i]), f"step {t}"
            if status is not None:
                assert (status == "success") == bool(info["is_success"][i])
                break
        assert status is not None
    finally:
        robot.disconnect()


def test_obs_delay_ticks_returns_the_observation_from_k_steps_earlier_and_judges_the_present():
    """The robot's decision delay: a delayed twin returns (also as final_obs) the state k control steps old, the
    episode's first until k steps have run; the physics, success and termination are the undelayed env's."""
    k = 2
    now, late = PirlSimVecEnv(3, seed=5, autoreset=False), PirlSimVecEnv(3, seed=5, autoreset=False, obs_delay_ticks=k)
    obs_now, _ = now.reset(seed=5)
    obs_late, _ = late.reset(seed=5)
    history = [obs_now]
    np.testing.assert_array_equal(obs_late["agent_pos"], obs_now["agent_pos"])
    rng = np.random.default_rng(0)
    for t in range(1, DEFAULT_MAX_STEPS + 1):
        actions = expert(obs_now, rng, noise=0.3)  # both envs run the same actions: the same physics
        obs_now, rew_now, term_now, trunc_now, info_now = now.step(actions)
        obs_late, rew_late, term_late, trunc_late, info_late = late.step(actions)
        history.append(obs_now)
        np.testing.assert_array_equal(rew_late, rew_now)
        np.testing.assert_array_equal(term_late, term_now)
        np.testing.assert_array_equal(trunc_late, trunc_now)
        np.testing.assert_array_equal(info_late["is_success"], info_now["is_success"])
        # envs that ended stay frozen: the stored states of every env, k steps back
        want = history[max(0, t - k)]
        running = ~now._done | term_now | trunc_now  # stepped this tick
        for key in ("agent_pos", "environment_state"):
            np.testing.assert_array_equal(obs_late[key][running], want[key][running])
            np.testing.assert_array_equal(info_late["final_obs"][key][running], want[key][running])
        if now._done.all():
            break
    assert now._done.all() and info_now["is_success"].dtype == bool
    # a reset starts each env's history again from its new first observation
    obs_now, _ = now.reset(seed=9)
    obs_late, _ = late.reset(seed=9)
    np.testing.assert_array_equal(obs_late["agent_pos"], obs_now["agent_pos"])
    with pytest.raises(ValueError, match="obs_delay_ticks"):
        PirlSimVecEnv(1, obs_delay_ticks=-1)
