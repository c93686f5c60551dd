"""pirl-sft on any env: demos from a scripted expert given as module:callable (a gymnasium id of a
third-party plugin, and a LeRobot env type), LeRobot's train loop, the evaluation on that env; its errors."""

from __future__ import annotations

import json

import pytest

from pirl.cli import parse_config
from pirl_tools.sft import SFTConfig, _run


def sft(*args):
    return parse_config(SFTConfig, prog="pirl-sft", args=list(args))


def test_a_gymnasium_id_with_an_expert_records_trains_and_evaluates(toy_plugin, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    out = tmp_path / "toy"
    cfg = sft(
        f"--out={out}",
        "--sim_env=lerobot_env_pirltoy:pirltoy/Toy-v0",
        "--env_kwargs={report_key: success}",
        "--success_key=success",
        "--expert=lerobot_env_pirltoy:zero_expert",
        "--num_demos=2",
        "--demo_noise=0",
        "--steps=4",
        "--eval_episodes=4",
    )
    assert _run(cfg) == 0
    ds = LeRobotDataset("local/pirl_demos", root=out / "data")
    assert ds.num_episodes == 2 and tuple(ds.meta.features["observation.state"]["shape"]) == (6,)
    assert tuple(ds.meta.features["action"]["shape"]) == (3,) and ds[0]["task"] == "succeed every other episode"
    report = json.loads((out / "sft.json").read_text())
    assert report["env"] == "sim_env=lerobot_env_pirltoy:pirltoy/Toy-v0" and 0 < report["sft_success"] <= 1


def test_a_lerobot_env_type_with_the_built_in_expert(tmp_path):
    out = tmp_path / "reach"
    cfg = sft(
        f"--out={out}",
        "--env.type=pirl_reach",
        "--expert=lerobot_policy_pi_rl.demos:builtin_expert",
        "--num_demos=2",
        "--steps=4",
        "--eval_episodes=4",
    )
    assert _run(cfg) == 0
    report = json.loads((out / "sft.json").read_text())
    assert report["env"] == "env.type=pirl_reach" and 0 <= report["sft_success"] <= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sim_env=Pendulum-v1"], "expert: recording demos on your env needs a scripted expert"),
        (["--expert=a:b"], "expert: it records on --env.type=... or --sim_env=..."),
        (["--env.type=pirl_reach", "--sim_env=Pendulum-v1", "--expert=a:b"], "sim_env: give --env.type or --sim_env"),
    ],
)
def test_config_errors_are_one_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        sft(f"--out={tmp_path}", *args)
    err = capsys.readouterr().err.strip()
    assert ei.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_an_expert_that_cannot_be_loaded_names_it():
    from lerobot_policy_pi_rl.demos import load_expert

    with pytest.raises(ValueError, match="expert: cannot import 'no_such_module'"):
        load_expert("no_such_module:fn")
    with pytest.raises(ValueError, match="expert: 'lerobot_policy_pi_rl.demos' has no 'nope'"):
        load_expert("lerobot_policy_pi_rl.demos:nope")
    with pytest.raises(ValueError, match="module:callable"):
        load_expert("just_a_name")


def test_pirl_bench_learn_on_a_gymnasium_id_from_an_sft_checkpoint(toy_plugin, tmp_path):
    from helpers.policy import builtin_policy, save_checkpoint
    from pirl_tools.bench import BenchLearnConfig, _learn

    ckpt = save_checkpoint(tmp_path / "sft", *builtin_policy(0))  # the toy has the built-in task's widths
    cfg = parse_config(
        BenchLearnConfig,
        prog="pirl-bench learn",
        args=[
            f"--out={tmp_path / 'bench'}",
            f"--policy_path={ckpt}",
            "--sim_env=lerobot_env_pirltoy:pirltoy/Toy-v0",
            "--env_kwargs={report_key: success}",
            "--success_key=success",
            "--noise_method=[flow_sde]",
            "--seeds=[0]",
            "--iterations=2",
            "--num_envs=4",
            "--eval_every=1",
            "--eval_episodes=4",
        ],
    )
    assert _learn(cfg, "pirl-bench learn (test)") == 0
    (run,) = json.loads((tmp_path / "bench" / "learn.json").read_text())["runs"]
    assert run["env"] == "lerobot_env_pirltoy:pirltoy/Toy-v0" and run["updates"] == 2 and len(run["curve"]) == 3
    assert run["sft_success"] > 0  # success read under the toy's 'success' key
    with pytest.raises(SystemExit):  # an env without a checkpoint of it: one error line (checked in the config)
        parse_config(BenchLearnConfig, prog="pirl-bench learn", args=[f"--out={tmp_path}", "--sim_env=Pendulum-v1"])
