"""The learner's gRPC service (pirl.v1.Learner) plus the standard health service.

Requests are registered with raw-bytes deserialisers and parsed here, so malformed protobuf bytes
get INVALID_ARGUMENT with a message instead of gRPC's generic INTERNAL error. Every call is
authenticated with the robot's token first.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from learner import metrics
from learner.contacts import RobotContacts
from learner.store import RecordError, RolloutStore
from learner.streams import StreamLimits, StreamRegistry, server_keepalive_options
from learner.versions import DEFAULT_CHUNK_BYTES, VersionStore, check_chunk_bytes
from pirl.logs import RateLimitedLog, bounded
from pirl.refusals import refusal_metadata
from pirl.security import TokenAuthenticator
from pirl.v1 import pirl_pb2

log = logging.getLogger(__name__)
SERVICE = "pirl.v1.Learner"
HEALTH_SERVICE = "grpc.health.v1.Health"


class Publisher:
    """Fan-out of policy versions to every subscribed robot; keeps the latest for late joiners.

    What it fans out is small: a chunked version's announcement (learner.versions); the bytes are
    served by FetchArtifact from ``versions``, the store on disk the trainer publishes into."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self._lock = threading.Lock()
        self._latest: pirl_pb2.PolicyUpdate | None = None
        self._subscribers: set[queue.Queue] = set()
        self.chunk_bytes = check_chunk_bytes(chunk_bytes, "sync.chunk_bytes")
        self.versions: VersionStore | None = None  # set by the trainer at its first publish

    def version_store(self, root: Path, keep: int) -> VersionStore:
        """The store published versions are written to and served from (opened once, at ``root``)."""
        with self._lock:
            if self.versions is None or self.versions.root != Path(root):
                self.versions = VersionStore(root, keep=keep, chunk_bytes=self.chunk_bytes)
            self.versions.keep = max(1, keep)
            return self.versions

    def publish(self, update: pirl_pb2.PolicyUpdate) -> None:
        with self._lock:
            self._latest = update
            for q in self._subscribers:
                q.put(update)

    def latest(self) -> pirl_pb2.PolicyUpdate | None:
        with self._lock:
            return self._latest

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._subscribers.add(q)
            if self._latest is not None:
                q.put(self._latest)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            self._subscribers.discard(q)

    def close(self) -> None:
        with self._lock:
            for q in self._subscribers:
                q.put(None)


