"""pirl-edge driving LeRobot robots as real processes: the simulated robot (MuJoCo, cameras rendered)
with a learner over TLS and its session dataset trained on by lerobot-train, a third-party robot plugin
found by its distribution name, and a robot with no hardware refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_pre_post_processors

from helpers.plugin_dist import install_fake_robot_plugin
from helpers.policy import save_checkpoint
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROBOT_MODE = ["--episode.start=delay", "--episode.start_delay_s=0.2", "--dataset.video=true"]


def robot_policy(path: Path, state: int, action: int, env_state: int = 0, seed: int = 0) -> Path:
    """A small pi_rl checkpoint for a robot's features, with action min / max (the safety bounds)."""
    torch.manual_seed(seed)
    inputs = {"observation.state": PolicyFeature(FeatureType.STATE, (state,))}
    stats = {
        "observation.state": {"mean": torch.zeros(state), "std": torch.ones(state)},
        "action": {
            "mean": torch.zeros(action),
            "std": 0.05 * torch.ones(action),
            "min": -0.2 * torch.ones(action),
            "max": 0.2 * torch.ones(action),
        },
    }
    if env_state:
        inputs["observation.environment_state"] = PolicyFeature(FeatureType.ENV, (env_state,))
        stats["observation.environment_state"] = {"mean": torch.zeros(env_state), "std": torch.ones(env_state)}
    cfg = PiRLConfig(
        device="cpu",
        push_to_hub=False,
        input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (action,))},
        hidden_dim=32,
        num_layers=2,
        expert_token_dim=8,
        prefix_dim=16,
        time_embed_dim=8,
        critic_hidden_dims=[16],
    )
    policy = PiRLPolicy(cfg)
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    return save_checkpoint(path, policy, pre, post)


def edge_cmd(cluster, robot_id: str, policy: Path, *extra) -> list[str]:
    c = cluster
    return [
        str(BIN / "pirl-edge"),
        f"--link.learner=127.0.0.1:{c.port}",
        f"--link.robot_id={robot_id}",
        f"--link.tokens={c.pki['tokens']}",
        f"--link.tls_ca={c.pki['ca_cert']}",
        f"--policy.path={policy}",
        f"--spool.dir={c.dir / robot_id / 'spool'}",
        f"--stats_file={c.dir / robot_id / 'stats.json'}",
        f"--dataset.root={c.dir / robot_id / 'session'}",
        *extra,
    ]


