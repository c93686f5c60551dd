"""The edge's control loops.

Paced (what a robot runs): one env ticks at ``control_hz``. The next chunk is asked for while the
current one still runs, ``lead`` ticks before it runs out (edge.chunk_schedule: the measured inference
latency, a high percentile plus a margin, in ticks), from the observation at that tick; the record holds
that decision observation and the chunk exactly as sampled. A tick never waits for inference: if no
action is ready it holds (counted as a deadline miss). An episode's first chunk is sampled before its
first tick, while the env waits at its reset state. The executed actions are exactly the sampled
chunk's first ``n_action_steps`` actions; records are written by a background thread.

Unpaced (simulation only): a vector of envs runs whole episodes as fast as the machine allows, with
the same sampler, and records every macro-step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from edge import metrics
from edge.chunk_schedule import LeadTime
from edge.records import Decision, Outcome, batch_decisions, make_record
from lerobot_policy_pi_rl.rollout import collect_rollouts

log = logging.getLogger(__name__)


@dataclass
class LoopStats:
    ticks: int = 0
    deadline_misses: int = 0
    late_ticks: int = 0
    starved_ticks: int = 0
    episodes: int = 0
    successes: int = 0
    records: int = 0
    records_refused_spool_full: int = 0
    reset_wait_s: float = 0.0  # waiting at a reset state for an episode's first chunk (not ticks)
    tick_intervals_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        iv = np.asarray(self.tick_intervals_s[1:]) if len(self.tick_intervals_s) > 1 else np.zeros(0)
        out = {k: v for k, v in self.__dict__.items() if k != "tick_intervals_s"}
        out["deadline_miss_ratio"] = self.deadline_misses / self.ticks if self.ticks else 0.0
        if iv.size:
            # rate implied by the median and by the 99th-percentile (slow tail) tick interval
            out["control_rate_hz_p50"] = float(1.0 / np.percentile(iv, 50))
            out["control_rate_hz_p99"] = float(1.0 / np.percentile(iv, 99))
            out["tick_interval_ms_p50"] = float(1e3 * np.percentile(iv, 50))
            out["tick_interval_ms_p99"] = float(1e3 * np.percentile(iv, 99))
        return out


class RecordWriter:
    """Appends finished macro-steps to the spool (never silently: a full spool is counted and logged).

    ``write`` appends on the caller's thread; ``submit`` queues for a background thread, so a control loop
    never waits for a disk write (``close`` writes what is still queued)."""

    def __init__(self, spool, robot_id: str, stats: LoopStats):
        self.spool, self.robot_id, self.stats = spool, robot_id, stats
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def write(self, episode_id: str, step_index: int, decision: Decision, outcome: Outcome) -> None:
        from edge.spool import SpoolFullError

        try:
            self.spool.allocate_and_append(
                lambda seq: make_record(self.robot_id, seq, episode_id, step_index, decision, outcome)
            )
            with self._lock:
                self.stats.records += 1
        except SpoolFullError as e:
            with self._lock:
                self.stats.records_refused_spool_full += 1
            metrics.RECORDS_REFUSED.labels(self.robot_id, "spool_full").inc()
            log.error("rollout record not kept: %s", e)

    def submit(self, episode_id: str, step_index: int, decision: Decision, outcome: Outcome) -> None:
        """Queue one record for the background writer (records keep their order)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pirl-records", daemon=True)
                self._thread.start()
        self._queue.put((episode_id, step_index, decision, outcome))

    def close(self, timeout: float = 30.0) -> None:
        """Write every queued record, then stop the background writer (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.write(*item)
            except Exception:  # noqa: BLE001  a full spool is counted by write; anything else is logged
                log.exception("writing a rollout record failed")


class PacedLoop:
    def __init__(
        self,
        env,
        worker,
        writer: RecordWriter,
        *,
        robot_id: str,
        control_hz: float,
        seed: int = 0,
        late_fraction: float = 0.5,
        lead: LeadTime | None = None,
    ):
        """``lead``: when to ask for the next chunk (edge.chunk_schedule); default: measured."""
        if getattr(env, "num_envs", 1) != 1:
            raise ValueError("the paced control loop drives exactly one env (num_envs=1)")
        self.env, self.worker, self.writer = env, worker, writer
        self.robot_id, self.period, self.seed = robot_id, 1.0 / control_hz, seed
        self.late_after = late_fraction * self.period  # a tick starting this late counts as missed
        self.lead = lead or LeadTime(self.period)
        self.stats = writer.stats
        self._ready: Decision | None = None
        self._waiting = False
        self._token = 0
        self._worker_busy = False  # a dropped request may still be running on the worker
        self.current_rate = 0.0  # ticks in the last second
        self._lock = threading.Lock()
        metrics.CONTROL_TARGET.labels(robot_id).set(control_hz)
        metrics.DEADLINE_MISSES.labels(robot_id)  # exported at 0, so rate() sees the first miss

    # decisions arrive on the worker thread; a token ties each to its request, so a chunk requested
    # for an episode that has ended since is never executed in the next one
    def _request(self, raw, measure: bool = True) -> None:
        with self._lock:
            self._token += 1
            token, self._ready, self._waiting = self._token, None, True
        asked = time.perf_counter() if measure else None
        self.worker.submit(raw, lambda decision: self._deliver(decision, token, asked))

    def _deliver(self, decision: Decision | None, token: int, asked: float | None) -> None:
        if decision is not None and asked is not None:
            self.lead.observe(time.perf_counter() - asked, decision.version)
        with self._lock:
            if token == self._token:
                self._ready, self._waiting = decision, False

    def _drop_request(self) -> None:
        with self._lock:
            self._token += 1  # a chunk still being sampled is dropped on arrival
            # ... and keeps the worker busy: the next request waits behind it, which says nothing
            # about how long inference takes (not measured)
            self._worker_busy = self._waiting
            self._ready, self._waiting = None, False

    def _take(self) -> Decision | None:
        with self._lock:
            d, self._ready = self._ready, None
            return d

    def _first_chunk(self, raw, stop: threading.Event) -> Decision | None:
        """An episode's first chunk, sampled before its first tick: the env waits at its reset state."""
        started = time.perf_counter()
        self._request(raw, measure=not self._worker_busy)
        while self._waiting and not stop.is_set():
            time.sleep(0.001)
        self.stats.reset_wait_s += time.perf_counter() - started
        return self._take()

    def run(self, stop: threading.Event, *, duration_s: float | None = None, max_episodes: int | None = None):
        env, s, rid = self.env, self.stats, self.robot_id
        raw, _ = env.reset(seed=self.seed)
        episode, step_index = uuid.uuid4().hex, 0
        outcome = Outcome()
        chunk, idx, requested = self._first_chunk(raw, stop), 0, False
        start = time.perf_counter()
        next_tick = start
        last_tick = None
        rate_window: list[float] = []
        while not stop.is_set():
            if duration_s is not None and time.perf_counter() - start >= duration_s:
                break
            if max_episodes is not None and s.episodes >= max_episodes:
                break
            delay = next_tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            now = time.perf_counter()
            s.ticks += 1
            metrics.TICKS.labels(rid).inc()
            if last_tick is not None:
                s.tick_intervals_s.append(now - last_tick)
            last_tick = now
            rate_window.append(now)
            while rate_window and rate_window[0] < now - 1.0:
                rate_window.pop(0)
            self.current_rate = float(len(rate_window))
            metrics.CONTROL_RATE.labels(rid).set(self.current_rate)
            missed = False
            if now - next_tick > self.late_after:
                missed = True
                s.late_ticks += 1
            if chunk is None:
                chunk = self._take()
                if chunk is None:  # inference not back yet: hold this tick
                    s.starved_ticks += 1
                    s.deadline_misses += 1
                    metrics.DEADLINE_MISSES.labels(rid).inc()
                    next_tick = max(next_tick + self.period, time.perf_counter())
                    continue
                idx, requested, outcome = 0, False, Outcome()
            if missed:
                s.deadline_misses += 1
                metrics.DEADLINE_MISSES.labels(rid).inc()
            raw, r, te, tr, info = env.step(chunk.actions[idx][None])
            idx += 1
            outcome.reward += float(r[0])
            outcome.env_steps += 1
            if bool(te[0] or tr[0]):
                outcome.terminated, outcome.truncated = bool(te[0]), bool(tr[0] and not te[0])
                outcome.success = bool(info["is_success"][0])
                if outcome.truncated:
                    outcome.final_observation = {k: v[0].numpy() for k, v in self.worker.observe(raw).items()}
                s.episodes += 1
                s.successes += int(outcome.success)
                self.writer.submit(episode, step_index, chunk, outcome)
                self._drop_request()  # a chunk asked for this episode never runs: it is not recorded
                if max_episodes is not None and s.episodes >= max_episodes:
                    break
                raw, _ = env.reset()
                episode, step_index = uuid.uuid4().hex, 0
                chunk, idx, requested, outcome = self._first_chunk(raw, stop), 0, False, Outcome()
                # the episode's first tick: a period after the last one at the earliest (the env is never
                # stepped faster than control_hz), else now, on a fresh grid
                next_tick, last_tick = max(next_tick + self.period, time.perf_counter()), None
                continue
            left = len(chunk.actions) - idx
            # ask for the next chunk while this one still runs: inference gets `lead` tick periods
            if not requested and left <= self.lead.ticks(len(chunk.actions)) - 1:
                self._request(raw)
                requested = True
            if left == 0:
                self.writer.submit(episode, step_index, chunk, outcome)
                step_index += 1
                chunk = None
            # stay on the fixed grid; if we fell more than a period behind, skip ahead (no burst)
            next_tick += self.period
            if time.perf_counter() - next_tick > self.period:
                next_tick = time.perf_counter()
        self._drop_request()
        return s


