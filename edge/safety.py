"""The safety layer between the policy and a real robot's motors, the e-stop and the control-loop watchdog.

Nothing the policy outputs reaches ``robot.send_action`` without ``SafetyLayer.filter``: each tick the
action is clamped to the action bounds, then limited to ``max_delta`` from the last command actually
sent; a tick without a fresh action repeats the last command. An e-stop always wins: once latched,
``filter`` returns no command at all, ``EStopResponder`` applies the robot's e-stop action once, and
only an explicit release clears it.

Units: bounds and ``max_delta`` are in the units of the action the robot receives (``send_action``'s
dict, after the policy's postprocessor unnormalized it), e.g. degrees, or LeRobot's -100..100 range,
for a Feetech / Dynamixel arm's ``<motor>.pos``; ``max_delta`` is per control tick, so the fastest
allowed motion is ``max_delta * control.hz`` units per second.

Threads: the control thread calls ``filter`` (pure numpy, a few microseconds); any thread, or a signal
handler, may call ``EStop.trigger``; the watchdog runs its own daemon thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from edge import metrics
from pirl.cli import require

log = logging.getLogger(__name__)

ESTOP_ACTIONS = ("hold", "torque_off")
BOUNDS_SOURCES = ("config", "dataset", "robot", "none")


@dataclass
class SafetyConfig:
    """What may reach the robot's motors: action bounds, jump limit, watchdog and e-stop."""

    # lowest command of every action dim, in the robot's action order and units (with action_max; overrides
    # the dataset's and the robot's bounds)
    action_min: list[float] | None = None
    # highest command of every action dim (with action_min)
    action_max: list[float] | None = None
    # bounds taken from the SFT dataset's action min / max are widened by this fraction of each dim's range
    # on each side (a dim that never moved in the dataset stays pinned)
    bounds_margin: float = 0.1
    # largest change of a command from the last one sent, in the action's units per control tick: one value
    # for every dim or a list with one per dim (None: off)
    max_delta: float | list[float] | None = None
    # the control loop counts as stalled when no tick came for this long, seconds (0: off)
    watchdog_s: float = 0.25
    # on an e-stop, hold: command the last observed joint positions; torque_off: disable the motors' torque
    # (robot.disable_torque() or robot.bus.disable_torque(), as LeRobot's Feetech / Dynamixel arms have; an
    # arm then falls under gravity), holding instead when the robot has neither
    estop_action: str = "hold"
    # local HTTP port for operator calls (POST /estop, /release, /start, /end; GET /status), on 127.0.0.1
    # only (0: off)
    estop_port: int = 0
    # the e-stop key of the operator's keyboard (stdin on a terminal)
    estop_key: str = "x"
    # run without action bounds when neither the config, the dataset's stats nor the robot gives them
    # (refused otherwise)
    allow_missing_bounds: bool = False

    def __post_init__(self):
        if (self.action_min is None) != (self.action_max is None):
            raise ValueError("safety.action_min and safety.action_max go together")
        if self.action_min is not None:
            lo, hi = self.action_min, self.action_max
            if not lo:
                raise ValueError("safety.action_min: must not be empty")
            if len(lo) != len(hi):
                raise ValueError(
                    f"safety.action_min / safety.action_max: {len(lo)} and {len(hi)} values, must be one per action dim"
                )
            for name, values in (("action_min", lo), ("action_max", hi)):
                if not all(math.isfinite(v) for v in values):
                    raise ValueError(f"safety.{name}: must be finite numbers (got {values})")
            bad = [i for i, (a, b) in enumerate(zip(lo, hi, strict=True)) if a > b]
            if bad:
                i = bad[0]
                raise ValueError(f"safety.action_min: above safety.action_max at dim {i} ({lo[i]} > {hi[i]})")
        require(self, "safety", at_least={"bounds_margin": 0, "watchdog_s": 0, "estop_port": 0})
        if self.estop_port > 65535:
            raise ValueError(f"safety.estop_port: must be in [0, 65535] (got {self.estop_port})")
        if self.max_delta is not None:
            deltas = self.max_delta if isinstance(self.max_delta, list) else [self.max_delta]
            if not deltas or not all(math.isfinite(d) and d > 0 for d in deltas):
                raise ValueError(
                    f"safety.max_delta: must be > 0, one value or one per action dim (got {self.max_delta})"
                )
        if self.estop_action not in ESTOP_ACTIONS:
            raise ValueError(f"safety.estop_action: must be one of {ESTOP_ACTIONS} (got {self.estop_action!r})")
        if len(self.estop_key) != 1 or not self.estop_key.isprintable() or self.estop_key.isspace():
            raise ValueError(f"safety.estop_key: must be one printable character (got {self.estop_key!r})")


