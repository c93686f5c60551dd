"""Latency-aware chunk scheduling (edge/chunk_schedule.py, edge/control.py's PacedLoop)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from edge.chunk_schedule import LeadTime
from edge.configuration import ControlConfig
from edge.control import LoopStats, PacedLoop, RecordWriter
from edge.records import Decision
from edge.spool import Spool
from helpers.robot_loop_fakes import records
from pirl.codec import from_tensor_msg

HZ = 50.0


def test_the_lead_is_a_high_latency_percentile_plus_the_margin_in_ticks():
    lead = LeadTime(1 / HZ, margin_s=0.005)
    assert lead.ticks(8) == 1  # nothing measured yet: the one-tick schedule
    for _ in range(30):
        lead.observe(0.060, version=0)
    assert lead.budget_s() == pytest.approx(0.065)
    assert lead.ticks(8) == 4  # 65 ms at 20 ms a tick
    assert LeadTime(1 / HZ, fixed_ticks=2).ticks(8) == 2


def test_few_latencies_are_given_room_and_a_slow_tail_sets_the_lead():
    lead = LeadTime(1 / HZ, margin_s=0.0)
    for _ in range(5):
        lead.observe(0.020, version=0)
    assert lead.budget_s() == pytest.approx(0.030)  # 1.5x the slowest until 20 are in
    for i in range(195):
        lead.observe(0.110 if i % 50 == 0 else 0.020, version=0)  # 2% of calls are slow
    assert lead.ticks(8) >= 5  # p99 sees the slow tail


def test_after_a_swap_the_new_versions_latencies_replace_the_old_ones():
    lead = LeadTime(1 / HZ, margin_s=0.0, after_swap=20)
    for _ in range(50):
        lead.observe(0.150, version=0)
    assert lead.ticks(16) == 8
    for _ in range(19):
        lead.observe(0.030, version=1)
    assert lead.ticks(16) == 8  # not enough of the new version's own yet: keep the old, longer lead
    lead.observe(0.030, version=1)
    assert lead.ticks(16) == 2  # the faster version's own latencies now
    for _ in range(25):
        lead.observe(0.090, version=2)  # a slower one: its lead grows as soon as it is measured
    assert lead.ticks(16) == 5


def test_a_chunk_shorter_than_inference_caps_the_lead_and_warns_once(caplog):
    lead = LeadTime(1 / HZ, margin_s=0.0)
    for _ in range(30):
        lead.observe(0.200, version=0)
    with caplog.at_level(logging.WARNING, logger="edge.chunk_schedule"):
        assert lead.ticks(4) == 4
        assert lead.ticks(4) == 4
    assert len([r for r in caplog.records if "longer than a chunk" in r.message]) == 1


def test_bad_lead_settings_are_clear_errors():
    with pytest.raises(ValueError, match="control.lead_ticks: must be >= 1"):
        ControlConfig(lead_ticks=0)
    with pytest.raises(ValueError, match="control.lead_percentile"):
        ControlConfig(lead_percentile=0)
    with pytest.raises(ValueError, match="at most the policy's n_action_steps=4"):
        LeadTime.for_control(ControlConfig(lead_ticks=5), 4)
    lead = LeadTime.for_control(ControlConfig(hz=30, lead_ticks=3, lead_margin_ms=7), 4)
    assert lead.ticks(4) == 3 and lead.period_s == pytest.approx(1 / 30) and lead.margin_s == pytest.approx(0.007)


class CounterEnv:
    """One env whose observation is the number of steps taken in the episode; episodes last ``length``."""

    num_envs = 1

    def __init__(self, length: int):
        self.length, self.t = length, 0

    def _obs(self):
        return {"agent_pos": np.full((1, 2), float(self.t), np.float32)}

    def reset(self, seed=None):
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        done = self.t >= self.length
        return self._obs(), np.zeros(1), np.array([False]), np.array([done]), {"is_success": np.array([False])}

    def close(self):
        pass


class SlowWorker:
    """An inference worker whose every chunk takes ``delay_s``; it runs one job at a time, in order, on its
    own thread (as edge.inference.InferenceWorker does). Each action says which step it was decided at."""

    version = 0

    def __init__(self, delay_s: float, chunk: int):
        import queue

        self.delay_s, self.chunk, self.jobs = delay_s, chunk, queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, raw, done, after=None):
        self.jobs.put((raw["agent_pos"][0].copy(), done))

    def _run(self):
        while True:
            at, done = self.jobs.get()
            time.sleep(self.delay_s)
            done(
                Decision(
                    version=0,
                    observation={"observation.state": at},
                    chain=np.zeros((2, self.chunk, 1), np.float32),
                    stochastic=np.ones(1, bool),
                    noise_level=0.5,
                    log_prob=0.0,
                    value=0.0,
                    actions=np.full((self.chunk, 1), at[0], np.float32),
                )
            )

    def observe(self, raw):
        import torch

        return {"observation.state": torch.as_tensor(raw["agent_pos"])}


@pytest.mark.slow  # a paced loop at 50 Hz for a few seconds
def test_slow_inference_is_asked_early_and_records_hold_the_decision_observation(tmp_path):
    chunk, delay = 8, 0.050  # 50 ms inference, 2.5 ticks
    stats = LoopStats()
    spool = Spool(tmp_path / "spool", fsync=False)
    lead = LeadTime(1 / HZ, margin_s=0.015)
    loop = PacedLoop(
        CounterEnv(length=40),
        SlowWorker(delay, chunk),
        RecordWriter(spool, "r", stats),
        robot_id="r",
        control_hz=HZ,
        lead=lead,
    )
    loop.run(threading.Event(), duration_s=3.0)
    loop.writer.close()
    recs = records(spool)
    spool.close()

    base = LoopStats()
    spool = Spool(tmp_path / "one-tick", fsync=False)
    one_tick = PacedLoop(
        CounterEnv(length=40),
        SlowWorker(delay, chunk),
        RecordWriter(spool, "r", base),
        robot_id="r",
        control_hz=HZ,
        lead=LeadTime(1 / HZ, fixed_ticks=1),
    )
    one_tick.run(threading.Event(), duration_s=3.0)
    spool.close()

    # the measured lead hides the latency; asking at the last tick (as before) starves every chunk
    assert 3 <= lead.ticks(chunk) <= chunk
    assert stats.starved_ticks < base.starved_ticks / 10 and base.starved_ticks > 2 * base.episodes
    # a record's observation is where the chunk was decided: before its first action, within the previous
    # chunk (or at the episode's start), never after the chunk began
    by_episode: dict[str, list] = {}
    for r in recs:
        by_episode.setdefault(r.episode_id, []).append(r)
    early = 0
    for steps in by_episode.values():
        steps.sort(key=lambda r: r.step_index)
        start = 0  # env step at which each chunk's first action ran
        for i, r in enumerate(steps):
            decided = int(from_tensor_msg(r.observation["observation.state"])[0])
            if i == 0:
                assert decided == 0
            else:
                assert start - chunk < decided <= start, (start, decided)  # asked while the last chunk ran
                early += decided < start
            start += r.env_steps
    assert early > 5
