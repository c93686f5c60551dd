"""LeRobot env types (``--env.type=...``) behind the vec-env protocol: the built-in task's own env type and a
third-party ``lerobot_env_*`` plugin, with success read where LeRobot reads it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from lerobot.envs.factory import make_env_config

from helpers.policy import builtin_policy
from learner.trainer import TrainerSettings, choose_evaluator
from lerobot_policy_pi_rl.envs import LeRobotVecEnv, known_vec_env, make_vec_env, scripted_expert
from lerobot_policy_pi_rl.rollout import PolicyRunner, collect_rollouts, evaluate_success


def test_the_built_in_task_through_lerobots_env_factory():
    cfg = make_env_config("pirl_reach")
    assert known_vec_env(cfg)
    env = make_vec_env(cfg, 4, autoreset=False)
    assert isinstance(env, LeRobotVecEnv) and env.action_dim == 3 and env.state_dim == 6 and env.max_steps == 60
    assert env.task_description == "reach the target and grasp it"
    first, _ = env.reset(seed=7)
    again, _ = env.reset(seed=7)
    np.testing.assert_array_equal(first["agent_pos"], again["agent_pos"])  # seeds are honoured, per env
    assert not np.array_equal(first["agent_pos"][0], first["agent_pos"][1])
    # the scripted expert succeeds; a do-nothing policy times out; frozen rows keep their terminal state
    raw, _ = env.reset(seed=0)
    alive, success = np.ones(4, bool), np.zeros(4, bool)
    idle = np.array([False, False, True, True])
    for _ in range(env.max_steps):
        actions = scripted_expert(raw["agent_pos"])
        actions[idle] = 0.0
        raw, _, te, tr, info = env.step(actions, active=alive)
        success |= info["is_success"]
        frozen = raw["agent_pos"][~alive].copy()
        alive &= ~(te | tr)
        if not alive.any():
            break
    assert success[:2].all() and not success[2:].any()
    raw_after, *_ = env.step(np.zeros((4, 3), np.float32), active=alive)
    np.testing.assert_array_equal(raw_after["agent_pos"][~alive], raw["agent_pos"][~alive])
    assert frozen.shape[0] <= 4
    env.close()


def test_a_plugin_env_type_with_its_own_success_key(toy_plugin, tmp_path, caplog):
    log = tmp_path / "episodes.jsonl"
    cfg = make_env_config("pirltoy", report_key="success", log_path=str(log))
    with caplog.at_level(logging.WARNING):
        quiet = make_vec_env(cfg, 1, autoreset=True)
        quiet.reset(seed=0)
        seen = [quiet.step(np.zeros((1, 3), np.float32))[4]["is_success"][0] for _ in range(9)]
    assert not any(seen)  # LeRobot's is_success is never reported here: nothing counts, and a warning says why
    (msg,) = [r.getMessage() for r in caplog.records if "without ever reporting" in r.getMessage()]
    assert "info['is_success']" in msg and "'success'" in msg
    quiet.close()

    log.unlink()
    env = make_vec_env(cfg, 1, autoreset=True, success_key="success")
    env.reset(seed=0)
    ended, successes = 0, 0
    for _ in range(20):
        _, _, te, tr, info = env.step(np.zeros((1, 3), np.float32))
        ended += int(te[0] or tr[0])
        successes += int(info["is_success"][0])
    truth = [json.loads(line) for line in log.read_text().splitlines()]
    # read from final_info: the env reset itself in the same call, and the reset's own info says False
    assert ended == len(truth) and successes == sum(t["success"] for t in truth) > 0
    assert any(not t["success"] for t in truth)
    env.close()


def test_rollouts_evaluation_and_the_learners_evaluator_on_an_env_type(toy_plugin):
    policy, pre, post = builtin_policy(0)
    env = make_vec_env(make_env_config("pirl_reach"), 3, autoreset=False)
    runner = PolicyRunner.for_env(policy, pre, post, env)
    torch.manual_seed(0)
    batch = collect_rollouts(runner, env, generator=torch.Generator().manual_seed(0))
    assert batch.valid.any() and batch.chains.shape[1] == 3
    rate = evaluate_success(runner, env, episodes=3, seed=0)
    assert rate == evaluate_success(runner, env, episodes=3, seed=0)  # fixed episodes and noise
    # the learner evaluates on --env.type when given; an env type that does not fit the policy is refused
    evaluator = choose_evaluator(
        TrainerSettings(eval_episodes=3), policy, pre, post, env_cfg=make_env_config("pirltoy")
    )
    assert isinstance(evaluator.env, LeRobotVecEnv) and 0.0 <= evaluator(policy) <= 1.0
    narrow, npre, npost = builtin_policy(0, max_action_dim=None)
    narrow.config.output_features["action"].shape = (2,)
    with pytest.raises(ValueError, match=r"env.type=pirltoy does not fit the policy"):
        choose_evaluator(TrainerSettings(eval_episodes=3), narrow, npre, npost, env_cfg=make_env_config("pirltoy"))


def test_a_multi_task_suite_is_refused():
    """One env per task: a LIBERO-like suite of several tasks must be narrowed with --env.task."""
    reach = make_env_config("pirl_reach")

    class TwoTasks:
        type = "two_tasks"
        task = "a,b"

        def create_envs(self, n_envs, use_async_envs=False):
            return {
                "suite": {0: reach.create_envs(n_envs)["pirl_reach"][0], 1: reach.create_envs(n_envs)["pirl_reach"][0]}
            }

    with pytest.raises(ValueError, match=r"env.type=two_tasks: task 'a,b' gives 2 tasks.*--env.task=<one task>"):
        LeRobotVecEnv(TwoTasks(), 1)


def test_gymnasium_module_ids_env_kwargs_and_build_errors(toy_plugin):
    from lerobot_policy_pi_rl.envs import open_sim_env, sim_env_kwargs

    # 'module:id': the module registers the id when imported (MetaWorld's 'metaworld:Meta-World/MT1')
    assert known_vec_env("lerobot_env_pirltoy:pirltoy/Toy-v0")
    assert not known_vec_env("no_such_module:Nope/Toy-v0") and not known_vec_env("Nope/Toy-v0")
    kwargs = sim_env_kwargs("lerobot_env_pirltoy:pirltoy/Toy-v0", None, "success", {"report_key": "success"})
    env = open_sim_env("lerobot_env_pirltoy:pirltoy/Toy-v0", 2, "control.env", autoreset=False, **kwargs)
    assert env.success_key == "success" and env.state_dim == 6
    # an argument the env does not take: one error naming the field, the cause, and where arguments go
    with pytest.raises(
        ValueError, match=r"control.env: the env could not be built: TypeError: .*bogus.*--control.env_kwargs"
    ):
        open_sim_env("Pendulum-v1", 1, "control.env", bogus=1)
    # subprocesses are for a gymnasium id or an env type; the built-in task and registered envs run their own way
    assert sim_env_kwargs("Pendulum-v1", None, async_envs=True)["use_async"] is True
    with pytest.raises(ValueError, match="async envs: 'pirl_reach' runs its envs its own way"):
        sim_env_kwargs("pirl_reach", None, async_envs=True)
    # a LeRobot env type takes its arguments as --env.<field>, not as env kwargs
    with pytest.raises(ValueError, match=r"env.type=pirltoy takes its arguments as --env.<field>"):
        sim_env_kwargs(make_env_config("pirltoy"), None, "is_success", {"report_key": "success"})


def test_the_learner_evaluates_on_a_gymnasium_id_with_its_kwargs_and_success_key(toy_plugin):
    policy, pre, post = builtin_policy(0)
    settings = TrainerSettings(
        eval_episodes=4,
        eval_env="lerobot_env_pirltoy:pirltoy/Toy-v0",
        eval_env_kwargs={"report_key": "success"},
        eval_success_key="success",
    )
    evaluator = choose_evaluator(settings, policy, pre, post)
    first = evaluator(policy)
    assert first > 0  # the toy's lucky episodes count: success is read under 'success'
    settings.eval_async_envs = True  # the same first evaluation with fresh envs in subprocesses
    from lerobot_policy_pi_rl.envs import AsyncGymVecEnv

    in_workers = choose_evaluator(settings, policy, pre, post)
    assert isinstance(in_workers.env, AsyncGymVecEnv) and in_workers(policy) == first
    in_workers.env.close()
    with pytest.raises(ValueError, match="trainer.eval_async_envs: applies to an evaluation env you give"):
        choose_evaluator(TrainerSettings(eval_async_envs=True), policy, pre, post)
    with pytest.raises(ValueError, match=r"trainer.eval_env=Pendulum-v1: the env could not be built"):
        choose_evaluator(TrainerSettings(eval_env="Pendulum-v1", eval_env_kwargs={"bogus": 1}), policy, pre, post)


def test_a_gymnasium_id_in_subprocesses_behaves_like_the_in_process_adapter(toy_plugin, tmp_path):
    from lerobot_policy_pi_rl.envs import AsyncGymVecEnv, GymVecAdapter

    gym_id = "lerobot_env_pirltoy:pirltoy/Toy-v0"
    sub = make_vec_env(gym_id, 3, use_async=True, autoreset=False, success_key="success", report_key="success")
    local = make_vec_env(gym_id, 3, autoreset=False, success_key="success", report_key="success")
    assert isinstance(sub, AsyncGymVecEnv) and isinstance(local, GymVecAdapter)
    assert sub.state_dim == local.state_dim == 6 and sub.max_steps == local.max_steps == 6
    for env in (sub, local):
        obs, _ = env.reset(seed=0)
        alive, success, steps = np.ones(3, bool), np.zeros(3, bool), 0
        while alive.any():
            obs, _, te, tr, info = env.step(np.zeros((3, 3), np.float32), active=alive)
            success |= info["is_success"]
            alive &= ~(te | tr)
            steps += 1
        # every copy's first episode succeeds at its 3rd step; the rows stay at their terminal state
        assert success.all() and steps == 3 and (obs["agent_pos"] == 0.3).all()
    # a Box observation is served flattened as agent_pos, as in process
    pend = make_vec_env("Pendulum-v1", 2, use_async=True)
    assert set(pend.reset(seed=0)[0]) == {"agent_pos"} and pend.state_dim == 3
    for env in (sub, local, pend):
        env.close()
