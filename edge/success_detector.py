"""A learned success detector on the edge: LeRobot's reward classifier scoring the robot's camera frames.

``pirl-success train`` (pirl_tools/success_detector.py) trains LeRobot's own ``reward_classifier``
(``lerobot.rewards.classifier.Classifier``) on recorded sessions and saves it the LeRobot way
(``config.json`` + ``model.safetensors`` + its pre/post-processors), with the vision backbone it was built on
in ``backbone/`` and a manifest, ``success_detector.json``: default threshold, cameras, label rule, the
datasets it was trained on and the sha256 of every file. This module loads such a directory and scores
robot observations:

- :func:`load_detector` verifies every file against the manifest before anything is deserialised (weights
  are read with safetensors only: nothing is unpickled, no ``torch.load``) and returns a
  :class:`LoadedDetector` that scores batches of images;
- :class:`SuccessDetector` runs it off the control thread: ``submit(raw_observation)`` hands the newest
  robot observation to a worker (an older one not yet scored is dropped), ``poll()`` says whether success
  was declared (``consecutive`` scored frames in a row above ``threshold``) and the latest score.

LeRobot's classifier builds its backbone with ``transformers.AutoModel.from_pretrained(model_name,
trust_remote_code=True)``; here ``model_name`` is pointed at the detector's own ``backbone/`` directory, so
loading needs neither the hub nor the training machine's paths, and any code a backbone carries (the hub's
``lerobot/resnet10`` is a custom-code model) runs only once its sha256 matched the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pirl.cli import require

log = logging.getLogger(__name__)

MANIFEST = "success_detector.json"
FORMAT = "pirl-success-detector/1"
BACKBONE_DIR = "backbone"
WEIGHTS = "model.safetensors"  # LeRobot's file name (huggingface_hub's SAFETENSORS_SINGLE_FILE)
PREPROCESSOR = "classifier_preprocessor.json"  # the name make_classifier_processor gives its pipeline
POSTPROCESSOR = "classifier_postprocessor.json"
IMAGE_PREFIX = "observation.images."  # a robot camera <name> is the dataset's observation.images.<name>
# files that could hold pickled code: never loaded, and a detector holding one is refused
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class DetectorConfig:
    """A learned success detector ending robot episodes as successes (the ``detector`` group of pirl-edge)."""

    # trained detector directory (pirl-success train --out); unset: no detector, episodes end as before
    path: str | None = None
    # a frame counts as a success when its score (the classifier's probability) is above this (default: the
    # threshold saved with the detector, 0.5 unless pirl-success train was told otherwise)
    threshold: float | None = None
    # success is declared after this many scored frames in a row above the threshold (one frame alone is
    # often a glitch: a hand, a reflection)
    consecutive: int = 3
    # torch device the detector runs on (cpu, cuda); on a 2-core robot computer it shares the CPU with the
    # control loop at a lower priority
    device: str = "cpu"

    def __post_init__(self):
        require(self, "detector", at_least={"consecutive": 1})
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"detector.threshold: must be in [0, 1] (got {self.threshold})")
        if self.path is not None and not Path(self.path).is_dir():
            raise ValueError(f"detector.path: {self.path} is not a directory (a pirl-success train --out)")
        if self.path is not None and not (Path(self.path) / MANIFEST).is_file():
            raise ValueError(f"detector.path: {self.path} has no {MANIFEST} (not a pirl-success train output)")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def detector_files(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of a detector directory but its manifest."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST:
            out[rel] = sha256_file(path)
    return out


def read_manifest(path: str | Path) -> dict:
    """The manifest of the detector at ``path``, after checking every file it lists against its sha256.

    ValueError / FileNotFoundError with one clear line: no such directory, no manifest, a file missing or
    changed, a file the manifest does not list inside ``backbone/`` (code there would run), a pickle file."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"detector: {root} is not a directory")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"detector: {root} has no {MANIFEST} (not a pirl-success train output)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"detector: {manifest_path} is not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ValueError(f"detector: {manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    files: dict[str, str] = manifest.get("files") or {}
    weights_sha = manifest.get("weights_sha256")
    if not weights_sha or files.get(WEIGHTS) != weights_sha:
        raise ValueError(f"detector: {manifest_path} lists no sha256 for {WEIGHTS}")
    for rel, want in files.items():
        file = root / rel
        if not file.is_file():
            raise FileNotFoundError(f"detector: {file} is missing")
        if sha256_file(file) != want:
            raise ValueError(f"detector: {file} does not match the sha256 in {MANIFEST} (changed or corrupt)")
    for file in root.rglob("*"):
        rel = file.relative_to(root).as_posix()
        if file.is_file() and file.suffix in _PICKLE_SUFFIXES:
            raise ValueError(f"detector: {file} is a pickle-format file; only safetensors weights are loaded")
        if file.is_file() and rel.startswith(BACKBONE_DIR + "/") and rel not in files:
            raise ValueError(f"detector: {file} is not listed in {MANIFEST} (backbone files may hold code)")
    return manifest


class LoadedDetector:
    """LeRobot's classifier with its preprocessor, loaded from a verified detector directory.

    ``score`` takes ``{"observation.images.<name>": float tensor (B, 3, H, W) in [0, 1]}`` at any resolution
    (the preprocessor resizes to the classifier's input size and normalises) and returns the success
    probability of each of the B frames."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch
        from lerobot.configs.rewards import RewardModelConfig
        from lerobot.processor import PolicyProcessorPipeline
        from lerobot.rewards.classifier import Classifier

        self.root = Path(path).resolve()
        self.manifest = read_manifest(self.root)  # before anything below reads a file
        self.camera_keys: list[str] = list(self.manifest["camera_keys"])
        self.camera_names = [k.removeprefix(IMAGE_PREFIX) for k in self.camera_keys]
        self.threshold: float = float(self.manifest["threshold"])
        self.consecutive: int = int(self.manifest.get("consecutive", 1))
        config = RewardModelConfig.from_pretrained(self.root)
        # the backbone travels inside the detector: build it from there, not from where it was trained
        config.model_name = str(self.root / BACKBONE_DIR)
        config.device = device
        config.pretrained_path = str(self.root)
        with _quiet_buffer_keys():
            self.model = Classifier.from_pretrained(self.root, config=config)
        self.model.eval()
        self.preprocessor = PolicyProcessorPipeline.from_pretrained(
            self.root, config_filename=PREPROCESSOR, overrides={"device_processor": {"device": device}}
        )
        self._torch = torch

    def score(self, images: dict) -> np.ndarray:
        """Success probability of each frame of the batch ``images`` (see the class docstring)."""
        missing = [k for k in self.camera_keys if k not in images]
        if missing:
            raise KeyError(f"detector: the batch lacks camera(s) {missing}")
        with self._torch.inference_mode():
            batch = self.preprocessor({k: images[k] for k in self.camera_keys})
            probs = self.model.predict([batch[k] for k in self.model.config.input_features if k in batch])
        return probs.probabilities.float().reshape(-1).cpu().numpy()

    def score_observation(self, raw_obs: dict) -> float:
        """Success probability of one robot observation (``robot.get_observation()``: a camera's key is its
        name, its value an HxWx3 uint8 array)."""
        return float(self.score(observation_to_batch(raw_obs, self.camera_names, self.camera_keys))[0])

    def check_cameras(self, available: list[str] | set[str]) -> None:
        """ValueError naming the cameras this detector scores that the robot does not have."""
        missing = [n for n in self.camera_names if n not in available]
        if missing:
            raise ValueError(
                f"detector.path: the detector scores camera(s) {missing}, the robot has {sorted(available)}"
            )


class _BufferKeysFilter(logging.Filter):
    """Drops LeRobot's "Unexpected key(s)" warning when it names only BatchNorm step counters: the
    classifier's backbone is registered twice (``encoder`` and inside each camera's ``encoders``) and the
    safetensors round trip leaves those counters (unused: BatchNorm runs in eval mode) under one name only."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.startswith("Unexpected key(s) when loading model"):
            return True
        keys = [k.strip(" '\"") for k in msg.split("[", 1)[-1].rstrip("]").split(",")]
        return not all(k.endswith("num_batches_tracked") for k in keys)


