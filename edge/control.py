"""The edge's control loops.

Paced (what a robot runs): one env ticks at ``control_hz``. At the tick that executes a chunk's last
action, the observation right after it is handed to the inference worker together with the
finished macro-step's record; the next chunk is therefore sampled from the observation at its own
decision time, and the worker has a whole tick period to deliver it. A tick never waits for
inference: if no action is ready it holds (counted as a deadline miss). The executed actions are
exactly the sampled chunk's first ``n_action_steps`` actions.

Unpaced (simulation only): a vector of envs runs whole episodes as fast as the machine allows, with
the same sampler, and records every macro-step.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from edge import metrics
from edge.records import Decision, Outcome, make_record
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
    """Appends finished macro-steps to the spool (never silently: a full spool is counted and logged)."""

    def __init__(self, spool, robot_id: str, stats: LoopStats):
        self.spool, self.robot_id, self.stats = spool, robot_id, stats
        self._lock = threading.Lock()

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
    ):
        if getattr(env, "num_envs", 1) != 1:
            raise ValueError("the paced control loop drives exactly one env (num_envs=1)")
        self.env, self.worker, self.writer = env, worker, writer
        self.robot_id, self.period, self.seed = robot_id, 1.0 / control_hz, seed
        self.late_after = late_fraction * self.period  # a tick starting this late counts as missed
        self.stats = writer.stats
        self._ready: Decision | None = None
        self._waiting = False
        self.current_rate = 0.0  # ticks in the last second
        self._lock = threading.Lock()
        metrics.CONTROL_TARGET.labels(robot_id).set(control_hz)
        metrics.DEADLINE_MISSES.labels(robot_id)  # exported at 0, so rate() sees the first miss

    # decisions arrive on the worker thread
    def _deliver(self, decision: Decision | None) -> None:
        with self._lock:
            self._ready, self._waiting = decision, False

    def _request(self, raw, record: tuple | None) -> None:
        with self._lock:
            self._waiting = True

        def persist():  # on the worker, right after the next chunk is delivered
            if record is not None:
                self.writer.write(*record)

        self.worker.submit(raw, self._deliver, after=persist)

    def _take(self) -> Decision | None:
        with self._lock:
            d, self._ready = self._ready, None
            return d

    def run(self, stop: threading.Event, *, duration_s: float | None = None, max_episodes: int | None = None):
        env, s, rid = self.env, self.stats, self.robot_id
        raw, _ = env.reset(seed=self.seed)
        episode, step_index = uuid.uuid4().hex, 0
        chunk: Decision | None = None
        idx = 0
        outcome = Outcome()
        self._request(raw, None)
        while self._waiting and not stop.is_set():  # the first chunk, before the first tick (start-up)
            time.sleep(0.001)
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
            if chunk is None or idx >= len(chunk.actions):
                nxt = self._take()
                if nxt is None:  # inference not back yet: hold this tick
                    s.starved_ticks += 1
                    s.deadline_misses += 1
                    metrics.DEADLINE_MISSES.labels(rid).inc()
                    next_tick = max(next_tick + self.period, time.perf_counter())
                    continue
                chunk, idx, outcome = nxt, 0, Outcome()
            if missed:
                s.deadline_misses += 1
                metrics.DEADLINE_MISSES.labels(rid).inc()
            raw, r, te, tr, info = env.step(chunk.actions[idx][None])
            idx += 1
            outcome.reward += float(r[0])
            outcome.env_steps += 1
            ended = bool(te[0] or tr[0])
            if ended:
                outcome.terminated, outcome.truncated = bool(te[0]), bool(tr[0] and not te[0])
                outcome.success = bool(info["is_success"][0])
                if outcome.truncated:
                    outcome.final_observation = {k: v[0].numpy() for k, v in self.worker.observe(raw).items()}
                s.episodes += 1
                s.successes += int(outcome.success)
                record = (episode, step_index, chunk, outcome)
                raw, _ = env.reset()
                episode, step_index = uuid.uuid4().hex, 0
                chunk = None
                self._request(raw, record)
            elif idx == len(chunk.actions):
                record = (episode, step_index, chunk, outcome)
                step_index += 1
                self._request(raw, record)
            # stay on the fixed grid; if we fell more than a period behind, skip ahead (no burst)
            next_tick += self.period
            if time.perf_counter() - next_tick > self.period:
                next_tick = time.perf_counter()
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
        T, N = batch.valid.shape
        final = batch.info["final_observation"]
        steps = batch.info["step_env_steps"]
        for j in range(N):
            episode = uuid.uuid4().hex
            for t in range(T):
                if not batch.valid[t, j]:
                    break
                d = Decision(
                    version=version,
                    observation={k: v[t, j].numpy() for k, v in batch.observations.items()},
                    chain=batch.chains[t, j].numpy(),
                    stochastic=batch.stochastic[t, j].numpy(),
                    noise_level=float(batch.noise_level[t, j]),
                    log_prob=float(batch.log_probs[t, j]),
                    value=float(batch.values[t, j]),
                    actions=np.zeros((n_exec, 0), np.float32),
                )
                te, tr = bool(batch.terminated[t, j]), bool(batch.truncated[t, j])
                o = Outcome(
                    reward=float(batch.rewards[t, j]),
                    terminated=te,
                    truncated=tr,
                    success=bool(batch.episode_success[j]) and (te or tr),
                    env_steps=int(steps[t, j]),
                )
                if tr:
                    o.final_observation = {k: v[j].numpy() for k, v in final.items()}
                self.writer.write(episode, t, d, o)
            self.stats.episodes += 1
            self.stats.successes += int(batch.episode_success[j])
