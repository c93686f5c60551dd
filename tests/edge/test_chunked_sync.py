"""Chunked, resumable, hash-checked weight sync: the learner's versioned store (learner.versions), the
FetchArtifact RPC over a real TLS server, the edge's staging (edge.weight_sync) and the Subscriber
that offers a downloaded version to a real InferenceWorker. The small built-in policy with a chunk
size of 1 KiB, so every version spans many chunks."""

from __future__ import annotations

import hashlib
import json
import time

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edge.inference import InferenceWorker
from edge.link import LearnerAddress, Subscriber, SyncClock
from edge.weight_sync import VersionRefusedError, WeightStaging, check_announcement
from helpers.policy import builtin_policy
from learner.service import LearnerService, Publisher, build_server
from learner.store import PolicyShapes, RolloutStore
from learner.versions import ANNOUNCE, VersionStore
from pirl.security import TokenAuthenticator, make_dev_pki, server_credentials
from pirl.v1 import pirl_pb2

CHUNK = 1024
ROBOT = "robot-0"
OVERHEAD = 128  # an ArtifactChunk's framing beside its data: offset, lengths, a 64-char hex sha256


def moved(policy, seed: int, delta: float = 0.01):
    """``policy`` with every trained tensor moved (a new version; the frozen part unchanged)."""
    g = torch.Generator().manual_seed(seed)
    names = set(policy.rl_state_names())
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n in names:
                p.add_(delta * torch.randn(p.shape, generator=g))
    return policy


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"), [ROBOT])


class Learner:
    """A real LearnerService over TLS serving a VersionStore at ``root`` (a 'learner process')."""

    def __init__(self, pki, root, port: int = 0, policy=None):
        policy = policy if policy is not None else builtin_policy(0)[0].eval()
        tokens = json.loads(pki["tokens"].read_text())
        self.token = tokens[ROBOT]
        self.publisher = Publisher(chunk_bytes=CHUNK)
        self.versions = self.publisher.version_store(root, keep=2)
        store = RolloutStore(PolicyShapes.from_policy(policy), max_version_lag=1, max_record_bytes=1 << 20)
        self.service = LearnerService(store, self.publisher, TokenAuthenticator(tokens), max_record_bytes=1 << 20)
        creds = server_credentials(pki["server_cert"], pki["server_key"])
        self.server, self.port, _ = build_server(
            self.service, f"127.0.0.1:{port}", credentials=creds, max_message_bytes=1 << 20
        )
        self.server.start()

    def address(self, pki) -> LearnerAddress:
        return LearnerAddress(f"127.0.0.1:{self.port}", ROBOT, self.token, ca=str(pki["ca_cert"]))

    def stop(self):
        self.service.stop()
        self.server.stop(grace=None).wait(5)


def opener(address: LearnerAddress, channel, version: int):
    raw = lambda x: x  # noqa: E731
    call = channel.unary_stream("/pirl.v1.Learner/FetchArtifact", request_serializer=raw, response_deserializer=raw)

    def open_stream(name, offset):
        req = pirl_pb2.FetchArtifactRequest(robot_id=ROBOT, version=version, name=name, offset=offset)
        return call(req.SerializeToString(), metadata=address.metadata, timeout=30)

    return open_stream