class UnpacedLoop:
    """Simulation only: ``env.num_envs`` episodes per batch, as fast as the machine allows."""

    def __init__(
        self, env, worker, writer: RecordWriter, *, robot_id: str, seed: int = 0, max_backlog: int | None = None
    ):
        self.env, self.worker, self.writer, self.robot_id, self.seed = env, worker, writer, robot_id, seed
        self.stats = writer.stats
        # simulation can outrun the learner: collect no more while this many records wait to be
        # uploaded, so the data stays within the learner's allowed policy-version lag
        self.max_backlog = max_backlog if max_backlog is not None else 4 * env.num_envs

    def run(self, stop: threading.Event, *, duration_s: float | None = None, max_episodes: int | None = None):
        import torch

        start = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        b = 0
        while not stop.is_set():
            if duration_s is not None and time.perf_counter() - start >= duration_s:
                break
            if max_episodes is not None and self.stats.episodes >= max_episodes:
                break
            if self.writer.spool.stats()["records"] >= self.max_backlog:
                stop.wait(0.05)
                continue
            self.worker.swap_if_pending()  # batch boundary = chunk boundary for every env
            version, runner = self.worker.version, self.worker.active_runner
            t0 = time.perf_counter()
            batch = collect_rollouts(
                runner,
                self.env,
                seeds=(self.seed + 1) * 10**9 + b * self.env.num_envs,
                generator=generator,
                noise_level=runner.policy.config.noise_level_at(version),
            )
            metrics.INFERENCE_LATENCY.labels(self.robot_id, self.worker.backend).observe(
                (time.perf_counter() - t0) / max(1, batch.chains.shape[0])
            )
            b += 1
            self._spool(batch, version, runner.policy.config.n_action_steps)
        return self.stats

    def _spool(self, batch, version: int, n_exec: int) -> None:
        ids = [uuid.uuid4().hex for _ in range(batch.valid.shape[1])]  # one episode per env of the batch
        for j, t, d, o in batch_decisions(batch, version, n_exec):
            self.writer.write(ids[j], t, d, o)
        self.stats.episodes += len(ids)
        self.stats.successes += int(batch.episode_success.sum())
