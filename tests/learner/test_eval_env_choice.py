"""The learner's evaluation env: the built-in task when the policy fits it, the env it is given, or none; a
policy that does not fit its env is told at start-up (learner and edge share the check)."""

from __future__ import annotations

import logging

import pytest

from helpers.policy import builtin_policy, other_task_policy
from learner.trainer import TrainerSettings, choose_evaluator
from lerobot_policy_pi_rl.envs import ReachGraspVecEnv, make_vec_env
from lerobot_policy_pi_rl.rollout import PolicyRunner, env_mismatch


def test_the_built_in_task_is_the_default_when_the_policy_fits_it():
    policy, pre, post = builtin_policy(0)
    evaluator = choose_evaluator(TrainerSettings(eval_episodes=4), policy, pre, post)
    assert isinstance(evaluator.env, ReachGraspVecEnv)
    assert 0.0 <= evaluator(policy) <= 1.0
    assert choose_evaluator(TrainerSettings(eval_every=0), policy, pre, post) is None


def test_a_policy_for_another_task_turns_default_evaluation_off_with_a_warning(caplog):
    policy, pre, post = other_task_policy()
    with caplog.at_level(logging.WARNING):
        assert choose_evaluator(TrainerSettings(eval_episodes=4), policy, pre, post) is None
    (msg,) = [r.getMessage() for r in caplog.records if "evaluation off" in r.getMessage()]
    assert "--trainer.eval_env" in msg and "actions have 3 dims, the policy's 4" in msg


def test_a_given_env_that_does_not_fit_is_refused_with_the_reason():
    policy, pre, post = other_task_policy()
    with pytest.raises(ValueError, match=r"trainer.eval_env=pirl_reach does not fit the policy: the env's actions"):
        choose_evaluator(TrainerSettings(eval_env="pirl_reach", eval_episodes=4), policy, pre, post)
    with pytest.raises(ValueError, match="trainer.eval_env: unknown env 'Meta-World/nope'"):
        choose_evaluator(TrainerSettings(eval_env="Meta-World/nope", eval_episodes=4), policy, pre, post)


def test_env_mismatch_names_shapes_and_missing_inputs():
    policy, pre, post = builtin_policy(0)
    runner = PolicyRunner(policy, pre, post)
    assert env_mismatch(runner, ReachGraspVecEnv(2, autoreset=False)) is None
    # Pendulum: 3-dim state, 1-dim action
    assert "actions have 1 dims, the policy's 3" in env_mismatch(runner, make_vec_env("Pendulum-v1", 1))
    # the built-in task with images, for a policy that reads the state only: still fits (extra inputs stay out)
    assert env_mismatch(runner, ReachGraspVecEnv(1, obs_type="pixels_agent_pos", image_size=16)) is None
    # a policy reading a 39-dim state on an env whose actions fit but whose state does not
    other, opre, opost = other_task_policy()
    env = ReachGraspVecEnv(1, autoreset=False)
    env.action_dim = 4  # only the state differs now
    why = env_mismatch(PolicyRunner(other, opre, opost), env)
    assert why is not None and "observation.state (6,) vs (39,)" in why
