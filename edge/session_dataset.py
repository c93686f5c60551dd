"""Every robot session of the edge is a local LeRobotDataset v3.

The control thread hands each step's frame to a :class:`SessionRecorder` and goes on: ``add_frame`` only
puts the frame in a bounded queue (a full queue drops the frame and counts it, it never waits). One writer
thread owns the dataset: it adds the frames, saves every episode, and finalizes the dataset on ``close()``,
the way ``lerobot-record`` does (``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` /
``finalize``), so a session trains with ``lerobot-train`` like any recorded dataset.

Camera frames are streamed into the video encoder while the episode runs (``lerobot-record
--dataset.streaming_encoding=true``). Measured on 2 CPU cores with one 640x480 camera at 30 Hz, the writer's
CPU per frame is 5.6 ms this way with h264 (11.6 ms with LeRobot's default codec, libsvtav1), against ~48 ms
through LeRobot's default PNG-then-encode path and ~84 ms as PNG images (which cannot keep up at 30 Hz);
saving an episode then takes ~0.3 s after its last frame, whatever its length.

Beside the LeRobot columns the robot gives (``observation.*``, ``action``), each frame carries the edge's
own: the policy version that produced the action, LeRobot's ``next.reward`` / ``next.done`` (as
``gym_manipulator`` records them), ``next.success`` and the safety flags of the step. LeRobot's training
reads only ``observation.*`` and ``action`` as policy features (``dataset_to_policy_features`` skips every
other column), so these travel with the data without reaching the policy. Each saved episode also gets a
line in ``<root>/sessions.jsonl``: why it ended, its success, its frames and the policy versions it used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from lerobot.configs.video import VALID_VIDEO_CODECS, RGBEncoderConfig
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.datasets.video_utils import StreamingVideoEncoder
from lerobot.utils.constants import DONE, REWARD

from pirl.cli import require

logger = logging.getLogger(__name__)

SUCCESS = "next.success"
POLICY_VERSION = "policy_version"
SAFETY_FLAGS = ("safety.clamped", "safety.limited", "safety.held", "safety.estop", "safety.watchdog")
# the frame's action came from a person's teleoperator, not the policy (LeRobot's HIL-SERL marks it the same way)
INTERVENTION = "intervention"
# why an episode ended (end_episode's reason); any other string is kept as given
END_REASONS = ("time_limit", "operator_end", "estop", "watchdog", "success", "failure", "abort", "stop")
SESSION_LOG = "sessions.jsonl"
# shorter episodes are not kept: a one-frame episode breaks LeRobot 0.6.1's episode metadata (its image
# stats take another shape), and with it every later save and finalize() of the session
MIN_EPISODE_FRAMES = 2

# The edge's columns. None of them starts with "observation" or "action", so LeRobot's
# dataset_to_policy_features leaves them out of the policy's features (pi_rl accepts STATE/VISUAL/ENV only).
# The value is what a frame that does not give the column gets: -1 = no policy (e.g. an operator drove).
EDGE_FEATURES: dict[str, tuple[dict, object]] = {
    POLICY_VERSION: ({"dtype": "int64", "shape": (1,), "names": None}, -1),
    REWARD: ({"dtype": "float32", "shape": (1,), "names": None}, 0.0),
    DONE: ({"dtype": "bool", "shape": (1,), "names": None}, False),
    SUCCESS: ({"dtype": "bool", "shape": (1,), "names": None}, False),
    **{flag: ({"dtype": "bool", "shape": (1,), "names": None}, False) for flag in SAFETY_FLAGS},
    INTERVENTION: ({"dtype": "bool", "shape": (1,), "names": None}, False),
}

# libx264 at "ultrafast" was the cheapest encoder measured here at LeRobot's crf (libx265 gets its
# ultrafast too); other codecs keep LeRobot's preset (libsvtav1's default, 12, is already its fastest).
_CPU_CHEAP_PRESETS = {"h264": "ultrafast", "hevc": "ultrafast"}
# One encoder thread per camera: on a 2-core robot computer the other core belongs to the control loop.
_ENCODER_THREADS = 1
# The writer (and the encoder threads it starts, which inherit it) runs at a lower CPU priority than the
# control thread: on Linux a thread's nice value is its own.
_WRITER_NICE = 10


@dataclass
class DatasetConfig:
    """Every robot session recorded as a local LeRobotDataset v3 (the ``dataset`` group of pirl-edge)."""

    # record every robot session as a LeRobotDataset (robot mode; a simulation run records nothing)
    enabled: bool = True
    # dataset directory (default: outputs/edge/<robot_id>/sessions/<UTC time>); an existing non-empty
    # directory is refused, a recorded session is never overwritten
    root: str | None = None
    # parent directory of the per-session datasets when root is unset: <sessions_dir>/<UTC time> (default
    # outputs/edge/<robot_id>/sessions; in the edge container, a volume)
    sessions_dir: str | None = None
    # repo_id written in the dataset's metadata (default: local/<robot_id>); nothing is ever pushed to the hub
    repo_id: str | None = None
    # camera frames as MP4 video, encoded while the episode runs (LeRobot's streaming encoding); false: PNG
    # images inside the parquet files (about 15x the writer's CPU and 60x the disk at 640x480)
    video: bool = True
    # video codec, one of LeRobot's (h264, hevc, libsvtav1, libaom-av1, auto, hardware ones such as
    # h264_nvenc); h264 (libx264, ultrafast preset) is the cheapest CPU encoder measured on 2 cores, LeRobot's
    # default libsvtav1 costs ~2x its CPU per frame
    vcodec: str = "h264"
    # frames buffered between the control thread and the dataset writer (~2.5 s at 50 Hz; 0.9 MB a frame
    # per 640x480 camera); when it is full a new frame is dropped, counted and logged: the control thread
    # never waits for the disk or the encoder
    queue_frames: int = 128

    def __post_init__(self):
        require(self, "dataset", at_least={"queue_frames": 1})
        if self.repo_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id):
            raise ValueError(f"dataset.repo_id: expected 'owner/name' (got {self.repo_id!r})")
        if self.root is not None and _is_non_empty(Path(self.root)):
            raise ValueError(f"dataset.root: {self.root} exists and is not empty; a session is never overwritten")
        if self.enabled and self.video:
            if self.vcodec not in VALID_VIDEO_CODECS:
                raise ValueError(f"dataset.vcodec: must be one of {sorted(VALID_VIDEO_CODECS)} (got {self.vcodec!r})")
            try:
                rgb_encoder(self.vcodec)  # is the encoder in this machine's FFmpeg?
            except ValueError as e:
                raise ValueError(f"dataset.vcodec: {e}") from e

    def resolve(self, robot_id: str, now: datetime | None = None) -> tuple[Path, str]:
        """(root, repo_id) of this session: the configured ones, else the defaults for ``robot_id``."""
        root = Path(self.root) if self.root else default_session_root(robot_id, now, self.sessions_dir)
        return root, self.repo_id or default_repo_id(robot_id)


def default_session_root(robot_id: str, now: datetime | None = None, sessions_dir: str | None = None) -> Path:
    """``<sessions_dir>/<UTC time>`` (default ``outputs/edge/<robot_id>/sessions/<UTC time>``): one new
    directory per session."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    parent = Path(sessions_dir) if sessions_dir else Path("outputs") / "edge" / _safe_name(robot_id) / "sessions"
    return parent / stamp


