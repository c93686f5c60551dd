"""Rollout collection semantics, and the few-shot SFT path through LeRobot's own tooling."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers.policy import builtin_policy
from lerobot_policy_pi_rl.envs.reach_grasp import ReachGraspVecEnv
from lerobot_policy_pi_rl.rollout import PolicyRunner, collect_rollouts, episode_successes, evaluate_success
from lerobot_policy_pi_rl.sft import REPO_ID, SFTSettings, load_policy, record_demos, train_sft


def make_runner(**kw):
    return PolicyRunner(*builtin_policy(0, action_std=0.5, **kw))


def test_executed_actions_are_the_sampled_chunk(monkeypatch):
    runner = make_runner(n_action_steps=3, chunk_size=5)
    env = ReachGraspVecEnv(6, autoreset=False, max_steps=10)
    executed = []
    orig_step = env.step

    def spy(actions, active=None):
        executed.append((actions.copy(), active.copy()))
        return orig_step(actions, active=active)

    monkeypatch.setattr(env, "step", spy)
    batch = collect_rollouts(runner, env, seeds=3, generator=torch.Generator().manual_seed(0))
    T = batch.chains.shape[0]
    assert 1 <= T <= 4  # at most ceil(10 / 3) macro-steps
    for t in range(T):
        chunk = batch.chains[t, :, -1, :3, :]  # final chain state, executed positions
        unnorm = (chunk * 0.5).numpy()  # action std 0.5, mean 0
        for j in range(3):
            if 3 * t + j >= len(executed):
                break
            acts, active = executed[3 * t + j]
            np.testing.assert_allclose(acts[active], unnorm[active, j], rtol=1e-6, atol=1e-6)
    # every env ran exactly one episode: ended by termination or truncation, never both
    last = batch.valid.long().cumsum(0).argmax(0)
    ended = batch.terminated | batch.truncated
    assert ended[last, torch.arange(6)].all()
    assert not (batch.terminated & batch.truncated).any()
    assert batch.env_steps == sum(int(a.sum()) for _, a in executed)


def test_deterministic_evaluation_is_repeatable():
    runner = make_runner()
    env = ReachGraspVecEnv(10, autoreset=False, max_steps=12)
    a = collect_rollouts(runner, env, deterministic=True, seeds=5, generator=torch.Generator().manual_seed(7))
    b = collect_rollouts(runner, env, deterministic=True, seeds=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.chains, b.chains) and torch.equal(a.episode_success, b.episode_success)
    assert (a.stochastic.sum() == 0) and torch.all(a.log_probs == 0)
    rate = evaluate_success(runner, env, episodes=15, seed=0)
    assert rate == evaluate_success(runner, env, episodes=15, seed=0) and 0.0 <= rate <= 1.0
    # the same episodes one by one; another noise seed runs the same resets from other initial noises
    each = episode_successes(runner, env, episodes=15, seed=0)
    assert each.shape == (15,) and each.dtype == torch.bool and int(each.sum()) / 15 == rate
    assert torch.equal(each, episode_successes(runner, env, episodes=15, seed=0, noise_seed=0))


def test_a_success_rate_on_the_target_counts_as_reaching_it(monkeypatch):
    """180 successes of 200 is 0.9, not float32's 0.89999998: a run that scores its target exactly reaches it."""
    import lerobot_policy_pi_rl.rollout as rollout

    monkeypatch.setattr(rollout, "episode_successes", lambda *a, episodes, **kw: torch.arange(episodes) < 180)
    rate = evaluate_success(None, None, episodes=200, seed=0)
    assert rate == 0.9 and rate >= 0.9 and type(rate) is float


def test_deterministic_evaluation_sees_the_same_noise_whatever_the_training_sampler():
    """Flow-SDE's hybrid sampler draws a step index per decision; an evaluation must not: the same weights give
    the same chains under every noise method, so methods are compared on the same episodes and noise."""
    env = ReachGraspVecEnv(6, autoreset=False, max_steps=60)
    chains = {}
    for method in ("flow_sde", "flow_noise"):
        policy, pre, post = builtin_policy(0, noise_method=method)
        policy.eval()
        runner, generator = PolicyRunner(policy, pre, post), torch.Generator().manual_seed(9)
        # two batches from one generator, as evaluate_success runs them: the second's x_1 follows the first's draws
        first = collect_rollouts(runner, env, deterministic=True, seeds=3, generator=generator)
        second = collect_rollouts(runner, env, deterministic=True, seeds=9, generator=generator)
        chains[method] = torch.cat([first.chains.flatten(0, 1), second.chains.flatten(0, 1)])
    assert torch.equal(chains["flow_sde"], chains["flow_noise"])


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft") / "data"
    record_demos(root, 3, seed=0, noise_std=0.1)
    return root


def test_recorded_demos_are_a_lerobot_dataset(demo_dataset):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(REPO_ID, root=demo_dataset)
    assert ds.num_episodes == 3 and ds.meta.robot_type == "pirl_reach"
    item = ds[0]
    assert item["observation.state"].shape == (6,) and item["action"].shape == (3,)
    assert item["task"] == "reach the target and grasp it"
    with pytest.raises(FileExistsError, match="already exists"):
        record_demos(demo_dataset, 1)


def test_sft_through_lerobot_train_and_reload(demo_dataset, tmp_path):
    ckpt = train_sft(demo_dataset, tmp_path / "train", SFTSettings(steps=4, batch_size=8))
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "policy_preprocessor.json").is_file()
    policy, pre, post = load_policy(ckpt, noise_method="flow_noise")
    assert policy.config.noise_method == "flow_noise"
    rate = evaluate_success(PolicyRunner(policy, pre, post), ReachGraspVecEnv(4, autoreset=False), episodes=4, seed=0)
    assert 0.0 <= rate <= 1.0
    with pytest.raises(ValueError, match="policy.bogus"):
        load_policy(ckpt, bogus=1)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_policy(tmp_path)


@pytest.mark.slow  # lerobot-train as a process
def test_lerobot_train_cli_trains_pi_rl_without_patches(demo_dataset, tmp_path):
    """The stock `lerobot-train` console script, policy type pi_rl, on our recorded dataset."""
    exe = os.path.join(os.path.dirname(sys.executable), "lerobot-train")
    out = tmp_path / "cli"
    cmd = [
        exe,
        "--policy.type=pi_rl",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        f"--dataset.repo_id={REPO_ID}",
        f"--dataset.root={demo_dataset}",
        f"--output_dir={out}",
        "--steps=3",
        "--batch_size=4",
        "--num_workers=0",
        "--save_freq=3",
        "--log_freq=1",
        "--policy.num_denoise_steps=3",
        "--policy.noise_method=flow_noise",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((out / "checkpoints" / "last" / "pretrained_model" / "config.json").read_text())
    assert cfg["type"] == "pi_rl" and cfg["num_denoise_steps"] == 3 and cfg["noise_method"] == "flow_noise"


def test_dataset_without_needed_features_is_a_clear_error(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path / "noaction"
    ds = LeRobotDataset.create(
        "local/noaction",
        fps=10,
        root=root,
        use_videos=False,
        features={"observation.state": {"dtype": "float32", "shape": (6,), "names": None}},
    )
    for _ in range(3):
        ds.add_frame({"observation.state": np.zeros(6, np.float32), "task": "x"})
    ds.save_episode()
    ds.finalize()
    from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfigError

    with pytest.raises(PiRLConfigError, match="needs an 'action' feature"):
        train_sft(root, tmp_path / "t", SFTSettings(steps=1, batch_size=2))
