"""The learner's gRPC service (pirl.v1.Learner) plus the standard health service.

Requests are registered with raw-bytes deserialisers and parsed here, so malformed protobuf bytes
get INVALID_ARGUMENT with a message instead of gRPC's generic INTERNAL error. Every call is
authenticated with the robot's token first.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from learner import metrics
from learner.contacts import RobotContacts
from learner.store import RecordError, RolloutStore
from pirl.security import TokenAuthenticator
from pirl.v1 import pirl_pb2

log = logging.getLogger(__name__)
SERVICE = "pirl.v1.Learner"


class Publisher:
    """Fan-out of policy versions to every subscribed robot; keeps the latest for late joiners."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latest: pirl_pb2.PolicyUpdate | None = None
        self._subscribers: set[queue.Queue] = set()

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
    def __init__(self, store: RolloutStore, publisher: Publisher, auth: TokenAuthenticator, *,
                 max_record_bytes: int, contacts_path: Path | None = None):
        self.store, self.publisher, self.auth = store, publisher, auth
        self.max_record_bytes = max_record_bytes
        # last-seen times, exported again after a restart (from contacts_path) for the sync-stale alert
        self.contacts = RobotContacts(contacts_path, auth.robot_ids)
        self._stop = threading.Event()
        self._connected: dict[str, int] = {}
        self._lock = threading.Lock()
        # labelled counters exported at 0 from the start (robot ids come from the tokens file: the fleet)
        for reason in metrics.REJECT_REASONS:
            metrics.LEARNER_REJECTED.labels(reason=reason)
        for robot_id in auth.robot_ids:
            metrics.LEARNER_ACCEPTED.labels(robot_id=robot_id)

    def _seen(self, robot_id: str) -> None:
        self.contacts.seen(robot_id)

    def _parse(self, cls, data: bytes, context):
        msg = cls()
        try:
            msg.ParseFromString(data)
        except DecodeError as e:
            metrics.LEARNER_REJECTED.labels(reason="malformed").inc()
            self.store.reject("malformed")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {cls.__name__} protobuf: {e}")
        return msg

    def _robot_connected(self, robot_id: str, delta: int) -> None:
        with self._lock:
            self._connected[robot_id] = self._connected.get(robot_id, 0) + delta
            if self._connected[robot_id] <= 0:
                del self._connected[robot_id]
            metrics.LEARNER_CONNECTED.set(len(self._connected))

    # --- RPCs -------------------------------------------------------------------------------------

    def _request(self, cls, data: bytes, context):
        """(authenticated robot id, parsed request); a request naming another robot is refused."""
        robot_id = self.auth.robot_for(context)
        self._seen(robot_id)
        req = self._parse(cls, data, context)
        if req.robot_id and req.robot_id != robot_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"robot_id {req.robot_id!r} does not match the token's robot {robot_id!r}")
        return robot_id, req

    def register(self, data: bytes, context) -> bytes:
        robot_id, req = self._request(pirl_pb2.RegisterRequest, data, context)
        log.info("robot %s registered (backend %s, edge %s)", robot_id, req.backend, req.edge_version)
        self.store.forget_below(robot_id, req.lowest_pending_sequence)
        return pirl_pb2.RegisterResponse(
            policy_version=self.store.version, next_sequence=self.store.next_sequence(robot_id),
            max_version_lag=self.store.max_version_lag, max_record_bytes=self.max_record_bytes,
            spec=self.store.shapes.to_msg(),
        ).SerializeToString()

    def heartbeat(self, data: bytes, context) -> bytes:
        robot_id, req = self._request(pirl_pb2.HeartbeatRequest, data, context)
        log.debug("heartbeat from %s: version %d, %d spooled", robot_id, req.policy_version, req.spool_records)
        self.store.forget_below(robot_id, req.lowest_pending_sequence)
        return pirl_pb2.HeartbeatResponse(policy_version=self.store.version).SerializeToString()

    def stream_rollouts(self, request_iterator, context):
        robot_id = self.auth.robot_for(context)
        self._robot_connected(robot_id, +1)
        try:
            self._seen(robot_id)
            for data in request_iterator:
                self._seen(robot_id)
                if len(data) > self.max_record_bytes:
                    metrics.LEARNER_REJECTED.labels(reason="oversized").inc()
                    self.store.reject("oversized")
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"record of {len(data)} bytes exceeds the limit of {self.max_record_bytes}")
                rec = self._parse(pirl_pb2.RolloutRecord, data, context)
                try:
                    status = self.store.add(robot_id, rec, data)
                except RecordError as e:
                    metrics.LEARNER_REJECTED.labels(reason=e.reason).inc()
                    self.store.reject(e.reason)
                    log.warning("rejected a record from %s: %s", robot_id, e.message)
                    context.abort(e.code, e.message)
                if status == pirl_pb2.RolloutAck.ACCEPTED:
                    metrics.LEARNER_ACCEPTED.labels(robot_id=robot_id).inc()
                else:
                    metrics.LEARNER_DUPLICATES.inc()
                yield pirl_pb2.RolloutAck(sequence=rec.sequence, status=status).SerializeToString()
        finally:
            self._robot_connected(robot_id, -1)

    def subscribe_policy(self, data: bytes, context):
        robot_id, req = self._request(pirl_pb2.SubscribeRequest, data, context)
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

    def stop(self) -> None:
        self._stop.set()
        self.publisher.close()
        self.contacts.close()


def _raw(x):
    return x


def build_server(service: LearnerService, address: str, *, credentials: grpc.ServerCredentials | None,
                 max_message_bytes: int, workers: int = 16) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server with the Learner and health services on ``address``; returns (server, port, health)."""
    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(service.register, _raw, _raw),
        "Heartbeat": grpc.unary_unary_rpc_method_handler(service.heartbeat, _raw, _raw),
        "StreamRollouts": grpc.stream_stream_rpc_method_handler(service.stream_rollouts, _raw, _raw),
        "SubscribePolicy": grpc.unary_stream_rpc_method_handler(service.subscribe_policy, _raw, _raw),
    }
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ]
    # every robot holds two long-lived streams (rollouts, policy subscription), each on a pool thread;
    # past maximum_concurrent_rpcs a call fails fast with RESOURCE_EXHAUSTED instead of queueing
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options,
                         maximum_concurrent_rpcs=workers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"could not bind the learner to {address}")
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def build_health_server(health_servicer: health.HealthServicer, address: str) -> tuple[grpc.Server, int]:
    """A plaintext server with only the standard health service (sharing ``health_servicer``) on ``address``.

    The learner's own port speaks TLS, which the kubelet's native gRPC probes cannot (they connect in
    plaintext). Health status is not secret and this server answers nothing else, so probes and the
    container healthcheck use it. Returns (server, bound port).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), maximum_concurrent_rpcs=8)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise ValueError(f"could not bind the health port to {address}")
    return server, port

