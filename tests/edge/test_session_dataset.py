"""Tests of the edge's session recording (edge/session_dataset.py): a recorder fed synthetic robot frames
writes a LeRobotDataset v3 that loads, decodes and trains with ``lerobot-train --policy.type=pi_rl``; a full
queue drops without blocking; close() is idempotent and keeps a partial episode; a recorded root is never
overwritten.

Videos are decoded with ``video_backend="pyav"``: torchcodec is installed with LeRobot but its FFmpeg
libraries may be missing (then LeRobot logs a traceback and falls back to pyav anyway).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.utils.feature_utils import dataset_to_policy_features, hw_to_dataset_features

from edge.session_dataset import (
    EDGE_FEATURES,
    SAFETY_FLAGS,
    DatasetConfig,
    SessionRecorder,
    default_repo_id,
    load_session_log,
    session_features,
)

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "local/robot-0"
FPS = 30
EPISODES = [(40, True, "success"), (25, False, "time_limit"), (30, None, "operator_end")]
IMG = 64


def robot_features(use_video: bool = True) -> dict:
    """What the edge builds from a robot's features, as lerobot-record does (hw_to_dataset_features)."""
    obs = {**{f"joint_{i}.pos": float for i in range(5)}, "front": (IMG, IMG, 3)}
    return {
        **hw_to_dataset_features(obs, "observation", use_video=use_video),
        "observation.environment_state": {"dtype": "float32", "shape": (2,), "names": ["cube_x", "cube_y"]},
        **hw_to_dataset_features({"x.vel": float, "y.vel": float, "grip": float}, "action", use_video=use_video),
    }


def color(ep: int, i: int) -> tuple[int, int, int]:
    """A flat colour per frame: decodes back within a few levels whatever the codec does to detail."""
    return (40 + 60 * ep, 4 * i, 200 - 3 * i)


def frame(ep: int, i: int, **extra) -> dict:
    img = np.empty((IMG, IMG, 3), dtype=np.uint8)
    img[...] = color(ep, i)
    return {
        "observation.state": np.full(5, ep * 100 + i, dtype=np.float32),
        "observation.environment_state": np.array([ep, i], dtype=np.float32),
        "observation.images.front": img,
        "action": np.array([i, -i, ep], dtype=np.float32),
        "policy_version": 3 + ep,
        "next.reward": float(i == 0),
        "next.done": False,  # never says done: the recorder marks each episode's last frame
        "safety.clamped": i % 2 == 0,
        **extra,
    }


