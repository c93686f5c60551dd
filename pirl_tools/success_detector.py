"""pirl-success: train LeRobot's reward classifier as a success detector on recorded robot sessions, and
measure how well it agrees with the sessions' recorded outcomes.

    pirl-success train --dataset.root=DIR[,DIR...] --out=DIR [--steps=2000] [--backbone=lerobot/resnet10]
                       [--success_frames=10] [--holdout_episodes=2] [--seed=0]
    pirl-success eval  --detector=DIR --dataset.root=DIR[,DIR...] --out=FILE.json [--episodes=holdout]
                       [--threshold=0.5] [--consecutive=3]

The sessions are the LeRobotDatasets pirl-edge records (edge/session_dataset.py): camera frames as
``observation.images.<name>``, each episode's outcome in ``next.success`` (its last frame) and in
``sessions.jsonl``. A frame's label (``frame_labels``, docs/success_detector.md): the last ``success_frames``
frames of a successful episode are positives; the ``ambiguous_frames`` before them are left out (the task
may already look done there, or not quite); every other frame is a negative. Episodes whose outcome is
unknown (aborted, cut short by the edge stopping) or was decided by the detector itself are left out.

Training is LeRobot's ``reward_classifier`` (``lerobot.rewards``: ``make_reward_model``,
``make_reward_pre_post_processors``, the config's own AdamW preset and its ``forward`` loss) in a short loop
here rather than ``lerobot-train``: lerobot-train trains a reward model on one dataset's ``next.reward``
column over all of its frames, which for a session is 1 on the single frame an episode succeeded at; the
label rule, class-balanced batches, held-out episodes and several session roots would each need a rewritten
copy of the videos. The result is saved the LeRobot way (``Classifier.from_pretrained`` loads it).
"""

from __future__ import annotations

import glob
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.success_detector import (
    BACKBONE_DIR,
    FORMAT,
    IMAGE_PREFIX,
    MANIFEST,
    WEIGHTS,
    detector_files,
    load_detector,
    sha256_file,
)
from pirl.cli import parse_config, require, run_cli, write_json

PROG = "pirl-success"
SUCCESS = "next.success"  # edge.session_dataset.SUCCESS (not imported: that pulls in the video encoder)
SESSION_LOG = "sessions.jsonl"
# the frame labels of frame_labels()
POSITIVE, NEGATIVE, EXCLUDED = 1, 0, -1
# sessions.jsonl "reason"s whose outcome is unknown: the operator aborted, or the edge stopped mid-episode
UNKNOWN_OUTCOME_REASONS = ("abort", "stop")
# the built-in backbone (--backbone=random): ResNet-10's shape (LeRobot's lerobot/resnet10: basic blocks,
# one per stage, 64..512 channels), randomly initialised from the seed; needs no download
RANDOM_BACKBONE = "random"
# LeRobot's classifier pools the backbone's last feature map with a learned 4x4 spatial embedding
# (SpatialLearnedEmbeddings(height=4, width=4)): the input size must bring the backbone to 4x4
FEATURE_MAP = 4
LABEL_RULE = (
    "successful episode: its last success_frames frames are positives, the ambiguous_frames before them are "
    "left out, earlier frames are negatives; failed episode: every frame is a negative; episodes with an "
    "unknown outcome (aborted, cut short by the edge stopping) or one decided by the detector are left out"
)

USAGE = f"usage: {PROG} {{train,eval}} [--help] [--field=value ...]"