def default_repo_id(robot_id: str) -> str:
    """``local/<robot_id>``: a name for the metadata only (the dataset stays local)."""
    return f"local/{_safe_name(robot_id)}"


def rgb_encoder(vcodec: str) -> RGBEncoderConfig:
    """LeRobot's encoder settings for camera videos with ``vcodec`` at its CPU-cheap preset (ValueError when
    this machine's FFmpeg lacks the encoder). GOP 2 (random access while training) and crf 30 stay LeRobot's."""
    return RGBEncoderConfig(vcodec=vcodec, preset=_CPU_CHEAP_PRESETS.get(vcodec))


def session_features(dataset_features: dict, *, use_videos: bool) -> dict:
    """The features to create a session's dataset with: the robot's LeRobot dataset features
    (``hw_to_dataset_features`` of its observation and action features) with cameras stored as video or
    images per ``use_videos``, plus the edge's columns (``EDGE_FEATURES``). Idempotent."""
    features = {}
    for key, ft in dataset_features.items():
        ft = dict(ft)
        if ft["dtype"] in ("image", "video"):
            ft["dtype"] = "video" if use_videos else "image"
        features[key] = ft
    for key, (spec, _) in EDGE_FEATURES.items():
        given = features.get(key)
        if given is not None and (given["dtype"] != spec["dtype"] or tuple(given["shape"]) != spec["shape"]):
            raise ValueError(f"feature {key!r} is the edge's own column ({spec['dtype']} {spec['shape']}); got {given}")
        features[key] = dict(spec)
    return features


