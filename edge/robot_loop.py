"""Robot mode: the episode protocol and the paced loop through a LeRobot ``Robot``, behind the safety layer.

Every episode goes through these phases (each one logged and exported in ``pirl_edge_episode_phase``):

``reset``
    move to ``episode.reset_pose`` at ``episode.reset_speed`` (skipped without a pose); a robot with a
    scene of its own (the simulated robot's ``reset_scene()``) resets it, as a person would.
``wait``
    until the operator starts the episode (Enter, or ``POST /start`` on the local port) or
    ``episode.start_delay_s`` has passed.
``run``
    paced ticks at ``control.hz``: read the observation, take the next action of the current chunk (or,
    while a person has taken over, the teleoperator's), pass it through the safety layer, send it. It ends
    at the time limit, on the operator's label (success / failure / abort) or "end", on the outcome source's
    verdict (``episode.outcome``: the robot's own ``episode_status()`` where it has one, e.g. the simulated
    robot, or the success detector), on an e-stop or on a watchdog trip.
``return``
    back to the reset pose.
``estop``
    latched: nothing is sent until the operator releases the e-stop; then ``reset``.

Chunk timing (as in ``edge.control.PacedLoop``, see ``edge.chunk_schedule``): the next chunk is asked
for ``lead`` ticks before the current one runs out (the measured inference latency in ticks), from that
tick's observation; a tick never waits for inference (it holds the last command, counted as a deadline
miss). The record carries the decision observation and the chunk exactly as sampled; the safety layer's
clamps and jump limits are deterministic functions of it, i.e. part of the environment, and are marked
in the record.

Outcomes: the reward is 1 at the step an episode ends in success, else 0. Who says "success" is
``episode.outcome``; whoever it was, the episode's last record carries it (``pirl.v1.EpisodeLabel``):

=====================================  =====================  ===========================
end                                    label source           verdict
=====================================  =====================  ===========================
operator's s / f / a (key, HTTP, pad)  OPERATOR               SUCCESS / FAILURE / ABORT
operator's "end" (n)                   OPERATOR               FAILURE (truncated)
robot's own verdict (outcome=robot)    ENV                    SUCCESS / FAILURE
success detector (outcome=detector)    DETECTOR               SUCCESS (with its score)
time limit, robot's step limit         TIME_LIMIT             FAILURE (truncated)
e-stop / watchdog                      OPERATOR / ENV         FAILURE
edge stopping mid-episode              OPERATOR               ABORT (never trained on)
=====================================  =====================  ===========================

A person's label comes a reaction time after what it judges: on a grasp, the gripper has closed and the
policy has run a chunk or two more by the time "success" is pressed. Those later macro-steps did not decide
the outcome; credited with it, they teach a critic that bootstraps through them (TD targets) that the states
after a close look alike whatever happened at the close. With ``episode.label_reaction_s`` the edge keeps
the finished macro-steps of that window unwritten, and a person's success / failure label (key, HTTP, pad)
ends the episode's records at the macro-step that ran that long before the label; the ones after it are
counted (``steps_after_label``) and not sent (the session dataset keeps every frame as it happened).

Interventions (``--teleop.type=...``): on the operator's "intervene" (space / ``i``, ``POST /takeover``, a
teleoperator's own intervention button) the teleoperator's action replaces the policy's from the next tick,
through the same safety layer. The policy keeps sampling a chunk at every macro-step boundary (the
learner needs the record's shape and value), but a macro-step a person drove any tick of is marked in
its record (``pirl.v1.Intervention``: what was sent and which ticks the teleoperator drove): the
learner never uses it as PPO data, and one the person drove from its first tick is a BC sample. On
"hand back" control returns to the policy at the next chunk boundary: the teleoperator drives until
then, so the policy's next chunk is sampled from where the person had the robot ``lead - 1`` ticks
before that boundary (its decision tick).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from edge import metrics
from edge.chunk_schedule import LeadTime
from edge.control import LoopStats, RecordWriter
from edge.records import Decision, Outcome
from edge.robot_features import RobotIO

log = logging.getLogger(__name__)

PHASES = ("reset", "wait", "run", "return", "estop")
END_REASONS = ("success", "failure", "abort", "time_limit", "operator_end", "estop", "watchdog", "stop")


@dataclass
class EpisodeEnd:
    reason: str  # one of END_REASONS
    success: bool = False
    # (source, verdict, detector score) in pirl.v1.EpisodeLabel names (see the module's table)
    label: tuple[str, str, float] = ("ENV", "FAILURE", 0.0)

    @property
    def terminated(self) -> bool:
        """The episode's own end (the learner bootstraps nothing after it); the others cut it short."""
        return self.reason in ("success", "failure", "abort", "estop", "watchdog")