@dataclass
class SessionsConfig:
    """The recorded sessions to read (the ``dataset`` group of pirl-success)."""

    # session dataset directory (pirl-edge's outputs/edge/<robot_id>/sessions/<UTC time>); several separated
    # by commas, or a glob pattern ('outputs/edge/arm/sessions/*'), read in sorted order (required)
    root: str | None = None
    # repo_id given to LeRobotDataset (metadata only: nothing is downloaded; default local/<directory name>)
    repo_id: str | None = None
    # LeRobot video decoder: pyav (always there) or torchcodec (needs FFmpeg's shared libraries)
    video_backend: str = "pyav"

    def __post_init__(self):
        if not self.root:
            raise ValueError("dataset.root: required (a session dataset directory)")
        if self.video_backend not in ("pyav", "torchcodec"):
            raise ValueError(f"dataset.video_backend: must be pyav or torchcodec (got {self.video_backend!r})")
        for root in self.roots():
            check_session_root(root)

    def roots(self) -> list[Path]:
        """The dataset directories, in the order given (a glob pattern expands sorted: sessions by time)."""
        out: list[Path] = []
        for part in (p.strip() for p in (self.root or "").split(",")):
            if not part:
                continue
            if glob.has_magic(part):
                matches = sorted(Path(m) for m in glob.glob(part) if Path(m).is_dir())
                if not matches:
                    raise ValueError(f"dataset.root: no directory matches {part}")
                out += matches
            else:
                out.append(Path(part))
        if not out:
            raise ValueError("dataset.root: required (a session dataset directory)")
        return out


def check_session_root(root: Path) -> dict:
    """The ``meta/info.json`` of a session dataset; ValueError naming what is wrong (a ValueError: a config's
    validation raises it, and parse_config turns it into one error line)."""
    if not root.is_dir():
        raise ValueError(f"dataset.root: {root} is not a directory")
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        raise ValueError(f"dataset.root: {root} is not a LeRobotDataset (no meta/info.json there)")
    info = json.loads(info_path.read_text())
    features = info.get("features", {})
    if not camera_keys_of(features):
        raise ValueError(
            f"dataset.root: {root} has no camera (no observation.images.* feature): the detector scores images"
        )
    if SUCCESS not in features:
        raise ValueError(f"dataset.root: {root} has no {SUCCESS} column (not a pirl-edge session dataset?)")
    return info


def camera_keys_of(features: dict) -> list[str]:
    return sorted(
        k for k, ft in features.items() if k.startswith(IMAGE_PREFIX) and ft.get("dtype") in ("video", "image")
    )