class LearnerService:
    def __init__(
        self,
        store: RolloutStore,
        publisher: Publisher,
        auth: TokenAuthenticator,
        *,
        max_record_bytes: int,
        contacts_path: Path | None = None,
        limits: StreamLimits | None = None,
    ):
        self.store, self.publisher, self.auth = store, publisher, auth
        self.max_record_bytes = max_record_bytes
        self.limits = limits or StreamLimits()
        self.streams = StreamRegistry(self.limits, auth.robot_ids)
        self._rejections = RateLimitedLog(log, period=10.0)  # one line per robot and reason every 10 s
        # last-seen times, exported again after a restart (from contacts_path) for the sync-stale alert
        self.contacts = RobotContacts(contacts_path, auth.robot_ids)
        self._stop = threading.Event()
        # labelled counters exported at 0 from the start (robot ids come from the tokens file: the fleet)
        for reason in metrics.REJECT_REASONS:
            metrics.LEARNER_REJECTED.labels(reason=reason)
        for source in metrics.BC_SOURCES:  # 0 without a BC term too: the dashboard's panel shows that
            metrics.BC_SAMPLES.labels(source=source)
        for robot_id in auth.robot_ids:
            metrics.LEARNER_ACCEPTED.labels(robot_id=robot_id)

    def _seen(self, robot_id: str) -> None:
        self.contacts.seen(robot_id)

    def _parse(self, cls, data: bytes, context, robot_id: str = "", record: bool = False):
        msg = cls()
        try:
            msg.ParseFromString(data)
        except DecodeError as e:
            self._refuse(
                context,
                robot_id,
                RecordError(grpc.StatusCode.INVALID_ARGUMENT, "malformed", f"malformed {cls.__name__} protobuf: {e}"),
                record=record,
            )
        return msg

    def _refuse(self, context, robot_id: str, e: RecordError, *, record: bool, sequence: int | None = None):
        """Count, log (rate-limited) and end the call with ``e``. On a rollout stream a final refusal is
        marked as the learner's judgement of the record being read, the only case in which the edge
        drops a record (pirl.refusals); the details sent back are bounded in size."""
        metrics.LEARNER_REJECTED.labels(reason=e.reason).inc()
        self.store.reject(e.reason)
        self._rejections.warning(
            (robot_id, e.reason),
            "refused a %s from %s (%s): %s",
            "record" if record else "request",
            robot_id or "?",
            e.reason,
            bounded(e.message, 300),
        )
        if record and e.final:
            context.set_trailing_metadata(refusal_metadata(e.reason, sequence))
        context.abort(e.code, bounded(e.message))

    # --- RPCs -------------------------------------------------------------------------------------

    def _request(self, cls, data: bytes, context):
        """(authenticated robot id, parsed request); a request naming another robot is refused."""
        robot_id = self.auth.robot_for(context)
        self._seen(robot_id)
        req = self._parse(cls, data, context, robot_id)
        if req.robot_id and req.robot_id != robot_id:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"robot_id {req.robot_id!r} does not match the token's robot {robot_id!r}",
            )
        return robot_id, req

    def register(self, data: bytes, context) -> bytes:
        robot_id, req = self._request(pirl_pb2.RegisterRequest, data, context)
        log.info("robot %s registered (backend %s, edge %s)", robot_id, req.backend, req.edge_version)
        self.store.forget_below(robot_id, req.lowest_pending_sequence)
        return pirl_pb2.RegisterResponse(
            policy_version=self.store.version,
            next_sequence=self.store.next_sequence(robot_id),
            max_version_lag=self.store.max_version_lag,
            max_record_bytes=self.max_record_bytes,
            spec=self.store.shapes.to_msg(),
        ).SerializeToString()

    def heartbeat(self, data: bytes, context) -> bytes:
        robot_id, req = self._request(pirl_pb2.HeartbeatRequest, data, context)
        log.debug("heartbeat from %s: version %d, %d spooled", robot_id, req.policy_version, req.spool_records)
        self.store.forget_below(robot_id, req.lowest_pending_sequence)
        return pirl_pb2.HeartbeatResponse(policy_version=self.store.version).SerializeToString()

    def stream_rollouts(self, request_iterator, context):
        robot_id = self.auth.robot_for(context)
        self._seen(robot_id)
        stream = self.streams.open(robot_id, "StreamRollouts", context)  # aborts past the per-robot limit
        try:
            for data in request_iterator:
                stream.touch()
                self._seen(robot_id)
                if len(data) > self.max_record_bytes:
                    self._refuse(
                        context,
                        robot_id,
                        RecordError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "oversized",
                            f"record of {len(data)} bytes exceeds the limit of {self.max_record_bytes}",
                        ),
                        record=True,
                    )
                rec = self._parse(pirl_pb2.RolloutRecord, data, context, robot_id, record=True)
                try:
                    status = self.store.add(robot_id, rec, data)
                except RecordError as e:
                    self._refuse(context, robot_id, e, record=True, sequence=rec.sequence)
                if status == pirl_pb2.RolloutAck.ACCEPTED:
                    metrics.LEARNER_ACCEPTED.labels(robot_id=robot_id).inc()
                else:
                    metrics.LEARNER_DUPLICATES.inc()
                yield pirl_pb2.RolloutAck(sequence=rec.sequence, status=status).SerializeToString()
        finally:
            self.streams.close(stream)

    def subscribe_policy(self, data: bytes, context):
        robot_id, req = self._request(pirl_pb2.SubscribeRequest, data, context)
        stream = self.streams.open(robot_id, "SubscribePolicy", context)  # aborts past the per-robot limit
        q = self.publisher.subscribe()
        try:
            while context.is_active() and not self._stop.is_set():
                try:
                    update = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                if update is None:
                    return
                if update.version <= req.have_version:
                    continue
                log.info("sending policy version %d to %s", update.version, robot_id)
                yield update.SerializeToString()
        finally:
            self.publisher.unsubscribe(q)
            self.streams.close(stream)

    def fetch_artifact(self, data: bytes, context):
        """The chunks of one artifact of a kept version, read from disk from the requested offset on."""
        robot_id, req = self._request(pirl_pb2.FetchArtifactRequest, data, context)
        versions = self.publisher.versions
        if versions is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "the learner serves no chunked version")
        try:
            chunks = versions.read_chunks(req.version, req.name, req.offset)
            first = next(chunks, None)  # the checks (version, name, offset) run here, before any yield
        except KeyError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, bounded(str(e.args[0] if e.args else e)))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(e)))
        except OSError as e:  # pruned between the lookup and the open
            context.abort(grpc.StatusCode.NOT_FOUND, bounded(f"version {req.version}: {e}"))
        if req.offset == 0:
            log.info("sending %s of policy version %d to %s", req.name, req.version, robot_id)
        else:
            log.info("resuming %s of policy version %d for %s at byte %d", req.name, req.version, robot_id, req.offset)
        # a robot drops its subscription while it downloads (edge.weight_sync), so a download takes
        # the subscription's place in the per-robot limit and the call slots sized for it
        stream = self.streams.open(robot_id, "SubscribePolicy", context)
        try:
            for chunk in itertools.chain(() if first is None else (first,), chunks):
                if not context.is_active() or self._stop.is_set():
                    return
                stream.touch()
                yield chunk.SerializeToString()
        finally:
            chunks.close()
            self.streams.close(stream)

    def stop(self) -> None:
        self._stop.set()
        self.streams.stop()
        self.publisher.close()
        self.contacts.close()