class _Step(NamedTuple):
    """A finished macro-step whose record is not written yet: what it ran and the ticks it ran them (1-based)."""

    index: int
    chunk: Decision
    outcome: Outcome
    marks: dict
    first_tick: int
    last_tick: int


def _teleop_flag(events: dict, name: str) -> bool:
    """A LeRobot teleoperator event (``TeleopEvents`` member or its string value) from get_teleop_events()."""
    for key, value in events.items():
        if getattr(key, "value", key) == name:
            return bool(value)
    return False


@dataclass
class RobotLoopStats(LoopStats):
    episode_ends: dict[str, int] = field(default_factory=dict)
    reset_timeouts: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # "SOURCE/VERDICT" -> episodes
    interventions: int = 0  # takeovers by a person
    teleop_ticks: int = 0  # ticks a teleoperator drove
    intervened_steps: int = 0  # macro-steps a teleoperator drove any tick of (never PPO data)
    teleop_errors: int = 0  # teleoperator reads that failed (the tick held)
    steps_after_label: int = 0  # macro-steps run after the moment a back-dated label judged (not sent)

    def summary(self) -> dict:
        out = super().summary()
        out["episode_ends"] = dict(self.episode_ends)
        out["labels"] = dict(self.labels)
        out["interventions"] = self.interventions
        out["teleop_ticks"] = self.teleop_ticks
        out["intervened_steps"] = self.intervened_steps
        out["teleop_errors"] = self.teleop_errors
        out["steps_after_label"] = self.steps_after_label
        return out


