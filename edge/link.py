"""The edge's connections to the learner: the rollout uploader and the policy subscriber.

Both run in their own threads, reconnect with capped exponential backoff, and never block the
control loop: a learner outage only means records wait in the spool and the robot keeps running
the policy it has.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import grpc
import safetensors
from safetensors.torch import load as load_safetensors, load_file as load_safetensors_file

from edge import metrics
from edge.spool import Spool
from pirl.logs import RateLimitedLog
from pirl.refusals import judged_record
from pirl.security import auth_metadata, channel_credentials
from pirl.v1 import pirl_pb2

log = logging.getLogger(__name__)
SERVICE = "/pirl.v1.Learner/"
# HTTP/2 keepalive pings: a learner that vanished without closing the connection (power cut, network
# partition) is noticed within ~30 s instead of never; the learner accepts pings at this period
KEEPALIVE_OPTIONS = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000)]


@dataclass
class LearnerAddress:
    address: str
    robot_id: str
    token: str
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", 256 * 1024 * 1024), *KEEPALIVE_OPTIONS]
        if self.ca:
            creds = channel_credentials(self.ca, self.client_cert, self.client_key)
            return grpc.secure_channel(self.address, creds, options=options)
        return grpc.insecure_channel(self.address, options=options)

    @property
    def metadata(self):
        return auth_metadata(self.token)


def lowest_pending(spool: Spool) -> int:
    """The oldest unacked sequence in the spool (or the next one to be allocated when it is empty)."""
    first = spool.pending(limit=1)
    return first[0][0] if first else spool.next_sequence


class SyncClock:
    """Time of the last successful exchange with the learner (for seconds_since_last_sync)."""

    def __init__(self, robot_id: str):
        self.robot_id = robot_id
        self.last = time.monotonic()
        self.learner_version = 0  # newest version the learner told us about
        self.max_version_lag: int | None = None

    def touch(self) -> None:
        self.last = time.monotonic()

    def update_metric(self) -> None:
        metrics.SECONDS_SINCE_SYNC.labels(self.robot_id).set(time.monotonic() - self.last)


def update_link_metrics(robot_id: str, spool: Spool, clock: SyncClock) -> None:
    """Spool gauges and seconds since the last sync. The heartbeat refreshes them every period whatever
    the learner's state: while it is unreachable the uploader only backs off, and these are what the
    spool-growing and sync-stale alerts read."""
    s = spool.stats()
    metrics.SPOOL_RECORDS.labels(robot_id).set(s["records"])
    metrics.SPOOL_BYTES.labels(robot_id).set(s["bytes"])
    metrics.SPOOL_OLDEST_AGE.labels(robot_id).set(s["oldest_age_s"])
    metrics.update_spool_quarantine(robot_id, spool, s)  # files in quarantine/: records lost to corruption
    clock.update_metric()


def _stub(channel, name, kind):
    ident = lambda x: x  # noqa: E731  raw bytes in and out; we (de)serialise ourselves
    return getattr(channel, kind)(SERVICE + name, request_serializer=ident, response_deserializer=ident)


class Backoff:
    """Capped exponential backoff; logs the first failure of each outage (not every retry)."""

    def __init__(self, what: str, first=0.2, cap=5.0):
        self.what, self.first, self.cap, self.delay = what, first, cap, first
        self.failing = False

    def reset(self):
        if self.failing:
            log.info("%s: connected again", self.what)
        self.delay, self.failing = self.first, False

    def failed(self, e: grpc.RpcError, stop: threading.Event):
        if not self.failing:
            log.warning("%s: %s %s; retrying every <= %.0fs", self.what, e.code().name, e.details(), self.cap)
        self.retry(stop)

    def retry(self, stop: threading.Event):
        """Wait before the next attempt, for a failure the caller has already said."""
        self.failing = True
        self.wait(stop)

    def wait(self, stop: threading.Event):
        stop.wait(self.delay)
        self.delay = min(self.cap, self.delay * 2)


class _Background:
    """A daemon thread running ``_run`` until ``stop()``."""

    thread_name = "pirl-background"

    def __init__(self):
        self.stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self.stop_event.set()
        self._thread.join(timeout=10)

    def _run(self):
        raise NotImplementedError


class Uploader(_Background):
    """Streams spooled records to the learner; deletes each one when the learner acks it, or when the
    learner marks its refusal as a judgement of that record (pirl.refusals). Every other error (the
    learner busy or restarting, a limit, the network) keeps the record for the next attempt."""

    thread_name = "pirl-uploader"

    def __init__(
        self,
        link: LearnerAddress,
        spool: Spool,
        clock: SyncClock,
        *,
        edge_version: str = "0.1.0",
        backend: str = "torch",
        window: int = 256,
    ):
        super().__init__()
        self.link, self.spool, self.clock = link, spool, clock
        self.edge_version, self.backend, self.window = edge_version, backend, window
        self.sent = 0  # first sends only (not resends)
        self.resent = 0
        self.acked = 0
        self.duplicates = 0
        self.refused = collections.Counter()
        self._sent_once: set[int] = set()
        self._backoff = Backoff(f"rollout upload to {link.address}")
        self._say = RateLimitedLog(log, period=10.0)  # per-record and per-retry lines, bounded in rate

    def _register(self, channel) -> pirl_pb2.RegisterResponse:
        req = pirl_pb2.RegisterRequest(
            robot_id=self.link.robot_id,
            edge_version=self.edge_version,
            backend=self.backend,
            lowest_pending_sequence=lowest_pending(self.spool),
        )
        raw = _stub(channel, "Register", "unary_unary")(
            req.SerializeToString(), metadata=self.link.metadata, timeout=10
        )
        resp = pirl_pb2.RegisterResponse.FromString(raw)
        self.clock.learner_version = max(self.clock.learner_version, resp.policy_version)
        self.clock.max_version_lag = resp.max_version_lag
        # anything below the learner's watermark was acked before (e.g. we crashed before deleting it),
        # and our numbering must never go back below it (e.g. a wiped spool directory)
        self.spool.ack_upto(resp.next_sequence - 1)
        self.spool.advance_sequence(resp.next_sequence)
        return resp

    def _run(self):
        while not self.stop_event.is_set():
            stage = "registering with the learner"
            try:
                with self.link.channel() as channel:
                    self._register(channel)  # records the learner's version and lag on the clock
                    self.clock.touch()
                    stage = "streaming records"
                    self._stream(channel)
            except grpc.RpcError as e:
                if self.stop_event.is_set():
                    return
                if e.code() == grpc.StatusCode.UNAVAILABLE:  # learner down or unreachable: said once an outage
                    self._backoff.failed(e, self.stop_event)
                else:
                    self._say_what_ended(stage, e)
                    self._backoff.retry(self.stop_event)

    def _say_what_ended(self, stage: str, e: grpc.RpcError) -> None:
        """One line (rate-limited per status) saying what ended ``stage``. Only a judged record left the
        spool (said by _drop_judged); in every other case the records stay."""
        code, details = e.code(), e.details()
        if code == grpc.StatusCode.UNAUTHENTICATED:  # a configuration error, not an outage
            self._say.error(("upload", code), "the learner refused our token while %s: %s", stage, details)
        elif judged_record(e) is None:
            cause = {
                grpc.StatusCode.RESOURCE_EXHAUSTED: "the learner is at a limit",
                grpc.StatusCode.OUT_OF_RANGE: "the learner asks us to register again",
                grpc.StatusCode.CANCELLED: "the learner closed the call",
            }.get(code, code.name)
            self._say.warning(
                ("upload", code), "%s while %s (%s); records stay in the spool, retrying", cause, stage, details
            )

    def _stream(self, channel):
        in_flight: collections.deque[int] = collections.deque()
        cond = threading.Condition()
        done = threading.Event()

        def records():
            last = -1
            while not (self.stop_event.is_set() or done.is_set()):
                batch = self.spool.pending(after=last, limit=64)
                if not batch:
                    self._update_spool_metrics()
                    time.sleep(0.02)
                    continue
                for seq, payload in batch:
                    last = seq
                    if self._stale(seq, payload):
                        continue
                    with cond:
                        while len(in_flight) >= self.window and not done.is_set():
                            cond.wait(0.1)
                        in_flight.append(seq)
                    if seq in self._sent_once:
                        self.resent += 1
                    else:
                        self._sent_once.add(seq)
                        self.sent += 1
                    metrics.RECORDS_SENT.labels(self.link.robot_id).inc()
                    yield payload

        call = _stub(channel, "StreamRollouts", "stream_stream")(records(), metadata=self.link.metadata)
        try:
            for raw in call:
                ack = pirl_pb2.RolloutAck.FromString(raw)
                with cond:
                    if in_flight and in_flight[0] == ack.sequence:
                        in_flight.popleft()
                    else:
                        with contextlib.suppress(ValueError):
                            in_flight.remove(ack.sequence)
                    cond.notify_all()
                self.spool.ack(ack.sequence)
                self.acked += 1
                if ack.status == pirl_pb2.RolloutAck.DUPLICATE:
                    self.duplicates += 1
                metrics.RECORDS_ACKED.labels(self.link.robot_id).inc()
                self.clock.touch()
                self._backoff.reset()  # progress, not a mere Register, ends an outage's backoff
            if self.stop_event.is_set():
                return
        except grpc.RpcError as e:
            judged = judged_record(e)
            if judged is not None:
                self._drop_judged(*judged, in_flight, e.details())
            raise
        finally:
            done.set()
            call.cancel()

    def _drop_judged(self, reason: str, sequence: int | None, in_flight, details: str) -> None:
        """Delete the record the learner judged: the oldest unacked one on this stream (the learner reads
        a stream in order and acks each record before reading the next), cross-checked against the
        sequence the learner names when it could read one. On any doubt the record is kept."""
        if not in_flight:
            log.error("the learner refused a record (%s) but none was in flight: nothing dropped", reason)
            return
        head = in_flight[0]
        if sequence is not None and sequence != head:
            log.error(
                "the learner refused record %d (%s) but %d is the oldest unacked one: nothing dropped",
                sequence,
                reason,
                head,
            )
            return
        self.spool.ack(head)
        self.refused[reason] += 1
        metrics.RECORDS_REFUSED.labels(self.link.robot_id, reason).inc()
        self._say.error(
            ("refused", reason), "the learner refused record %d (%s): %s; dropped from the spool", head, reason, details
        )

    def _stale(self, seq: int, payload: bytes) -> bool:
        """A record the learner would refuse for version lag is dropped here (counted, logged)."""
        lag = self.clock.max_version_lag
        if lag is None:
            return False
        version = pirl_pb2.RolloutRecord.FromString(payload).policy_version
        if version >= self.clock.learner_version - lag:
            return False
        self.spool.ack(seq)
        self.refused["stale_version"] += 1
        metrics.RECORDS_REFUSED.labels(self.link.robot_id, "stale_version").inc()
        self._say.warning(
            "stale",
            "record %d (policy version %d) is older than the learner accepts (version %d, lag %d): dropped",
            seq,
            version,
            self.clock.learner_version,
            lag,
        )
        return True

    def _update_spool_metrics(self):
        update_link_metrics(self.link.robot_id, self.spool, self.clock)


def lower_thread_priority(nice: int = 10) -> bool:
    """Best effort: raise the calling thread's nice value (Linux: threads are tasks, and threads it
    starts inherit it), so the work it does (preparing the next version: an ONNX Runtime session, a
    TensorRT refit or a multi-minute engine build with the builder's own threads) yields the CPU to
    the control loop. False where the platform does not allow it."""
    import os

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
        return True
    except (AttributeError, OSError) as e:
        log.debug("could not lower the priority of thread %s: %s", threading.current_thread().name, e)
        return False


class Subscriber(_Background):
    """Receives new policy versions, checks their sha256, and hands them to the inference worker
    (which prepares them on this thread, run at a lower CPU priority than the control loop).

    A chunked version (the learner's normal path) is announced without its bytes: the subscription
    is dropped, every artifact is downloaded in chunks into ``staging_dir`` (edge.weight_sync:
    per-chunk and whole-file sha256, resumed from the staged offset after a disconnect or a
    learner restart), loaded from the verified file, offered, and the subscription taken up again.
    A version that rides inline in its announcement (one no bigger than a chunk) is applied as is."""

    thread_name = "pirl-subscriber"

    def __init__(self, link: LearnerAddress, worker, clock: SyncClock, staging_dir=None):
        super().__init__()
        self.link, self.worker, self.clock = link, worker, clock
        self.received: list[tuple[int, float]] = []  # (version, publish -> loaded latency s)
        self.rejected = 0
        if staging_dir is None:  # in-process use: a private folder (the edge gives one in its state dir)
            import tempfile

            staging_dir = tempfile.mkdtemp(prefix="pirl-versions-")
        from edge.weight_sync import WeightStaging

        self.staging = WeightStaging(staging_dir)
        self.offered = -1  # newest version handed to the worker (it may not serve it until a chunk boundary)
        self._refused: set[tuple[int, str]] = set()  # (version, manifest digest) refused: not fetched again
        metrics.SWAP_FAILURES.labels(link.robot_id)  # exported at 0, so rate() sees the first failure

    def _run(self):
        lower_thread_priority()
        backoff = Backoff(f"policy subscription to {self.link.address}")
        while not self.stop_event.is_set():
            try:
                with self.link.channel() as channel:
                    announced = self._subscribe(channel, backoff)
                    if announced is not None:
                        self._fetch(channel, announced)
                        backoff.reset()
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    log.warning("policy subscription ended: %s %s", e.code().name, e.details())
                backoff.failed(e, self.stop_event)

    def _subscribe(self, channel, backoff) -> pirl_pb2.PolicyUpdate | None:
        """Follow the subscription until a chunked version to download arrives (returned, the call
        ended: a download takes the subscription's place at the learner) or we are stopped (None)."""
        have = max(self.worker.version, self.offered)
        req = pirl_pb2.SubscribeRequest(robot_id=self.link.robot_id, have_version=have)
        call = _stub(channel, "SubscribePolicy", "unary_stream")(req.SerializeToString(), metadata=self.link.metadata)
        try:
            for raw in call:
                backoff.reset()
                self.clock.touch()
                update = pirl_pb2.PolicyUpdate.FromString(raw)
                self.clock.learner_version = max(self.clock.learner_version, update.version)
                if update.chunked:
                    if update.version > max(self.worker.version, self.offered) and _key(update) not in self._refused:
                        return update
                else:
                    self._apply(update)
                if self.stop_event.is_set():
                    return None
        finally:
            call.cancel()
        return None

    def _fetch(self, channel, update: pirl_pb2.PolicyUpdate) -> None:
        """Download, verify and offer a chunked version; gRPC errors propagate (the staged chunks stay
        and the next attempt resumes from them)."""
        from edge.weight_sync import VersionRefusedError

        fetch = _stub(channel, "FetchArtifact", "unary_stream")

        def open_stream(name: str, offset: int):
            req = pirl_pb2.FetchArtifactRequest(
                robot_id=self.link.robot_id, version=update.version, name=name, offset=offset
            )
            return fetch(req.SerializeToString(), metadata=self.link.metadata)

        try:
            paths = self.staging.fetch(update, open_stream, on_chunk=lambda *_: self.clock.touch())
            state = load_safetensors_file(str(paths["model.safetensors"]))  # safetensors: no code execution
            files = {name: p.read_bytes() for name, p in paths.items() if name != "model.safetensors"}
        except (VersionRefusedError, OSError, safetensors.SafetensorError) as e:
            self._refuse(update, e)
            return
        self._offer(update, state, files)
        self.staging.prune([self.worker.version, self.offered, update.version])

    def _refuse(self, update: pirl_pb2.PolicyUpdate, why) -> None:
        self.rejected += 1
        self._refused.add(_key(update))
        metrics.SWAP_FAILURES.labels(self.link.robot_id).inc()
        log.error("policy version %d rejected: %s", update.version, why)

    def _apply(self, update: pirl_pb2.PolicyUpdate) -> None:
        """A version whose bytes ride in the message: check every one against the manifest, then offer."""
        listed = {a.name: a for a in update.manifest.artifacts}
        blobs = {"model.safetensors": update.weights, **dict(update.files)}
        bad = [
            name
            for name, data in blobs.items()
            if name not in listed
            or listed[name].sha256 != hashlib.sha256(data).hexdigest()
            or listed[name].size_bytes != len(data)
        ]
        if bad or "model.safetensors" not in listed or update.manifest.policy_version != update.version:
            self._refuse(update, f"{', '.join(bad) or 'manifest version / weights entry'} do not match the manifest")
            return
        try:
            state = load_safetensors(update.weights)  # safetensors: no code execution on load
        except Exception as e:  # a corrupt blob that still hashed right: refuse, keep serving
            self._refuse(update, e)
            return
        self._offer(update, state, dict(update.files))

    def _offer(self, update: pirl_pb2.PolicyUpdate, state: dict, files: dict) -> None:
        self.clock.learner_version = max(self.clock.learner_version, update.version)
        frozen = update.frozen_sha256 if update.trained_only else None
        if self.worker.offer(update.version, state, files, frozen_sha256=frozen):
            self.offered = max(self.offered, update.version)
            latency = max(0.0, time.time() - update.published_unix_s)
            self.received.append((update.version, latency))
            metrics.SYNC_LATENCY.labels(self.link.robot_id).observe(latency)
        elif update.version > max(self.worker.version, self.offered):  # refused by the worker (it counted it)
            self._refused.add(_key(update))


def _key(update: pirl_pb2.PolicyUpdate) -> tuple[int, str]:
    """A version and its manifest: a learner that republishes other bytes under the same number is
    not taken for the refused one."""
    return update.version, hashlib.sha256(update.manifest.SerializeToString(deterministic=True)).hexdigest()


class Heartbeat(_Background):
    """Tells the learner every ``period`` seconds which version this robot runs and how full its spool is."""

    thread_name = "pirl-heartbeat"

    def __init__(self, link: LearnerAddress, worker, spool: Spool, clock: SyncClock, rate_fn=None, period: float = 5.0):
        super().__init__()
        self.link, self.worker, self.spool, self.clock = link, worker, spool, clock
        self.rate_fn, self.period = rate_fn or (lambda: 0.0), period
        self.sent = 0

    def _run(self):
        with self.link.channel() as channel:
            call = _stub(channel, "Heartbeat", "unary_unary")
            while not self.stop_event.wait(self.period):
                req = pirl_pb2.HeartbeatRequest(
                    robot_id=self.link.robot_id,
                    policy_version=self.worker.version,
                    spool_records=self.spool.stats()["records"],
                    control_rate_hz=float(self.rate_fn()),
                    lowest_pending_sequence=lowest_pending(self.spool),
                )
                try:
                    resp = pirl_pb2.HeartbeatResponse.FromString(
                        call(req.SerializeToString(), metadata=self.link.metadata, timeout=5)
                    )
                    self.sent += 1
                    self.clock.touch()
                    self.clock.learner_version = max(self.clock.learner_version, resp.policy_version)
                except grpc.RpcError:
                    pass  # the uploader and subscriber log connection problems
                update_link_metrics(self.link.robot_id, self.spool, self.clock)
            self.clock.update_metric()
