"""pirl-demo --robot=sim end to end, cut short: SFT on a few scripted demos of the simulated robot, the
learner evaluating on its batched twin, a paced edge on the simulated robot (camera rendered and
recorded) and an unpaced simulated edge; demo.json carries the robot's figures and its session dataset
loads; and with a scripted person labelling and taking over (--operator=scripted: pirl-bench robot's
best method, noise_q_action_td, on the robot alone, the person's labels back-dated by their reaction time). (The full runs and their figures: BENCHMARKS.md.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pirl_tools.bench_robot import METHODS, offline_demo_flags
from pirl_tools.demo import OPERATOR_METHOD

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

KEYS_BEFORE = {
    "sft_success",
    "final_success",
    "policy_versions",
    "rollouts_sent",
    "rollouts_accepted",
    "duplicates",
    "rollouts_left_in_spools",
    "rollouts_dropped",
    "deadline_miss_ratio",
    "control_rate_hz_p50",
    "sync_latency_p50_s",
    "eval_curve",
    "edges",
}
ROBOT_KEYS = {"robot_type", "dataset_root", "episodes", "safety_clamps", "estops"}


SHORT = [
    "--robot=sim",
    "--num_demos=3",
    "--sft_steps=60",
    "--episodes_per_update=16",
    "--eval_every=2",
    "--eval_episodes=20",
    "--time_limit=150",
    "--target=1.0",
]


def run_demo(out: Path, *extra: str) -> None:
    p = subprocess.run(
        [str(BIN / "pirl-demo"), f"--out={out}", *SHORT, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


def test_demo_on_the_simulated_robot_reports_the_robot_and_its_dataset(tmp_path):
    out = tmp_path / "demo"
    run_demo(out, "--num_envs=16")
    report = json.loads((out / "demo.json").read_text())
    assert set(report) >= KEYS_BEFORE | ROBOT_KEYS, sorted(KEYS_BEFORE | ROBOT_KEYS - set(report))
    assert report["robot_type"] == "pirl_sim" and report["task"] == "pirl_sim"
    assert report["policy_versions"] >= 2
    assert report["rollouts_accepted"] == report["rollouts_sent"] - report["rollouts_resent"]
    assert report["duplicates"] == 0 and report["rollouts_left_in_spools"] == 0
    assert report["paced_episodes"] >= 1 and report["dataset_episodes"] == report["paced_episodes"]
    assert report["estops"] == 0

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("local/robot-0", root=report["dataset_root"], video_backend="pyav")
    assert ds.num_frames == report["dataset_frames"] > 0
    assert tuple(ds[0]["observation.images.front"].shape) == (3, 64, 64)


def test_demo_with_a_scripted_operator_labels_and_takes_over(tmp_path):
    out = tmp_path / "demo"
    run_demo(out, "--operator=scripted")
    report = json.loads((out / "demo.json").read_text())
    assert report["operator"] == "scripted" and report["policy_versions"] >= 2
    # the bench's best method on the robot alone: no simulation farm; its off-policy steering update ran
    spec = METHODS[OPERATOR_METHOD]
    assert report["method"] == OPERATOR_METHOD and set(report["edges"]) == {"robot-0"}
    log = (out / "logs" / "learner.log").read_text()
    assert "q_loss" in log, log[-2000:]
    if offline_demo_flags(spec, out / "sft" / "data"):  # the SFT demos seed the critic's replay
        assert "demonstrated macro-steps" in log, log[-2000:]
    labels = report["labels"]
    # every episode of the robot was judged by the person (or cut by the time limit / the demo's end), except
    # one the safety watchdog ended (a control loop stalled on a loaded machine): that one says ENV/FAILURE
    judged = {"OPERATOR/SUCCESS", "OPERATOR/FAILURE", "OPERATOR/ABORT", "TIME_LIMIT/FAILURE"}
    watchdog_ends = sum((e.get("episode_ends") or {}).get("watchdog", 0) for e in report["edges"].values())
    assert labels and set(labels) <= judged | ({"ENV/FAILURE"} if watchdog_ends else set())
    assert labels.get("ENV/FAILURE", 0) == watchdog_ends
    assert sum(v for k, v in labels.items() if k.startswith("OPERATOR/")) >= 1
    # the edge back-dated the person's labels by their reaction time (0.3 s: about two chunks)
    if labels.get("OPERATOR/SUCCESS", 0) + labels.get("OPERATOR/FAILURE", 0):
        assert report["label_reaction_s"] == 0.3 and report["edges"]["robot-0"]["steps_after_label"] >= 1
    if spec["interventions"]:
        # a 60-step SFT drifts: the person takes over, and the chunk critic learns from the takeovers
        assert report["interventions"] >= 1
        in_replay = [int(n) for n in re.findall(r"(\d+) in the critic's replay", log)]
        assert in_replay and sum(in_replay) >= 1, log[-2000:]
    else:  # the method learns without takeovers: the person only labels
        assert report["interventions"] == 0