def run(cmd, env_extra=None, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def test_a_robot_with_no_hardware_is_refused_in_one_line_before_anything_is_spooled(cluster, tmp_path):
    policy = robot_policy(tmp_path / "so101_policy", state=6, action=6)
    p = run(
        edge_cmd(
            cluster,
            "robot-0",
            policy,
            "--robot.type=so101_follower",
            "--robot.port=/dev/ttyNOPE",
            "--robot.id=arm0",
            *ROBOT_MODE,
        ),
        timeout=120,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "so101_follower" in errors[0] and "/dev/ttyNOPE" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    spool = cluster.dir / "robot-0" / "spool"
    assert not spool.exists() or not any(spool.iterdir())
    assert not (cluster.dir / "robot-0" / "session").exists()


def test_a_policy_that_does_not_fit_the_robot_is_refused_naming_the_feature(cluster, tmp_path):
    policy = robot_policy(tmp_path / "wrong_policy", state=5, action=2, env_state=2)
    p = run(edge_cmd(cluster, "robot-0", policy, "--robot.type=pirl_sim", *ROBOT_MODE), timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "action with 2 dims" in errors[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_a_third_party_robot_plugin_is_found_and_driven(cluster, runtime_setup, tmp_path):
    site = install_fake_robot_plugin(tmp_path / "plugin")
    actions = tmp_path / "fakearm_actions.jsonl"
    cluster.learner()
    p = run(
        edge_cmd(
            cluster,
            "robot-0",
            cluster.ckpt,  # the built-in task's policy: the fake arm has its feature names
            "--robot.type=fakearm",
            f"--robot.log_path={actions}",
            "--safety.action_min=[-1,-1,-1]",
            "--safety.action_max=[1,1,1]",
            "--control.hz=50",
            "--control.episodes=2",
            "--episode.time_limit_s=0.5",
            *ROBOT_MODE,
        ),
        env_extra={"PYTHONPATH": str(site)},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    stats = cluster.edge_stats("robot-0")
    assert stats["robot_type"] == "fakearm" and stats["episodes"] == 2
    assert stats["records_acked"] == stats["records"] > 0 and stats["records_left_in_spool"] == 0
    sent = [json.loads(line) for line in actions.read_text().splitlines()]
    assert len(sent) >= 40 and all(-1 <= v <= 1 for a in sent for v in a.values())


def test_the_simulated_robot_runs_paced_with_a_learner_and_its_session_trains_with_lerobot_train(cluster, tmp_path):
    from lerobot_robot_pirl_sim import ACTION_NAMES, ENV_STATE_NAMES, STATE_NAMES

    policy = robot_policy(tmp_path / "sim_policy", len(STATE_NAMES), len(ACTION_NAMES), len(ENV_STATE_NAMES))
    cluster.ckpt = policy  # the learner trains the policy the robot runs
    cluster.learner()
    proc = subprocess.Popen(
        edge_cmd(
            cluster,
            "robot-0",
            policy,
            "--robot.type=pirl_sim",
            "--robot.cameras={front: {type: pirl_sim, width: 64, height: 64, fps: 30}}",
            "--control.hz=25",
            "--episode.time_limit_s=2",
            # bounds that keep the gripper open (>= 60 %): this untrained policy's episodes run to the limit
            "--safety.action_min=[-0.2,-0.2,60]",
            "--safety.action_max=[0.2,0.2,100]",
            *ROBOT_MODE,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    session = cluster.dir / "robot-0" / "session"
    deadline = time.monotonic() + 120
    # two episodes recorded, and the third one running (not resetting or waiting to start: an e-stop there
    # ends no episode), however slowly a loaded machine gets there
    while time.monotonic() < deadline and proc.poll() is None:
        log = session / "sessions.jsonl"
        recorded = len(log.read_text().splitlines()) if log.is_file() else 0
        if recorded >= 2 and sum(line.rstrip().endswith("robot robot-0: run") for line in lines) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "".join(lines)[-3000:]
    time.sleep(0.5)  # a dozen ticks into it: an episode of a frame or two is not kept in the dataset
    proc.send_signal(signal.SIGUSR1)  # e-stop: the episode fails, nothing more is sent until released
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    stats = cluster.edge_stats("robot-0")
    assert stats["robot_type"] == "pirl_sim" and stats["episodes"] >= 3, stats
    assert stats["safety"]["estops"] == 1 and stats["episode_ends"].get("estop") == 1, stats
    assert stats["records_acked"] == stats["records"] > 0 and stats["records_left_in_spool"] == 0, stats
    assert stats["control_rate_hz_p50"] == pytest.approx(25, rel=0.1), stats
    assert stats["dataset"]["finalized"] and stats["dataset"]["episodes_saved"] == stats["episodes"], stats
    assert stats["safety"]["clamped_ticks"] > 0  # the untrained policy does try to close the gripper

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(stats["dataset"]["repo_id"], root=session, video_backend="pyav")
    assert ds.num_episodes == stats["episodes"] and ds.num_frames == stats["dataset"]["frames_written"]
    frame = ds[0]
    assert tuple(frame["observation.images.front"].shape) == (3, 64, 64)
    assert frame["observation.state"].shape == (len(STATE_NAMES),)
    assert bool(ds[ds.num_frames - 1]["next.done"])

    out_dir = tmp_path / "train"
    p = run(
        [
            str(BIN / "lerobot-train"),
            f"--dataset.repo_id={stats['dataset']['repo_id']}",
            f"--dataset.root={session}",
            "--dataset.video_backend=pyav",
            "--policy.type=pi_rl",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            "--steps=3",
            "--batch_size=4",
            "--num_workers=0",
            "--save_freq=3",
            "--wandb.enable=false",
            f"--output_dir={out_dir}",
        ],
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out_dir / "checkpoints" / "last" / "pretrained_model" / "model.safetensors").is_file()
    trained = json.loads((out_dir / "checkpoints" / "last" / "pretrained_model" / "config.json").read_text())
    assert set(trained["input_features"]) == {
        "observation.state",
        "observation.environment_state",
        "observation.images.front",
    }