def load_session_log(root: str | Path) -> list[dict]:
    """The lines of ``<root>/sessions.jsonl``: one per saved episode, in order."""
    path = Path(root) / SESSION_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class SessionRecorder:
    """Records one robot session as a LeRobotDataset v3 at ``root``, off the control thread.

    ``add_frame`` / ``end_episode`` only enqueue; one writer thread does all the writing and encoding. A
    writer error is logged and counted and discards that episode (the dataset stays loadable); it never
    reaches the caller. ``close`` saves a partly recorded episode, finalizes the dataset and reports.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        repo_id: str,
        fps: int,
        robot_type: str | None,
        features: dict,
        task: str,
        use_videos: bool = True,
        vcodec: str = "h264",
        queue_frames: int = 128,
        on_drop: Callable[[], None] | None = None,
    ):
        """``features``: the robot's dataset features (edge columns are added, see ``session_features``).
        ``task``: the episodes' task string (a frame's own ``"task"`` overrides it). ``on_drop``: called on
        the control thread for every dropped frame (e.g. a metrics counter); it must be cheap."""
        if queue_frames < 1:
            raise ValueError(f"queue_frames: must be >= 1 (got {queue_frames})")
        self.root = Path(root)
        if _is_non_empty(self.root):
            raise FileExistsError(
                f"dataset root {self.root} exists and is not empty; a recorded session is never overwritten "
                "(choose another dataset.root)"
            )
        if self.root.is_dir():
            self.root.rmdir()  # LeRobot creates the directory itself and refuses an existing one
        self.repo_id = repo_id
        self.use_videos = use_videos
        self._task = task
        self.features = session_features(features, use_videos=use_videos)
        has_videos = use_videos and any(ft["dtype"] == "video" for ft in self.features.values())
        self._ds = _SessionDataset.create(
            repo_id,
            fps=fps,
            features=self.features,
            root=self.root,
            robot_type=robot_type,
            use_videos=use_videos,
            rgb_encoder=rgb_encoder(vcodec) if has_videos else None,
            encoder_threads=_ENCODER_THREADS,
            streaming_encoding=has_videos,
        )
        self._capacity = queue_frames
        self._on_drop = on_drop
        # No lock between the threads: SimpleQueue's put is reentrant (close() may run in a signal handler that
        # interrupted add_frame on the same thread), and each counter below has a single writer thread, so the
        # queue depth is frames_in - frames_out.
        self._items: queue.SimpleQueue[tuple[str, dict]] = queue.SimpleQueue()
        self._frames_in = 0  # control thread
        self._frames_out = 0  # writer thread
        self._frames_dropped = 0  # control thread
        self._close_requested = False
        # writer side (only the writer thread changes these)
        self.frames_written = 0
        self.frames_discarded = 0
        self.episodes_saved = 0
        self.episodes_discarded = 0
        self.episodes_too_short = 0  # under MIN_EPISODE_FRAMES frames: not kept (see _end_episode)
        self.writer_errors = 0
        self.finalized = False
        self._error: str | None = None
        self._held: dict | None = None  # the latest frame, held back until we know whether it ends its episode
        self._ep = _EpisodeState()
        self._drops_logged = 0
        self._drops_before = 0
        self._thread = threading.Thread(target=self._run, name="session-dataset-writer", daemon=True)
        self._thread.start()

    # ── control thread ────────────────────────────────────────────────

    def add_frame(self, frame: dict) -> bool:
        """Queue one step's frame (numpy arrays as the robot returns them, images HxWx3 uint8, plus the edge
        columns; missing edge columns take their defaults). False when it was dropped: queue full or closed.
        Arrays are copied here, so the caller may reuse its buffers. Call it (and ``end_episode``) from one
        thread, the control thread."""
        if self._close_requested or self._frames_in - self._frames_out >= self._capacity:
            self._frames_dropped += 1
            if self._on_drop is not None:
                with contextlib.suppress(Exception):  # a metrics hook must not break the control loop
                    self._on_drop()
            return False
        self._frames_in += 1
        self._items.put(("frame", {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in frame.items()}))
        return True

    def end_episode(self, *, success: bool | None, reason: str, label: str | None = None) -> None:
        """End the current episode (reason: one of ``END_REASONS``, e.g. "time_limit", "estop"; label: who
        decided its outcome, e.g. "operator", kept in sessions.jsonl); the writer marks its last frame done (and
        its success when given) and saves it."""
        if not self._close_requested:
            payload = {"success": success, "reason": reason, "dropped": self._frames_dropped, "label": label}
            self._items.put(("end", payload))

    def close(self, timeout_s: float = 60.0) -> dict:
        """Flush the queue, save a partly recorded episode (done, reason "stop"), finalize the dataset and
        return ``summary()``; its ``error`` says what failed (a writer still busy after ``timeout_s``: the
        dataset is not finalized). Idempotent; safe to call from a signal handler of the main thread."""
        if not self._close_requested:
            self._close_requested = True
            self._items.put(("close", {"success": None, "reason": "stop", "dropped": self._frames_dropped}))
        self._thread.join(timeout_s)
        if self._thread.is_alive() and self._error is None:
            logger.error(
                "session dataset %s: writer still busy after %.0f s; dataset not finalized", self.root, timeout_s
            )
            return {**self.summary(), "error": f"writer still busy after {timeout_s:.0f} s: dataset not finalized"}
        return self.summary()

    @property
    def frames_dropped(self) -> int:
        return self._frames_dropped

    def size_bytes(self) -> int:
        """Bytes the dataset takes on disk now."""
        total = 0
        for path in self.root.rglob("*"):
            try:
                if path.is_file():
                    total += path.stat().st_size
            except OSError:  # a temporary file the writer just removed
                continue
        return total

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "repo_id": self.repo_id,
            "video": self.use_videos,
            "frames_written": self.frames_written,
            "frames_dropped": self._frames_dropped,
            "frames_discarded": self.frames_discarded,
            "episodes_saved": self.episodes_saved,
            "episodes_discarded": self.episodes_discarded,
            "episodes_too_short": self.episodes_too_short,
            "writer_errors": self.writer_errors,
            "size_bytes": self.size_bytes(),
            "finalized": self.finalized,
            "error": self._error,
        }

    # ── writer thread ─────────────────────────────────────────────────

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # not Linux: same priority, still off the control thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _WRITER_NICE)
        while True:
            kind, payload = self._items.get()
            if kind == "frame":
                self._frames_out += 1
            self._log_drops()
            if kind == "close":
                break
            try:
                if kind == "frame":
                    self._on_frame(payload)
                else:
                    self._end_episode(payload["success"], payload["reason"], payload["dropped"], payload.get("label"))
            except Exception:  # noqa: BLE001 - the writer outlives any one item
                self.writer_errors += 1
                logger.exception("session dataset %s: writer error", self.root)
        try:
            if self._held is not None or self._ep.frames:
                self._end_episode(payload["success"], payload["reason"], payload["dropped"])  # a partial episode
        except Exception:  # noqa: BLE001
            self.writer_errors += 1
            logger.exception("session dataset %s: saving the last episode failed", self.root)
        self._log_drops()
        self._finalize()

    def _on_frame(self, frame: dict) -> None:
        try:
            row = self._row(frame)
        except Exception as e:  # noqa: BLE001 - a bad frame discards its episode, never the loop
            self._fail(f"bad frame: {e}")
            self._ep.frames += 1  # counted with its discarded episode
            row = None
        if self._held is not None:
            self._add(self._held)
        self._held = row

    def _row(self, frame: dict) -> dict:
        """The frame as LeRobot's add_frame takes it: edge columns filled in, numbers in the features' dtypes."""
        row = dict(frame)
        row.setdefault("task", self._task)
        for key, (spec, default) in EDGE_FEATURES.items():
            row[key] = np.asarray(row.get(key, default), dtype=spec["dtype"]).reshape(spec["shape"])
        for key, ft in self.features.items():
            if key in EDGE_FEATURES or ft["dtype"] in ("image", "video", "string") or key not in row:
                continue
            value = row[key]
            if not isinstance(value, np.ndarray) or value.dtype != np.dtype(ft["dtype"]):
                row[key] = np.asarray(value, dtype=ft["dtype"])
        return row

    def _add(self, row: dict) -> None:
        self._ep.frames += 1
        if self._ep.broken:
            return
        try:
            self._ds.add_frame(row)
            self._ep.versions.add(int(row[POLICY_VERSION][0]))
        except Exception as e:  # noqa: BLE001
            self._fail(f"add_frame: {e}")

    def _end_episode(self, success: bool | None, reason: str, dropped_total: int, label: str | None = None) -> None:
        # the control thread counts drops in all; this episode's are those since the previous end
        dropped, self._drops_before = dropped_total - self._drops_before, dropped_total
        if self._held is not None:
            # the episode's last frame is done whatever the caller's frame said (LeRobot's next.done)
            self._held[DONE] = np.ones(1, dtype=bool)
            if success is not None:
                self._held[SUCCESS] = np.full(1, bool(success))
            self._add(self._held)
            self._held = None
        ep, self._ep = self._ep, _EpisodeState()
        if ep.frames == 0:
            return  # nothing recorded: nothing to save
        if ep.frames < MIN_EPISODE_FRAMES:
            # LeRobot 0.6.1 stores a one-frame episode's image stats with another shape, and every later
            # save_episode and finalize() then fail on the metadata table: such an episode is not kept
            self.episodes_too_short += 1
            self.frames_discarded += ep.frames
            logger.warning("session dataset %s: a %d-frame episode is not kept (%s)", self.root, ep.frames, reason)
            self._clear_buffer()
            return
        if not ep.broken:
            index = self._ds.meta.total_episodes
            try:
                self._ds.save_episode()
            except Exception as e:  # noqa: BLE001
                ep.broken = True
                self.writer_errors += 1
                logger.exception("session dataset %s: saving episode %d failed: %s", self.root, index, e)
            else:
                self.episodes_saved += 1
                self.frames_written += ep.frames
                self._log_episode(index, reason, success, ep, dropped, label)
                return
        self.episodes_discarded += 1
        self.frames_discarded += ep.frames
        logger.error("session dataset %s: episode of %d frames discarded (%s)", self.root, ep.frames, reason)
        self._clear_buffer()

    def _clear_buffer(self) -> None:
        try:
            self._ds.clear_episode_buffer()
        except Exception:  # noqa: BLE001
            logger.exception("session dataset %s: clearing the discarded episode failed", self.root)

    def _fail(self, message: str) -> None:
        """First error of an episode: log it; the rest of the episode is skipped and it is discarded at its end."""
        self.writer_errors += 1
        if not self._ep.broken:
            logger.error("session dataset %s: %s; the episode will be discarded", self.root, message)
        self._ep.broken = True

    def _log_episode(
        self, index: int, reason: str, success: bool | None, ep: _EpisodeState, dropped: int, label: str | None
    ) -> None:
        line = {
            "episode_index": index,
            "reason": reason,
            "success": success,
            "label": label,
            "frames": ep.frames,
            "frames_dropped": dropped,
            "policy_versions": sorted(ep.versions),
            "end_time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            with open(self.root / SESSION_LOG, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            self.writer_errors += 1
            logger.error("session dataset %s: writing %s failed: %s", self.root, SESSION_LOG, e)

    def _log_drops(self) -> None:
        # drops are logged here, on the writer thread: the control thread does no I/O, not even a log line
        dropped = self._frames_dropped
        if dropped > self._drops_logged:
            logger.warning(
                "session dataset %s: writer queue full, %d frame(s) dropped (%d in all)",
                self.root,
                dropped - self._drops_logged,
                dropped,
            )
            self._drops_logged = dropped

    def _finalize(self) -> None:
        try:
            self._ds.finalize()
            self.finalized = True
        except Exception as e:  # noqa: BLE001
            self._error = f"finalize failed: {e}"
            logger.exception("session dataset %s: finalize failed", self.root)


@dataclass
class _EpisodeState:
    """What the writer knows of the episode being recorded."""

    frames: int = 0
    broken: bool = False  # an error happened: the rest is skipped, the episode discarded at its end
    versions: set[int] = field(default_factory=set)


class _NoDropStreamingEncoder(StreamingVideoEncoder):
    """LeRobot's streaming encoder drops a camera frame when its queue stays full for 0.1 s, which leaves the
    episode's video shorter than its parquet rows (a dataset whose frames fail to decode). The writer thread
    waits for room instead, so the recorder's own queue is the one place where frames are dropped (and
    counted); the control thread never waits either way."""

    def feed_frame(self, video_key: str, image: np.ndarray) -> None:
        frames, thread = self._frame_queues.get(video_key), self._threads.get(video_key)
        while frames is not None and frames.full() and thread.is_alive():
            time.sleep(0.002)
        super().feed_frame(video_key, image)


class _SessionDataset(LeRobotDataset):
    """A LeRobotDataset whose streaming encoder never drops a frame (loads as a plain LeRobotDataset)."""

    @staticmethod
    def _build_streaming_encoder(fps, rgb_encoder, depth_encoder, encoder_queue_maxsize, encoder_threads):
        return _NoDropStreamingEncoder(
            fps=fps,
            rgb_encoder=rgb_encoder,
            depth_encoder=depth_encoder,
            queue_maxsize=encoder_queue_maxsize,
            encoder_threads=encoder_threads,
        )


def _is_non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _safe_name(robot_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", robot_id) or "robot"