class RobotLoop:
    """Drives ``robot`` through episodes with ``worker``'s policy; see the module docstring."""

    def __init__(
        self,
        robot,
        io: RobotIO,
        worker,
        writer: RecordWriter,
        safety,
        estop,
        *,
        robot_id: str,
        control_hz: float,
        episode,
        inputs=None,
        watchdog=None,
        recorder=None,
        estop_action: str = "hold",
        late_fraction: float = 0.5,
        teleop=None,
        outcome: str = "robot",
        detector=None,
        lead: LeadTime | None = None,
    ):
        self.robot, self.io, self.worker, self.writer = robot, io, worker, writer
        # when to ask for the next chunk (edge.chunk_schedule): measured by default
        self.lead = lead or LeadTime(1.0 / control_hz)
        self.teleop, self.outcome, self.detector = teleop, outcome, detector
        self.intervening = False  # a person drives (through the teleoperator)
        self._handback = False  # ... until the next chunk boundary, then the policy
        self._pad_held = False  # a teleoperator's intervention button was held at the last tick
        self.safety, self.estop, self.inputs, self.watchdog, self.recorder = safety, estop, inputs, watchdog, recorder
        self.robot_id, self.period, self.episode_cfg = robot_id, 1.0 / control_hz, episode
        self.estop_action = estop_action
        self.late_after = late_fraction * self.period
        self.stats: RobotLoopStats = writer.stats
        self.phase = ""
        self.current_rate = 0.0
        self._rate_window: list[float] = []
        self._last_tick: float | None = None
        self._next_tick = time.perf_counter()
        self._last_sent: np.ndarray | None = None
        self._last_obs: dict | None = None
        self._watchdog_tripped = threading.Event()
        self._ready: Decision | None = None
        self._waiting = False
        self._token = 0
        self._estop_applied = 0  # the e-stop latch whose action was applied to the robot
        self._lock = threading.Lock()
        self.reset_pose = None
        if episode.reset_pose:
            unknown = sorted(set(episode.reset_pose) - set(io.action_names))
            if unknown:
                raise ValueError(f"episode.reset_pose: {unknown} are not actions of this robot ({io.action_names})")
            missing = sorted(set(io.action_names) - set(episode.reset_pose))
            if missing:
                raise ValueError(f"episode.reset_pose: give every action of this robot a value (missing {missing})")
            self.reset_pose = np.asarray([episode.reset_pose[k] for k in io.action_names], np.float32)
        metrics.CONTROL_TARGET.labels(robot_id).set(control_hz)
        metrics.DEADLINE_MISSES.labels(robot_id)
        for phase in PHASES:
            metrics.EPISODE_PHASE.labels(robot_id, phase).set(0)
        # exported at 0 from the start, so increase() sees the first one
        for reason in END_REASONS:
            metrics.EPISODES.labels(robot_id, reason)
        metrics.RESET_TIMEOUTS.labels(robot_id)
        for action in ("torque_off", "hold", "none", "failed"):
            metrics.SAFETY_ESTOP_ACTIONS.labels(robot_id, action)
        for source in ("ENV", "OPERATOR", "DETECTOR", "TIME_LIMIT"):
            for verdict in ("SUCCESS", "FAILURE", "ABORT"):
                metrics.EPISODE_LABELS.labels(robot_id, source.lower(), verdict.lower())
        metrics.INTERVENTIONS.labels(robot_id)
        metrics.TELEOP_TICKS.labels(robot_id)
        metrics.INTERVENED_STEPS.labels(robot_id)
        metrics.STEPS_AFTER_LABEL.labels(robot_id)
        metrics.INTERVENING.labels(robot_id).set(0)

    def status(self) -> dict:
        """What ``GET /status`` on the operator port adds: the phase, the episode's number (episodes ended
        before it) and whether a person drives."""
        return {"phase": self.phase, "episode": self.stats.episodes, "intervening": self.intervening}

    # --- phases -----------------------------------------------------------------------------------

    def _enter(self, phase: str) -> None:
        if self.phase:
            metrics.EPISODE_PHASE.labels(self.robot_id, self.phase).set(0)
        self.phase = phase
        metrics.EPISODE_PHASE.labels(self.robot_id, phase).set(1)
        log.info("robot %s: %s", self.robot_id, phase)

    def run(self, stop: threading.Event, *, duration_s: float | None = None, max_episodes: int | None = None):
        started = time.perf_counter()
        if self.watchdog is not None:
            self.watchdog.on_trip = self._on_watchdog
        try:
            while not stop.is_set():
                if duration_s is not None and time.perf_counter() - started >= duration_s:
                    break
                if max_episodes is not None and self.stats.episodes >= max_episodes:
                    break
                if self.estop.is_set():
                    self._estopped(stop)
                    continue
                self._enter("reset")
                if hasattr(self.robot, "reset_scene"):
                    self.robot.reset_scene()
                if not self._move_to_reset_pose(stop):
                    continue
                self._enter("wait")
                if not self._wait_for_start(stop, started, duration_s):
                    continue
                self._enter("run")
                end = self._run_episode(stop, started, duration_s)
                self.stats.episode_ends[end.reason] = self.stats.episode_ends.get(end.reason, 0) + 1
                metrics.EPISODES.labels(self.robot_id, end.reason).inc()
                source, verdict, _ = end.label
                key = f"{source}/{verdict}"
                self.stats.labels[key] = self.stats.labels.get(key, 0) + 1
                metrics.EPISODE_LABELS.labels(self.robot_id, source.lower(), verdict.lower()).inc()
                if end.reason != "estop":
                    self._enter("return")
                    self._move_to_reset_pose(stop, on_stop=True)
        finally:
            if self.phase:
                metrics.EPISODE_PHASE.labels(self.robot_id, self.phase).set(0)
            self.phase = ""
        return self.stats

    def _estopped(self, stop: threading.Event) -> None:
        """Latched: send nothing until the operator releases the e-stop (or the edge stops)."""
        self._enter("estop")
        if self._estop_applied != self.estop.latch_id:  # latched outside an episode (reset, wait): stop the arm too
            self._fail_safe(EpisodeEnd("estop"))
        if self.watchdog is not None:
            self.watchdog.pause()
        while self.estop.is_set() and not stop.is_set():
            self._poll_inputs()
            stop.wait(0.02)
        if self.watchdog is not None:
            self.watchdog.resume()
        if not stop.is_set():
            log.warning("robot %s: e-stop released", self.robot_id)

    def _wait_for_start(self, stop: threading.Event, started: float, duration_s: float | None) -> bool:
        cfg = self.episode_cfg
        if self.watchdog is not None:
            self.watchdog.pause()
        deadline = time.monotonic() + cfg.start_delay_s if cfg.start == "delay" else None
        if cfg.start == "operator":
            log.warning("robot %s: press Enter (or POST /start) to start the episode", self.robot_id)
        try:
            while not stop.is_set() and not self.estop.is_set():
                if duration_s is not None and time.perf_counter() - started >= duration_s:
                    return False
                events = self._poll_inputs()
                if "start" in events or (deadline is not None and time.monotonic() >= deadline):
                    return True
                stop.wait(0.01)
            return False
        finally:
            if self.watchdog is not None:
                self.watchdog.resume()
                self.watchdog.kick()

    def _poll_inputs(self) -> set[str]:
        if self.inputs is None:
            return set()
        events = set(self.inputs.poll())
        if "release" in events and self.estop.is_set():
            self.estop.release()
        return events

    # --- ticks ------------------------------------------------------------------------------------

    def _tick(self) -> float:
        """Sleep to the next tick of the fixed grid; returns its start time (counts ticks and rate)."""
        delay = self._next_tick - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        now = time.perf_counter()
        if self.watchdog is not None:
            self.watchdog.kick()
        s, rid = self.stats, self.robot_id
        s.ticks += 1
        metrics.TICKS.labels(rid).inc()
        if self._last_tick is not None and now - self._last_tick < 2 * self.period + 1.0:
            s.tick_intervals_s.append(now - self._last_tick)
        self._last_tick = now
        self._rate_window.append(now)
        while self._rate_window and self._rate_window[0] < now - 1.0:
            self._rate_window.pop(0)
        self.current_rate = float(len(self._rate_window))
        metrics.CONTROL_RATE.labels(rid).set(self.current_rate)
        late = now - self._next_tick > self.late_after
        # stay on the grid; after a long stall skip ahead (no burst of catch-up ticks)
        self._next_tick += self.period
        if time.perf_counter() - self._next_tick > self.period:
            self._next_tick = time.perf_counter()
        return late

    def _observe(self) -> dict:
        obs = self.robot.get_observation()
        self._last_obs = obs
        return obs

    def _send(self, command: np.ndarray) -> np.ndarray:
        """Send through the robot's API; returns what it actually sent (after its own clipping)."""
        sent = self.robot.send_action(self.io.action_dict(command))
        self._last_sent = self.io.action_vector(sent) if sent else command
        return self._last_sent

    def _move_to_reset_pose(self, stop: threading.Event, on_stop: bool = False) -> bool:
        """Bounded-speed move to the reset pose through the safety layer; False if an e-stop or stop
        cut it short (the stop during ``return`` still completes the move: the arm is left at rest)."""
        if self.reset_pose is None:
            return not self.estop.is_set()
        cfg = self.episode_cfg
        obs = self._observe()
        current = self.io.positions(obs)
        if current is None:
            raise ValueError(
                f"episode.reset_pose: robot {self.robot_id} does not report its action values in get_observation(), "
                "so a bounded-speed move cannot be planned (leave episode.reset_pose unset)"
            )
        command = self._last_sent if self._last_sent is not None else current
        step = cfg.reset_speed * self.period
        deadline = time.monotonic() + cfg.reset_timeout_s
        self._next_tick = time.perf_counter()
        while True:
            if self.estop.is_set():
                return False
            if stop.is_set() and not on_stop:
                return False
            if np.max(np.abs(current - self.reset_pose)) <= cfg.reset_tolerance:
                return True
            if time.monotonic() >= deadline:
                self.stats.reset_timeouts += 1
                metrics.RESET_TIMEOUTS.labels(self.robot_id).inc()
                log.warning(
                    "robot %s: reset pose not reached in %.1fs (off by %.3f): going on",
                    self.robot_id,
                    cfg.reset_timeout_s,
                    float(np.max(np.abs(current - self.reset_pose))),
                )
                return True
            self._tick()
            target = command + np.clip(self.reset_pose - command, -step, step)
            safe = self.safety.filter(target, self._last_sent)
            if self.estop.is_set():
                return False
            if safe.command is not None:
                command = self._send(safe.command)
            current = self.io.positions(self._observe())

    def _on_watchdog(self) -> None:
        """Watchdog thread: the loop is stuck (a blocked bus read, a stalled process). A position-
        controlled arm holds its last goal by itself; with estop_action=torque_off the torque goes off now.
        The loop ends the episode as failed when it runs again."""
        self._watchdog_tripped.set()
        if self.estop_action == "torque_off":
            from edge.safety import apply_estop_action

            apply_estop_action(self.robot, "torque_off", None, robot_id=self.robot_id)  # never raises

    # decisions arrive on the worker thread; a token ties each to its request, so a chunk requested
    # for an episode that has ended since is never executed in the next one
    def _request(self, raw) -> None:
        with self._lock:
            self._token += 1
            token, self._ready, self._waiting = self._token, None, True
        asked = time.perf_counter()

        def deliver(decision: Decision | None) -> None:
            if decision is not None:
                self.lead.observe(time.perf_counter() - asked, decision.version)
            with self._lock:
                if token == self._token:
                    self._ready, self._waiting = decision, False

        self.worker.submit(raw, deliver)

    def _take(self) -> Decision | None:
        with self._lock:
            d, self._ready = self._ready, None
            return d

    def _run_episode(self, stop: threading.Event, started: float, duration_s: float | None) -> EpisodeEnd:
        s, rid, io = self.stats, self.robot_id, self.io
        episode, step_index = uuid.uuid4().hex, 0
        self._watchdog_tripped.clear()
        self._set_intervening(False)
        if self.detector is not None:
            self.detector.reset()
        obs = self._observe()
        # the jump limit of the first command is measured from where the arm is
        present = io.positions(obs)
        if present is not None:
            self._last_sent = present
        self._request(io.raw_observation(obs))
        # the first chunk, before the first tick (start-up); the robot holds its pose meanwhile
        wait_until = time.monotonic() + 30.0
        while self._waiting and not stop.is_set() and not self.estop.is_set() and time.monotonic() < wait_until:
            if self.watchdog is not None:
                self.watchdog.kick()
            time.sleep(0.001)
        # A finished chunk's record is written once it is known what follows it: the next chunk
        # (an ordinary step) or the episode's end (its terminal or truncated step). Records are
        # written by the record thread, never on the control thread.
        chunk: Decision | None = None
        requested = False  # the chunk after the current one has been asked for
        idx, outcome, marks, holds, first_tick = 0, Outcome(), _marks(), 0, 0
        ticks_sent: list[np.ndarray] = []  # what each tick of the current chunk sent, and who drove it
        ticks_teleop: list[bool] = []
        # finished macro-steps not written yet, oldest first. One waits for what follows it; with
        # episode.label_reaction_s more wait, as long as a person's label could still be back-dated into them
        finished: list[_Step] = []
        reaction_ticks = round(self.episode_cfg.label_reaction_s / self.period)
        limit_ticks = max(1, round(self.episode_cfg.time_limit_s / self.period))
        ticks = 0
        self._next_tick = time.perf_counter()
        end: EpisodeEnd | None = None
        while end is None:
            late = self._tick()
            ticks += 1
            events = self._poll_inputs()
            teleop_events = self._teleop_events()
            if self.estop.is_set():
                end = EpisodeEnd("estop", label=("OPERATOR", "FAILURE", 0.0))
                break
            if self._watchdog_tripped.is_set():
                end = EpisodeEnd("watchdog", label=("ENV", "FAILURE", 0.0))
                break
            if stop.is_set():
                end = EpisodeEnd("stop", label=("OPERATOR", "ABORT", 0.0))
                break
            self._update_intervention(events, teleop_events)
            obs = self._observe()
            if self.detector is not None:
                self.detector.submit(obs)
            action, teleop_tick = None, False
            if chunk is None:
                chunk = self._take()
                if chunk is not None:
                    idx, outcome, marks, requested, first_tick = 0, Outcome(), _marks(), False, ticks
                    marks["held_ticks"], holds = holds, 0
                    ticks_sent, ticks_teleop = [], []
                    if self._handback:  # a chunk boundary: the policy drives again, from this chunk on
                        self._set_intervening(False)
                    # what follows them is known; a label from now on is back-dated to tick >= ticks - reaction
                    while finished and finished[0].last_tick < ticks - reaction_ticks:
                        self._write(episode, finished.pop(0))
            if self.intervening:
                action, teleop_tick = self._teleop_action(), True
            elif chunk is not None:
                action = chunk.actions[idx]
            if chunk is not None:
                idx += 1
                outcome.env_steps += 1
            if action is None or late:
                s.deadline_misses += 1
                metrics.DEADLINE_MISSES.labels(rid).inc()
                if late:
                    s.late_ticks += 1
                else:
                    s.starved_ticks += 1
            safe = self.safety.filter(action, self._last_sent)
            if self.estop.is_set():  # checked again right before the motors: an e-stop always wins
                end = EpisodeEnd("estop", label=("OPERATOR", "FAILURE", 0.0))
                break
            executed = self._send(safe.command) if safe.command is not None else None
            if teleop_tick:
                s.teleop_ticks += 1
                metrics.TELEOP_TICKS.labels(rid).inc()
            if chunk is not None:
                ticks_sent.append(np.asarray(executed if executed is not None else self._last_sent_or_zeros()))
                ticks_teleop.append(teleop_tick)
            if action is None:
                holds += int(safe.held)
            else:
                marks["clamped_ticks"] += int(safe.clamped)
                marks["limited_ticks"] += int(safe.limited)
            end = self._episode_end(events, teleop_events, ticks, limit_ticks, started, duration_s)
            reward = 1.0 if end is not None and end.success else 0.0
            outcome.reward += reward
            self._record_frame(obs, executed, chunk, safe, end, reward, teleop_tick)
            if end is None and chunk is not None:
                left = len(chunk.actions) - idx
                # ask for the next chunk while this one still runs: inference gets `lead` tick periods
                if not requested and left <= self.lead.ticks(len(chunk.actions)) - 1:
                    self._request(io.raw_observation(obs))
                    requested = True
                if left == 0:
                    self._mark_intervention(outcome, ticks_sent, ticks_teleop)
                    finished.append(_Step(step_index, chunk, outcome, marks, first_tick, ticks))
                    step_index += 1
                    chunk = None
        if end.reason in ("estop", "watchdog"):
            self._fail_safe(end)
        self._set_intervening(False)
        if chunk is not None and outcome.env_steps:  # the chunk that ran when it ended
            self._mark_intervention(outcome, ticks_sent, ticks_teleop)
            finished.append(_Step(step_index, chunk, outcome, marks, first_tick, ticks))
        # the episode's last macro-step: the last one run, or, for a person's back-dated label, the one that ran
        # label_reaction_s before it; the ones after that are not sent (see the module docstring)
        last_at = len(finished) - 1
        # a person's verdict on the attempt only: an e-stop, "end" or an abort lands where it happened
        if reaction_ticks and end.label[0] == "OPERATOR" and end.reason in ("success", "failure") and finished:
            judged = ticks - reaction_ticks
            last_at = max([i for i, step in enumerate(finished) if step.first_tick <= judged] or [0])
        for step in finished[:last_at]:
            self._write(episode, step)
        after = finished[last_at + 1 :] if finished else []
        if after:
            s.steps_after_label += len(after)
            metrics.STEPS_AFTER_LABEL.labels(rid).inc(len(after))
        last = finished[last_at] if finished else None
        if last is not None:
            out, mk = last.outcome, last.marks
            out.reward = 1.0 if end.success else 0.0  # the label's reward, on the step it judged
            if not after:  # ticks held after the last chunk ran out belong to it
                mk["held_ticks"] += holds
            mk["estop"], mk["watchdog"] = end.reason == "estop", end.reason == "watchdog"
            out.terminated, out.truncated, out.success = end.terminated, not end.terminated, end.success
            out.label = end.label
            if out.truncated:
                cut = self._last_obs if self._last_obs is not None else obs
                out.final_observation = {
                    k: v[0].numpy() for k, v in self.worker.observe(io.raw_observation(cut)).items()
                }
            self._write(episode, last)
        with self._lock:
            self._token += 1  # a chunk still being sampled for this episode is dropped on arrival
            self._ready, self._waiting = None, False
        s.episodes += 1
        s.successes += int(end.success)
        if self.recorder is not None:
            self.recorder.end_episode(success=end.success, reason=end.reason, label=end.label[0].lower())
        log.info("robot %s: episode ended (%s; %s %s)", rid, end.reason, *end.label[:2])
        return end

    def _episode_end(self, events, teleop_events, ticks, limit_ticks, started, duration_s) -> EpisodeEnd | None:
        """Whether this tick ends the episode, and how (see the module's table). An operator's label wins
        over every other source; the robot's own verdict counts only with episode.outcome=robot."""
        for verdict in ("abort", "failure", "success"):
            if verdict in events:
                return EpisodeEnd(verdict, success=verdict == "success", label=("OPERATOR", verdict.upper(), 0.0))
        if _teleop_flag(teleop_events, "rerecord_episode"):
            return EpisodeEnd("abort", label=("OPERATOR", "ABORT", 0.0))
        if _teleop_flag(teleop_events, "success"):
            return EpisodeEnd("success", success=True, label=("OPERATOR", "SUCCESS", 0.0))
        if _teleop_flag(teleop_events, "failure") or _teleop_flag(teleop_events, "terminate_episode"):
            return EpisodeEnd("failure", label=("OPERATOR", "FAILURE", 0.0))
        # the robot's own step limit cuts the episode short whoever judges it; its verdict (episode_status) is
        # not even read unless it is the outcome source
        if _robot_truncated(self.robot):
            return EpisodeEnd("time_limit", label=("TIME_LIMIT", "FAILURE", 0.0))
        if self.outcome == "robot" and hasattr(self.robot, "episode_status"):
            status = self.robot.episode_status()
            if status is not None:
                return EpisodeEnd(status, success=status == "success", label=("ENV", status.upper(), 0.0))
        if self.detector is not None:
            fired, score = self.detector.poll()
            if fired:
                return EpisodeEnd("success", success=True, label=("DETECTOR", "SUCCESS", float(score)))
        if "end" in events:
            return EpisodeEnd("operator_end", label=("OPERATOR", "FAILURE", 0.0))
        if ticks >= limit_ticks:
            return EpisodeEnd("time_limit", label=("TIME_LIMIT", "FAILURE", 0.0))
        if duration_s is not None and time.perf_counter() - started >= duration_s:
            return EpisodeEnd("stop", label=("OPERATOR", "ABORT", 0.0))
        return None

    # --- interventions ----------------------------------------------------------------------------

    def _teleop_events(self) -> dict:
        """The teleoperator's own buttons (LeRobot's gamepad / keyboard teleoperators have them)."""
        if self.teleop is None or not hasattr(self.teleop, "get_teleop_events"):
            return {}
        try:
            return self.teleop.get_teleop_events() or {}
        except Exception:  # noqa: BLE001  a flaky pad must not stop the robot: no events this tick
            log.exception("teleop.get_teleop_events() failed")
            return {}

    def _update_intervention(self, events: set, teleop_events: dict) -> None:
        if self.teleop is None:
            if events & {"intervene", "takeover"}:
                log.warning("robot %s: no teleoperator to take over with (give --teleop.type=...)", self.robot_id)
            return
        active = self.intervening and not self._handback  # a person drives and means to go on
        want = None
        if "takeover" in events or ("intervene" in events and not active):
            want = True
        elif "handback" in events or ("intervene" in events and active):
            want = False
        held = _teleop_flag(teleop_events, "is_intervention")
        if held and not self.intervening:
            want = True  # a pad's intervention button: held = a person drives
        elif not held and self.intervening and self._pad_held:
            want = False
        self._pad_held = held
        if want is True and not active:
            if not self.intervening:
                self.stats.interventions += 1
                metrics.INTERVENTIONS.labels(self.robot_id).inc()
                log.warning("robot %s: a person has taken over", self.robot_id)
            self._set_intervening(True)
        elif want is False and self.intervening and not self._handback:
            self._handback = True  # the policy drives again at the next chunk boundary
            log.warning("robot %s: handing back to the policy at the next chunk boundary", self.robot_id)

    def _set_intervening(self, on: bool) -> None:
        self.intervening, self._handback = on, False
        metrics.INTERVENING.labels(self.robot_id).set(int(on))

    def _teleop_action(self) -> np.ndarray | None:
        """The teleoperator's action in the robot's action order (None when its read failed: the tick holds)."""
        try:
            return self.io.action_vector(self.teleop.get_action())
        except Exception:  # noqa: BLE001  counted and logged; the safety layer holds the arm this tick
            self.stats.teleop_errors += 1
            log.exception("teleop.get_action() failed: holding")
            return None

    def _mark_intervention(self, outcome: Outcome, sent: list, teleop: list) -> None:
        """A macro-step a person drove any tick of carries what was sent and which ticks they drove."""
        if any(teleop):
            outcome.intervention = (np.stack(sent).astype(np.float32), np.asarray(teleop, bool))
            self.stats.intervened_steps += 1
            metrics.INTERVENED_STEPS.labels(self.robot_id).inc()

    def _write(self, episode: str, step: _Step) -> None:
        step.outcome.safety = dict(step.marks)
        self.writer.submit(episode, step.index, step.chunk, step.outcome)  # written off the control thread

    def close(self) -> None:
        """Write every record still queued (call after run)."""
        self.writer.close()

    def _fail_safe(self, end: EpisodeEnd) -> None:
        """After an e-stop or watchdog trip: the e-stop action on the robot (hold its present position,
        or torque off where the robot's API allows), counted in the safety layer's metrics."""
        from edge.safety import apply_estop_action, positions_from_observation

        self.estop.poll()  # counts and logs the latch (off the signal handler that may have set it)
        if end.reason == "estop":
            self._estop_applied = self.estop.latch_id
        obs = self._last_obs or {}
        # never raises: a failed robot call is logged and counted; the latch keeps policy actions away
        apply_estop_action(
            self.robot,
            self.estop_action,
            positions_from_observation(obs, self.io.action_names),
            robot_id=self.robot_id,
        )
        if end.reason == "estop":
            log.error(
                "robot %s: E-STOP (%s): no policy action is sent until released", self.robot_id, self.estop.source
            )

    def _record_frame(self, obs, executed, chunk, safe, end: EpisodeEnd | None, reward: float, teleop: bool) -> None:
        if self.recorder is None:
            return
        frame = self.io.frame(obs)
        frame["action"] = np.asarray(executed if executed is not None else self._last_sent_or_zeros(), np.float32)
        frame["policy_version"] = np.asarray([chunk.version if chunk is not None else self.worker.version], np.int64)
        frame["next.reward"] = np.asarray([reward], np.float32)
        frame["next.done"] = np.asarray([end is not None], bool)
        frame["next.success"] = np.asarray([end is not None and end.success], bool)
        frame["safety.clamped"] = np.asarray([bool(safe.clamped)], bool)
        frame["safety.limited"] = np.asarray([bool(safe.limited)], bool)
        frame["safety.held"] = np.asarray([bool(safe.held)], bool)
        frame["safety.estop"] = np.asarray([end is not None and end.reason == "estop"], bool)
        frame["safety.watchdog"] = np.asarray([end is not None and end.reason == "watchdog"], bool)
        frame["intervention"] = np.asarray([teleop], bool)
        self.recorder.add_frame(frame)

    def _last_sent_or_zeros(self) -> np.ndarray:
        if self._last_sent is not None:
            return self._last_sent
        return np.zeros(len(self.io.action_names), np.float32)


def _robot_truncated(robot) -> bool:
    """Whether the robot ended its episode at its own step limit (``episode_truncated``, a property or a
    method, where the robot has one)."""
    truncated = getattr(robot, "episode_truncated", False)
    return bool(truncated() if callable(truncated) else truncated)


def _marks() -> dict[str, int | bool]:
    return {"clamped_ticks": 0, "limited_ticks": 0, "held_ticks": 0, "estop": False, "watchdog": False}
