"""When to ask for the next chunk: early enough for the measured inference latency.

A paced loop executes a chunk of ``n`` actions, one per tick. If it asked for the next chunk only at the
tick of the current chunk's last action, inference would have one tick (20 ms at 50 Hz) and every policy
slower than that (a real VLA: 50-400 ms a chunk) would miss ticks at every chunk boundary. So the loop
asks ``lead`` ticks before the current chunk runs out, from the observation at that tick, and the next
chunk is sampled while the current one still runs:

    tick:      ... n-L   n-L+1 ...   n-1  |  0 (next chunk)
    request:        ^ observation of this tick -> the worker, which has L tick periods

``lead`` comes from the request -> delivery latencies the loop measures (queueing and the GIL included,
not only the sampler): a high percentile of the recent ones plus a margin, in ticks, rounded up. It adapts
as it runs, and after a policy swap the old version's latencies are dropped once the new version has
given enough of its own (a new version can be slower or faster: a new backend, a new engine).

What the learner sees does not change: a record holds the observation the chunk was sampled from (its
decision observation, now ``lead - 1`` ticks before the chunk starts) and the chunk exactly as sampled,
so the log-prob the learner recomputes is the sampler's and the PPO ratio stays 1. The ticks between the
decision and the chunk's start run the previous chunk, which the policy chose earlier: to the policy
they are part of the environment, as a robot's own actuation delay is.

A chunk shorter than the latency cannot be hidden: one worker delivers one chunk per latency, so the
lead is capped at ``n`` (ask at the chunk's first tick) and the loop warns that it will miss ticks.
"""

from __future__ import annotations

import collections
import logging
import math
import threading

import numpy as np

log = logging.getLogger(__name__)


class LeadTime:
    """Ticks before a chunk's end at which to request the next one, from measured latencies."""

    def __init__(
        self,
        period_s: float,
        *,
        fixed_ticks: int | None = None,
        percentile: float = 99.0,
        margin_s: float = 0.005,
        window: int = 200,
        after_swap: int = 20,
    ):
        """``period_s``: the tick period; ``fixed_ticks``: a fixed lead instead of the measured one; ``percentile`` of the last ``window``
        latencies plus ``margin_s`` is what inference is given; ``after_swap``: latencies of a newly
        served version that replace the old version's."""
        if fixed_ticks is not None and fixed_ticks < 1:
            raise ValueError(f"lead ticks: must be >= 1 (got {fixed_ticks})")
        self.period_s, self.fixed_ticks = period_s, fixed_ticks
        self.percentile, self.margin_s, self.after_swap = percentile, margin_s, after_swap
        self._samples: collections.deque[float] = collections.deque(maxlen=window)
        self._version: int | None = None
        self._new: list[float] | None = None  # latencies of a version served since the last swap, not yet trusted
        self._lock = threading.Lock()
        self._warned = False
        self.history: list[int] = []  # the lead after every observed latency (for benchmarks and logs)

    @classmethod
    def for_control(cls, control, chunk_ticks: int) -> LeadTime:
        """From the edge's ``control`` config (edge.configuration.ControlConfig: hz and lead_*), for a policy
        that executes ``chunk_ticks`` actions per chunk (a fixed lead longer than that is refused)."""
        if control.lead_ticks is not None and control.lead_ticks > chunk_ticks:
            raise ValueError(
                f"control.lead_ticks: at most the policy's n_action_steps={chunk_ticks} (got {control.lead_ticks})"
            )
        return cls(
            1.0 / control.hz,
            fixed_ticks=control.lead_ticks,
            percentile=control.lead_percentile,
            margin_s=control.lead_margin_ms / 1e3,
        )

    def observe(self, latency_s: float, version: int) -> None:
        """One request -> delivery latency, sampled by policy ``version`` (any thread)."""
        with self._lock:
            if self._version is None:
                self._version = version
            elif version != self._version:  # a swap: collect the new version's own latencies
                self._version, self._new = version, []
            self._samples.append(latency_s)  # meanwhile old and new both count
            if self._new is not None:
                self._new.append(latency_s)
                if len(self._new) >= self.after_swap:  # enough of its own: the old version's are dropped
                    self._samples.clear()
                    self._samples.extend(self._new)
                    self._new = None
            self.history.append(self._need_locked())

    def budget_s(self) -> float:
        """Seconds inference is given: the latency percentile plus the margin (0 before any sample)."""
        with self._lock:
            return self._budget_locked()

    def ticks(self, chunk_ticks: int) -> int:
        """The lead in ticks for a chunk of ``chunk_ticks`` actions: 1 (ask at its last action's tick) to
        ``chunk_ticks`` (ask at its first)."""
        with self._lock:
            need = self._need_locked()
            if need > chunk_ticks and not self._warned:
                self._warned = True
                log.warning(
                    "inference takes %.0f ms (p%.0f + margin), longer than a chunk of %d actions at %.0f Hz "
                    "(%.0f ms): ticks will be missed at chunk boundaries; execute more actions per chunk "
                    "(n_action_steps) or use a faster backend",
                    1e3 * self._budget_locked(),
                    self.percentile,
                    chunk_ticks,
                    1.0 / self.period_s,
                    1e3 * chunk_ticks * self.period_s,
                )
            return max(1, min(need, chunk_ticks))

    def _budget_locked(self) -> float:
        if not self._samples:
            return 0.0
        s = np.asarray(self._samples)
        # few samples: the percentile of a handful says little about the tail, so take the slowest with room
        high = float(np.percentile(s, self.percentile)) if len(s) >= 20 else 1.5 * float(s.max())
        return high + self.margin_s

    def _need_locked(self) -> int:
        if self.fixed_ticks is not None:
            return self.fixed_ticks
        return max(1, math.ceil(self._budget_locked() / self.period_s - 1e-9))
