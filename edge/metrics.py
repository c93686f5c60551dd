"""Edge Prometheus metrics (prefix pirl_edge_, base units, label robot_id / backend only)."""

import os
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from edge.spool import QUARANTINE_DIR

TICKS = Counter("pirl_edge_ticks_total", "Control ticks", ["robot_id"])
DEADLINE_MISSES = Counter(
    "pirl_edge_tick_deadline_misses_total", "Ticks that started late or had no action ready", ["robot_id"]
)
CONTROL_RATE = Gauge("pirl_edge_control_rate_hz", "Achieved control rate over the last second", ["robot_id"])
# the rate the paced loop aims at (control.hz), so one alert rule serves robots with different rates
CONTROL_TARGET = Gauge("pirl_edge_control_target_hz", "Control rate the paced loop aims at (control.hz)", ["robot_id"])
INFERENCE_LATENCY = Histogram(
    "pirl_edge_inference_latency_seconds",
    "One chunk inference (prefix + K denoise steps)",
    ["robot_id", "backend"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
)
POLICY_VERSION = Gauge("pirl_edge_policy_version", "Policy version the control loop runs", ["robot_id"])
SECONDS_SINCE_SYNC = Gauge(
    "pirl_edge_seconds_since_last_sync", "Seconds since the last successful learner contact", ["robot_id"]
)
SYNC_LATENCY = Histogram(
    "pirl_edge_sync_latency_seconds",
    "Publish-to-serving latency of a new policy version",
    ["robot_id"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SPOOL_RECORDS = Gauge("pirl_edge_spool_records", "Rollout records waiting in the spool", ["robot_id"])
SPOOL_BYTES = Gauge("pirl_edge_spool_bytes", "Bytes waiting in the spool", ["robot_id"])
SPOOL_OLDEST_AGE = Gauge("pirl_edge_spool_oldest_record_age_seconds", "Age of the oldest unacked record", ["robot_id"])
# A gauge of what sits in quarantine/ (never deleted automatically, so it survives restarts: most
# quarantining happens when the spool is opened after a crash, where a counter born at N shows no
# increase()), and a counter of what this process moved there.
SPOOL_QUARANTINE_FILES = Gauge(
    "pirl_edge_spool_quarantine_files",
    "Files in the spool's quarantine/ directory: records lost to corruption (torn or "
    "corrupted files, never uploaded), kept until someone removes them",
    ["robot_id"],
)
SPOOL_QUARANTINED = Counter(
    "pirl_edge_spool_quarantined_total",
    "Spool files this process moved to quarantine/ (at open or when read)",
    ["robot_id"],
)
RECORDS_SENT = Counter("pirl_edge_records_sent_total", "Records sent to the learner (resends included)", ["robot_id"])
RECORDS_ACKED = Counter("pirl_edge_records_acked_total", "Records acked by the learner", ["robot_id"])
RECORDS_REFUSED = Counter("pirl_edge_records_refused_total", "Records not kept, by reason", ["robot_id", "reason"])
BACKEND = Gauge("pirl_edge_backend_info", "Inference backend in use (1 for the active one)", ["robot_id", "backend"])
BACKEND_REQUESTED = Gauge(
    "pirl_edge_backend_requested_info", "Inference backend asked for with --backend (1 for it)", ["robot_id", "backend"]
)
BACKEND_FALLBACKS = Counter(
    "pirl_edge_backend_fallbacks_total",
    "A requested backend could not load and a slower one serves instead, by the backend that failed",
    ["robot_id", "backend"],
)
SWAP_FAILURES = Counter(
    "pirl_edge_swap_failures_total",
    "Policy versions refused (hash mismatch, load error, backend prepare error, golden-input mismatch)",
    ["robot_id"],
)
PREPARE_SECONDS = Histogram(
    "pirl_edge_backend_prepare_seconds",
    "Preparing the spare backend for a new version, off the control thread "
    "(a new ONNX Runtime session; a TensorRT refit, build or engine load)",
    ["robot_id", "backend"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
TRT_REFITS = Counter(
    "pirl_edge_tensorrt_refits_total", "New versions served by refitting a TensorRT engine", ["robot_id"]
)
TRT_BUILDS = Counter(
    "pirl_edge_tensorrt_builds_total", "New versions that needed a TensorRT engine build", ["robot_id"]
)
TRT_LOADS = Counter(
    "pirl_edge_tensorrt_engine_loads_total",
    "New versions served by an engine built for exactly them (the learner's, or cached)",
    ["robot_id"],
)
TRT_REFIT_FAILURES = Counter(
    "pirl_edge_tensorrt_refit_failures_total",
    "TensorRT refits that failed (a build or cached engine was used instead)",
    ["robot_id"],
)
SWAPS = Counter("pirl_edge_policy_swaps_total", "Policy versions swapped in", ["robot_id"])
# robot mode (edge/robot_loop.py): the episode protocol
EPISODE_PHASE = Gauge(
    "pirl_edge_episode_phase",
    "Phase of the robot's episode protocol (1 for the current one: reset, wait, run, return, estop)",
    ["robot_id", "phase"],
)
EPISODES = Counter(
    "pirl_edge_episodes_total",
    "Robot episodes ended, by how (success, failure, abort, time_limit, operator_end, estop, watchdog, stop)",
    ["robot_id", "reason"],
)
EPISODE_LABELS = Counter(
    "pirl_edge_episode_labels_total",
    "Robot episodes by who decided the outcome (env, operator, detector, time_limit) and the verdict "
    "(success, failure, abort)",
    ["robot_id", "source", "verdict"],
)
INTERVENTIONS = Counter(
    "pirl_edge_interventions_total",
    "Times a person took over the robot with the teleoperator",
    ["robot_id"],
)
TELEOP_TICKS = Counter(
    "pirl_edge_teleop_ticks_total",
    "Control ticks a person's teleoperator drove (through the safety layer)",
    ["robot_id"],
)
INTERVENED_STEPS = Counter(
    "pirl_edge_intervened_steps_total",
    "Macro-steps a teleoperator drove any tick of (never PPO data; BC data from their first tick)",
    ["robot_id"],
)
STEPS_AFTER_LABEL = Counter(
    "pirl_edge_steps_after_label_total",
    "Macro-steps that ran after the moment a person's back-dated label judged (episode.label_reaction_s): "
    "in the session dataset, never sent to the learner",
    ["robot_id"],
)
INTERVENING = Gauge(
    "pirl_edge_intervening",
    "1 while a person drives the robot through the teleoperator",
    ["robot_id"],
)
DATASET_FRAMES_DROPPED = Counter(
    "pirl_edge_dataset_frames_dropped_total",
    "Frames of the session dataset dropped because its writer fell behind (the control loop never waits)",
    ["robot_id"],
)
RESET_TIMEOUTS = Counter(
    "pirl_edge_reset_timeouts_total",
    "Moves to the reset pose that did not arrive in episode.reset_timeout_s",
    ["robot_id"],
)


_TRT_METHOD_COUNTERS = {
    "refit": TRT_REFITS,
    "cache_refit": TRT_REFITS,
    "build": TRT_BUILDS,
    "cache": TRT_LOADS,
    "published": TRT_LOADS,
}


def record_prepare(robot_id: str, backend: str, entry: dict) -> None:
    """Metrics of one prepared version (an ``InferenceWorker.prepare_log`` entry)."""
    if "prepare_seconds" in entry:
        PREPARE_SECONDS.labels(robot_id, backend).observe(entry["prepare_seconds"])
    if backend != "tensorrt":
        return
    counter = _TRT_METHOD_COUNTERS.get(entry.get("method"))
    if counter is not None:
        counter.labels(robot_id).inc()
    failed_refits = sum(1 for f in entry.get("failed", []) if f.startswith(("refit:", "cache_refit:")))
    if failed_refits:
        TRT_REFIT_FAILURES.labels(robot_id).inc(failed_refits)


def spool_quarantine_hook(robot_id: str) -> Callable[[Path], None]:
    """``Spool(on_quarantine=...)``: counts every file the spool moves to quarantine/ in
    pirl_edge_spool_quarantined_total (exported at 0 from now on)."""
    counter = SPOOL_QUARANTINED.labels(robot_id)
    return lambda _dest: counter.inc()


QUARANTINE_RECOUNT_S = 5.0
_quarantine_counts: dict[str, tuple[float, int, int]] = {}  # dir -> (monotonic time, spool's count, files)


def update_spool_quarantine(robot_id: str, spool, stats: dict | None = None) -> None:
    """Set pirl_edge_spool_quarantine_files to the number of files in the spool's quarantine/.

    The directory is counted (cheap, it is small) whenever the spool's own count (``stats()
    ["quarantined"]``: found at open + moved since) changed, and at least every
    ``QUARANTINE_RECOUNT_S`` seconds otherwise, so files an operator removed after inspecting them
    clear the gauge (and the alert) without restarting the edge; callers may run this every few ms.
    """
    seen = (stats if stats is not None else spool.stats())["quarantined"]
    qdir = Path(spool.directory) / QUARANTINE_DIR
    key, now = str(qdir), time.monotonic()
    last = _quarantine_counts.get(key)
    if last is not None and last[1] == seen and now - last[0] < QUARANTINE_RECOUNT_S:
        files = last[2]
    else:
        try:
            with os.scandir(qdir) as it:
                files = sum(1 for _ in it)
        except FileNotFoundError:
            files = 0
        except OSError:
            files = seen  # unreadable: what the spool knows
        _quarantine_counts[key] = (now, seen, files)
    SPOOL_QUARANTINE_FILES.labels(robot_id).set(files)


# ---- safety layer and operator inputs (edge/safety.py, edge/operator_inputs.py) -------------------------------
# Every command to the motors passes the safety layer; these count what it changed or refused, so a
# policy that keeps pushing against its bounds, stalls, or a robot that keeps being e-stopped shows.
SAFETY_CLAMPED_TICKS = Counter(
    "pirl_edge_safety_clamped_ticks_total",
    "Ticks whose command had at least one dim clamped to the action bounds",
    ["robot_id"],
)
SAFETY_LIMITED_TICKS = Counter(
    "pirl_edge_safety_jump_limited_ticks_total",
    "Ticks whose command had at least one dim limited to max_delta from the last sent command",
    ["robot_id"],
)
SAFETY_HELD_TICKS = Counter(
    "pirl_edge_safety_held_ticks_total",
    "Ticks without a usable policy action, the last command repeated, by reason (no_action: none ready; "
    "nonfinite: NaN or inf in it)",
    ["robot_id", "reason"],
)
SAFETY_WATCHDOG_TRIPS = Counter(
    "pirl_edge_safety_watchdog_trips_total",
    "Control-loop stalls: no tick for safety.watchdog_s (one per stall)",
    ["robot_id"],
)
SAFETY_ESTOPS = Counter(
    "pirl_edge_safety_estops_total",
    "E-stops latched, by the source that latched it (key, http, sigusr1, watchdog, ...)",
    ["robot_id", "source"],
)
SAFETY_ESTOP_LATCHED = Gauge("pirl_edge_safety_estop_latched", "1 while an e-stop is latched", ["robot_id"])
SAFETY_ESTOP_ACTIONS = Counter(
    "pirl_edge_safety_estop_actions_total",
    "E-stop actions applied to the robot, by what was done (torque_off, hold, none: nothing to hold, "
    "failed: the robot call raised)",
    ["robot_id", "action"],
)