def _raw(x):
    return x


def build_server(
    service: LearnerService,
    address: str,
    *,
    credentials: grpc.ServerCredentials | None,
    max_message_bytes: int,
    workers: int | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server with the Learner and health services on ``address``; returns (server, port, health).

    ``workers``: concurrent calls admitted (each long-lived stream holds a thread); default: sized for
    the fleet in the tokens file at its per-robot stream limit (``StreamLimits.call_slots``)."""
    if workers is None:
        workers = service.limits.call_slots(len(service.auth.robot_ids))
    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(service.register, _raw, _raw),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(service.heartbeat, _raw, _raw),
        "StreamRollouts": grpc.stream_stream_rpc_method_handler(service.stream_rollouts, _raw, _raw),
        "SubscribePolicy": grpc.unary_stream_rpc_method_handler(service.subscribe_policy, _raw, _raw),
        "FetchArtifact": grpc.unary_stream_rpc_method_handler(service.fetch_artifact, _raw, _raw),
    }
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        *server_keepalive_options(service.limits),
    ]
    # every robot holds two long-lived streams (rollouts, policy subscription), each on a pool thread;
    # past maximum_concurrent_rpcs a call fails fast with RESOURCE_EXHAUSTED instead of queueing
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=options, maximum_concurrent_rpcs=workers
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_servicer = health.HealthServicer()
    server.add_generic_rpc_handlers((health_check_only(health_servicer),))
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"could not bind the learner to {address}")
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def health_check_only(health_servicer: health.HealthServicer) -> grpc.GenericRpcHandler:
    """The health service's Check alone. Its Watch is a stream that anyone may open without a token:
    on the learner's port it would let an unauthenticated client hold every call slot."""
    return grpc.method_handlers_generic_handler(
        HEALTH_SERVICE,
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                health_servicer.Check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            ),
        },
    )


def build_health_server(health_servicer: health.HealthServicer, address: str) -> tuple[grpc.Server, int]:
    """A plaintext server with only the standard health service (sharing ``health_servicer``) on ``address``.

    The learner's own port speaks TLS, which the kubelet's native gRPC probes cannot (they connect in
    plaintext). Health status is not secret and this server answers nothing else, so probes and the
    container healthcheck use it. Returns (server, bound port).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), maximum_concurrent_rpcs=8)
    server.add_generic_rpc_handlers((health_check_only(health_servicer),))  # probes only ever Check
    port = server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"could not bind the health port to {address}")
    return server, port
