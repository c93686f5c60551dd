"""pirl-edge on LeRobot env types as a real process: ``--env.type`` of a third-party ``lerobot_env_*``
plugin (installed for the test), success read under the env's own key, every episode's outcome matching
what the env itself logged; and a policy that does not fit the env refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.toy_env import install_toy_env_plugin

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def edge(cluster, *extra, pythonpath: Path, timeout=240) -> subprocess.CompletedProcess:
    c = cluster
    cmd = [
        str(BIN / "pirl-edge"),
        f"--link.learner=127.0.0.1:{c.port}",
        "--link.robot_id=robot-0",
        f"--link.tokens={c.pki['tokens']}",
        f"--link.tls_ca={c.pki['ca_cert']}",
        f"--spool.dir={c.dir / 'robot-0' / 'spool'}",
        f"--stats_file={c.dir / 'robot-0' / 'stats.json'}",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(pythonpath)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def test_a_plugin_env_type_runs_through_pirl_edge_with_success_read_correctly(cluster, tmp_path):
    site = install_toy_env_plugin(tmp_path / "plugin")
    log = tmp_path / "episodes.jsonl"
    cluster.learner()
    p = edge(
        cluster,
        f"--policy.path={cluster.ckpt}",  # the built-in task's policy: the toy env has its widths
        "--env.type=pirltoy",
        "--env.report_key=success",
        f"--env.log_path={log}",
        "--control.success_key=success",
        "--control.hz=100",
        "--control.episodes=4",
        pythonpath=site,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    truth = [json.loads(line) for line in log.read_text().splitlines()]
    stats = cluster.edge_stats("robot-0")
    # episodes 1 and 3 succeed at their 3rd step, 2 and 4 time out at the 6-step limit
    assert [t["success"] for t in truth] == [True, False, True, False]
    assert stats["episodes"] == 4 and stats["successes"] == 2
    assert stats["records_acked"] == stats["records"] > 0 and stats["records_left_in_spool"] == 0


def test_a_policy_that_does_not_fit_the_env_type_is_one_error_line(cluster, runtime_setup, tmp_path):
    from helpers.policy import other_task_policy, save_checkpoint

    site = install_toy_env_plugin(tmp_path / "plugin")
    policy = save_checkpoint(tmp_path / "metaworld_policy", *other_task_policy())
    p = edge(cluster, f"--policy.path={policy}", "--env.type=pirltoy", pythonpath=site, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "env.type=pirltoy does not fit the policy" in errors[0], p.stderr[-2000:]
    assert "actions have 3 dims, the policy's 4" in errors[0] and "Traceback" not in p.stderr


# Wraps LeRobot's MetaworldEnv.step in the edge process, once lerobot.envs.metaworld is imported (lazily: a
# sitecustomize that imported it at start-up would run in every Python the edge starts, e.g. the subprocess
# pyGLFW spawns to probe its library, and each of those would start another): every success MetaWorld reports
# is appended to a file, the ground truth the edge's count is compared with.
_MW_SUCCESS_LOG = """
import importlib.abc, importlib.util, json, os, sys


def _patch(module):
    step = module.MetaworldEnv.step

    def logged_step(self, action):
        out = step(self, action)
        if out[4].get("is_success"):
            with open(os.environ["PIRL_TEST_MW_LOG"], "a") as f:
                f.write(json.dumps({"success": True}) + "\\n")
        return out

    module.MetaworldEnv.step = logged_step


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lerobot.envs.metaworld":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchOnImport())
"""


@pytest.mark.parametrize("backbone", ["mlp", "pi0", "smolvla"])
def test_lerobots_metaworld_env_type_runs_through_pirl_edge_with_success_read_correctly(
    backbone, runtime_setup, tmp_path, monkeypatch
):
    """``--env.type=metaworld`` (480x480 camera + 4-dim state + the task's instruction, next-step autoreset, the
    env resets inside step) through a learner and an edge: a policy that always pushes straight down on
    handle-press, which MetaWorld calls a success from some starts and never from others within the 30 steps of
    ``--env.episode_length``. ``mlp`` reads the state; ``pi0`` / ``smolvla`` are reduced-size LeRobot VLAs that
    read the camera image, the state and the instruction (random weights: the action statistics fix the push)."""
    pytest.importorskip("metaworld")
    from helpers.cluster import Cluster
    from helpers.policy import constant_action_policy, constant_action_vla, save_checkpoint

    root, _, pki = runtime_setup
    push_down = [0.0, 0.0, -1.0, 0.0]
    made = constant_action_policy(4, push_down) if backbone == "mlp" else constant_action_vla(backbone, push_down)
    ckpt = save_checkpoint(tmp_path / f"push_down_{backbone}", *made)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_MW_SUCCESS_LOG)
    log = tmp_path / "metaworld_successes.jsonl"
    monkeypatch.setenv("PIRL_TEST_MW_LOG", str(log))
    cluster = Cluster(root, ckpt, pki, f"metaworld_{backbone}")
    try:
        # a VLA's record holds its 480x480 camera frame(s) as floats: over the learner's 4 MiB default when a
        # truncated episode adds its final observation (refused and counted, never lost silently)
        cluster.learner("--intake.max_record_bytes=33554432")
        p = edge(
            cluster,
            f"--policy.path={ckpt}",
            "--env.type=metaworld",
            "--env.task=handle-press-v3",
            "--env.episode_length=30",
            "--control.hz=100",
            "--control.episodes=5",
            "--spool.drain_timeout_s=180",  # a VLA's PPO update on one loaded core can hold the last ack past 30 s
            pythonpath=site,
            timeout=400,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        stats = cluster.edge_stats("robot-0")
    finally:
        cluster.close()
    successes = len(log.read_text().splitlines()) if log.exists() else 0
    assert stats["episodes"] == 5
    assert stats["successes"] == successes  # what MetaWorld itself said
    assert 0 < successes < 5  # episodes that succeed and episodes that ran into the limit
    assert stats["records_acked"] == stats["records"] > 0 and stats["records_left_in_spool"] == 0