def test_version_store_writes_announces_serves_and_prunes(tmp_path):
    policy = builtin_policy(0)[0].eval()
    store = VersionStore(tmp_path / "artifacts", keep=2, chunk_bytes=CHUNK)
    ann = store.publish(policy, 1)
    check_announcement(ann)  # well-formed for an edge
    assert ann.chunked and ann.chunk_bytes == CHUNK and not ann.weights and not ann.files
    (art,) = ann.manifest.artifacts
    data = (store.folder(1) / "model.safetensors").read_bytes()
    assert art.name == "model.safetensors" and art.size_bytes == len(data) > 4 * CHUNK
    assert art.sha256 == hashlib.sha256(data).hexdigest()
    assert list(art.chunk_sha256) == [
        hashlib.sha256(data[i : i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)
    ]
    # the trained tensors only, in the dtype the policy holds them in
    state = load_file(str(store.folder(1) / "model.safetensors"))
    assert sorted(state) == policy.rl_state_names()
    # served from disk by offset, chunk by chunk
    chunks = list(store.read_chunks(1, "model.safetensors", 2 * CHUNK))
    assert chunks[0].offset == 2 * CHUNK and b"".join(c.data for c in chunks) == data[2 * CHUNK :]
    assert all(len(c.data) <= CHUNK for c in chunks)
    with pytest.raises(ValueError, match="chunk boundary"):
        next(store.read_chunks(1, "model.safetensors", CHUNK + 1))
    with pytest.raises(KeyError):
        next(store.read_chunks(1, "../announce.pb", 0))  # only names the manifest lists
    with pytest.raises(KeyError):
        next(store.read_chunks(7, "model.safetensors", 0))

    # a restarted learner (--resume) announces the very same files again, even if the policy moved
    before = (store.folder(1) / ANNOUNCE).read_bytes()
    again = VersionStore(tmp_path / "artifacts", keep=2, chunk_bytes=CHUNK).publish(moved(policy, 3), 1)
    assert again.manifest == ann.manifest and (store.folder(1) / ANNOUNCE).read_bytes() == before

    # pruned to the newest `keep`
    for v in (2, 3):
        store.publish(moved(policy, v), v)
    assert store.versions() == [2, 3] and not store.folder(1).exists()
    # reopened with another chunk size: a version on disk is served in the chunks it was hashed in
    other = VersionStore(tmp_path / "artifacts", keep=2, chunk_bytes=4 * CHUNK)
    chunks = list(other.read_chunks(3, "model.safetensors", 0))
    listed = other.announcement(3).manifest.artifacts[0].chunk_sha256
    assert [hashlib.sha256(c.data).hexdigest() for c in chunks] == list(listed)

    # a version no bigger than one chunk rides inline in its announcement
    big = VersionStore(tmp_path / "big", chunk_bytes=16 << 20).publish(policy, 1)
    assert not big.chunked and big.weights == (tmp_path / "big" / "v000001" / "model.safetensors").read_bytes()


def test_staging_refuses_a_bad_chunk_refetches_it_and_refuses_a_version_that_stays_bad(tmp_path):
    policy = builtin_policy(0)[0].eval()
    store = VersionStore(tmp_path / "learner", chunk_bytes=CHUNK)
    ann = store.publish(policy, 1)
    size = ann.manifest.artifacts[0].size_bytes
    flips = {"left": 1}

    def flaky(name, offset):  # the chunk at 3*CHUNK arrives corrupted once, then intact
        for c in store.read_chunks(1, name, offset):
            if c.offset == 3 * CHUNK and flips["left"]:
                flips["left"] -= 1
                c.data = bytes([c.data[0] ^ 1]) + c.data[1:]
                c.sha256 = hashlib.sha256(c.data).hexdigest()  # consistent with itself, not with the announcement
            yield c.SerializeToString()

    staging = WeightStaging(tmp_path / "edge")
    paths = staging.fetch(ann, flaky)
    assert staging.stats["bad_chunks"] == 1 and staging.stats["bytes_received"] == size
    assert paths["model.safetensors"].read_bytes() == (store.folder(1) / "model.safetensors").read_bytes()

    def always_bad(name, offset):
        for c in store.read_chunks(1, name, offset):
            c.data = c.data[:-1] + bytes([c.data[-1] ^ 1])
            yield c.SerializeToString()

    # a later version whose file did not change is linked from the staged one, not downloaded again
    same = store.publish(policy, 2)
    received = staging.stats["bytes_received"]
    assert staging.fetch(same, lambda name, offset: pytest.fail("downloaded again"))["model.safetensors"].is_file()
    assert staging.stats["bytes_received"] == received and staging.stats["bytes_reused"] == size

    staging2 = WeightStaging(tmp_path / "edge2", chunk_retries=2)
    with pytest.raises(VersionRefusedError, match="3 chunks refused"):
        staging2.fetch(ann, always_bad)
    assert not (staging2.folder(1) / "model.safetensors").exists()  # nothing unverified is ever final

    bad = pirl_pb2.PolicyUpdate()
    bad.CopyFrom(ann)
    evil = bad.manifest.artifacts.add()
    evil.CopyFrom(ann.manifest.artifacts[0])
    evil.name = "../../etc/x"
    with pytest.raises(VersionRefusedError, match="relative path"):
        check_announcement(bad)
    del bad.manifest.artifacts[-1]
    check_announcement(bad)
    del bad.manifest.artifacts[0].chunk_sha256[-1]
    with pytest.raises(VersionRefusedError):
        check_announcement(bad)


def test_download_resumes_from_the_staged_offset_after_the_learner_restarts(tmp_path, pki):
    """The learner dies mid-download; a new learner on the same store (--resume) serves the same version;
    the edge resumes at the end of the chunks it had verified and the file hashes as announced."""
    root = tmp_path / "artifacts"
    first = Learner(pki, root)
    ann = first.versions.publish(moved(builtin_policy(0)[0].eval(), 1), 1)
    art = ann.manifest.artifacts[0]
    staging = WeightStaging(tmp_path / "edge")
    address = first.address(pki)

    def kill_after_three(name, end):
        if end == 3 * CHUNK:
            first.stop()  # the learner is gone while the stream is open

    with address.channel() as channel, pytest.raises(grpc.RpcError):
        staging.fetch(ann, opener(address, channel, 1), on_chunk=kill_after_three)
    staged = (staging.folder(1) / "model.safetensors.part").stat().st_size
    assert 3 * CHUNK <= staged < art.size_bytes

    received_before = staging.stats["bytes_received"]
    second = Learner(pki, root)  # a fresh process would reopen the store the same way
    try:
        again = second.versions.publish(builtin_policy(0)[0].eval(), 1)  # on disk already: not rewritten
        assert again.manifest == ann.manifest
        address = second.address(pki)
        with address.channel() as channel:
            paths = staging.fetch(again, opener(address, channel, 1))
    finally:
        second.stop()
    assert staging.stats["resumed_from_bytes"] == staged and staged % CHUNK == 0
    assert staging.stats["bytes_received"] - received_before == art.size_bytes - staged
    assert hashlib.sha256(paths["model.safetensors"].read_bytes()).hexdigest() == art.sha256


def _wait(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_subscriber_downloads_in_chunks_and_a_corrupted_version_keeps_the_old_one_serving(tmp_path, pki):
    policy, pre, post = builtin_policy(0)
    policy.eval()
    worker = InferenceWorker(policy, pre, post, robot_id=ROBOT, backend="torch")
    learner = Learner(pki, tmp_path / "artifacts", policy=policy)
    sub = Subscriber(learner.address(pki), worker, SyncClock(ROBOT), staging_dir=tmp_path / "edge")
    sub.start()
    try:
        # version 1: its stored file is damaged on the learner's disk after it was announced: every
        # chunk from the damage on fails its announced hash; the version is refused, version 0 serves
        newer = moved(builtin_policy(0)[0].eval(), 1)
        ann = learner.versions.publish(newer, 1)
        path = learner.versions.folder(1) / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[5 * CHUNK + 7] ^= 0xFF
        path.write_bytes(bytes(data))
        learner.publisher.publish(ann)
        _wait(lambda: sub.rejected == 1)
        assert sub.staging.stats["bad_chunks"] >= 1 and sub.offered == -1
        obs = {"agent_pos": np.zeros((1, 6), np.float32)}
        assert worker.decide(obs)[0].version == 0

        # version 2: intact; every message the edge received stayed within a chunk (+ framing)
        newest = moved(builtin_policy(0)[0].eval(), 2)
        learner.publisher.publish(learner.versions.publish(newest, 2))
        _wait(lambda: sub.offered == 2)
        assert worker.decide(obs)[0].version == 2
        assert CHUNK < sub.staging.stats["max_message_bytes"] <= CHUNK + OVERHEAD
        got = dict(worker.policy.named_parameters())
        for n, t in newest.rl_state_dict().items():
            assert torch.equal(got[n], t), n
        # pruned on both sides: the learner keeps 2 versions, the edge the one it serves (+ one more)
        assert learner.versions.versions() == [1, 2]
        learner.publisher.publish(learner.versions.publish(moved(newest, 3), 3))
        _wait(lambda: sub.offered == 3)
        worker.decide(obs)
        assert learner.versions.versions() == [2, 3]
        staged = sorted(p.name for p in (tmp_path / "edge").iterdir())
        assert "v000003" in staged and "v000001" not in staged and len(staged) <= 2
    finally:
        sub.stop()
        learner.stop()


def test_the_trainer_publishes_through_the_version_store_and_republishes_it_after_a_restart(tmp_path):
    from learner.trainer import Trainer, TrainerSettings
    from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm
    from lerobot_policy_pi_rl.presets import builtin_task_algorithm_config

    def trainer(publisher):
        policy, pre, post = builtin_policy(0)
        algo = PiRLAlgorithm(policy, builtin_task_algorithm_config())
        store = RolloutStore(PolicyShapes.from_policy(policy), max_version_lag=1, max_record_bytes=1 << 20)
        settings = TrainerSettings(export_onnx=False, eval_every=0, keep_checkpoints=2)
        return Trainer(algo, store, publisher, tmp_path, settings, pre, post)

    t = trainer(Publisher(chunk_bytes=CHUNK))
    t.version = 4
    t._publish()
    ann = t.publisher.latest()
    assert ann.chunked and ann.version == 4 and (tmp_path / "artifacts" / "v000004" / ANNOUNCE).is_file()
    t2 = trainer(Publisher(chunk_bytes=CHUNK))
    t2.version = 4
    t2._publish()
    assert t2.publisher.latest().manifest == ann.manifest


def test_a_fetch_names_a_kept_version_and_artifact(tmp_path, pki):
    learner = Learner(pki, tmp_path / "artifacts")
    try:
        learner.versions.publish(builtin_policy(0)[0].eval(), 1)
        address = learner.address(pki)
        with address.channel() as channel:
            fetch = opener(address, channel, 1)
            with pytest.raises(grpc.RpcError) as e:
                list(fetch("model.safetensors", 5))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk boundary" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                list(fetch("nope", 0))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                list(opener(address, channel, 9)("model.safetensors", 0))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        learner.stop()


def test_the_spare_copy_shares_the_frozen_weights_and_a_swap_never_changes_the_serving_ones():
    """One spare copy of the trained set, not of the frozen rest (a VLA's VLM): the worker's spare shares
    the frozen tensors with the active policy; a full state dict that changes them gets private copies."""
    policy, pre, post = builtin_policy(0)
    policy.eval()
    worker = InferenceWorker(policy, pre, post, robot_id=ROBOT, backend="torch")
    trained = set(policy.rl_state_names())
    frozen = [n for n, _ in policy.named_parameters() if n not in trained]
    assert trained and frozen
    spare = dict(worker._spare.policy.named_parameters())
    active = dict(policy.named_parameters())
    assert all(spare[n] is active[n] for n in frozen) and not any(spare[n] is active[n] for n in trained)

    newer = moved(builtin_policy(0)[0].eval(), 1)  # trained-only version: the shared tensors are untouched
    before = {n: active[n].detach().clone() for n in frozen}
    assert worker.offer(1, newer.rl_state_dict(), frozen_sha256=newer.frozen_sha256())
    obs = {"agent_pos": np.zeros((1, 6), np.float32)}
    assert worker.decide(obs)[0].version == 1
    serving = dict(worker.policy.named_parameters())
    assert all(torch.equal(serving[n], before[n]) for n in frozen)
    assert all(torch.equal(serving[n], t) for n, t in newer.rl_state_dict().items())

    full = {k: v + 0.5 if k == frozen[0] else v for k, v in newer.state_dict().items()}  # a frozen tensor moved
    old_serving = dict(worker.policy.named_parameters())
    assert worker.offer(2, full)
    assert torch.equal(old_serving[frozen[0]], before[frozen[0]])  # what was serving did not change meanwhile
    worker.decide(obs)
    now = dict(worker.policy.named_parameters())
    assert torch.equal(now[frozen[0]], full[frozen[0]]) and now[frozen[1]] is old_serving[frozen[1]]
