"""Few-demo statistics widened by the env's start states: with one demo an object's start position has a spread
of 0, so at every other start the normalised input sits at the clamp; recording demos with ``start_states``
widens the dataset's statistics (what lerobot-train normalises with) to cover the spread across resets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lerobot_policy_pi_rl.input_stats import start_state_stats, widen_stats


def test_widen_stats_keeps_the_centre_and_takes_the_wider_spread_and_range():
    demo = {
        "mean": np.array([0.5, 2.0, 0.0]),
        "std": np.array([1e-5, 3.0, 0.0]),
        "min": np.array([0.5, -4.0, 0.0]),
        "max": np.array([0.5, 8.0, 0.0]),
        "q01": np.array([0.5, -3.0, 0.0]),
        "q50": np.array([0.5, 2.0, 0.0]),
        "q99": np.array([0.5, 7.0, 0.0]),
        "count": np.array([150]),
    }
    starts = np.stack([np.array([x, 2.0 + 0.1 * x, 0.0]) for x in np.linspace(0.4, 0.6, 21)])
    new, dims = widen_stats(demo, start_state_stats(starts))
    assert dims.tolist() == [0]  # dim 1 varies more in the demos; dim 2 is constant everywhere
    assert new["std"][0] == pytest.approx(np.std(starts[:, 0])) and new["std"][1] == 3.0 and new["std"][2] == 0
    assert new["min"].tolist() == pytest.approx([0.4, -4.0, 0.0]) and new["max"].tolist() == pytest.approx([0.6, 8, 0])
    assert new["q01"][0] < 0.5 < new["q99"][0]
    np.testing.assert_array_equal(new["mean"], demo["mean"])  # SFT learned around the demos' centre
    np.testing.assert_array_equal(new["q50"], demo["q50"])
    assert new["count"].tolist() == [150]


def record(tmp_path, name: str, start_states: int):
    from lerobot_policy_pi_rl.demos import builtin_expert, record_env_demos
    from lerobot_policy_pi_rl.envs import open_sim_env

    env = open_sim_env("pirl_reach", 4, "env", autoreset=False)
    try:
        return record_env_demos(
            tmp_path / name,
            env,
            builtin_expert,
            1,
            repo_id="local/one_demo",
            seed=3,
            start_states=start_states,
            progress=None,
        )
    finally:
        env.close()


def test_one_demo_recorded_with_start_states_no_longer_hides_the_object_position(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from helpers.policy import builtin_config
    from lerobot_policy_pi_rl.input_stats import near_constant_dims

    plain = record(tmp_path, "plain", 0).meta.stats
    cfg = builtin_config()
    constant = {d.index for d in near_constant_dims(cfg, plain)}
    assert constant, "one demo of the reach task should leave the object's start position constant"
    assert not (tmp_path / "plain" / "meta" / "pirl_start_states.json").exists()

    record(tmp_path, "wide", 64)
    # what lerobot-train reads, from disk
    wide = LeRobotDatasetMetadata("local/one_demo", root=tmp_path / "wide").stats
    still = {d.index for d in near_constant_dims(cfg, wide)}
    assert still < constant  # the start-state dims now have their spread; the rest is untouched
    info = json.loads((tmp_path / "wide" / "meta" / "pirl_start_states.json").read_text())
    assert info["start_states"] == 64
    widened = info["widened"]["observation.state"]
    assert set(constant - still) <= set(widened["dims"])
    state_plain, state_wide = plain["observation.state"], wide["observation.state"]
    for i, before, after in zip(widened["dims"], widened["demo_std"], widened["std"], strict=True):
        assert before == pytest.approx(float(state_plain["std"][i]), rel=1e-5)
        assert after == pytest.approx(float(state_wide["std"][i]), rel=1e-5) and after > before
    np.testing.assert_allclose(state_wide["mean"], state_plain["mean"], rtol=1e-6)  # same demo (same seed)
    np.testing.assert_array_equal(wide["action"]["std"], plain["action"]["std"])


def test_pirl_sft_trains_with_the_widened_statistics(tmp_path):
    from lerobot.datasets.io_utils import load_stats

    from lerobot_policy_pi_rl.input_stats import normalizer_stats
    from lerobot_policy_pi_rl.sft import load_policy
    from pirl.cli import parse_config
    from pirl_tools.sft import SFTConfig, _run

    out = tmp_path / "sft"
    args = [f"--out={out}", "--env.type=pirl_reach", "--expert=lerobot_policy_pi_rl.demos:builtin_expert"]
    cfg = parse_config(
        SFTConfig, prog="pirl-sft", args=[*args, "--num_demos=1", "--steps=4", "--eval_episodes=4", "--start_states=32"]
    )
    assert _run(cfg) == 0
    widened = json.loads((out / "data" / "meta" / "pirl_start_states.json").read_text())["widened"]
    assert widened["observation.state"]["dims"]
    _, pre, _ = load_policy(out / "train" / "checkpoints" / "last" / "pretrained_model")
    np.testing.assert_allclose(
        normalizer_stats(pre)["observation.state"]["std"], load_stats(out / "data")["observation.state"]["std"]
    )
    # the same --out with another setting: a clear error, not demos silently reused with the wrong statistics
    cfg = parse_config(SFTConfig, prog="pirl-sft", args=[*args, "--num_demos=1", "--steps=4", "--start_states=0"])
    with pytest.raises(ValueError, match="recorded with start_states=32, not 0"):
        _run(cfg)