def new_recorder(root: Path, **kw) -> SessionRecorder:
    kw.setdefault("features", robot_features())
    return SessionRecorder(root, repo_id=REPO_ID, fps=FPS, robot_type="so101_follower", task="reach the cube", **kw)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A closed session of EPISODES (video), its summary, and the add_frame times of the control thread."""
    root = tmp_path_factory.mktemp("session") / "ds"
    rec = new_recorder(root)
    add_s = []
    for ep, (length, success, reason) in enumerate(EPISODES):
        for i in range(length):
            t0 = time.perf_counter()
            assert rec.add_frame(frame(ep, i))
            add_s.append(time.perf_counter() - t0)
        if ep < len(EPISODES) - 1:
            rec.end_episode(success=success, reason=reason)
    summary = rec.close(timeout_s=120)
    return root, summary, add_s


def load(root: Path) -> LeRobotDataset:
    return LeRobotDataset(REPO_ID, root=root, video_backend="pyav")


def test_session_loads_as_a_lerobot_dataset(recorded):
    root, summary, add_s = recorded
    total = sum(n for n, _, _ in EPISODES)
    assert summary["finalized"] and summary["error"] is None
    assert summary["frames_written"] == total and summary["episodes_saved"] == len(EPISODES)
    assert summary["frames_dropped"] == 0 and summary["writer_errors"] == 0
    assert summary["size_bytes"] > 0
    assert np.median(add_s) < 0.005  # the control thread only enqueues (a copy of a 64x64 frame)

    ds = load(root)
    assert len(ds) == total and ds.num_episodes == len(EPISODES)
    assert ds.meta.video_keys == ["observation.images.front"]
    assert ds.meta.robot_type == "so101_follower"
    start = 0
    for ep, (length, _, _) in enumerate(EPISODES):
        first, last = ds[start], ds[start + length - 1]
        assert int(first["episode_index"]) == ep and int(first["frame_index"]) == 0
        assert int(last["episode_index"]) == ep and int(last["frame_index"]) == length - 1
        assert bool(last["next.done"]) and not bool(ds[start + length - 2]["next.done"])
        assert int(first["policy_version"]) == 3 + ep
        assert float(first["next.reward"]) == 1.0 and bool(first["safety.clamped"])
        assert first["task"] == "reach the cube"
        np.testing.assert_array_equal(last["observation.state"].numpy(), np.full(5, ep * 100 + length - 1))
        for i in (0, length // 2, length - 1):
            img = ds[start + i]["observation.images.front"]
            assert tuple(img.shape) == (3, IMG, IMG)
            np.testing.assert_allclose(img.mean(dim=(1, 2)).numpy() * 255, color(ep, i), atol=6)
        start += length


def test_episode_end_reason_and_success_are_kept(recorded):
    root, _, _ = recorded
    log = load_session_log(root)
    assert [line["episode_index"] for line in log] == [0, 1, 2]
    assert [line["frames"] for line in log] == [n for n, _, _ in EPISODES]
    assert [line["policy_versions"] for line in log] == [[3], [4], [5]]
    # the last episode was still running when close() came: saved as "stop", success unknown
    assert [(line["reason"], line["success"]) for line in log] == [
        ("success", True),
        ("time_limit", False),
        ("stop", None),
    ]
    ds = load(root)
    ends = np.cumsum([n for n, _, _ in EPISODES]) - 1
    assert [bool(ds[int(e)]["next.success"]) for e in ends] == [True, False, False]


def test_edge_columns_never_reach_the_policy():
    feats = session_features(robot_features(use_video=True), use_videos=False)
    assert feats["observation.images.front"]["dtype"] == "image"
    assert session_features(feats, use_videos=True)["observation.images.front"]["dtype"] == "video"
    assert session_features(feats, use_videos=False) == feats  # idempotent
    assert set(EDGE_FEATURES) <= set(feats) and set(SAFETY_FLAGS) <= set(feats)
    assert feats["next.done"]["dtype"] == "bool" and feats["policy_version"]["dtype"] == "int64"
    # what lerobot-train gives the policy: observations and the action only (pi_rl takes STATE/VISUAL/ENV)
    policy = dataset_to_policy_features(feats)
    assert set(policy) == {"observation.state", "observation.environment_state", "observation.images.front", "action"}
    with pytest.raises(ValueError, match="next.reward"):
        session_features({"next.reward": {"dtype": "float64", "shape": (1,), "names": None}}, use_videos=True)


class GatedDataset:
    """Wraps the recorder's dataset so the writer blocks in add_frame until the test opens the gate."""

    def __init__(self, ds):
        self.ds, self.entered, self.gate = ds, threading.Event(), threading.Event()

    def add_frame(self, row):
        self.entered.set()
        self.gate.wait(timeout=30)
        self.ds.add_frame(row)

    def __getattr__(self, name):
        return getattr(self.ds, name)


def test_full_queue_drops_and_counts_without_blocking(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="edge.session_dataset")
    drops = []
    rec = new_recorder(tmp_path / "ds", queue_frames=2, use_videos=False, on_drop=lambda: drops.append(1))
    gated = rec._ds = GatedDataset(rec._ds)
    assert rec.add_frame(frame(0, 0)) and rec.add_frame(frame(0, 1))  # the writer holds 0, writes it on seeing 1
    assert gated.entered.wait(10)  # ...and is now stuck on the disk
    results, slowest = [], 0.0
    for i in range(2, 8):
        t0 = time.perf_counter()
        results.append(rec.add_frame(frame(0, i)))
        slowest = max(slowest, time.perf_counter() - t0)
    assert results == [True, True, False, False, False, False]  # two fit in the queue, the rest are dropped
    assert slowest < 0.5 and rec.frames_dropped == 4 and len(drops) == 4
    rec.end_episode(success=None, reason="operator_end")  # control items are never dropped
    gated.gate.set()
    summary = rec.close(timeout_s=60)
    assert summary["frames_dropped"] == 4 and summary["frames_written"] == 4 and summary["finalized"]
    assert load_session_log(tmp_path / "ds")[0]["frames_dropped"] == 4
    assert "4 frame(s) dropped" in caplog.text  # logged by the writer, not the control thread
    assert len(load(tmp_path / "ds")) == 4


def test_close_is_idempotent_and_keeps_a_partial_episode(tmp_path):
    rec = new_recorder(tmp_path / "ds")
    for i in range(12):
        rec.add_frame(frame(0, i))
    first = rec.close(timeout_s=60)
    assert first["finalized"] and first["episodes_saved"] == 1 and first["frames_written"] == 12
    assert rec.close() == first
    assert not rec.add_frame(frame(0, 12))  # after close: not recorded
    rec.end_episode(success=True, reason="success")  # ignored
    ds = load(tmp_path / "ds")
    assert len(ds) == 12 and bool(ds[11]["next.done"])
    assert load_session_log(tmp_path / "ds")[0]["reason"] == "stop"


