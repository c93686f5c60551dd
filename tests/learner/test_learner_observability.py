"""What deployment relies on in the learner: the plaintext health port (probes cannot speak TLS), the
per-robot last-seen gauge (sync-stale alert for a stopped edge, kept across learner restarts) and
counters exported at 0 from the start."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from helpers.policy import builtin_policy
from learner import metrics
from learner.contacts import RobotContacts
from learner.service import LearnerService, Publisher, build_health_server, build_server
from learner.store import PolicyShapes, RolloutStore
from pirl.security import TokenAuthenticator, auth_metadata, channel_credentials, make_dev_pki, server_credentials
from pirl.v1 import pirl_pb2

ROOT = Path(__file__).resolve().parents[2]
ROBOTS = ["obs-robot-a", "obs-robot-b"]  # ids of their own: the prometheus registry is process-wide
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    policy = builtin_policy(0)[0].eval()
    pki = make_dev_pki(tmp_path_factory.mktemp("pki"), ROBOTS)
    tokens = json.loads(pki["tokens"].read_text())
    store = RolloutStore(PolicyShapes.from_policy(policy), max_version_lag=1, max_record_bytes=1 << 20)
    service = LearnerService(store, Publisher(), TokenAuthenticator(tokens), max_record_bytes=1 << 20)
    server, port, health_servicer = build_server(
        service,
        "127.0.0.1:0",
        max_message_bytes=2 << 20,
        credentials=server_credentials(pki["server_cert"], pki["server_key"]),
    )
    health_server, health_port = build_health_server(health_servicer, "127.0.0.1:0")
    server.start()
    health_server.start()
    channel = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(pki["ca_cert"]))
    yield tokens, channel, health_port, health_servicer
    channel.close()
    service.stop()
    server.stop(None).wait(5)
    health_server.stop(None).wait(5)


def last_seen(robot: str) -> float | None:
    return REGISTRY.get_sample_value("pirl_learner_robot_last_seen_timestamp_seconds", {"robot_id": robot})


def call(channel, name: str, req, token: str) -> bytes:
    stub = channel.unary_unary(
        f"/pirl.v1.Learner/{name}", request_serializer=lambda x: x, response_deserializer=lambda x: x
    )
    return stub(req.SerializeToString(), metadata=auth_metadata(token), timeout=10)


def test_health_port_is_plaintext_and_shares_the_learners_status(learner):
    _, _, health_port, servicer = learner
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pirl.v1.Learner"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == SERVING
        # the health port answers health checks and nothing else: no learner RPC in plaintext
        register = ch.unary_unary(
            "/pirl.v1.Learner/Register", request_serializer=lambda x: x, response_deserializer=lambda x: x
        )
        with pytest.raises(grpc.RpcError) as ei:
            register(pirl_pb2.RegisterRequest(robot_id=ROBOTS[0]).SerializeToString(), timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # a status change on the learner (here: what shutdown does) is what the probe sees
        servicer.set("pirl.v1.Learner", NOT_SERVING)
        try:
            assert (
                stub.Check(health_pb2.HealthCheckRequest(service="pirl.v1.Learner"), timeout=10).status == NOT_SERVING
            )
        finally:
            servicer.set("pirl.v1.Learner", SERVING)


def test_last_seen_is_set_by_register_and_heartbeat_of_that_robot_only(learner):
    tokens, channel, _, _ = learner
    a, b = ROBOTS
    before_b = last_seen(b)
    t0 = time.time()
    call(channel, "Register", pirl_pb2.RegisterRequest(robot_id=a, backend="torch"), tokens[a])
    seen_register = last_seen(a)
    assert seen_register is not None and t0 <= seen_register <= time.time()
    time.sleep(0.05)
    call(channel, "Heartbeat", pirl_pb2.HeartbeatRequest(robot_id=a, policy_version=0), tokens[a])
    assert last_seen(a) > seen_register
    assert last_seen(b) == before_b  # another robot's series is untouched


def test_last_seen_is_set_by_a_streamed_record_even_when_it_is_refused(learner):
    tokens, channel, _, _ = learner
    b = ROBOTS[1]
    stream = channel.stream_stream(
        "/pirl.v1.Learner/StreamRollouts", request_serializer=lambda x: x, response_deserializer=lambda x: x
    )
    t0 = time.time()
    with pytest.raises(grpc.RpcError) as ei:
        list(stream(iter([b"\xff\xff not a record"]), metadata=auth_metadata(tokens[b]), timeout=10))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert last_seen(b) is not None and last_seen(b) >= t0  # the robot is alive, whatever its record was


def test_unauthenticated_calls_do_not_touch_last_seen(learner):
    _, channel, _, _ = learner
    before = {r: last_seen(r) for r in ROBOTS}
    with pytest.raises(grpc.RpcError):
        call(channel, "Register", pirl_pb2.RegisterRequest(robot_id=ROBOTS[0]), "not-a-token")
    assert {r: last_seen(r) for r in ROBOTS} == before


def test_counters_alerts_use_are_exported_from_the_start(learner):
    for reason in metrics.REJECT_REASONS:
        assert REGISTRY.get_sample_value("pirl_learner_rollouts_rejected_total", {"reason": reason}) is not None, reason
    for robot in ROBOTS:
        assert REGISTRY.get_sample_value("pirl_learner_rollouts_accepted_total", {"robot_id": robot}) is not None


def test_reject_reasons_list_every_reason_the_learner_rejects_with():
    """REJECT_REASONS is what is exported at 0: it must name every reason the code can count."""
    source = (ROOT / "learner" / "store.py").read_text() + (ROOT / "learner" / "service.py").read_text()
    used = set(re.findall(r'RecordError\(\s*grpc\.StatusCode\.\w+,\s*"(\w+)"', source))
    used |= set(re.findall(r'LEARNER_REJECTED\.labels\(reason="(\w+)"\)', source))
    assert used and used <= set(metrics.REJECT_REASONS), used - set(metrics.REJECT_REASONS)


class FakeClock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_last_seen_survives_a_learner_restart(tmp_path):
    """A robot that was switched off before the learner restarted is still reported (sync-stale alert):
    the restarted learner exports the times it had written to its output directory."""
    path, clock = tmp_path / "robots_last_seen.json", FakeClock()
    on, off = "contacts-on", "contacts-off"
    first = RobotContacts(path, [on, off], persist_every_s=5.0, clock=clock)
    first.seen(off)  # written at once (the first write)
    clock.t += 1.0
    first.seen(on)  # within persist_every_s of the last write: kept in memory only ...
    assert json.loads(path.read_text())["last_seen_unix_s"] == {off: 1_000_000.0}
    clock.t += 1.0
    first.close()  # ... until the learner stops
    assert json.loads(path.read_text())["last_seen_unix_s"] == {off: 1_000_000.0, on: 1_000_001.0}

    # the process ends; a new learner starts (the gauges are reset to show the file is what restores them)
    for r in (on, off):
        metrics.LEARNER_ROBOT_LAST_SEEN.remove(r)
    assert last_seen(off) is None
    RobotContacts(path, [on, off], clock=clock)
    assert last_seen(off) == 1_000_000.0 and last_seen(on) == 1_000_001.0


def test_last_seen_file_drops_robots_removed_from_the_fleet_and_survives_damage(tmp_path, caplog):
    path = tmp_path / "robots_last_seen.json"
    path.write_text(json.dumps({"last_seen_unix_s": {"contacts-kept": 5.0, "contacts-retired": 6.0}}))
    contacts = RobotContacts(path, ["contacts-kept"])
    assert contacts.last_seen() == {"contacts-kept": 5.0}
    assert last_seen("contacts-kept") == 5.0 and last_seen("contacts-retired") is None

    path.write_text('{"last_seen_unix_s": {"contacts-kept": 5.')  # truncated (a full disk)
    with caplog.at_level("WARNING"):
        contacts = RobotContacts(path, ["contacts-kept"])
    assert contacts.last_seen() == {} and "ignoring" in caplog.text
    contacts.seen("contacts-kept")  # the learner keeps serving and writes a good file again
    assert set(json.loads(path.read_text())["last_seen_unix_s"]) == {"contacts-kept"}
