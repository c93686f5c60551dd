"""When each robot last reached the learner, kept across learner restarts.

``pirl_learner_robot_last_seen_timestamp_seconds`` is what lets the sync-stale alert see a robot
that is switched off (its own /metrics is gone with it). A gauge lives in the learner's memory, so
after a restart it would only know the robots that have called since, and a robot that was already
off would never be reported. The times are therefore also written to a small JSON file in the
learner's output directory (on its volume) and exported again when the learner starts.

Writes are rate-limited (an RPC thread writes at most every ``persist_every_s``; ``close`` writes
the rest): what a crash can lose is at most that much of "seen", which the robot's next call
(every heartbeat) restores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path

from learner import metrics

log = logging.getLogger(__name__)


class RobotContacts:
    def __init__(self, path: Path | None, robot_ids, *, persist_every_s: float = 5.0, clock=time.time):
        self.path, self.persist_every_s, self._clock = path, persist_every_s, clock
        self._fleet = set(robot_ids)
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._written_at = -math.inf
        self._dirty = False
        for robot_id, t in self._load().items():
            self._seen[robot_id] = t
            metrics.LEARNER_ROBOT_LAST_SEEN.labels(robot_id=robot_id).set(t)

    def _load(self) -> dict[str, float]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            seen = {str(k): float(v) for k, v in data["last_seen_unix_s"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            # our own file, damaged (e.g. a full disk): losing it only loses the restart memory
            log.warning(
                "ignoring %s (%s): robots seen before this start are not reported as stale until they call",
                self.path,
                e,
            )
            return {}
        dropped = sorted(set(seen) - self._fleet)
        if dropped:  # removed from the tokens file: no longer part of the fleet, no longer watched
            log.info("robots no longer in the tokens file, not watched: %s", ", ".join(dropped))
        return {k: v for k, v in seen.items() if k in self._fleet}

    def seen(self, robot_id: str) -> None:
        now = self._clock()
        metrics.LEARNER_ROBOT_LAST_SEEN.labels(robot_id=robot_id).set(now)
        with self._lock:
            self._seen[robot_id] = now
            self._dirty = True
            if now - self._written_at >= self.persist_every_s:
                self._write_locked(now)

    def last_seen(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seen)

    def close(self) -> None:
        with self._lock:
            if self._dirty:
                self._write_locked(self._clock())

    def _write_locked(self, now: float) -> None:
        self._written_at = now
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"last_seen_unix_s": self._seen}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as e:  # serving robots matters more than this file: say so, keep serving
            log.warning("could not write %s: %s", self.path, e)
