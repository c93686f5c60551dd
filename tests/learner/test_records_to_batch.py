"""The learner service trains on what the in-process loop would: an in-process rollout batch, written as an edge
writes its records (edge.records.batch_decisions and make_record, as the simulation farm spools them) and taken back through the learner's store, comes out of
episodes_to_batch as the same batch, field for field; the steered replay a chunk critic fits is the same."""

from __future__ import annotations

import pytest
import torch

from edge.records import batch_decisions, make_record
from helpers.policy import sim_robot_policy
from learner.store import PolicyShapes, RolloutStore, episodes_to_batch
from lerobot_policy_pi_rl.noise_critic import return_to_go
from lerobot_policy_pi_rl.rollout import PolicyRunner, collect_rollouts
from pirl.v1 import pirl_pb2

ROBOT = "robot-0"


def as_records(batch, n_exec: int) -> list[bytes]:
    """The batch's macro-steps as one robot's records, written the way the edge's simulation farm writes them."""
    return [
        make_record(ROBOT, seq, f"ep{j}", t, d, o) for seq, (j, t, d, o) in enumerate(batch_decisions(batch, 0, n_exec))
    ]


@pytest.mark.parametrize("gripper_open", [False, True], ids=["episodes-that-terminate", "episodes-cut-at-the-limit"])
def test_a_batch_through_records_and_the_store_is_the_in_process_batch(gripper_open):
    import lerobot_robot_pirl_sim  # noqa: F401
    from lerobot_robot_pirl_sim.vec_env import PirlSimVecEnv

    policy, pre, post = sim_robot_policy(0, gripper_open=gripper_open)
    env = PirlSimVecEnv(16, autoreset=False, obs_delay_ticks=1)  # the robot's delayed twin
    runner = PolicyRunner.for_env(policy, pre, post, env)
    batch = collect_rollouts(runner, env, seeds=11, generator=torch.Generator().manual_seed(3))
    ends = batch.truncated if gripper_open else batch.terminated
    assert ends.sum() == 16  # each case compares one way an episode ends
    store = RolloutStore(PolicyShapes.from_policy(policy), max_version_lag=1, max_record_bytes=1 << 20)
    for raw in as_records(batch, policy.config.n_action_steps):
        rec = pirl_pb2.RolloutRecord()
        rec.ParseFromString(raw)
        store.add(ROBOT, rec, raw)
    episodes = store.take_episodes(16)
    assert [e.steps[0].observation is not None for e in episodes] == [True] * 16
    got = episodes_to_batch(episodes, policy)

    valid = batch.valid
    assert torch.equal(got.valid, valid) and got.env_steps == batch.env_steps
    for name in ("chains", "stochastic", "log_probs", "values", "rewards", "terminated", "truncated", "noise_level"):
        want, have = getattr(batch, name), getattr(got, name)
        assert torch.allclose(have[valid].to(want.dtype), want[valid], atol=1e-6), name
    for k, v in batch.observations.items():
        assert torch.allclose(got.observations[k][valid], v[valid]), k
    assert torch.equal(got.episode_success, batch.episode_success)
    assert torch.allclose(got.episode_returns, batch.episode_returns)
    # a truncated episode's bootstrap value: V of the same final observation
    cut = batch.truncated & valid
    assert torch.allclose(got.bootstrap_values[cut], batch.bootstrap_values[cut], atol=1e-5)
    # what a chunk critic's replay takes from each: the same rows (observation, executed chunk, return-to-go)
    gamma = 0.97
    assert torch.equal(got.trainable, batch.trainable)
    assert torch.allclose(
        return_to_go(got.rewards, got.valid, gamma)[got.trainable],
        return_to_go(batch.rewards, batch.valid, gamma)[batch.trainable],
    )
    assert torch.allclose(got.chains[got.trainable][:, -1], batch.chains[batch.trainable][:, -1])