@dataclass
class TrainConfig:
    """pirl-success train: LeRobot's reward classifier trained as a success detector on recorded sessions."""

    # the recorded sessions to train on (--dataset.root=...)
    dataset: SessionsConfig = field(default_factory=SessionsConfig)
    # output directory of the detector (refused when it exists and is not empty) (required)
    out: str | None = None
    # optimiser steps (one class-balanced batch each)
    steps: int = 2000
    # frames per batch, half positives and half negatives (drawn with replacement)
    batch_size: int = 32
    # AdamW learning rate (LeRobot's reward_classifier default)
    learning_rate: float = 1e-4
    # vision backbone (frozen, as LeRobot's classifier keeps it): a Hugging Face model id
    # (lerobot/resnet10, LeRobot's default: needs the hub or its local cache), a local transformers model
    # directory (save_pretrained), or 'random' (ResNet-10's shape, randomly initialised: no download, weak
    # features; for trying the pipeline offline)
    backbone: str = "lerobot/resnet10"
    # camera frames are resized to image_size x image_size for the classifier (128 suits ResNet-10: its
    # 32x downsampling gives the 4x4 feature map LeRobot's classifier pools)
    image_size: int = 128
    # positives: the last success_frames frames of each successful episode
    success_frames: int = 10
    # frames just before those, left out of training (the task may already look done there, or not quite)
    ambiguous_frames: int = 10
    # the last holdout_episodes episodes (over all roots, in order) are not trained on; pirl-success eval
    # measures the detector on them
    holdout_episodes: int = 2
    # also learn from episodes whose outcome the detector itself decided (off: it would learn its own mistakes)
    include_detector_labels: bool = False
    # threshold saved with the detector: the default of pirl-success eval and pirl-edge --detector.threshold
    threshold: float = 0.5
    # consecutive frames above the threshold that declare success, saved with the detector as the default
    consecutive: int = 3
    # seed of the classifier's initialisation, the random backbone and the batches
    seed: int = 0
    # torch device to train on (cpu, cuda)
    device: str = "cpu"
    # print the loss and batch accuracy every log_every steps
    log_every: int = 50

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: required (the detector's output directory)")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"out: {out} exists and is not empty; a trained detector is never overwritten")
        require(
            self,
            at_least={
                "steps": 1,
                "batch_size": 2,
                "success_frames": 1,
                "ambiguous_frames": 0,
                "holdout_episodes": 0,
                "consecutive": 1,
                "log_every": 1,
            },
            above={"learning_rate": 0, "image_size": 0},
        )
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold: must be in [0, 1] (got {self.threshold})")


@dataclass
class EvalConfig:
    """pirl-success eval: how often a trained detector agrees with the recorded outcomes of sessions."""

    # trained detector directory (pirl-success train --out) (required)
    detector: str | None = None
    # the recorded sessions to evaluate on (--dataset.root=...)
    dataset: SessionsConfig = field(default_factory=SessionsConfig)
    # episodes to evaluate: 'holdout' (those the detector was not trained on: its held-out episodes of a root
    # it trained on, every episode of another root), 'all', or indices such as '3,5,8-12' (in every root)
    episodes: str = "holdout"
    # score above which a frame counts as a success (default: the detector's own)
    threshold: float | None = None
    # frames in a row above the threshold that make the detector fire in an episode (default: the detector's)
    consecutive: int | None = None
    # JSON report to write (required)
    out: str | None = None
    # frames scored per batch
    batch_size: int = 64
    # torch device to score on
    device: str = "cpu"
    # also count episodes whose outcome the detector decided (off: they would agree with it by construction)
    include_detector_labels: bool = False

    def __post_init__(self):
        parse_episodes(self.episodes)  # a typo fails here, before any loading
        if not self.detector:
            raise ValueError("detector: required (a pirl-success train output directory)")
        if not Path(self.detector).is_dir():
            raise ValueError(f"detector: {self.detector} is not a directory")
        if not (Path(self.detector) / MANIFEST).is_file():
            raise ValueError(f"detector: {self.detector} has no {MANIFEST} (not a pirl-success train output)")
        if not self.out:
            raise ValueError("out: required (the JSON report to write)")
        require(self, at_least={"consecutive": 1, "batch_size": 1})
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold: must be in [0, 1] (got {self.threshold})")


def parse_episodes(spec: str) -> str | set[int]:
    """'holdout' / 'all', or the set of episode indices of '3,5,8-12'."""
    if spec in ("holdout", "all"):
        return spec
    out: set[int] = set()
    try:
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
            if a < 0 or b < a:
                raise ValueError
            out.update(range(a, b + 1))
    except ValueError:
        raise ValueError(f"episodes: expected 'holdout', 'all' or indices like '3,5,8-12' (got {spec!r})") from None
    if not out:
        raise ValueError(f"episodes: no episode in {spec!r}")
    return out


# ── the sessions ─────────────────────────────────────────────────────────


@dataclass
class Episode:
    """One recorded episode: where its frames are and how it ended."""

    root: Path
    index: int  # episode_index in its dataset
    rows: np.ndarray  # its frames' positions in the dataset, in order
    success: bool | None  # None: unknown (aborted, cut short), never labelled
    decided_by: str | None  # who decided the outcome (sessions.jsonl "label"), when recorded

    @property
    def length(self) -> int:
        return len(self.rows)


class Sessions:
    """The episodes of one or more session datasets, and their frames decoded on demand."""

    def __init__(self, cfg: SessionsConfig):
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        self.roots = cfg.roots()
        self.datasets: dict[Path, LeRobotDataset] = {}
        self.episodes: list[Episode] = []
        cameras = None
        for root in self.roots:
            info = check_session_root(root)
            keys = camera_keys_of(info["features"])
            if cameras is not None and keys != cameras:
                raise ValueError(f"dataset.root: {root} has cameras {keys}, {self.roots[0]} has {cameras}")
            cameras = keys
            repo_id = cfg.repo_id or f"local/{root.resolve().name}"
            ds = LeRobotDataset(repo_id, root=root, video_backend=cfg.video_backend, return_uint8=True)
            self.datasets[root] = ds
            self.episodes += _episodes_of(root, ds)
        self.camera_keys: list[str] = cameras or []

    def frames(self, episode: Episode, positions: np.ndarray | None = None) -> dict[str, list]:
        """``{camera key: [uint8 tensor (3, H, W)]}`` of the episode's frames (``positions`` in the episode,
        default all)."""
        ds = self.datasets[episode.root]
        rows = episode.rows if positions is None else episode.rows[positions]
        out: dict[str, list] = {k: [] for k in self.camera_keys}
        for row in rows:
            item = ds[int(row)]
            for k in self.camera_keys:
                out[k].append(item[k])
        return out


def _episodes_of(root: Path, ds) -> list[Episode]:
    cols = ds.hf_dataset.select_columns(["episode_index", "frame_index", SUCCESS]).with_format("numpy")
    ep_index = np.asarray(cols["episode_index"]).reshape(-1)
    frame_index = np.asarray(cols["frame_index"]).reshape(-1)
    success_col = np.asarray(cols[SUCCESS]).reshape(-1).astype(bool)
    log = {line["episode_index"]: line for line in _session_log(root)}
    episodes = []
    for index in np.unique(ep_index):
        rows = np.flatnonzero(ep_index == index)
        rows = rows[np.argsort(frame_index[rows], kind="stable")]
        line = log.get(int(index))
        if line is None:  # no session log (another recorder): the frames' own next.success
            success, decided_by = bool(success_col[rows].any()), None
        elif line.get("reason") in UNKNOWN_OUTCOME_REASONS or line.get("success") is None:
            success, decided_by = None, line.get("label")
        else:
            success, decided_by = bool(line["success"]), line.get("label")
        episodes.append(Episode(root, int(index), rows, success, decided_by))
    return episodes


def _session_log(root: Path) -> list[dict]:
    path = root / SESSION_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def usable(episode: Episode, include_detector_labels: bool) -> bool:
    """Whether an episode has a ground truth to learn from or to be measured against."""
    if episode.success is None:
        return False
    return include_detector_labels or (episode.decided_by or "").lower() != "detector"


def frame_labels(length: int, success: bool, success_frames: int, ambiguous_frames: int) -> np.ndarray:
    """The label of each frame of an episode (POSITIVE, NEGATIVE or EXCLUDED): see LABEL_RULE."""
    labels = np.full(length, NEGATIVE, dtype=np.int8)
    if success:
        pos_start = max(0, length - success_frames)
        labels[max(0, pos_start - ambiguous_frames) : pos_start] = EXCLUDED
        labels[pos_start:] = POSITIVE
    return labels


# ── train ────────────────────────────────────────────────────────────────


def _resize(images: list, size: int):
    """uint8 (N, 3, size, size) from a list of uint8 (3, H, W): torchvision's resize, as LeRobot's
    image_crop_resize_processor (in the detector's preprocessor) does it at inference."""
    import torch
    import torchvision.transforms.functional as F  # noqa: N812 - torchvision's own name

    batch = torch.stack(images).float().div_(255.0)
    if batch.shape[-2:] != (size, size):
        batch = F.resize(batch, [size, size]).clamp_(0.0, 1.0)
    return batch.mul_(255.0).round_().to(torch.uint8)


def _prepare_backbone(name: str, dest: Path, seed: int) -> None:
    """The backbone saved (config + safetensors weights, with its code when it is a custom-code model) in
    ``dest``: the detector carries it, so loading it needs no hub and no path of this machine."""
    import torch

    if name == RANDOM_BACKBONE:
        from transformers import ResNetConfig, ResNetModel

        torch.manual_seed(seed)
        config = ResNetConfig(
            num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1], layer_type="basic"
        )
        ResNetModel(config).save_pretrained(dest)
    else:
        from transformers import AutoModel

        try:
            # as LeRobot's Classifier loads it (trust_remote_code: lerobot/resnet10 is a custom-code model)
            model = AutoModel.from_pretrained(name, trust_remote_code=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"backbone: cannot load {name!r} ({first}); without the Hugging Face hub pass a local transformers "
                f"model directory, or --backbone={RANDOM_BACKBONE} (randomly initialised: for trying the pipeline)"
            ) from None
        model.save_pretrained(dest)
    if not (dest / WEIGHTS).is_file():
        raise ValueError(f"backbone: {name!r} was not saved as {WEIGHTS} (safetensors only)")