# ---------------------------------------------------------------------------------------------- bounds


@dataclass(frozen=True)
class ActionBounds:
    """Per-dim command bounds and where they came from ("config", "dataset", "robot", or "none": unbounded)."""

    low: np.ndarray
    high: np.ndarray
    source: str

    def __post_init__(self):
        if self.low.shape != self.high.shape or self.low.ndim != 1:
            raise ValueError(f"action bounds: low {self.low.shape} and high {self.high.shape} must be equal 1-d shapes")
        if self.source not in BOUNDS_SOURCES:
            raise ValueError(f"action bounds: source must be one of {BOUNDS_SOURCES} (got {self.source!r})")

    @property
    def dim(self) -> int:
        return int(self.low.shape[0])

    @classmethod
    def unbounded(cls, dim: int) -> ActionBounds:
        return cls(np.full(dim, -np.inf, np.float32), np.full(dim, np.inf, np.float32), "none")


def _vector(values, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)  # torch tensors (LeRobot's stats) convert too
    if not np.isfinite(v).all():
        raise ValueError(f"{what}: must be finite numbers (got {v.tolist()})")
    return v


def bounds_from_stats(stats: Mapping, margin: float) -> ActionBounds:
    """Bounds from a dataset's action stats (``{"min": ..., "max": ...}``, as LeRobot's ``meta.stats["action"]``),
    widened by ``margin`` times each dim's range on each side."""
    if "min" not in stats or "max" not in stats:
        raise ValueError(f"dataset action stats: need 'min' and 'max' (got {sorted(stats)})")
    lo, hi = _vector(stats["min"], "dataset action stats min"), _vector(stats["max"], "dataset action stats max")
    if lo.shape != hi.shape:
        raise ValueError(f"dataset action stats: min has {lo.size} dims, max {hi.size}")
    if margin < 0:
        raise ValueError(f"safety.bounds_margin: must be >= 0 (got {margin})")
    pad = margin * np.maximum(hi - lo, 0.0)
    return ActionBounds((lo - pad).astype(np.float32), (hi + pad).astype(np.float32), "dataset")


def robot_action_limits(robot) -> dict[str, tuple[float, float]] | None:
    """The robot's own ``action_limits`` (``{action name: (low, high)}``) when it exposes them (optional;
    LeRobot's robots do not have it, a robot class of yours may)."""
    limits = getattr(robot, "action_limits", None)
    return dict(limits) if limits else None


def resolve_bounds(
    cfg: SafetyConfig,
    dim: int,
    dataset_stats: Mapping | None = None,
    robot_limits: Mapping[str, tuple[float, float]] | None = None,
    names: Sequence[str] | None = None,
) -> ActionBounds:
    """The bounds the safety layer enforces, first found of: the config's ``action_min`` / ``action_max``
    (the operator's explicit choice), the SFT dataset's action min / max widened by ``bounds_margin`` (what the
    policy was trained to do), the robot's ``action_limits`` ordered by ``names`` (the hardware's range).
    None of them: ValueError, unless ``allow_missing_bounds`` (then unbounded, logged). A source whose
    length differs from ``dim`` is a ValueError naming it, never silently skipped."""
    if names is not None and len(names) != dim:
        raise ValueError(f"action names: {len(names)} names for {dim} action dims")
    if cfg.action_min is not None:
        lo, hi = _vector(cfg.action_min, "safety.action_min"), _vector(cfg.action_max, "safety.action_max")
        if lo.size != dim or hi.size != dim:
            raise ValueError(
                f"safety.action_min / safety.action_max: {lo.size} values for {dim} action dims (the robot's "
                f"action order{': ' + ', '.join(names) if names else ''})"
            )
        return ActionBounds(lo.astype(np.float32), hi.astype(np.float32), "config")
    if dataset_stats is not None:
        bounds = bounds_from_stats(dataset_stats, cfg.bounds_margin)
        if bounds.dim != dim:
            raise ValueError(f"dataset action stats: {bounds.dim} dims for {dim} action dims")
        return bounds
    if robot_limits:
        if names is None:
            raise ValueError("robot action_limits: the action names are needed to order them")
        missing = [n for n in names if n not in robot_limits]
        if missing:
            raise ValueError(f"robot action_limits: no limits for {missing}")
        lo = _vector([robot_limits[n][0] for n in names], "robot action_limits low")
        hi = _vector([robot_limits[n][1] for n in names], "robot action_limits high")
        return ActionBounds(lo.astype(np.float32), hi.astype(np.float32), "robot")
    if cfg.allow_missing_bounds:
        log.warning("no action bounds: the policy's commands reach the robot unclamped (safety.allow_missing_bounds)")
        return ActionBounds.unbounded(dim)
    raise ValueError(
        "safety.action_min / safety.action_max: no action bounds for the robot: set them, use a policy whose "
        "dataset stats have the action's min and max, or a robot exposing action_limits; "
        "--safety.allow_missing_bounds=true runs without (not recommended)"
    )


