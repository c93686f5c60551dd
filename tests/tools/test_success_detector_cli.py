"""pirl-success on the command line (pirl_tools/success_detector.py, in-process: main() with argv):
``train`` then ``eval`` on a session recorded by the edge's recorder write what they promise (the detector,
the JSON report with the agreement figures), and every user mistake is one ``error:`` line with exit
status 2 and no traceback, before any work starts where the mistake is visible in the flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from lerobot.utils.feature_utils import hw_to_dataset_features

from edge.session_dataset import SessionRecorder
from pirl_tools import success_detector as cli

IMG = 48
LENGTH = 10


def record_session(root: Path, outcomes: list[bool]) -> Path:
    """A pirl-edge session (SessionRecorder): dark noise, a bright square over a success's last 4 frames."""
    features = {
        **hw_to_dataset_features({"joint.pos": float, "front": (IMG, IMG, 3)}, "observation", use_video=True),
        **hw_to_dataset_features({"x.vel": float}, "action", use_video=True),
    }
    rec = SessionRecorder(root, repo_id="local/arm", fps=10, robot_type="so101_follower", features=features, task="t")
    rng = np.random.default_rng(1)
    for success in outcomes:
        for i in range(LENGTH):
            img = rng.integers(0, 60, (IMG, IMG, 3), dtype=np.uint8)
            if success and i >= LENGTH - 4:
                img[12:36, 12:36] = 255
            rec.add_frame(
                {
                    "observation.state": np.zeros(1, np.float32),
                    "observation.images.front": img,
                    "action": np.zeros(1, np.float32),
                }
            )
        rec.end_episode(success=success, reason="success" if success else "failure")
    assert rec.close()["finalized"]
    return root


def tiny_backbone(path: Path) -> Path:
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(path)
    return path


def fake_dataset(root: Path, features: dict) -> Path:
    """Only a meta/info.json: enough for the checks made while parsing the flags."""
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps({"features": features}))
    return root


def run(argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["pirl-success", *argv])
    with pytest.raises(SystemExit) as ei:
        cli.main()
    return ei.value.code


def one_error_line(err: str, *needles: str) -> None:
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], err


