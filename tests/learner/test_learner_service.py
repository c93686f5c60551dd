"""The learner's gRPC service end to end: a real TLS server in-process, raw-bytes clients like the edge's.

Every refusal is checked for its specific status code and a message that says what was wrong, and after
every bad call a good client (robot-1) must still get its records ACCEPTED: one bad robot or record never
takes the learner down. The server is module-scoped, so each test uses its own sequence numbers / robots.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load as load_safetensors

from edge.backends import TorchBackend
from edge.records import Decision, Outcome, make_record
from helpers.policy import builtin_policy
from learner.service import LearnerService, Publisher, build_server
from learner.store import PolicyShapes, RolloutStore
from learner.trainer import policy_update_message
from pirl.codec import to_tensor_msg
from pirl.security import TokenAuthenticator, auth_metadata, channel_credentials, make_dev_pki, server_credentials
from pirl.v1 import pirl_pb2

MAX_RECORD_BYTES = 64 * 1024
RPC_TIMEOUT = 10.0
STATE, ACTION_DIM = 6, 3
OBS_KEY = "observation.state"
ROBOTS = ["robot-0", "robot-1", "robot-2"]  # robot-0: bad calls; robot-1: the good client; robot-2: Register test
ACCEPTED, DUPLICATE = pirl_pb2.RolloutAck.ACCEPTED, pirl_pb2.RolloutAck.DUPLICATE
SC = grpc.StatusCode


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def policy():
    return builtin_policy(0)[0].eval()


@pytest.fixture(scope="module")
def decision(policy) -> Decision:
    """One real sampled chunk, as an edge would record it (policy version 0)."""
    obs = {OBS_KEY: torch.randn(1, STATE, generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        noise = policy.draw_noise(1, generator=torch.Generator().manual_seed(1))
        sample = TorchBackend(policy).sample(obs, *noise, torch.full((1,), policy.config.noise_level))
    actions = sample.actions.detach().cpu().numpy()
    return Decision.from_sample(0, obs, sample, actions, 0, policy.config.n_action_steps)


@pytest.fixture(scope="module")
def learner(tmp_path_factory, policy, decision):
    pki = make_dev_pki(tmp_path_factory.mktemp("pki"), ROBOTS)
    tokens = json.loads(pki["tokens"].read_text())

    shapes = PolicyShapes.from_policy(policy)
    store = RolloutStore(shapes, max_version_lag=1, max_record_bytes=MAX_RECORD_BYTES)
    publisher = Publisher()
    service = LearnerService(store, publisher, TokenAuthenticator(tokens), max_record_bytes=MAX_RECORD_BYTES)
    server, port, _ = build_server(
        service,
        "127.0.0.1:0",
        credentials=server_credentials(pki["server_cert"], pki["server_key"]),
        max_message_bytes=2 * MAX_RECORD_BYTES,
    )
    server.start()
    v0 = policy_update_message(policy, 0)
    publisher.publish(v0)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(pki["ca_cert"]))
    raw = lambda x: x  # noqa: E731  raw bytes in and out, like edge/link.py

    def stub(name, kind):
        return getattr(channel, kind)(f"/pirl.v1.Learner/{name}", request_serializer=raw, response_deserializer=raw)

    lrn = SimpleNamespace(
        store=store,
        publisher=publisher,
        service=service,
        port=port,
        tokens=tokens,
        shapes=shapes,
        channel=channel,
        policy=policy,
        decision=decision,
        v0=v0,
        register=stub("Register", "unary_unary"),
        heartbeat=stub("Heartbeat", "unary_unary"),
        stream=stub("StreamRollouts", "stream_stream"),
        subscribe=stub("SubscribePolicy", "unary_stream"),
        good_seq=itertools.count(0),  # robot-1: contiguous from 0
        bad_seq=itertools.count(1000),  # robot-0: each test draws fresh numbers
    )
    try:
        yield lrn
    finally:
        channel.close()
        service.stop()
        server.stop(grace=None).wait(5)


# ---------------------------------------------------------------------------------------------- helpers


def record(lrn, robot: str, seq: int, **fields) -> pirl_pb2.RolloutRecord:
    """A valid record (a real sampled chunk via edge.records.make_record); ``fields`` override its fields."""
    raw = make_record(
        robot,
        seq,
        f"{robot}-ep-{seq}",
        0,
        lrn.decision,
        Outcome(reward=1.0, terminated=True, success=True, env_steps=4),
    )
    rec = pirl_pb2.RolloutRecord.FromString(raw)
    for k, v in fields.items():
        if isinstance(v, pirl_pb2.Tensor):
            getattr(rec, k).CopyFrom(v)
        else:
            setattr(rec, k, v)
    return rec


def send(lrn, robot: str | None, payloads, token: str | None = None):
    """Stream ``payloads`` (messages or raw bytes) as ``robot`` (or with ``token``); (acks, RpcError or None)."""
    if token is None and robot is not None:
        token = lrn.tokens[robot]
    data = [p if isinstance(p, bytes) else p.SerializeToString() for p in payloads]
    md = auth_metadata(token) if token is not None else None
    acks = []
    try:
        for raw in lrn.stream(iter(data), metadata=md, timeout=RPC_TIMEOUT):
            acks.append(pirl_pb2.RolloutAck.FromString(raw))
    except grpc.RpcError as e:
        return acks, e
    return acks, None


def refused(lrn, robot, payloads, code: grpc.StatusCode, *needles: str, token=None) -> grpc.RpcError:
    """Send, expect the stream to end with ``code`` and a message containing every needle; nothing accepted."""
    before = lrn.store.counts["accepted"]
    acks, err = send(lrn, robot, payloads, token=token)
    assert err is not None, f"expected {code.name}, got acks {acks}"
    assert err.code() == code, (err.code(), err.details())
    for n in needles:
        assert n.lower() in (err.details() or "").lower(), f"{n!r} not in {err.details()!r}"
    assert lrn.store.counts["accepted"] == before + sum(a.status == ACCEPTED for a in acks)
    assert_good_client_ok(lrn)
    return err


def assert_good_client_ok(lrn) -> None:
    """robot-1 can still register and gets a fresh record ACCEPTED."""
    seq = next(lrn.good_seq)
    acks, err = send(lrn, "robot-1", [record(lrn, "robot-1", seq, policy_version=lrn.store.version)])
    assert err is None, (err.code(), err.details())
    assert [(a.sequence, a.status) for a in acks] == [(seq, ACCEPTED)]
    resp = register(lrn, "robot-1")
    assert resp.next_sequence == seq + 1


def register(lrn, robot, token=None, robot_id=None) -> pirl_pb2.RegisterResponse:
    req = pirl_pb2.RegisterRequest(robot_id=robot if robot_id is None else robot_id, edge_version="t", backend="torch")
    raw = lrn.register(req.SerializeToString(), metadata=auth_metadata(token or lrn.tokens[robot]), timeout=RPC_TIMEOUT)
    return pirl_pb2.RegisterResponse.FromString(raw)


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value


# ---------------------------------------------------------------------------------------------- tests


def test_health_service_reports_serving(learner):
    stub = health_pb2_grpc.HealthStub(learner.channel)
    for service in ("", "pirl.v1.Learner"):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_good_client_round_trip(learner):
    assert_good_client_ok(learner)
    hb = pirl_pb2.HeartbeatRequest(robot_id="robot-1", policy_version=0, spool_records=3, control_rate_hz=10.0)
    raw = learner.heartbeat(
        hb.SerializeToString(), metadata=auth_metadata(learner.tokens["robot-1"]), timeout=RPC_TIMEOUT
    )
    assert pirl_pb2.HeartbeatResponse.FromString(raw).policy_version == learner.store.version == 0


def test_register_returns_spec_and_next_sequence(learner):
    resp = register(learner, "robot-2")
    sh = learner.shapes
    assert resp.policy_version == 0 and resp.max_version_lag == 1 and resp.max_record_bytes == MAX_RECORD_BYTES
    assert resp.next_sequence == 0
    assert (resp.spec.chain.dtype, tuple(resp.spec.chain.shape)) == ("float32", sh.chain)
    assert sh.chain == (
        learner.policy.config.num_denoise_steps + 1,
        learner.policy.config.chunk_size,
        learner.policy.config.model_action_dim,
    )
    assert (resp.spec.stochastic.dtype, tuple(resp.spec.stochastic.shape)) == ("bool", (sh.num_steps,))
    assert resp.spec.noise_method == learner.policy.config.noise_method
    assert resp.spec.n_action_steps == learner.policy.config.n_action_steps
    assert {k: (v.dtype, tuple(v.shape)) for k, v in resp.spec.observation.items()} == {OBS_KEY: ("float32", (STATE,))}
    # next_sequence is the lowest sequence not acked yet: 0, 1, 3 acked -> 2; then 2 acked -> 4
    acks, err = send(learner, "robot-2", [record(learner, "robot-2", s) for s in (0, 1, 3)])
    assert err is None and [a.status for a in acks] == [ACCEPTED] * 3
    assert register(learner, "robot-2").next_sequence == 2
    acks, err = send(learner, "robot-2", [record(learner, "robot-2", 2)])
    assert err is None and [(a.sequence, a.status) for a in acks] == [(2, ACCEPTED)]
    assert register(learner, "robot-2").next_sequence == 4


def test_register_robot_id_mismatch_is_permission_denied(learner):
    err = rpc_error(lambda: register(learner, "robot-0", robot_id="robot-1"))
    assert err.code() == SC.PERMISSION_DENIED
    assert "robot-1" in err.details() and "robot-0" in err.details() and "match" in err.details()
    assert_good_client_ok(learner)


@pytest.mark.parametrize("token", [None, "not-the-token-of-any-robot"], ids=["no_token", "wrong_token"])
def test_unauthenticated_calls_are_refused(learner, token):
    md = auth_metadata(token) if token else None
    want = "missing token" if token is None else "invalid token"
    reg = pirl_pb2.RegisterRequest(robot_id="robot-0").SerializeToString()
    sub = pirl_pb2.SubscribeRequest(robot_id="robot-0", have_version=-1).SerializeToString()
    hb = pirl_pb2.HeartbeatRequest(robot_id="robot-0").SerializeToString()
    calls = {
        "Register": lambda: learner.register(reg, metadata=md, timeout=RPC_TIMEOUT),
        "Heartbeat": lambda: learner.heartbeat(hb, metadata=md, timeout=RPC_TIMEOUT),
        "SubscribePolicy": lambda: next(learner.subscribe(sub, metadata=md, timeout=RPC_TIMEOUT)),
    }
    for name, call in calls.items():
        err = rpc_error(call)
        assert err.code() == SC.UNAUTHENTICATED, (name, err.code(), err.details())
        assert want in err.details(), (name, err.details())
        assert token is None or token not in err.details()  # never echoes the presented token
    seq = next(learner.bad_seq)
    next_before = register(learner, "robot-0").next_sequence
    payload = record(learner, "robot-0", seq)
    # robot=None: send() passes no metadata without a token, else the wrong token
    err = refused(learner, None, [payload], SC.UNAUTHENTICATED, want, token=token)
    assert token is None or token not in err.details()
    assert register(learner, "robot-0").next_sequence == next_before  # nothing of robot-0's was stored


@pytest.mark.parametrize(
    "payload", [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x3a\x05abc"], ids=["bad_tag", "bad_utf8", "truncated_field"]
)
def test_malformed_protobuf_is_invalid_argument(learner, payload):
    refused(learner, "robot-0", [payload], SC.INVALID_ARGUMENT, "malformed", "RolloutRecord")


def test_malformed_register_request_is_invalid_argument(learner):
    err = rpc_error(
        lambda: learner.register(
            b"\xff\xff\xff", metadata=auth_metadata(learner.tokens["robot-0"]), timeout=RPC_TIMEOUT
        )
    )
    assert err.code() == SC.INVALID_ARGUMENT and "malformed" in err.details()
    assert_good_client_ok(learner)


def _obs(arr) -> dict:
    return {OBS_KEY: to_tensor_msg(arr)}


BAD_RECORDS = {
    # name: (mutate(rec, shapes), needles in the message)
    "chain_wrong_shape": (
        lambda r, s: r.chain.CopyFrom(to_tensor_msg(np.zeros((s.chain[0] - 1, *s.chain[1:]), np.float32))),
        ["shape mismatch", "(5, 8, 3)"],
    ),
    "chain_wrong_dtype": (
        lambda r, s: r.chain.CopyFrom(to_tensor_msg(np.zeros(s.chain, np.float64))),
        ["dtype mismatch", "float64"],
    ),
    "chain_short_data": (lambda r, s: setattr(r.chain, "data", r.chain.data[:-4]), ["data length mismatch"]),
    "chain_nan": (
        lambda r, s: r.chain.CopyFrom(to_tensor_msg(np.full(s.chain, np.nan, np.float32))),
        ["chain has non-finite"],
    ),
    "stochastic_not_bool": (
        lambda r, s: r.stochastic.CopyFrom(to_tensor_msg(np.ones(s.num_steps, np.float32))),
        ["dtype mismatch", "expected bool"],
    ),
    "observation_float64": (
        lambda r, s: r.observation[OBS_KEY].CopyFrom(to_tensor_msg(np.zeros(STATE, np.float64))),
        ["observation['observation.state']", "dtype mismatch", "float64"],
    ),
    "observation_wrong_shape": (
        lambda r, s: r.observation[OBS_KEY].CopyFrom(to_tensor_msg(np.zeros(STATE + 1, np.float32))),
        ["observation['observation.state']", "shape mismatch"],
    ),
    "observation_inf": (
        lambda r, s: r.observation[OBS_KEY].CopyFrom(to_tensor_msg(np.full(STATE, np.inf, np.float32))),
        ["observation['observation.state']", "non-finite"],
    ),
    "observation_extra_key": (
        lambda r, s: r.observation["observation.extra"].CopyFrom(to_tensor_msg(np.zeros(2, np.float32))),
        ["observation keys", "observation.extra"],
    ),
    "observation_missing": (lambda r, s: r.ClearField("observation"), ["observation keys"]),
    "reward_nan": (lambda r, s: setattr(r, "reward", float("nan")), ["reward", "not finite"]),
    "log_prob_inf": (lambda r, s: setattr(r, "log_prob", float("inf")), ["log_prob", "not finite"]),
    "empty_episode_id": (lambda r, s: setattr(r, "episode_id", ""), ["episode_id"]),
    "terminated_and_truncated": (lambda r, s: setattr(r, "truncated", True), ["terminated and truncated"]),
    "final_obs_not_truncated": (
        lambda r, s: r.final_observation[OBS_KEY].CopyFrom(to_tensor_msg(np.zeros(STATE, np.float32))),
        ["final_observation"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_invalid_record_is_invalid_argument_and_its_sequence_is_not_burnt(learner, case):
    mutate, needles = BAD_RECORDS[case]
    good_seq, bad_seq = next(learner.bad_seq), next(learner.bad_seq)
    bad = record(learner, "robot-0", bad_seq)
    mutate(bad, learner.shapes)
    # the good record ahead of it in the same stream is acked before the stream ends
    err = refused(
        learner, "robot-0", [record(learner, "robot-0", good_seq), bad], SC.INVALID_ARGUMENT, f"seq={bad_seq}", *needles
    )
    assert err is not None
    # the refused sequence was not acked: the corrected record is ACCEPTED, not DUPLICATE
    acks, err = send(learner, "robot-0", [record(learner, "robot-0", good_seq), record(learner, "robot-0", bad_seq)])
    assert err is None and [(a.sequence, a.status) for a in acks] == [(good_seq, DUPLICATE), (bad_seq, ACCEPTED)]


def test_refused_stream_keeps_the_acks_before_the_bad_record(learner):
    s1, s2, s3 = (next(learner.bad_seq) for _ in range(3))
    acks, err = send(
        learner,
        "robot-0",
        [
            record(learner, "robot-0", s1),
            record(learner, "robot-0", s2),
            record(learner, "robot-0", s3, reward=float("nan")),
        ],
    )
    assert [(a.sequence, a.status) for a in acks] == [(s1, ACCEPTED), (s2, ACCEPTED)]
    assert err.code() == SC.INVALID_ARGUMENT and "reward" in err.details()
    assert learner.store.counts["rejected_invalid"] >= 1
    assert_good_client_ok(learner)


def test_oversized_record_is_resource_exhausted(learner):
    seq = next(learner.bad_seq)
    before = learner.store.counts["rejected_oversized"]
    # over max_record_bytes but under gRPC's message limit (2x): the service's own check, with its message
    big = record(learner, "robot-0", seq, episode_id="e" * (MAX_RECORD_BYTES + 100))
    assert MAX_RECORD_BYTES < big.ByteSize() < 2 * MAX_RECORD_BYTES
    refused(learner, "robot-0", [big], SC.RESOURCE_EXHAUSTED, "exceeds the limit", str(MAX_RECORD_BYTES))
    assert learner.store.counts["rejected_oversized"] == before + 1
    # a huge extra observation key
    huge_obs = record(learner, "robot-0", seq)
    huge_obs.observation["observation.huge"].CopyFrom(to_tensor_msg(np.zeros(MAX_RECORD_BYTES // 4, np.float32)))
    refused(learner, "robot-0", [huge_obs], SC.RESOURCE_EXHAUSTED, "exceeds the limit")
    # over gRPC's receive limit: refused by gRPC itself, still RESOURCE_EXHAUSTED, server still fine
    bigger = record(learner, "robot-0", seq, episode_id="e" * (3 * MAX_RECORD_BYTES))
    refused(learner, "robot-0", [bigger], SC.RESOURCE_EXHAUSTED)
    # the sequence was never acked
    acks, err = send(learner, "robot-0", [record(learner, "robot-0", seq)])
    assert err is None and [a.status for a in acks] == [ACCEPTED]


def test_replayed_sequence_is_duplicate_and_counted_once(learner):
    seq = next(learner.bad_seq)
    rec = record(learner, "robot-0", seq)
    c = learner.store.counts
    accepted, dupes, episodes = c["accepted"], c["duplicate"], c["episodes"]
    acks, err = send(learner, "robot-0", [rec, rec])  # replay within one stream
    assert err is None and [(a.sequence, a.status) for a in acks] == [(seq, ACCEPTED), (seq, DUPLICATE)]
    acks, err = send(learner, "robot-0", [rec])  # and on a new stream (an edge resending after reconnecting)
    assert err is None and [(a.sequence, a.status) for a in acks] == [(seq, DUPLICATE)]
    # even a different payload under the same (robot, sequence) is a duplicate, never stored twice
    acks, err = send(learner, "robot-0", [record(learner, "robot-0", seq, reward=-5.0, episode_id="other")])
    assert err is None and [a.status for a in acks] == [DUPLICATE]
    assert (c["accepted"], c["duplicate"], c["episodes"]) == (accepted + 1, dupes + 3, episodes + 1)
    # the key is (robot id, sequence): the same number from another robot is a new record
    other = next(learner.good_seq)
    acks, err = send(learner, "robot-1", [record(learner, "robot-1", other)])
    assert err is None and [a.status for a in acks] == [ACCEPTED]
    assert_good_client_ok(learner)


def test_stale_and_future_policy_versions(learner):
    store = learner.store
    old = store.version
    store.set_version(5)
    try:
        stale, future, within = (next(learner.bad_seq) for _ in range(3))
        refused(
            learner,
            "robot-0",
            [record(learner, "robot-0", stale, policy_version=2)],
            SC.FAILED_PRECONDITION,
            "policy version 2",
            "5",
            "lag",
        )
        refused(
            learner,
            "robot-0",
            [record(learner, "robot-0", future, policy_version=99)],
            SC.INVALID_ARGUMENT,
            "99",
            "current 5",
        )
        # within the allowed lag (5 - 1) is fine
        acks, err = send(learner, "robot-0", [record(learner, "robot-0", within, policy_version=4)])
        assert err is None and [a.status for a in acks] == [ACCEPTED]
        assert register(learner, "robot-1").policy_version == 5
    finally:
        store.set_version(old)
    assert_good_client_ok(learner)


def test_record_for_another_robot_is_permission_denied(learner):
    seq = next(learner.bad_seq)
    for robot_id in ("robot-9", "robot-1"):  # unknown robot, and another (known) robot's id
        refused(learner, "robot-0", [record(learner, robot_id, seq)], SC.PERMISSION_DENIED, robot_id, "robot-0")


def test_subscribe_first_sends_the_current_version(learner):
    call = learner.subscribe(
        pirl_pb2.SubscribeRequest(robot_id="robot-1", have_version=-1).SerializeToString(),
        metadata=auth_metadata(learner.tokens["robot-1"]),
        timeout=RPC_TIMEOUT,
    )
    try:
        upd = pirl_pb2.PolicyUpdate.FromString(next(call))
    finally:
        call.cancel()
    assert upd.version == 0 and upd.manifest.policy_version == 0
    (art,) = upd.manifest.artifacts
    assert art.name == "model.safetensors" and art.size_bytes == len(upd.weights)
    assert art.sha256 == hashlib.sha256(upd.weights).hexdigest()
    assert upd.weights == learner.v0.weights and upd.published_unix_s > 0
    state = load_safetensors(upd.weights)
    ref = learner.policy.rl_state_dict()  # trained-only: the tensors PI-RL trains
    assert upd.trained_only and upd.frozen_sha256 == learner.policy.frozen_sha256()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_subscribe_up_to_date_waits_for_the_next_version(learner):
    call = learner.subscribe(
        pirl_pb2.SubscribeRequest(robot_id="robot-1", have_version=0).SerializeToString(),
        metadata=auth_metadata(learner.tokens["robot-1"]),
        timeout=RPC_TIMEOUT,
    )
    got: queue.Queue = queue.Queue()

    def reader():
        try:
            for raw in call:
                got.put(pirl_pb2.PolicyUpdate.FromString(raw))
        except grpc.RpcError as e:
            got.put(e)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        time.sleep(0.6)  # long enough for the server to subscribe and (wrongly) send version 0
        assert got.empty(), got.get()
        learner.publisher.publish(policy_update_message(learner.policy, 1))
        upd = got.get(timeout=5)
        assert isinstance(upd, pirl_pb2.PolicyUpdate), upd
        assert upd.version == 1 and upd.manifest.policy_version == 1
        assert upd.manifest.artifacts[0].sha256 == hashlib.sha256(upd.weights).hexdigest()
    finally:
        call.cancel()
        t.join(5)
        learner.publisher.publish(learner.v0)  # later subscribers see version 0 again
    assert_good_client_ok(learner)


# ------------------------------------------------------------------ found by these tests, fixed since


def test_negative_sequence_is_invalid_argument(learner):
    refused(learner, "robot-0", [record(learner, "robot-0", -1)], SC.INVALID_ARGUMENT, "sequence")


def test_negative_policy_version_is_invalid_argument(learner):
    refused(
        learner,
        "robot-0",
        [record(learner, "robot-0", next(learner.bad_seq), policy_version=-1)],
        SC.INVALID_ARGUMENT,
        "policy_version",
    )


def test_chain_error_names_the_field(learner):
    bad = record(learner, "robot-0", next(learner.bad_seq))
    bad.chain.CopyFrom(to_tensor_msg(np.zeros((1, 1, 1), np.float32)))
    refused(learner, "robot-0", [bad], SC.INVALID_ARGUMENT, "chain")


def test_gaps_the_robot_will_never_fill_are_closed(learner):
    """A robot reports its lowest pending sequence; the learner's acked set stays a watermark."""
    store = learner.store
    with store._lock:
        store._acked["robot-gap"].add(0)
        store._acked["robot-gap"].add(2)  # 1 was lost before it was spooled
        store._acked["robot-gap"].add(3)
    assert store.state()["acked"]["robot-gap"] == {"below": 1, "above": [2, 3]}
    store.forget_below("robot-gap", 2)
    assert store.state()["acked"]["robot-gap"] == {"below": 4, "above": []}
    store.forget_below("robot-gap", 1)  # never moves back
    assert store.state()["acked"]["robot-gap"] == {"below": 4, "above": []}