# ----------------------------------------------------------------------------------------- the layer


@dataclass
class SafetyStats:
    """What the safety layer changed or refused (also exported as pirl_edge_safety_* metrics)."""

    clamped_ticks: int = 0
    limited_ticks: int = 0
    held_ticks: int = 0
    estops: int = 0
    watchdog_trips: int = 0

    def summary(self) -> dict:
        return asdict(self)


@dataclass
class SafeAction:
    """One tick's verdict: ``command`` is what to send (float32, the robot's action order) or None: send
    nothing. ``*_dims`` are the indices (into the layer's ``names``) that were changed."""

    command: np.ndarray | None
    clamped: bool = False
    limited: bool = False
    held: bool = False
    estopped: bool = False
    clamped_dims: tuple[int, ...] = ()
    limited_dims: tuple[int, ...] = ()


class SafetyLayer:
    """Bounds clamp, then per-tick jump limit, then the hold of a tick without an action; nothing when the
    e-stop is latched.

    Clamping first and limiting after keeps every command within ``max_delta`` of the last one even when
    the robot starts outside the bounds: it is brought inside at ``max_delta`` per tick, never in one jump.
    At an episode's start pass the observed joint positions as ``last_sent``, so the first command is
    limited too.
    """

    def __init__(
        self,
        bounds: ActionBounds,
        max_delta: float | Sequence[float] | np.ndarray | None = None,
        names: Sequence[str] | None = None,
        *,
        estop: EStop | None = None,
        robot_id: str | None = None,
        stats: SafetyStats | None = None,
    ):
        self.bounds, self.estop, self.robot_id = bounds, estop, robot_id
        self.low, self.high = bounds.low.astype(np.float32), bounds.high.astype(np.float32)
        self.dim = bounds.dim
        if names is not None and len(names) != self.dim:
            raise ValueError(f"action names: {len(names)} names for {self.dim} action dims")
        self.names = list(names) if names is not None else [str(i) for i in range(self.dim)]
        self.max_delta = None
        if max_delta is not None:
            md = np.asarray(max_delta, dtype=np.float32).reshape(-1)
            if md.size not in (1, self.dim):
                raise ValueError(f"safety.max_delta: {md.size} values for {self.dim} action dims")
            if not (np.isfinite(md).all() and (md > 0).all()):
                raise ValueError(f"safety.max_delta: must be > 0 (got {md.tolist()})")
            self.max_delta = np.broadcast_to(md, (self.dim,)).copy()
        # one SafetyStats for the layer, its e-stop and the watchdog (pass it to Watchdog(stats=...))
        self.stats = stats or (estop.stats if estop is not None and estop.stats is not None else SafetyStats())
        if estop is not None and estop.stats is None:
            estop.stats = self.stats
        self._nonfinite_run = False
        self._m = None
        if robot_id is not None:  # bound once (the tick path does no label lookups); exported at 0 from now
            m = metrics
            self._m = {
                "clamped": m.SAFETY_CLAMPED_TICKS.labels(robot_id),
                "limited": m.SAFETY_LIMITED_TICKS.labels(robot_id),
                "no_action": m.SAFETY_HELD_TICKS.labels(robot_id, "no_action"),
                "nonfinite": m.SAFETY_HELD_TICKS.labels(robot_id, "nonfinite"),
            }

    def filter(self, action: np.ndarray | None, last_sent: np.ndarray | None) -> SafeAction:
        """The command for this tick from the policy's ``action`` (None: no fresh action this tick) and
        ``last_sent``, the command the robot last took (``send_action``'s return, which may itself be
        clipped by the robot) or, before the first, its observed positions."""
        if self.estop is not None:
            self.estop.poll()
            if self.estop.is_set():
                return SafeAction(None, estopped=True)
        if action is None:
            return self._hold(last_sent, "no_action")
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        if a.size != self.dim:
            raise ValueError(f"safety layer: an action of {a.size} dims for {self.dim} bounds")
        if not np.isfinite(a).all():
            if not self._nonfinite_run:  # once per run of bad actions, not at the control rate
                log.error("policy action with NaN / inf %s: holding the last command", a.tolist())
            self._nonfinite_run = True
            return self._hold(last_sent, "nonfinite")
        self._nonfinite_run = False
        cmd = np.clip(a, self.low, self.high)
        clamped_dims = tuple(np.flatnonzero(cmd != a).tolist())
        limited_dims: tuple[int, ...] = ()
        if self.max_delta is not None and last_sent is not None:
            prev = np.asarray(last_sent, dtype=np.float32).reshape(-1)
            if prev.size != self.dim:
                raise ValueError(f"safety layer: last_sent has {prev.size} dims for {self.dim} bounds")
            step = np.clip(cmd - prev, -self.max_delta, self.max_delta)
            limited = prev + step
            limited_dims = tuple(np.flatnonzero(limited != cmd).tolist())
            cmd = limited
        out = SafeAction(
            cmd.astype(np.float32, copy=False),
            clamped=bool(clamped_dims),
            limited=bool(limited_dims),
            clamped_dims=clamped_dims,
            limited_dims=limited_dims,
        )
        if out.clamped:
            self.stats.clamped_ticks += 1
            if self._m:
                self._m["clamped"].inc()
        if out.limited:
            self.stats.limited_ticks += 1
            if self._m:
                self._m["limited"].inc()
        return out

    def _hold(self, last_sent: np.ndarray | None, reason: str) -> SafeAction:
        self.stats.held_ticks += 1
        if self._m:
            self._m[reason].inc()
        if last_sent is None:  # nothing commanded yet: the robot stays where it is
            return SafeAction(None, held=True)
        return SafeAction(np.array(last_sent, dtype=np.float32).reshape(-1), held=True)

    def describe(self, result: SafeAction) -> str:
        """The changed dims by name, for a log line."""
        parts = []
        if result.clamped:
            parts.append("clamped " + ", ".join(self.names[i] for i in result.clamped_dims))
        if result.limited:
            parts.append("jump-limited " + ", ".join(self.names[i] for i in result.limited_dims))
        if result.held:
            parts.append("held")
        if result.estopped:
            parts.append("e-stopped")
        return "; ".join(parts) or "unchanged"


