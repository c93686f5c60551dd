"""configs/benchmarks: every file parses as the config of the tool it is for (no unknown field, no value the
config refuses), so the GPU recipes of docs/benchmarks.md start."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.configuration import EdgeConfig
from learner.configuration import LearnerConfig
from pirl.cli import parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "benchmarks").glob("*.yaml"))


def test_there_is_a_learner_config_per_benchmark():
    assert {p.name.split("_")[0] for p in CONFIGS if p.stem.endswith("_learner")} == {
        "libero",
        "metaworld",
        "maniskill",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_benchmark_config_parses(path):
    if path.stem.endswith("_learner"):
        cfg = parse_config(
            LearnerConfig, prog="pirl-learner", args=[f"--config_path={path}", "--policy_path=x", "--tokens=t.json"]
        )
        assert cfg.device == "cuda" and cfg.algorithm.update_epochs == 4 and cfg.trainer.export_onnx is False
        assert cfg.noise_method in ("flow_noise", "flow_sde")
    else:
        assert path.stem.endswith("_edge")
        cfg = parse_config(
            EdgeConfig,
            prog="pirl-edge",
            args=[
                f"--config_path={path}",
                "--policy.path=x",
                "--link.learner=h:1",
                "--link.robot_id=r",
                "--link.tokens=t.json",
                "--link.tls_ca=ca.pem",
            ],
        )
        assert cfg.env is not None and cfg.control.mode == "unpaced" and cfg.policy.device == "cuda"
