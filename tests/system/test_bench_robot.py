"""pirl-bench robot end to end, small: SFT, a learner and ONE edge on the simulated robot as processes, the
scripted person labelling and taking over, the learner training on interventions and the SFT demos; and its
one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = [sys.executable, "-m", "pirl_tools.bench", "robot"]


def test_an_unknown_method_is_one_line_and_exit_2():
    p = subprocess.run([*BENCH, "--methods=[nope]"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("pirl-bench robot: error: methods: unknown ['nope']")


@pytest.mark.slow
def test_a_short_run_with_interventions_writes_robot_json(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    cmd = [
        *BENCH,
        f"--out={out}",
        "--methods=[interventions_bc]",
        "--max_episodes=24",
        "--max_run_s=240",
        "--sft_steps=200",
        "--num_demos=4",
        "--eval_episodes=20",
        "--intervene_after_s=0.2",  # an SFT of 200 steps drifts: the person takes over early and often
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "robot.json").read_text())
    (run,) = report["runs"]
    assert run["method"] == "interventions_bc" and report["target"] == 0.9
    for key in ("sft_success", "final_success", "episodes_to_target", "robot_seconds_to_target", "interventions"):
        assert key in run
    assert run["episodes"] >= 24 and run["robot_seconds"] > 0 and run["interventions"] > 0
    assert sum(run["labels"].values()) >= 24 and all(k.startswith(("OPERATOR/", "TIME_LIMIT/")) for k in run["labels"])
    assert (out / "robot.png").is_file()
    # the learner trained: at least one update after the SFT evaluation, with BC data from the interventions
    logs = (out / "interventions_bc-s0" / "logs" / "learner.log").read_text()
    assert "bc_loss" in logs
