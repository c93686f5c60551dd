"""Per-robot limits on the learner's long-lived streams, so no robot can starve another.

Every robot holds two long-lived calls (its rollout stream and its policy subscription), each on a
server thread; the server has a fixed number of call slots (``maximum_concurrent_rpcs``) sized for
the fleet. Without a per-robot limit one robot's token could hold every slot (50 idle streams: the
rest of the fleet locked out). So:

- each robot may hold at most ``per_robot`` open calls of each streaming RPC; one more is refused at
  once (RESOURCE_EXHAUSTED, no record marker: the edge keeps its records and retries). Two by default,
  so an edge that reconnects while the learner has not yet noticed its old stream is gone still gets
  in;
- a rollout stream that carries no record for ``idle_timeout_s`` is closed by the learner (the edge
  reconnects at once when it has something to send);
- dead peers (a robot that lost power mid-stream) are found by HTTP/2 keepalive pings
  (:func:`server_keepalive_options`), which ends their calls and frees the slot.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc

from learner import metrics
from pirl.logs import RateLimitedLog

log = logging.getLogger(__name__)
STREAM_RPCS = ("StreamRollouts", "SubscribePolicy")
UNARY_HEADROOM = 8  # call slots beyond the fleet's streams: Register / Heartbeat / health checks


@dataclass(frozen=True)
class StreamLimits:
    per_robot: int = 2  # open calls of each streaming RPC one robot may hold
    idle_timeout_s: float = 120.0  # a rollout stream with no record for this long is closed (0: never)
    keepalive_s: float = 30.0  # ping each connection this often; a peer silent keepalive_timeout_s later is dead
    keepalive_timeout_s: float = 10.0

    def __post_init__(self):
        if self.per_robot < 1:
            raise ValueError(f"max streams per robot must be >= 1 (got {self.per_robot})")
        if self.idle_timeout_s < 0 or self.keepalive_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ValueError("stream idle timeout must be >= 0 and keepalive times > 0")

    def call_slots(self, robots: int) -> int:
        """Concurrent calls the server admits: every robot's streams at its limit, plus headroom."""
        return robots * len(STREAM_RPCS) * self.per_robot + UNARY_HEADROOM


def server_keepalive_options(limits: StreamLimits) -> list[tuple[str, int]]:
    """gRPC server options: ping idle connections and drop peers that do not answer; accept the
    edges' own keepalive pings (every 20 s or more) instead of closing them with too_many_pings."""
    return [
        ("grpc.keepalive_time_ms", int(limits.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(limits.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class _Stream:
    __slots__ = ("robot_id", "rpc", "context", "last_activity", "idle_closed")

    def __init__(self, robot_id: str, rpc: str, context):
        self.robot_id, self.rpc, self.context = robot_id, rpc, context
        self.last_activity = time.monotonic()
        self.idle_closed = False

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class StreamRegistry:
    """Counts each robot's open streams, refuses those over the limit, and closes idle rollout streams."""

    def __init__(self, limits: StreamLimits, robot_ids=()):
        self.limits = limits
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], set[_Stream]] = {}
        self._stop = threading.Event()
        self._refusals = RateLimitedLog(log, period=30.0)
        for rpc in STREAM_RPCS:
            metrics.LEARNER_STREAMS_OPEN.labels(rpc=rpc).set(0)
            metrics.LEARNER_STREAMS_IDLE_CLOSED.labels(rpc=rpc)
            for robot_id in robot_ids:
                metrics.LEARNER_STREAMS_REFUSED.labels(robot_id=robot_id, rpc=rpc)
        self._watchdog = None
        if limits.idle_timeout_s:
            self._watchdog = threading.Thread(target=self._close_idle, name="pirl-stream-watchdog", daemon=True)
            self._watchdog.start()

    def open(self, robot_id: str, rpc: str, context) -> _Stream:
        """Register a new stream of ``robot_id``, or abort the call when the robot is at its limit."""
        with self._lock:
            streams = self._open.setdefault((robot_id, rpc), set())
            if len(streams) < self.limits.per_robot:
                stream = _Stream(robot_id, rpc, context)
                streams.add(stream)
                metrics.LEARNER_STREAMS_OPEN.labels(rpc=rpc).inc()
                self._export_connected()
                return stream
        metrics.LEARNER_STREAMS_REFUSED.labels(robot_id=robot_id, rpc=rpc).inc()
        self._refusals.warning(
            (robot_id, rpc),
            "refused a %s call of robot %s: it already holds %d (the per-robot limit, --max-streams-per-robot)",
            rpc,
            robot_id,
            self.limits.per_robot,
        )
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"robot {robot_id} already holds {self.limits.per_robot} open {rpc} calls (the per-robot limit)",
        )
        raise AssertionError("unreachable: context.abort raises")

    def close(self, stream: _Stream) -> None:
        with self._lock:
            streams = self._open.get((stream.robot_id, stream.rpc))
            if streams is not None and stream in streams:
                streams.discard(stream)
                metrics.LEARNER_STREAMS_OPEN.labels(rpc=stream.rpc).dec()
                if not streams:
                    del self._open[(stream.robot_id, stream.rpc)]
                self._export_connected()

    def _export_connected(self) -> None:
        """Robots with an open rollout stream (caller holds the lock): derived from the open streams."""
        metrics.LEARNER_CONNECTED.set(sum(rpc == "StreamRollouts" for _, rpc in self._open))

    def count(self, robot_id: str, rpc: str) -> int:
        with self._lock:
            return len(self._open.get((robot_id, rpc), ()))

    def _close_idle(self) -> None:
        """Cancel rollout streams that carried no record for idle_timeout_s (a blocked read cannot time
        out by itself; cancelling the call wakes the handler, which then unregisters the stream)."""
        timeout = self.limits.idle_timeout_s
        while not self._stop.wait(min(5.0, timeout / 4)):
            now = time.monotonic()
            with self._lock:
                idle = [
                    s
                    for (_, rpc), ss in self._open.items()
                    if rpc == "StreamRollouts"
                    for s in ss
                    if not s.idle_closed and now - s.last_activity > timeout
                ]
                for s in idle:
                    s.idle_closed = True
            for s in idle:
                log.info(
                    "closing the rollout stream of %s: no record for %.0fs (it reconnects when it has some)",
                    s.robot_id,
                    now - s.last_activity,
                )
                metrics.LEARNER_STREAMS_IDLE_CLOSED.labels(rpc=s.rpc).inc()
                s.context.cancel()

    def stop(self) -> None:
        self._stop.set()