def test_train_then_eval(tmp_path, monkeypatch, capsys):
    session = record_session(tmp_path / "session", [True, False, True, False, True, False])
    backbone = tiny_backbone(tmp_path / "backbone")
    out = tmp_path / "det"
    code = run(
        [
            "train",
            f"--dataset.root={session}",
            f"--out={out}",
            f"--backbone={backbone}",
            "--image_size=32",
            "--steps=30",
            "--batch_size=16",
            "--learning_rate=1e-3",
            "--success_frames=4",
            "--ambiguous_frames=2",
            "--holdout_episodes=2",
            "--log_every=10",
        ],
        monkeypatch,
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "step 10/30" in printed and "step 30/30" in printed and "per episode (2)" in printed
    assert (out / "success_detector.json").is_file() and (out / "model.safetensors").is_file()

    report_path = tmp_path / "eval.json"
    code = run(["eval", f"--detector={out}", f"--dataset.root={session}", f"--out={report_path}"], monkeypatch)
    assert code == 0, capsys.readouterr()
    report = json.loads(report_path.read_text())
    assert {"detector", "threshold", "consecutive", "label_rule", "episodes", "per_episode", "per_frame"} <= set(report)
    assert report["threshold"] == 0.5 and report["consecutive"] == 3  # the detector's defaults
    assert [e.rsplit("#", 1)[1] for e in report["episodes"]] == ["4", "5"]  # the held-out ones by default
    for level in ("per_episode", "per_frame"):
        m = report[level]
        assert {"accuracy", "precision", "recall", "confusion", "count"} <= set(m)
        assert set(m["confusion"]) == {"true_positive", "false_positive", "true_negative", "false_negative"}
        assert sum(m["confusion"].values()) == m["count"]
    assert report["per_episode"]["count"] == 2 and report["per_frame"]["count"] == 2 * LENGTH - 2  # 2 left out
    ep = report["per_episode"]["episodes"][0]
    assert ep["recorded_success"] is True and {"fired", "fired_at_frame", "frames_before_end", "max_score"} <= set(ep)

    # every episode, a stricter rule: the keys stay, the counts follow the flags
    code = run(
        [
            "eval",
            f"--detector={out}",
            f"--dataset.root={session}",
            f"--out={report_path}",
            "--episodes=all",
            "--consecutive=2",
            "--threshold=0.7",
        ],
        monkeypatch,
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["per_episode"]["count"] == 6 and report["consecutive"] == 2 and report["threshold"] == 0.7

    # a session the detector never saw: all of its episodes by default
    other = record_session(tmp_path / "other", [False, True])
    code = run(["eval", f"--detector={out}", f"--dataset.root={session},{other}", f"--out={report_path}"], monkeypatch)
    assert code == 0
    assert json.loads(report_path.read_text())["per_episode"]["count"] == 4


def test_user_mistakes_are_one_error_line(tmp_path, monkeypatch, capsys):
    no_camera = fake_dataset(
        tmp_path / "no_camera",
        {"observation.state": {"dtype": "float32", "shape": [1]}, "next.success": {"dtype": "bool", "shape": [1]}},
    )
    no_success = fake_dataset(
        tmp_path / "no_success", {"observation.images.front": {"dtype": "video", "shape": [48, 48, 3]}}
    )
    good = fake_dataset(
        tmp_path / "good",
        {
            "observation.images.front": {"dtype": "video", "shape": [48, 48, 3]},
            "next.success": {"dtype": "bool", "shape": [1]},
        },
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    not_a_detector = tmp_path / "empty_dir"
    not_a_detector.mkdir()
    out = f"--out={tmp_path / 'det'}"
    cases = [
        ([], "a command is required"),
        (["fit"], "unknown command 'fit'"),
        (["train", f"--dataset.root={good}"], "out: required"),
        (["train", out], "dataset.root: required"),
        (["train", out, f"--dataset.root={tmp_path / 'missing'}"], "is not a directory"),
        (["train", out, f"--dataset.root={tmp_path}"], "not a LeRobotDataset"),
        (["train", out, f"--dataset.root={no_camera}"], "has no camera"),
        (["train", out, f"--dataset.root={no_success}"], "has no next.success"),
        (["train", out, f"--dataset.root={good},{no_success}"], "has no next.success"),
        (["train", out, f"--dataset.root={tmp_path / 'nothing_*'}"], "no directory matches"),
        (["train", f"--out={full}", f"--dataset.root={good}"], "exists and is not empty"),
        (["train", out, f"--dataset.root={good}", "--steps=0"], "steps"),
        (["train", out, f"--dataset.root={good}", "--threshold=2"], "threshold"),
        (["train", out, f"--dataset.root={good}", "--holdout_episodes=many"], "holdout_episodes"),
        (["eval", f"--dataset.root={good}", f"--out={tmp_path / 'r.json'}"], "detector: required"),
        (
            ["eval", f"--detector={tmp_path / 'nope'}", f"--dataset.root={good}", f"--out={tmp_path / 'r.json'}"],
            "is not a directory",
        ),
        (
            ["eval", f"--detector={not_a_detector}", f"--dataset.root={good}", f"--out={tmp_path / 'r.json'}"],
            "success_detector.json",
        ),
        (["eval", f"--detector={not_a_detector}", f"--dataset.root={good}"], ""),
    ]
    for argv, needle in cases:
        code = run(argv, monkeypatch)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        one_error_line(err, needle)
    assert not (tmp_path / "det").exists()


def test_mistakes_found_while_running_are_one_error_line_and_leave_no_output(tmp_path, monkeypatch, capsys):
    session = record_session(tmp_path / "session", [True, False, True])
    backbone = tiny_backbone(tmp_path / "backbone")
    base = ["train", f"--dataset.root={session}", f"--out={tmp_path / 'det'}", "--image_size=32", "--steps=1"]
    cases = [
        ([*base, f"--backbone={backbone}", "--holdout_episodes=3"], "leaves nothing to train on"),
        ([*base, f"--backbone={backbone}", "--holdout_episodes=2"], "no negative frame"),  # only a success left
        ([*base, f"--backbone={tmp_path / 'no_backbone'}"], "backbone: cannot load"),
        ([*base, f"--backbone={backbone}", "--image_size=64"], "--image_size=32"),
    ]
    for argv, needle in cases:
        code = run(argv, monkeypatch)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        one_error_line(err, needle)
        assert not (tmp_path / "det").exists(), argv  # a failed training leaves nothing behind
    code = run(
        [
            "eval",
            f"--detector={tmp_path}",
            f"--dataset.root={session}",
            f"--out={tmp_path / 'r.json'}",
            "--episodes=3-1",
        ],
        monkeypatch,
    )
    one_error_line(capsys.readouterr().err, "episodes")
    assert code == 2


def test_episodes_with_unknown_or_detector_outcomes_are_left_out(tmp_path):
    session = record_session(tmp_path / "session", [True, False, True, False])
    log = session / "sessions.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    lines[0]["label"] = "detector"  # the detector ended it: not ground truth
    lines[1]["reason"] = "abort"  # the operator aborted it: outcome unknown
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    sessions = cli.Sessions(cli.SessionsConfig(root=str(session)))
    assert [(e.index, e.success, e.decided_by) for e in sessions.episodes] == [
        (0, True, "detector"),
        (1, None, None),
        (2, True, None),
        (3, False, None),
    ]
    assert [e.index for e in sessions.episodes if cli.usable(e, False)] == [2, 3]
    assert [e.index for e in sessions.episodes if cli.usable(e, True)] == [0, 2, 3]
    # without a session log, an episode's success is its frames' next.success
    log.unlink()
    sessions = cli.Sessions(cli.SessionsConfig(root=str(session)))
    assert [e.success for e in sessions.episodes] == [True, False, True, False]
    train_eps, held = cli.split_episodes(sessions.episodes, 1)
    assert [e.index for e in train_eps] == [0, 1, 2] and [e.index for e in held] == [3]
    assert cli.parse_episodes("3,5,8-10") == {3, 5, 8, 9, 10}