def _check_feature_map(model, image_size: int, camera_key: str) -> None:
    import torch

    encoder = model.encoders[camera_key.replace(".", "_")][0]
    was_training = encoder.training
    encoder.eval()  # a probe: BatchNorm's running statistics must not see it
    with torch.no_grad():
        out = encoder(torch.zeros(1, 3, image_size, image_size))
    encoder.train(was_training)
    h, w = out.last_hidden_state.shape[-2:]
    if (h, w) != (FEATURE_MAP, FEATURE_MAP):
        suggest = image_size * FEATURE_MAP // max(h, 1)
        raise ValueError(
            f"image_size: the backbone maps {image_size}x{image_size} images to a {h}x{w} feature map; LeRobot's "
            f"classifier needs {FEATURE_MAP}x{FEATURE_MAP} (try --image_size={suggest})"
        )


def split_episodes(episodes: list[Episode], holdout: int) -> tuple[list[Episode], list[Episode]]:
    """(training episodes, held-out episodes): the last ``holdout`` episodes over all roots are held out."""
    if holdout >= len(episodes):
        raise ValueError(
            f"holdout_episodes: {holdout} leaves nothing to train on ({len(episodes)} episode(s) recorded)"
        )
    cut = len(episodes) - holdout
    return episodes[:cut], episodes[cut:]