def as_robot_action(command: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """A command array as the dict ``robot.send_action`` takes (LeRobot's ``{"<motor>.pos": value}``)."""
    return {n: float(v) for n, v in zip(names, command, strict=True)}


def from_robot_action(action: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    """The dict ``robot.send_action`` returned (what was actually sent) as an array in ``names`` order."""
    return np.array([float(action[n]) for n in names], dtype=np.float32)


def positions_from_observation(observation: Mapping, names: Sequence[str]) -> dict[str, float]:
    """The observed values of the action's names (for LeRobot's arms ``<motor>.pos`` is both an action and
    an observation key): what the hold e-stop action commands, and the first tick's ``last_sent``."""
    return {n: float(observation[n]) for n in names if n in observation}


# -------------------------------------------------------------------------------------------- e-stop


class EStop:
    """A latched e-stop shared between threads.

    ``trigger`` may be called from any thread and from a signal handler: it only writes plain attributes
    and appends to a deque (no lock, so a handler that interrupts a thread holding one cannot deadlock);
    logging and counting happen in ``poll``, which the control loop calls every tick (``SafetyLayer.filter``
    does). ``is_set`` is one attribute read. Only ``release`` clears it, and releasing moves nothing: the
    robot waits for the operator's next start.
    """

    def __init__(self, robot_id: str | None = None, stats: SafetyStats | None = None):
        self.robot_id, self.stats = robot_id, stats  # stats.estops counts the latches too
        self._latched = False
        self._source: str | None = None
        self._latched_at: float | None = None  # unix time, for the status
        self._latched_mono: float | None = None
        self._ids = itertools.count(1)  # next() on it is atomic: safe from a handler
        self._latch_id = 0
        self._pending: collections.deque[tuple[str, bool]] = collections.deque(maxlen=1024)
        self.count = 0  # latches so far
        if robot_id is not None:
            metrics.SAFETY_ESTOP_LATCHED.labels(robot_id).set(0)

    def trigger(self, source: str = "unknown") -> None:
        """Latch the e-stop (async-signal-safe enough for a Python signal handler)."""
        latches = not self._latched
        if latches:
            self._source = source
            self._latched_at, self._latched_mono = time.time(), time.monotonic()
            self._latch_id = next(self._ids)
            self._latched = True
        self._pending.append((source, latches))

    def is_set(self) -> bool:
        return self._latched

    def poll(self) -> int:
        """Log and count the triggers since the last poll; returns how many latched the e-stop."""
        latched = 0
        while self._pending:
            try:
                source, latches = self._pending.popleft()
            except IndexError:  # another thread took the last one
                break
            if latches:
                latched += 1
                self.count += 1
                if self.stats is not None:
                    self.stats.estops += 1
                log.warning("E-STOP latched (source: %s): no further policy action reaches the robot", source)
                if self.robot_id is not None:
                    metrics.SAFETY_ESTOPS.labels(self.robot_id, source).inc()
            else:
                log.warning("e-stop (source: %s): already latched", source)
        if self.robot_id is not None:
            metrics.SAFETY_ESTOP_LATCHED.labels(self.robot_id).set(1 if self._latched else 0)
        return latched

    def release(self, source: str = "unknown") -> bool:
        """Clear a latched e-stop; returns whether it was latched."""
        self.poll()  # the latch is counted before it is cleared
        was = self._latched
        self._latched, self._source, self._latched_at, self._latched_mono = False, None, None, None
        if was:
            log.warning("e-stop released (source: %s)", source)
        if self.robot_id is not None:
            metrics.SAFETY_ESTOP_LATCHED.labels(self.robot_id).set(0)
        return was

    @property
    def source(self) -> str | None:
        return self._source

    @property
    def latched_at(self) -> float | None:
        """Unix time the current latch began (None: not latched)."""
        return self._latched_at

    @property
    def latch_id(self) -> int:
        """Changes with every new latch (0: never latched): apply the e-stop action once per id."""
        return self._latch_id

    def latched_for_s(self) -> float | None:
        mono = self._latched_mono
        return None if mono is None else time.monotonic() - mono

    def wait(self, timeout: float | None = None, poll_s: float = 0.005) -> bool:
        """Until latched (True) or ``timeout``; it polls the flag (no Event a signal handler would have to lock)."""
        return _wait_until(lambda: self._latched, timeout, poll_s)

    def wait_released(self, timeout: float | None = None, poll_s: float = 0.005) -> bool:
        return _wait_until(lambda: not self._latched, timeout, poll_s)

    def status(self) -> dict:
        return {"estop": self._latched, "source": self._source, "latched_at": self._latched_at}


def _wait_until(cond: Callable[[], bool], timeout: float | None, poll_s: float) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while not cond():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def install_sigusr1(estop: EStop) -> Callable | int | None:
    """SIGUSR1 latches ``estop`` (``kill -USR1 <pid>`` from any shell on the robot). Main thread only, as
    Python's signal module requires; returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_sigusr1: signal handlers can only be installed from the main thread")
    return signal.signal(signal.SIGUSR1, lambda _signum, _frame: estop.trigger("sigusr1"))


def find_disable_torque(robot) -> Callable[[], object] | None:
    """``robot.disable_torque`` or ``robot.bus.disable_torque`` (LeRobot's Feetech / Dynamixel arms), if any."""
    for owner in (robot, getattr(robot, "bus", None)):
        fn = getattr(owner, "disable_torque", None) if owner is not None else None
        if callable(fn):
            return fn
    return None


def apply_estop_action(
    robot, mode: str, last_observation_positions: Mapping[str, float] | None, *, robot_id: str | None = None
) -> str:
    """Make the robot stop now; returns what was done: "torque_off", "hold", "none" (hold with no observed
    position to hold) or "failed" (the robot call raised: logged, never raised, the loop must go on to end
    the episode). ``mode`` "torque_off" disables torque where the robot's API allows, else holds; "hold"
    commands the last observed positions straight to the robot (they are where it is, so no safety filter)."""
    if mode not in ESTOP_ACTIONS:
        raise ValueError(f"safety.estop_action: must be one of {ESTOP_ACTIONS} (got {mode!r})")
    done = None
    if mode == "torque_off":
        fn = find_disable_torque(robot)
        if fn is None:
            log.warning("e-stop: %s has no disable_torque (robot or robot.bus): holding instead", type(robot).__name__)
        else:
            try:
                fn()
                done = "torque_off"
            except Exception:
                log.exception("e-stop: disable_torque failed: holding instead")
    if done is None:
        if not last_observation_positions:
            log.error("e-stop: no observed position to hold: the robot keeps its last command")
            done = "none"
        else:
            try:
                robot.send_action(dict(last_observation_positions))
                done = "hold"
            except Exception:
                log.exception("e-stop: sending the hold command failed")
                done = "failed"
    log.warning("e-stop action: %s", done)
    if robot_id is not None:
        metrics.SAFETY_ESTOP_ACTIONS.labels(robot_id, done).inc()
    return done


class EStopResponder:
    """The control loop's e-stop check: call it every tick; True means latched (send no policy action this
    tick and end the episode as failed), and the robot's e-stop action is applied once per latch."""

    def __init__(self, estop: EStop, robot, mode: str = "hold", *, robot_id: str | None = None):
        if mode not in ESTOP_ACTIONS:
            raise ValueError(f"safety.estop_action: must be one of {ESTOP_ACTIONS} (got {mode!r})")
        self.estop, self.robot, self.mode, self.robot_id = estop, robot, mode, robot_id
        self._applied_id = 0
        self.last_result: str | None = None

    def __call__(self, last_observation_positions: Mapping[str, float] | None) -> bool:
        if not self.estop.is_set():
            return False
        latch = self.estop.latch_id
        if latch != self._applied_id:
            self._applied_id = latch
            self.estop.poll()
            self.last_result = apply_estop_action(
                self.robot, self.mode, last_observation_positions, robot_id=self.robot_id
            )
        return True


# ------------------------------------------------------------------------------------------ watchdog


@dataclass
class _WatchState:
    last_kick: float = field(default_factory=time.monotonic)
    paused: bool = False
    tripped_at_kick: float | None = None  # the kick time of the stall already reported


class Watchdog:
    """Calls ``on_trip()`` (on its own daemon thread) once per control-loop stall: no ``kick()`` for
    ``timeout_s``. It re-arms at the next kick; while paused (the loop legitimately waits, e.g. for the
    operator's start) it never trips, and resuming counts as a kick. ``timeout_s`` 0: off (every method a
    no-op). ``on_trip`` typically latches the e-stop: a loop stuck in a robot call cannot react itself,
    and position-controlled servos keep their last goal meanwhile."""

    def __init__(
        self,
        timeout_s: float,
        on_trip: Callable[[], None],
        *,
        robot_id: str | None = None,
        stats: SafetyStats | None = None,
        check_s: float | None = None,
    ):
        if timeout_s < 0:
            raise ValueError(f"safety.watchdog_s: must be >= 0 (got {timeout_s})")
        self.timeout_s, self.on_trip, self.robot_id, self.stats = timeout_s, on_trip, robot_id, stats
        # how often the thread looks: a stall is seen within timeout_s + check_s
        self.check_s = check_s if check_s is not None else min(0.05, max(timeout_s / 5, 0.001))
        self.trips = 0
        self._s = _WatchState()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if robot_id is not None:
            metrics.SAFETY_WATCHDOG_TRIPS.labels(robot_id)  # exported at 0

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> Watchdog:
        if self.enabled and self._thread is None:
            self._s.last_kick = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="pirl-safety-watchdog", daemon=True)
            self._thread.start()
        return self

    def kick(self) -> None:
        """The control loop's every tick: one attribute write."""
        self._s.last_kick = time.monotonic()

    def pause(self) -> None:
        self._s.paused = True

    def resume(self) -> None:
        self._s.last_kick = time.monotonic()
        self._s.paused = False

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        s = self._s
        while not self._stop.wait(self.check_s):
            kick = s.last_kick
            if s.paused or kick == s.tripped_at_kick:  # paused, or this stall was already reported
                continue
            stalled = time.monotonic() - kick
            if stalled < self.timeout_s:
                continue
            s.tripped_at_kick = kick
            self.trips += 1
            if self.stats is not None:
                self.stats.watchdog_trips += 1
            if self.robot_id is not None:
                metrics.SAFETY_WATCHDOG_TRIPS.labels(self.robot_id).inc()
            log.error("control loop stalled: no tick for %.3f s (safety.watchdog_s=%s)", stalled, self.timeout_s)
            try:
                self.on_trip()
            except Exception:
                log.exception("watchdog on_trip failed")
