"""Scripted demonstrations of the simulated task as a local LeRobotDataset."""

from __future__ import annotations

import numpy as np
import pytest
from lerobot_robot_pirl_sim.demos import REPO_ID, record_demos, scripted_episodes
from lerobot_robot_pirl_sim.physics import GRASP_THRESHOLD
from lerobot_robot_pirl_sim.vec_env import DEFAULT_MAX_STEPS


def test_scripted_episodes_are_successes_in_the_vec_env_format():
    episodes = scripted_episodes(3, seed=0, noise_std=0.02)
    assert len(episodes) == 3
    for ep in episodes:
        assert 5 <= len(ep) <= DEFAULT_MAX_STEPS
        first, last = ep[0], ep[-1]
        assert first["observation.state"].shape == (5,) and first["observation.environment_state"].shape == (2,)
        assert first["action"].shape == (3,) and first["action"].dtype == np.float32
        assert first["observation.state"][4] == 100.0  # the gripper opens every episode
        assert last["action"][2] < GRASP_THRESHOLD  # ...and the last action closes it
    again = scripted_episodes(3, seed=0, noise_std=0.02)
    np.testing.assert_array_equal(episodes[2][-1]["action"], again[2][-1]["action"])


def test_record_demos_writes_a_dataset_lerobot_loads(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path / "data"
    record_demos(root, 2, seed=0, noise_std=0.02)
    ds = LeRobotDataset(REPO_ID, root=root)
    assert ds.num_episodes == 2 and ds.fps == 25 and ds.meta.robot_type == "pirl_sim"
    names = {k: ds.features[k]["names"] for k in ("observation.state", "observation.environment_state", "action")}
    assert names == {
        "observation.state": ["x.pos", "y.pos", "x.vel", "y.vel", "gripper.pos"],
        "observation.environment_state": ["cube.x", "cube.y"],
        "action": ["x.pos", "y.pos", "gripper.pos"],
    }
    item = ds[0]
    assert item["observation.state"].shape == (5,) and item["observation.environment_state"].shape == (2,)
    assert item["task"]
    with pytest.raises(FileExistsError):
        record_demos(root, 1)


@pytest.mark.slow
def test_tune_runs_sft_and_pirl_on_the_vec_env(tmp_path):
    """The measurement script end to end at a toy size: demos -> LeRobot's train() -> run_pirl(env="pirl_sim")
    (the pi_rl MLP reads observation.state and observation.environment_state)."""
    import json

    from lerobot_robot_pirl_sim.tune import TuneConfig, run

    cfg = TuneConfig(out=str(tmp_path), seeds=[0], num_demos=2, sft_steps=20, time_limit=1.0, num_envs=8, eval_every=1)
    report = run(cfg)
    (only,) = report["runs"]
    assert 0.0 <= only["sft_success"] <= 1.0 and only["updates"] >= 1
    assert json.loads((tmp_path / "tune.json").read_text())["runs"][0]["seed"] == 0
    features = json.loads((tmp_path / "seed0/train/checkpoints/last/pretrained_model/config.json").read_text())
    assert set(features["input_features"]) == {"observation.state", "observation.environment_state"}