@contextlib.contextmanager
def _quiet_buffer_keys():
    root, flt = logging.getLogger(), _BufferKeysFilter()
    handlers = list(root.handlers)
    for h in handlers:
        h.addFilter(flt)
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)
        for h in handlers:
            h.removeFilter(flt)


def observation_to_batch(raw_obs: dict, camera_names: list[str], camera_keys: list[str]) -> dict:
    """``{dataset camera key: (1, 3, H, W) float tensor in [0, 1]}`` from a raw robot observation."""
    import torch

    batch = {}
    for name, key in zip(camera_names, camera_keys, strict=True):
        if name not in raw_obs:
            raise KeyError(f"detector: the observation has no camera {name!r} (has {sorted(raw_obs)})")
        img = np.asarray(raw_obs[name])
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"detector: camera {name!r} gave an array of shape {img.shape}, expected HxWx3")
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0)
        batch[key] = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    return batch


def load_detector(path: str | Path, device: str = "cpu") -> LoadedDetector:
    """The detector at ``path`` (pirl-success train --out), verified against its manifest first."""
    return LoadedDetector(path, device=device)


class SuccessDetector:
    """Scores robot observations on a worker thread and declares success after ``consecutive`` scored
    frames in a row above ``threshold``; the control thread never waits for it.

    ``submit`` only swaps the newest observation into a one-slot mailbox (an observation not yet scored is
    replaced and counted in ``dropped``), so when scoring is slower than the control loop, the frames
    scored are the newest ones and ``consecutive`` counts scored frames, which then span more time.
    ``poll`` returns ``(success, score)``: success stays True until ``reset()``, which the edge calls at
    each episode start (a score still in flight from the previous episode is then discarded). A scoring
    error is logged and counted (``errors``), never raised to the caller.
    """

    def __init__(
        self,
        scorer: Callable[[dict], float],
        *,
        threshold: float,
        consecutive: int,
        name: str = "pirl-success-detector",
        lower_priority: bool = True,
    ):
        """``scorer``: the success probability of one raw observation (``LoadedDetector.score_observation``;
        a test may pass any function)."""
        if consecutive < 1:
            raise ValueError(f"consecutive: must be >= 1 (got {consecutive})")
        self.threshold = float(threshold)
        self.consecutive = int(consecutive)
        self._scorer = scorer
        self._lower_priority = lower_priority
        self._cond = threading.Condition()
        self._pending: tuple[int, dict] | None = None  # (episode, observation) waiting to be scored
        self._episode = 0  # bumped by reset(): a result for an older episode is discarded
        self._streak = 0
        self._success = False
        self._score = float("nan")
        self._closed = False
        self.submitted = 0
        self.scored = 0
        self.dropped = 0
        self.errors = 0
        self.last_score_s = float("nan")  # seconds the last scoring took
        self.loaded: LoadedDetector | None = None  # the model behind the scorer (from_config)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: DetectorConfig, cameras: list[str] | set[str] | None = None) -> SuccessDetector:
        """The detector ``cfg.path`` names, loaded and verified; ``cfg.threshold`` unset takes the detector's.
        ``cameras``: the robot's camera names, checked against the detector's (ValueError naming the missing)."""
        if cfg.path is None:
            raise ValueError("detector.path: required to load a success detector")
        loaded = load_detector(cfg.path, device=cfg.device)
        if cameras is not None:
            loaded.check_cameras(cameras)
        threshold = loaded.threshold if cfg.threshold is None else cfg.threshold
        detector = cls(loaded.score_observation, threshold=threshold, consecutive=cfg.consecutive)
        detector.loaded = loaded
        log.info(
            "success detector %s: cameras %s, threshold %.3f, %d consecutive frame(s)",
            cfg.path,
            loaded.camera_names,
            threshold,
            cfg.consecutive,
        )
        return detector

    def submit(self, raw_obs: dict) -> None:
        """Hand the newest robot observation to the worker (the control thread's call: never waits for
        scoring). The arrays are kept by reference, not copied: the robot returns fresh ones each step."""
        with self._cond:
            if self._closed:
                return
            if self._pending is not None:
                self.dropped += 1
            self._pending = (self._episode, raw_obs)
            self.submitted += 1
            self._cond.notify()

    def poll(self) -> tuple[bool, float]:
        """(success declared this episode, latest score; NaN before the first frame is scored)."""
        with self._cond:
            return self._success, self._score

    def reset(self) -> None:
        """A new episode: forget the streak, the declared success, the latest score and any unscored frame."""
        with self._cond:
            self._episode += 1
            self._pending = None
            self._streak = 0
            self._success = False
            self._score = float("nan")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (a scoring in progress finishes first, up to ``timeout`` seconds). Idempotent."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def stats(self) -> dict:
        with self._cond:
            return {
                "submitted": self.submitted,
                "scored": self.scored,
                "dropped": self.dropped,
                "errors": self.errors,
                "last_score_s": self.last_score_s,
                "success": self._success,
                "score": self._score,
            }

    def __enter__(self) -> SuccessDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        if self._lower_priority:
            from edge.link import lower_thread_priority

            lower_thread_priority()  # the control loop keeps the CPU it needs; scoring takes what is left
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                episode, obs = self._pending
                self._pending = None
            start = time.perf_counter()
            try:
                score = float(self._scorer(obs))
            except Exception:  # noqa: BLE001 - a bad frame must not stop the detector, nor reach the loop
                with self._cond:
                    self.errors += 1
                log.exception("success detector: scoring a frame failed")
                continue
            with self._cond:
                self.last_score_s = time.perf_counter() - start
                if episode != self._episode:
                    continue  # scored for an episode that has since ended
                self.scored += 1
                self._score = score
                self._streak = self._streak + 1 if score > self.threshold else 0
                if self._streak >= self.consecutive:
                    self._success = True