def train(cfg: TrainConfig) -> dict:
    """Train, save the detector to ``cfg.out`` and, with held-out episodes, evaluate it there. Returns the
    manifest. A failure removes what it wrote (``out`` was empty or absent: nothing of anyone else's)."""
    out = Path(cfg.out).resolve()
    existed = out.exists()
    try:
        return _train(cfg, out)
    except BaseException:
        if out.is_dir() and not (out / MANIFEST).is_file():
            shutil.rmtree(out, ignore_errors=True)
            if existed:
                out.mkdir(parents=True, exist_ok=True)
        raise


def _train(cfg: TrainConfig, out: Path) -> dict:
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.hil_processor import ImageCropResizeProcessorStep
    from lerobot.rewards import make_reward_model, make_reward_pre_post_processors
    from lerobot.rewards.classifier import RewardClassifierConfig
    from lerobot.utils.constants import REWARD
    from lerobot.utils.random_utils import set_seed

    started = time.perf_counter()
    sessions = Sessions(cfg.dataset)
    train_eps, holdout_eps = split_episodes(sessions.episodes, cfg.holdout_episodes)
    kept = [e for e in train_eps if usable(e, cfg.include_detector_labels)]
    print(
        f"[success] {len(sessions.episodes)} episode(s) in {len(sessions.roots)} session(s); training on "
        f"{len(kept)} ({sum(bool(e.success) for e in kept)} successful), {len(train_eps) - len(kept)} left out "
        f"(unknown outcome or decided by the detector), {len(holdout_eps)} held out; cameras {sessions.camera_keys}"
    )
    set_seed(cfg.seed)
    (out / BACKBONE_DIR).mkdir(parents=True, exist_ok=True)
    _prepare_backbone(cfg.backbone, out / BACKBONE_DIR, cfg.seed)
    shape = (3, cfg.image_size, cfg.image_size)
    config = RewardClassifierConfig(
        model_name=str(out / BACKBONE_DIR),
        num_cameras=len(sessions.camera_keys),
        device=cfg.device,
        learning_rate=cfg.learning_rate,
        input_features={k: PolicyFeature(type=FeatureType.VISUAL, shape=shape) for k in sessions.camera_keys},
        output_features={REWARD: PolicyFeature(type=FeatureType.REWARD, shape=(1,))},
    )
    model = make_reward_model(config)
    _check_feature_map(model, cfg.image_size, sessions.camera_keys[0])
    # the labelled frames, decoded once and kept resized (uint8): ~49 KB a frame per camera at 128x128
    images: dict[str, list] = {k: [] for k in sessions.camera_keys}
    labels: list[np.ndarray] = []
    for i, ep in enumerate(kept):
        ep_labels = frame_labels(ep.length, bool(ep.success), cfg.success_frames, cfg.ambiguous_frames)
        keep = np.flatnonzero(ep_labels != EXCLUDED)
        frames = sessions.frames(ep, keep)
        for k in sessions.camera_keys:
            images[k].append(_resize(frames[k], cfg.image_size))
        labels.append(ep_labels[keep])
        if (i + 1) % 10 == 0 or i + 1 == len(kept):
            print(f"[success] decoded {i + 1}/{len(kept)} episode(s) ({time.perf_counter() - started:.1f} s)")
    y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int8)
    positives, negatives = np.flatnonzero(y == POSITIVE), np.flatnonzero(y == NEGATIVE)
    if len(positives) == 0:
        raise ValueError("dataset.root: no successful episode to train on (next.success is never true there)")
    if len(negatives) == 0:
        raise ValueError("dataset.root: no negative frame to train on (record failed episodes too)")
    cache = {k: torch.cat(v) for k, v in images.items()}
    print(f"[success] {len(positives)} positive and {len(negatives)} negative frame(s)")

    # normalisation stats of the training frames as LeRobot keeps them for images: per channel, (3, 1, 1)
    stats = {}
    for k, v in cache.items():
        x = v.float().div_(255.0)
        stats[k] = {
            "mean": x.mean(dim=(0, 2, 3)).reshape(3, 1, 1),
            "std": x.std(dim=(0, 2, 3)).reshape(3, 1, 1),
            "min": x.amin(dim=(0, 2, 3)).reshape(3, 1, 1),
            "max": x.amax(dim=(0, 2, 3)).reshape(3, 1, 1),
        }
    pre, post = make_reward_pre_post_processors(config, dataset_stats=stats)
    # the saved preprocessor resizes camera frames itself (LeRobot's image_crop_resize_processor), so a
    # frame at the camera's resolution scores as the frames here were trained
    pre = PolicyProcessorPipeline(
        steps=[ImageCropResizeProcessorStep(resize_size=(cfg.image_size, cfg.image_size)), *pre.steps], name=pre.name
    )
    optimizer = config.get_optimizer_preset().build(model.get_optim_params())

    rng = np.random.default_rng(cfg.seed)
    half = cfg.batch_size // 2
    model.train()
    window: list[tuple[float, float]] = []
    for step in range(1, cfg.steps + 1):
        # class-balanced: positives are a few frames an episode, negatives the rest
        idx = np.concatenate([rng.choice(positives, half), rng.choice(negatives, cfg.batch_size - half)])
        batch = {k: v[idx].float().div_(255.0) for k, v in cache.items()}
        batch[REWARD] = torch.as_tensor(y[idx], dtype=torch.float32)
        batch = pre(batch)
        loss, info = model.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad()
        window.append((loss.item(), info["accuracy"] / 100.0))
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_avg, acc_avg = np.mean(window, axis=0)
            window.clear()
            print(
                f"[success] step {step}/{cfg.steps}  loss {loss_avg:.4f}  batch accuracy {acc_avg:.3f}  "
                f"({time.perf_counter() - started:.1f} s)"
            )
    model.eval()

    model.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    files = detector_files(out)
    manifest = {
        "format": FORMAT,
        "threshold": cfg.threshold,
        "consecutive": cfg.consecutive,
        "camera_keys": sessions.camera_keys,
        "camera_names": [k.removeprefix(IMAGE_PREFIX) for k in sessions.camera_keys],
        "image_size": cfg.image_size,
        "backbone": cfg.backbone,
        "label_rule": {
            "success_frames": cfg.success_frames,
            "ambiguous_frames": cfg.ambiguous_frames,
            "include_detector_labels": cfg.include_detector_labels,
            "rule": LABEL_RULE,
        },
        "datasets": [
            {
                "root": str(root.resolve()),
                "repo_id": sessions.datasets[root].repo_id,
                "episodes": sessions.datasets[root].meta.total_episodes,
                "frames": sessions.datasets[root].meta.total_frames,
                "trained_on": [e.index for e in kept if e.root == root],
                "held_out": [e.index for e in holdout_eps if e.root == root],
            }
            for root in sessions.roots
        ],
        "training": {
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "seed": cfg.seed,
            "positive_frames": int(len(positives)),
            "negative_frames": int(len(negatives)),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "weights_sha256": sha256_file(out / WEIGHTS),
        "files": files,
    }
    # the manifest is written last: a directory without one is an unfinished training
    write_json(out / MANIFEST, manifest)
    print(f"[success] detector saved to {out} ({time.perf_counter() - started:.1f} s)")
    held = [e for e in holdout_eps if usable(e, cfg.include_detector_labels)]
    if held:
        report = evaluate_episodes(
            load_detector(out, device=cfg.device), sessions, held, cfg.threshold, cfg.consecutive
        )
        write_json(out / "eval_holdout.json", report)
        _print_report(report, out / "eval_holdout.json")
    else:
        print("[success] no held-out episode with a known outcome: nothing evaluated (see --holdout_episodes)")
    return manifest


# ── eval ─────────────────────────────────────────────────────────────────


def _metrics(tp: int, fp: int, tn: int, fn: int) -> dict:
    n = tp + fp + tn + fn
    return {
        "count": n,
        "accuracy": (tp + tn) / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "confusion": {"true_positive": tp, "false_positive": fp, "true_negative": tn, "false_negative": fn},
    }


def first_fire(scores: np.ndarray, threshold: float, consecutive: int) -> int | None:
    """The frame at which ``consecutive`` frames in a row are above ``threshold`` (SuccessDetector's rule)."""
    streak = 0
    for i, s in enumerate(scores):
        streak = streak + 1 if s > threshold else 0
        if streak >= consecutive:
            return i
    return None


def evaluate_episodes(detector, sessions: Sessions, episodes: list[Episode], threshold, consecutive, batch=64) -> dict:
    """Per-episode and per-frame agreement of ``detector`` with the recorded outcomes of ``episodes``."""
    import torch

    rule = detector.manifest["label_rule"]
    per_episode, frame_counts = [], {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    ep_counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for n, ep in enumerate(episodes):
        scores = []
        for start in range(0, ep.length, batch):
            frames = sessions.frames(ep, np.arange(start, min(start + batch, ep.length)))
            images = {k: torch.stack(v).float().div_(255.0) for k, v in frames.items()}
            scores.append(detector.score(images))
        scores = np.concatenate(scores)
        fired_at = first_fire(scores, threshold, consecutive)
        fired, truth = fired_at is not None, bool(ep.success)
        ep_counts[("t" if fired == truth else "f") + ("p" if fired else "n")] += 1
        labels = frame_labels(ep.length, truth, rule["success_frames"], rule["ambiguous_frames"])
        pred = scores > threshold
        for lab, p in zip(labels, pred, strict=True):
            if lab != EXCLUDED:
                frame_counts[("t" if p == (lab == POSITIVE) else "f") + ("p" if p else "n")] += 1
        per_episode.append(
            {
                "dataset": str(ep.root),
                "episode_index": ep.index,
                "frames": ep.length,
                "recorded_success": truth,
                "fired": fired,
                "fired_at_frame": fired_at,
                # how long before the episode's recorded end it fired: large values in a successful episode
                # mean it would have ended the episode before the task was done
                "frames_before_end": None if fired_at is None else ep.length - 1 - fired_at,
                "max_score": float(scores.max()),
                "last_score": float(scores[-1]),
            }
        )
        print(f"[success] scored {n + 1}/{len(episodes)} episode(s)")
    c = ep_counts
    f = frame_counts
    return {
        "detector": str(detector.root),
        "threshold": threshold,
        "consecutive": consecutive,
        "label_rule": rule,
        "episodes": [f"{e.root}#{e.index}" for e in episodes],
        "per_episode": {**_metrics(c["tp"], c["fp"], c["tn"], c["fn"]), "episodes": per_episode},
        "per_frame": _metrics(f["tp"], f["fp"], f["tn"], f["fn"]),
    }


def select_episodes(sessions: Sessions, manifest: dict, spec: str | set[int], include_detector_labels: bool):
    """The episodes ``--episodes`` names that have a known outcome (see EvalConfig.episodes)."""
    held_out = {Path(d["root"]).resolve(): set(d["held_out"]) for d in manifest.get("datasets", [])}
    out = []
    for ep in sessions.episodes:
        root = ep.root.resolve()
        if spec == "holdout":
            chosen = ep.index in held_out[root] if root in held_out else True
        else:
            chosen = spec == "all" or ep.index in spec
        if chosen and usable(ep, include_detector_labels):
            out.append(ep)
    return out


def evaluate(cfg: EvalConfig) -> dict:
    detector = load_detector(cfg.detector, device=cfg.device)
    sessions = Sessions(cfg.dataset)
    if sessions.camera_keys != detector.camera_keys:
        missing = sorted(set(detector.camera_keys) - set(sessions.camera_keys))
        if missing:
            raise ValueError(f"dataset.root: the detector scores camera(s) {missing}, the sessions have none of them")
    episodes = select_episodes(sessions, detector.manifest, parse_episodes(cfg.episodes), cfg.include_detector_labels)
    if not episodes:
        raise ValueError(
            f"episodes: no episode with a known outcome selected by --episodes={cfg.episodes} "
            "(the detector holds out none of these sessions' episodes? try --episodes=all)"
        )
    threshold = detector.threshold if cfg.threshold is None else cfg.threshold
    consecutive = detector.consecutive if cfg.consecutive is None else cfg.consecutive
    report = evaluate_episodes(detector, sessions, episodes, threshold, consecutive, cfg.batch_size)
    write_json(Path(cfg.out), report)
    _print_report(report, Path(cfg.out))
    return report


def _print_report(report: dict, path: Path) -> None:
    def fmt(m: dict) -> str:
        def pct(v):
            return "n/a" if v is None else f"{v:.3f}"

        c = m["confusion"]
        return (
            f"accuracy {pct(m['accuracy'])}  precision {pct(m['precision'])}  recall {pct(m['recall'])}  "
            f"(tp {c['true_positive']} fp {c['false_positive']} tn {c['true_negative']} fn {c['false_negative']})"
        )

    print(f"[success] per episode ({report['per_episode']['count']}): {fmt(report['per_episode'])}")
    print(f"[success] per frame   ({report['per_frame']['count']}): {fmt(report['per_frame'])}")
    print(f"[success] report: {path}")


# ── command line ─────────────────────────────────────────────────────────


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(f"{USAGE}\n  train: train a success detector on recorded sessions\n  eval: measure one on sessions")
        sys.exit(0)
    command, rest = (args[0], args[1:]) if args else (None, [])
    if command == "train":
        train_cfg = parse_config(TrainConfig, prog=f"{PROG} train", args=rest)
        run_cli(lambda: train(train_cfg) and None)
    elif command == "eval":
        eval_cfg = parse_config(EvalConfig, prog=f"{PROG} eval", args=rest)
        run_cli(lambda: evaluate(eval_cfg) and None)
    else:
        what = "a command is required" if command is None else f"unknown command {command!r}"
        print(f"{PROG}: error: {what} (train or eval); {USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
