"""The edge's success detector (edge/success_detector.py): LeRobot's reward classifier trained by
``pirl-success train`` on a session the edge's own recorder wrote, loaded back after a sha256 check (a
tampered or unlisted file is refused before anything is deserialised), scoring raw robot observations; and
the non-blocking detector around it (newest frame wins, ``consecutive`` scored frames above the threshold,
``reset`` per episode), with a stub scorer where the logic, not the model, is under test.

The session: 48x48 frames of dark noise; in a successful episode a bright square appears for its last
frames. The backbone is a tiny randomly initialised transformers ResNet saved in the test (no hub)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from lerobot.utils.feature_utils import hw_to_dataset_features

from edge.session_dataset import SessionRecorder
from edge.success_detector import (
    MANIFEST,
    WEIGHTS,
    DetectorConfig,
    SuccessDetector,
    load_detector,
    read_manifest,
)
from pirl_tools.success_detector import SessionsConfig, TrainConfig, frame_labels, train

IMG = 48
LENGTH = 12
SHOWN = 4  # frames at the end of a successful episode that show the square
OUTCOMES = [True, False, True, False, True, False, True, False]


def camera_frame(rng: np.random.Generator, success: bool) -> np.ndarray:
    img = rng.integers(0, 60, (IMG, IMG, 3), dtype=np.uint8)
    if success:
        img[12:36, 12:36] = 255
    return img


def record_session(root: Path, outcomes=OUTCOMES, seed: int = 0) -> Path:
    """A session as pirl-edge records it (SessionRecorder: h264 video, sessions.jsonl)."""
    obs = {"joint.pos": float, "front": (IMG, IMG, 3)}
    features = {
        **hw_to_dataset_features(obs, "observation", use_video=True),
        **hw_to_dataset_features({"x.vel": float}, "action", use_video=True),
    }
    rec = SessionRecorder(root, repo_id="local/arm", fps=10, robot_type="so101_follower", features=features, task="t")
    rng = np.random.default_rng(seed)
    for success in outcomes:
        for i in range(LENGTH):
            rec.add_frame(
                {
                    "observation.state": np.array([i], np.float32),
                    "observation.images.front": camera_frame(rng, success and i >= LENGTH - SHOWN),
                    "action": np.zeros(1, np.float32),
                }
            )
        rec.end_episode(success=success, reason="success" if success else "failure")
    summary = rec.close()
    assert summary["episodes_saved"] == len(outcomes) and summary["finalized"], summary
    return root


def tiny_backbone(path: Path) -> Path:
    """A two-stage ResNet (8x downsampling: 32x32 images give LeRobot's 4x4 feature map), saved like any
    transformers model."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(path)
    return path


def train_config(session: Path, backbone: Path, out: Path, **kw) -> TrainConfig:
    kw = {
        "steps": 40,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "image_size": 32,
        "success_frames": SHOWN,
        "ambiguous_frames": 2,
        "holdout_episodes": 2,
        "log_every": 20,
        **kw,
    }
    return TrainConfig(dataset=SessionsConfig(root=str(session)), out=str(out), backbone=str(backbone), **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(detector dir, session root): a detector trained on a recorded session, its last 2 episodes held out."""
    tmp = tmp_path_factory.mktemp("success")
    session = record_session(tmp / "session")
    out = tmp / "detector"
    train(train_config(session, tiny_backbone(tmp / "backbone"), out))
    return out, session


def copy_detector(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ── the trained detector ─────────────────────────────────────────────────


def test_training_saves_a_lerobot_classifier_with_its_manifest(trained):
    out, session = trained
    manifest = read_manifest(out)
    assert manifest["camera_keys"] == ["observation.images.front"] and manifest["camera_names"] == ["front"]
    assert manifest["threshold"] == 0.5 and manifest["consecutive"] == 3
    assert manifest["label_rule"]["success_frames"] == SHOWN
    (ds,) = manifest["datasets"]
    assert ds["root"] == str(session.resolve()) and ds["trained_on"] == [0, 1, 2, 3, 4, 5] and ds["held_out"] == [6, 7]
    assert manifest["files"][WEIGHTS] == manifest["weights_sha256"]
    # LeRobot's own loaders read it as it lies (its config names the backbone inside the detector)
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.rewards.classifier import Classifier

    model = Classifier.from_pretrained(out)
    pre = PolicyProcessorPipeline.from_pretrained(out, config_filename="classifier_preprocessor.json")
    assert model.config.model_name == str(out.resolve() / "backbone")
    assert [s.__class__.__name__ for s in pre.steps][0] == "ImageCropResizeProcessorStep"
    # the held-out episodes were evaluated at the end of training
    assert (out / "eval_holdout.json").is_file()


def test_the_loaded_detector_tells_success_frames_from_the_rest(trained):
    out, _ = trained
    detector = load_detector(out)
    rng = np.random.default_rng(123)
    # a raw robot observation: camera name -> HxWx3 uint8, at any resolution (the preprocessor resizes)
    success = [detector.score_observation({"front": camera_frame(rng, True)}) for _ in range(4)]
    failure = [detector.score_observation({"front": camera_frame(rng, False)}) for _ in range(4)]
    assert min(success) > 0.5 > max(failure), (success, failure)
    with pytest.raises(KeyError, match="no camera 'front'"):
        detector.score_observation({"wrist": camera_frame(rng, True)})
    with pytest.raises(ValueError, match="wrist"):
        detector.check_cameras({"wrist"})


def test_success_is_declared_after_consecutive_frames_of_the_trained_detector(trained):
    out, _ = trained
    rng = np.random.default_rng(7)
    with SuccessDetector.from_config(DetectorConfig(path=str(out), consecutive=3)) as det:
        assert det.threshold == 0.5  # the detector's own
        for i, shown in enumerate([False, False, True, True, False, True, True, True]):
            det.submit({"front": camera_frame(rng, shown), "joint.pos": 0.0})
            wait_scored(det, i + 1)
            success, score = det.poll()
            assert (score > 0.5) == shown
            assert success == (i == 7), i  # the third bright frame in a row, not the two before


def test_a_tampered_weights_file_is_refused(trained, tmp_path):
    det = copy_detector(trained[0], tmp_path / "det")
    data = bytearray((det / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (det / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match the sha256"):
        load_detector(det)


def test_unlisted_backbone_files_and_pickles_are_refused(trained, tmp_path):
    det = copy_detector(trained[0], tmp_path / "det")
    (det / "backbone" / "modeling_evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ValueError, match="not listed"):
        load_detector(det)
    det = copy_detector(trained[0], tmp_path / "det2")
    (det / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        load_detector(det)
    det = copy_detector(trained[0], tmp_path / "det3")
    (det / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        load_detector(det)


# ── the label rule ───────────────────────────────────────────────────────


def test_label_rule():
    assert frame_labels(8, True, 3, 2).tolist() == [0, 0, 0, -1, -1, 1, 1, 1]
    assert frame_labels(8, False, 3, 2).tolist() == [0] * 8
    assert frame_labels(4, True, 3, 2).tolist() == [-1, 1, 1, 1]  # a short episode: what fits


# ── the non-blocking detector (stub scorers) ─────────────────────────────


def wait_scored(det: SuccessDetector, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while det.stats()["scored"] + det.stats()["errors"] < n:
        assert time.monotonic() < deadline, det.stats()
        time.sleep(0.001)


def test_consecutive_frames_above_threshold_declare_success_until_reset():
    with SuccessDetector(lambda obs: obs["s"], threshold=0.5, consecutive=3, lower_priority=False) as det:
        assert det.poll()[0] is False and np.isnan(det.poll()[1])
        for i, s in enumerate([0.9, 0.9, 0.1, 0.9, 0.6, 0.51], 1):
            det.submit({"s": s})
            wait_scored(det, i)
            assert det.poll() == (i == 6, s), i
        det.submit({"s": 0.0})  # declared success stays declared for the rest of the episode
        wait_scored(det, 7)
        assert det.poll() == (True, 0.0)
        det.reset()
        success, score = det.poll()
        assert success is False and np.isnan(score)
        det.submit({"s": 0.9})
        wait_scored(det, 8)
        assert det.poll() == (False, 0.9)  # the streak restarted with the episode
        with pytest.raises(ValueError):
            SuccessDetector(lambda obs: 1.0, threshold=0.5, consecutive=0)


def test_submit_never_waits_and_the_newest_frame_wins():
    gate, seen, entered = threading.Event(), [], threading.Event()

    def slow(obs):
        entered.set()
        gate.wait(10)
        seen.append(obs["i"])
        return 1.0

    det = SuccessDetector(slow, threshold=0.5, consecutive=1, lower_priority=False)
    try:
        det.submit({"i": 0})
        assert entered.wait(5)  # the worker is busy with frame 0
        start = time.perf_counter()
        for i in range(1, 6):
            det.submit({"i": i})
        assert time.perf_counter() - start < 0.05  # the control thread never waits for scoring
        gate.set()
        wait_scored(det, 2)
        assert seen == [0, 5] and det.stats()["dropped"] == 4
    finally:
        gate.set()
        det.close()
    det.close()  # idempotent
    det.submit({"i": 9})  # after close: ignored


def test_a_score_in_flight_when_the_episode_resets_is_discarded():
    gate, entered = threading.Event(), threading.Event()

    def slow(obs):
        entered.set()
        gate.wait(10)
        return 1.0

    with SuccessDetector(slow, threshold=0.5, consecutive=1, lower_priority=False) as det:
        det.submit({})
        assert entered.wait(5)
        det.reset()
        gate.set()
        deadline = time.monotonic() + 5
        while np.isnan(det.stats()["last_score_s"]):  # NaN until the in-flight scoring has finished
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert det.poll()[0] is False and det.stats()["scored"] == 0


def test_a_scorer_error_is_counted_not_raised():
    def bad(obs):
        raise RuntimeError("camera frame unreadable")

    with SuccessDetector(bad, threshold=0.5, consecutive=1, lower_priority=False) as det:
        det.submit({})
        wait_scored(det, 1)
        assert det.stats()["errors"] == 1 and det.poll()[0] is False


def test_detector_config_validates():
    assert DetectorConfig().path is None
    with pytest.raises(ValueError, match="detector.consecutive"):
        DetectorConfig(consecutive=0)
    with pytest.raises(ValueError, match="detector.threshold"):
        DetectorConfig(threshold=1.5)
    with pytest.raises(ValueError, match="detector.path"):
        DetectorConfig(path="/nonexistent/detector")
