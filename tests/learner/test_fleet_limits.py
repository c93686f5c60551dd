"""Nothing lost, nobody locked out: an edge deletes a record only when the learner judged it; one robot
cannot take the call slots of the others; sequence numbers far ahead are refused without being
remembered; error text and per-record logs stay bounded. In-process servers and real gRPC; the
process-level versions of the first two are in tests/system/test_runtime.py."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from edge.link import LearnerAddress, SyncClock, Uploader
from edge.records import Decision, Outcome, make_record
from edge.spool import Spool
from helpers.policy import builtin_policy, sampled_decision
from learner.service import LearnerService, Publisher, build_server
from learner.store import PolicyShapes, RecordError, RolloutStore
from learner.streams import StreamLimits
from learner.trainer import policy_update_message
from pirl.codec import to_tensor_msg
from pirl.logs import MAX_DETAIL_CHARS, RateLimitedLog, bounded
from pirl.refusals import REFUSED_RECORD, judged_record, refusal_metadata
from pirl.security import TokenAuthenticator, auth_metadata
from pirl.v1 import pirl_pb2

SC = grpc.StatusCode
ACCEPTED = pirl_pb2.RolloutAck.ACCEPTED
TOKENS = {"good": "token-good", "hog": "token-hog", "other": "token-other"}
RAW = lambda x: x  # noqa: E731  raw bytes in and out, like edge/link.py


@pytest.fixture(scope="module")
def policy():
    return builtin_policy(0)[0].eval()


@pytest.fixture(scope="module")
def decision(policy) -> Decision:
    return sampled_decision(policy)


def good_record(decision, robot: str, seq: int) -> bytes:
    return make_record(
        robot, seq, f"{robot}-ep-{seq}", 0, decision, Outcome(reward=1.0, terminated=True, success=True, env_steps=4)
    )


class Learner:
    """A real LearnerService on an insecure loopback port, with the limits under test."""

    def __init__(self, policy, limits: StreamLimits, *, workers: int | None = None, max_sequence_ahead: int = 1 << 16):
        self.store = RolloutStore(
            PolicyShapes.from_policy(policy),
            max_version_lag=1,
            max_record_bytes=1 << 20,
            max_sequence_ahead=max_sequence_ahead,
        )
        publisher = Publisher()
        publisher.publish(policy_update_message(policy, 0))
        self.service = LearnerService(
            self.store, publisher, TokenAuthenticator(TOKENS), max_record_bytes=1 << 20, limits=limits
        )
        self.server, self.port, _ = build_server(
            self.service, "127.0.0.1:0", credentials=None, max_message_bytes=2 << 20, workers=workers
        )
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.closed = threading.Event()  # ends the request streams of held calls

    def stub(self, name, kind):
        return getattr(self.channel, kind)(
            f"/pirl.v1.Learner/{name}", request_serializer=RAW, response_deserializer=RAW
        )

    def register(self, robot: str) -> pirl_pb2.RegisterResponse:
        raw = self.stub("Register", "unary_unary")(
            pirl_pb2.RegisterRequest(robot_id=robot).SerializeToString(),
            metadata=auth_metadata(TOKENS[robot]),
            timeout=10,
        )
        return pirl_pb2.RegisterResponse.FromString(raw)

    def send(self, robot: str, payloads: list[bytes]):
        """(acks, RpcError or None) of one rollout stream carrying ``payloads``."""
        acks = []
        try:
            for raw in self.stub("StreamRollouts", "stream_stream")(
                iter(payloads), metadata=auth_metadata(TOKENS[robot]), timeout=10
            ):
                acks.append(pirl_pb2.RolloutAck.FromString(raw))
        except grpc.RpcError as e:
            return acks, e
        return acks, None

    def hold(self, robot: str, rpc: str):
        """Open one long-lived call of ``rpc`` as ``robot`` that sends nothing; returns it (cancel() ends it)."""
        md = auth_metadata(TOKENS[robot])
        if rpc == "SubscribePolicy":
            req = pirl_pb2.SubscribeRequest(robot_id=robot, have_version=1 << 40).SerializeToString()
            return self.stub(rpc, "unary_stream")(req, metadata=md)

        def nothing_until_closed():
            self.closed.wait()
            yield from ()

        return self.stub(rpc, "stream_stream")(nothing_until_closed(), metadata=md)

    def close(self):
        self.closed.set()
        self.channel.close()
        self.service.stop()
        self.server.stop(grace=None).wait(5)


@pytest.fixture
def make_learner(policy):
    made = []

    def make(**kw):
        kw.setdefault("limits", StreamLimits())
        lrn = Learner(policy, **kw)
        made.append(lrn)
        return lrn

    yield make
    for lrn in made:
        lrn.close()


def settle(calls, timeout=10.0):
    """Wait until each call has either ended or is still open after a moment; (open, ended) lists."""
    deadline = time.monotonic() + timeout
    time.sleep(0.3)
    while time.monotonic() < deadline and not all(c.done() or c.is_active() for c in calls):
        time.sleep(0.05)
    time.sleep(0.3)
    return [c for c in calls if not c.done()], [c for c in calls if c.done()]


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ----------------------------------------------------------------- the refusal marker (learner side)


def test_a_judged_record_is_marked_with_its_reason_and_sequence(make_learner, decision):
    lrn = make_learner()
    rec = pirl_pb2.RolloutRecord.FromString(good_record(decision, "good", 0))
    rec.policy_version = 7  # from the future: the learner judges this record
    acks, err = lrn.send("good", [good_record(decision, "good", 1), rec.SerializeToString()])
    assert [a.sequence for a in acks] == [1]
    assert err.code() == SC.INVALID_ARGUMENT
    assert judged_record(err) == ("future_version", 0)
    # a record it cannot even parse: marked, without a sequence
    acks, err = lrn.send("good", [b"\xff\xff\xff"])
    assert err.code() == SC.INVALID_ARGUMENT and judged_record(err) == ("malformed", None)


def test_transport_limit_and_per_robot_limit_carry_no_marker(make_learner):
    lrn = make_learner(limits=StreamLimits(per_robot=1), workers=3)
    held = [lrn.hold("hog", "SubscribePolicy")]
    settle(held)
    extra = lrn.hold("hog", "SubscribePolicy")
    open_, ended = settle([*held, extra])
    assert (
        open_ == held
        and ended == [extra]
        and extra.code() == SC.RESOURCE_EXHAUSTED
        and "per-robot limit" in extra.details()
    )
    assert judged_record(extra) is None
    # fill the server's call slots: gRPC itself refuses with RESOURCE_EXHAUSTED, and no marker
    held += [lrn.hold("good", "SubscribePolicy"), lrn.hold("other", "SubscribePolicy")]
    settle(held)
    with pytest.raises(grpc.RpcError) as ei:
        lrn.register("good")
    assert ei.value.code() == SC.RESOURCE_EXHAUSTED and judged_record(ei.value) is None
    for c in held:
        c.cancel()


def test_bad_input_errors_are_bounded_and_received_as_themselves(make_learner, decision):
    lrn = make_learner()
    rec = pirl_pb2.RolloutRecord.FromString(good_record(decision, "good", 0))
    for i in range(10_000):  # 10,000 extra observation keys
        rec.observation[f"observation.extra_{i:05d}_{'x' * 40}"].CopyFrom(to_tensor_msg(torch.zeros(1).numpy()))
    # the edge's own channel: before, the 100 KB details exceeded its metadata limit (RESOURCE_EXHAUSTED)
    channel = LearnerAddress(lrn.address, "good", TOKENS["good"]).channel()
    call = channel.stream_stream("/pirl.v1.Learner/StreamRollouts", request_serializer=RAW, response_deserializer=RAW)
    with pytest.raises(grpc.RpcError) as ei:
        list(call(iter([rec.SerializeToString()]), metadata=auth_metadata(TOKENS["good"]), timeout=10))
    err = ei.value
    channel.close()
    assert err.code() == SC.INVALID_ARGUMENT, (err.code(), err.details()[:200])
    assert len(err.details()) <= MAX_DETAIL_CHARS
    assert "10001 keys" in err.details() and "and 9995 more" in err.details()
    assert judged_record(err) == ("invalid", 0)


def test_rejections_are_logged_at_a_bounded_rate(make_learner, decision, caplog):
    lrn = make_learner()
    bad = pirl_pb2.RolloutRecord.FromString(good_record(decision, "good", 0))
    bad.policy_version = 99
    with caplog.at_level(logging.WARNING, logger="learner.service"):
        for _ in range(50):
            _, err = lrn.send("good", [bad.SerializeToString()])
            assert err.code() == SC.INVALID_ARGUMENT
    lines = [r for r in caplog.records if "refused a record" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lrn.store.counts["rejected_future_version"] == 50  # every one still counted


def test_rate_limited_log_reports_what_it_suppressed(caplog):
    say = RateLimitedLog(logging.getLogger("t.rate"), period=0.2)
    with caplog.at_level(logging.WARNING, logger="t.rate"):
        assert say.warning("k", "line %d", 1)
        assert not any(say.warning("k", "line %d", i) for i in range(2, 10))
        assert say.warning("other", "another key")
        time.sleep(0.25)
        assert say.warning("k", "line %d", 10)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["line 1", "another key", "line 10 (8 similar lines suppressed in the last 0s)"]
    assert bounded("x" * 5000).endswith("more characters)") and len(bounded("x" * 5000)) == MAX_DETAIL_CHARS


# ----------------------------------------------------------------- sequence window


@pytest.mark.parametrize("seq", [2**62, 2**63 - 1, 101])  # 101: the first one past the window (watermark 1 + 100)
def test_sequences_far_ahead_are_refused_and_not_remembered(make_learner, decision, seq):
    lrn = make_learner(max_sequence_ahead=100)
    acks, err = lrn.send("good", [good_record(decision, "good", 0), good_record(decision, "good", seq)])
    assert [a.sequence for a in acks] == [0]
    assert err.code() == SC.OUT_OF_RANGE and "register again" in err.details()
    assert judged_record(err) is None  # not a judgement of the record: the edge keeps it
    assert lrn.store.state()["acked"]["good"] == {"below": 1, "above": []}
    assert lrn.store.counts["rejected_sequence_ahead"] == 1
    # inside the window: accepted and remembered above the watermark
    acks, err = lrn.send("good", [good_record(decision, "good", 99)])
    assert err is None and acks[0].status == ACCEPTED
    assert lrn.store.state()["acked"]["good"] == {"below": 1, "above": [99]}


def test_store_window_error_is_not_final(policy):
    store = RolloutStore(
        PolicyShapes.from_policy(policy), max_version_lag=1, max_record_bytes=1 << 20, max_sequence_ahead=10
    )
    with pytest.raises(RecordError) as ei:
        store.add("r", pirl_pb2.RolloutRecord(robot_id="r", sequence=10, episode_id="e"))
    assert ei.value.reason == "sequence_ahead" and not ei.value.final


# ----------------------------------------------------------------- per-robot stream limits


def test_one_robot_holding_many_streams_cannot_lock_out_another(make_learner, decision):
    lrn = make_learner()  # defaults: 2 streams of each kind per robot; slots sized for the 3 robots
    refused_before = {
        rpc: sample("pirl_learner_streams_refused_total", robot_id="hog", rpc=rpc)
        for rpc in ("StreamRollouts", "SubscribePolicy")
    }
    calls = [lrn.hold("hog", rpc) for _ in range(25) for rpc in ("StreamRollouts", "SubscribePolicy")]
    open_, ended = settle(calls)
    assert len(open_) == 4, len(open_)  # 2 + 2
    assert {c.code() for c in ended} == {SC.RESOURCE_EXHAUSTED}
    for kind, rpc in enumerate(("StreamRollouts", "SubscribePolicy")):
        # a burst of 50 calls can find every call slot taken for a moment: gRPC refuses those itself
        by_limit = sum("per-robot limit" in c.details() for c in ended if calls.index(c) % 2 == kind)
        assert by_limit > 0
        assert sample("pirl_learner_streams_refused_total", robot_id="hog", rpc=rpc) - refused_before[rpc] == by_limit
        assert lrn.service.streams.count("hog", rpc) == 2
    start = time.monotonic()
    assert lrn.register("good").next_sequence == 0
    acks, err = lrn.send("good", [good_record(decision, "good", 0)])
    elapsed = time.monotonic() - start
    assert err is None and acks[0].status == ACCEPTED
    assert elapsed < 1.0, elapsed
    for c in open_:
        c.cancel()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and lrn.service.streams.count("hog", "SubscribePolicy"):
        time.sleep(0.05)
    assert lrn.service.streams.count("hog", "SubscribePolicy") == 0  # slots come back when calls end


def test_idle_rollout_streams_are_closed(make_learner, decision):
    lrn = make_learner(limits=StreamLimits(idle_timeout_s=1.0))
    before = sample("pirl_learner_streams_idle_closed_total", rpc="StreamRollouts")
    idle = lrn.hold("good", "StreamRollouts")
    busy_q: queue.Queue = queue.Queue()
    busy = lrn.stub("StreamRollouts", "stream_stream")(iter(busy_q.get, None), metadata=auth_metadata(TOKENS["other"]))
    acks = []

    def read_acks():
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end of the test
            acks.extend(busy)

    threading.Thread(target=read_acks, daemon=True).start()
    deadline = time.monotonic() + 4.0
    seq = 0
    while time.monotonic() < deadline:  # 'other' keeps sending: never idle
        busy_q.put(good_record(decision, "other", seq))
        seq += 1
        time.sleep(0.2)
    assert idle.done() and idle.code() == SC.CANCELLED
    assert not busy.done() and len(acks) >= 10
    assert sample("pirl_learner_streams_idle_closed_total", rpc="StreamRollouts") - before == 1
    busy.cancel()


def test_health_watch_is_not_served_on_the_learner_port(make_learner):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    lrn = make_learner()
    stub = health_pb2_grpc.HealthStub(lrn.channel)
    assert (
        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    with pytest.raises(grpc.RpcError) as ei:
        next(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5))
    assert ei.value.code() == SC.UNIMPLEMENTED


# ----------------------------------------------------------------- the uploader keeps what was not judged


class FakeLearner:
    """Register answers; StreamRollouts reads one record and then fails the way ``fail`` says."""

    def __init__(self, fail, register_fail=None):
        self.fail, self.register_fail, self.streams, self.registers = fail, register_fail, 0, 0
        handlers = {
            "Register": grpc.unary_unary_rpc_method_handler(self._register, RAW, RAW),
            "StreamRollouts": grpc.stream_stream_rpc_method_handler(self._stream, RAW, RAW),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("pirl.v1.Learner", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _register(self, data, context):
        self.registers += 1
        if self.register_fail is not None:
            self.register_fail(context)
        return pirl_pb2.RegisterResponse(next_sequence=0, max_version_lag=5).SerializeToString()

    def _stream(self, request_iterator, context):
        self.streams += 1
        rec = pirl_pb2.RolloutRecord.FromString(next(request_iterator))
        self.fail(context, rec)
        yield b""  # never reached


def run_uploader(tmp_path, fail, n_records=3, streams=3):
    fake = FakeLearner(fail)
    spool = Spool(tmp_path / "spool", fsync=False)
    for seq in range(n_records):
        spool.append(seq, pirl_pb2.RolloutRecord(robot_id="good", sequence=seq, episode_id="e").SerializeToString())
    up = Uploader(LearnerAddress(f"127.0.0.1:{fake.port}", "good", TOKENS["good"]), spool, SyncClock("good"))
    up.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and fake.streams < streams:
        time.sleep(0.05)
    up.stop()
    fake.server.stop(None)
    left = [seq for seq, _ in spool.pending()]
    spool.close()
    return up, left, fake


def test_uploader_keeps_records_when_the_learner_is_merely_busy(tmp_path, caplog):
    def busy(context, rec):  # exactly what gRPC's own concurrent-call limit sends: no marker
        context.abort(SC.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")

    with caplog.at_level(logging.WARNING, logger="edge.link"):
        up, left, fake = run_uploader(tmp_path, busy)
    assert fake.streams >= 3
    assert left == [0, 1, 2] and dict(up.refused) == {}
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "at a limit" in msgs and "records stay in the spool" in msgs


@pytest.mark.parametrize(
    "code", [SC.OUT_OF_RANGE, SC.CANCELLED, SC.INTERNAL, SC.PERMISSION_DENIED, SC.INVALID_ARGUMENT]
)
def test_uploader_keeps_records_on_any_unmarked_error(tmp_path, code):
    def fail(context, rec):
        context.abort(code, "not a judgement of the record")

    up, left, _ = run_uploader(tmp_path, fail, streams=2)
    assert left == [0, 1, 2] and dict(up.refused) == {}


def test_uploader_drops_exactly_the_record_the_learner_judged(tmp_path):
    def judge(context, rec):
        context.set_trailing_metadata(refusal_metadata("invalid", rec.sequence))
        context.abort(SC.INVALID_ARGUMENT, f"record seq={rec.sequence}: bad")

    up, left, _ = run_uploader(tmp_path, judge, streams=2)
    assert left == [2] and dict(up.refused) == {"invalid": 2}


def test_uploader_keeps_a_record_when_the_judged_sequence_is_not_the_one_in_flight(tmp_path):
    def wrong(context, rec):
        context.set_trailing_metadata(refusal_metadata("invalid", rec.sequence + 1000))
        context.abort(SC.INVALID_ARGUMENT, "bad")

    up, left, _ = run_uploader(tmp_path, wrong, streams=2)
    assert left == [0, 1, 2] and dict(up.refused) == {}


def test_a_failed_register_is_not_called_a_stream_end(tmp_path, caplog):
    fake = FakeLearner(None, register_fail=lambda context: context.abort(SC.INTERNAL, "register broke"))
    spool = Spool(tmp_path / "spool", fsync=False)
    up = Uploader(LearnerAddress(f"127.0.0.1:{fake.port}", "good", TOKENS["good"]), spool, SyncClock("good"))
    with caplog.at_level(logging.WARNING, logger="edge.link"):
        up.start()
        time.sleep(1.5)
        up.stop()
    fake.server.stop(None)
    spool.close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "edge.link"]
    assert fake.registers >= 2 and fake.streams == 0
    assert len(msgs) == 1, msgs  # the retries are not logged again within the rate limit
    assert "while registering with the learner (register broke)" in msgs[0] and "stream" not in msgs[0], msgs


def test_refusal_reasons_from_the_wire_are_label_safe():
    class E(grpc.RpcError):
        def __init__(self, md):
            self.md = md

        def trailing_metadata(self):
            return self.md

    assert judged_record(E(((REFUSED_RECORD, "x" * 10_000),))) == ("other", None)
    assert judged_record(E(((REFUSED_RECORD, "stale_version"), ("pirl-refused-sequence", "nan")))) == (
        "stale_version",
        None,
    )
    assert judged_record(E(())) is None
    assert (
        json.dumps(judged_record(E(((REFUSED_RECORD, "invalid"), ("pirl-refused-sequence", "5"))))) == '["invalid", 5]'
    )