def test_close_from_a_signal_handler_while_the_loop_records(tmp_path):
    rec = new_recorder(tmp_path / "ds", use_videos=False)
    summaries = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: summaries.append(rec.close(timeout_s=60)))
    try:
        accepted = []
        for i in range(10):
            if i == 6:
                os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs on this (the control) thread
            accepted.append(rec.add_frame(frame(0, i)))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert accepted.count(True) == 6 and summaries and summaries[0]["finalized"]
    assert summaries[0]["frames_written"] == 6 and len(load(tmp_path / "ds")) == 6


def test_a_bad_frame_discards_its_episode_only(tmp_path):
    rec = new_recorder(tmp_path / "ds")
    for i in range(10):
        rec.add_frame(frame(0, i))
    rec.end_episode(success=True, reason="success")
    for i in range(10):  # a frame the dataset refuses (wrong state size) in the middle of episode 1
        rec.add_frame(frame(1, i, **({"observation.state": np.zeros(7, np.float32)} if i == 4 else {})))
    rec.end_episode(success=False, reason="failure")
    for i in range(8):
        rec.add_frame(frame(2, i))
    rec.end_episode(success=None, reason="estop")
    summary = rec.close(timeout_s=60)
    assert summary["episodes_saved"] == 2 and summary["episodes_discarded"] == 1 and summary["writer_errors"] >= 1
    assert summary["frames_written"] == 18 and summary["frames_discarded"] == 10 and summary["finalized"]
    ds = load(tmp_path / "ds")
    assert len(ds) == 18 and ds.num_episodes == 2
    assert int(ds[10]["policy_version"]) == 5  # episode 2's frames follow episode 0's
    np.testing.assert_allclose(ds[17]["observation.images.front"].mean(dim=(1, 2)).numpy() * 255, color(2, 7), atol=6)
    assert [line["reason"] for line in load_session_log(tmp_path / "ds")] == ["success", "estop"]


def test_an_existing_root_is_refused(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "keep.txt").write_text("a recorded session")
    with pytest.raises(FileExistsError, match="not empty"):
        new_recorder(root)
    assert (root / "keep.txt").read_text() == "a recorded session"
    with pytest.raises(ValueError, match="dataset.root"):
        DatasetConfig(root=str(root))
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory (made by the caller) is fine
    new_recorder(empty, use_videos=False).close()
    assert (empty / "meta" / "info.json").is_file()


def test_config_validates_and_resolves_defaults():
    from datetime import UTC, datetime

    cfg = DatasetConfig()
    assert cfg.enabled and cfg.video and cfg.vcodec == "h264" and cfg.queue_frames >= 1
    root, repo_id = cfg.resolve("robot 0", now=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert root == Path("outputs/edge/robot_0/sessions/20250102T030405Z") and repo_id == "local/robot_0"
    assert default_repo_id("robot-0") == "local/robot-0"
    assert DatasetConfig(root="/x/y", repo_id="me/set").resolve("r") == (Path("/x/y"), "me/set")
    for kwargs, field in (
        ({"queue_frames": 0}, "dataset.queue_frames"),
        ({"vcodec": "divx"}, "dataset.vcodec"),
        ({"repo_id": "no-owner"}, "dataset.repo_id"),
    ):
        with pytest.raises(ValueError, match=field):
            DatasetConfig(**kwargs)
    DatasetConfig(video=False, vcodec="divx")  # no video: the codec is not used


@pytest.mark.slow
def test_lerobot_train_pi_rl_on_a_session(recorded, tmp_path):
    root, _, _ = recorded
    out = tmp_path / "train"
    cmd = [
        str(REPO / ".venv" / "bin" / "lerobot-train"),
        f"--dataset.repo_id={REPO_ID}",
        f"--dataset.root={root}",
        "--dataset.video_backend=pyav",
        "--policy.type=pi_rl",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        "--steps=3",
        "--batch_size=4",
        "--num_workers=0",
        "--save_checkpoint=true",
        "--wandb.enable=false",
        f"--output_dir={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = out / "checkpoints" / "last" / "pretrained_model"
    assert (model / "model.safetensors").is_file()
    config = (model / "config.json").read_text()
    assert "observation.environment_state" in config and "policy_version" not in config


def test_a_one_frame_episode_is_not_kept_and_does_not_break_the_session(tmp_path):
    # LeRobot 0.6.1 cannot store a one-frame video episode beside longer ones (its metadata table breaks,
    # and every later save and finalize with it): an e-stop right after a start must not cost the session
    rec = new_recorder(tmp_path / "ds")
    for ep, length in enumerate((4, 1, 3)):
        for i in range(length):
            assert rec.add_frame(frame(ep, i))
        rec.end_episode(success=False, reason="estop" if length == 1 else "time_limit")
    summary = rec.close(timeout_s=120)
    assert summary["finalized"] and summary["error"] is None, summary
    assert summary["episodes_saved"] == 2 and summary["episodes_too_short"] == 1
    ds = load(tmp_path / "ds")
    assert ds.num_episodes == 2 and ds.num_frames == 7
