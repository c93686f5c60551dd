"""Checkpoint integrity: a damaged checkpoint is refused (one log line, a counter), the learner
resumes from the newest intact one and publishes its weights under a NEW version number, and the
write-ahead log still holds every record accepted after the checkpoint it falls back to.

Unit tests run the trainer in-process; the process tests launch ``pirl-learner --resume`` as a real
process on a damaged output folder, as the hostile-testing report did."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load as load_safetensors, load_file

from edge.backends import TorchBackend
from edge.records import Decision, Outcome, make_record
from helpers.net import free_port
from helpers.policy import builtin_policy
from learner import checkpoints, metrics
from learner.checkpoints import CheckpointRefusedError, NoIntactCheckpointError
from learner.service import Publisher
from learner.store import PolicyShapes, RolloutStore
from learner.trainer import Trainer, TrainerSettings
from learner.wal import RecordLog
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm
from lerobot_policy_pi_rl.presets import builtin_task_algorithm_config
from pirl.security import auth_metadata, channel_credentials, make_dev_pki
from pirl.v1 import pirl_pb2

BIN = Path(sys.executable).parent
ROBOT = "robot-0"
WEIGHTS = "pretrained_model/model.safetensors"


# ---------------------------------------------------------------------------------------------- helpers


def make_trainer(out: Path) -> Trainer:
    """A trainer as pirl-learner builds one (built-in policy, a write-ahead log), without ONNX export."""
    policy, pre, post = builtin_policy(0)
    algo = PiRLAlgorithm(policy, builtin_task_algorithm_config())
    store = RolloutStore(
        PolicyShapes.from_policy(policy), max_version_lag=1000, max_record_bytes=1 << 20, wal=RecordLog(out / "wal")
    )
    return Trainer(algo, store, Publisher(), out, TrainerSettings(export_onnx=False, eval_every=0), pre, post)


def perturb(policy, seed: int) -> None:
    """Move every trained tensor, so each version's weights differ."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name in policy.rl_state_names():
            params[name].add_(0.05 * torch.randn(params[name].shape, generator=gen))


def record(policy, seq: int, version: int) -> pirl_pb2.RolloutRecord:
    """A valid record (a real sampled chunk), in an episode that stays open."""
    obs = {"observation.state": torch.randn(1, 6, generator=torch.Generator().manual_seed(seq))}
    with torch.no_grad():
        noise = policy.draw_noise(1, generator=torch.Generator().manual_seed(seq))
        sample = TorchBackend(policy).sample(obs, *noise, torch.full((1,), policy.config.noise_level))
    d = Decision.from_sample(
        version, obs, sample, sample.actions.detach().cpu().numpy(), 0, policy.config.n_action_steps
    )
    return pirl_pb2.RolloutRecord.FromString(make_record(ROBOT, seq, f"ep-{seq}", seq, d, Outcome(env_steps=4)))


def build_checkpoints(out: Path, versions=(1, 2, 3)) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints ``versions`` with different weights, each published the way the trainer does it
    (the high-water mark is recorded first), and one record accepted after each checkpoint (seq =
    its index). Returns each version's trained tensors."""
    t = make_trainer(out)
    trained = {}
    for i, v in enumerate(versions):
        perturb(t.algo.policy, v)
        t.version = v
        t.store.set_version(v)
        t.save()
        t._publish()  # what _update does after save(): record the high-water mark, then publish
        trained[v] = {k: x.clone() for k, x in t.algo.policy.rl_state_dict().items()}  # not views of the live weights
        t.store.add(ROBOT, record(t.algo.policy, i, v))
    t.store.wal.close()
    return trained


def ckpt(out: Path, version: int) -> Path:
    return out / "checkpoints" / f"{version:06d}"


def flip_tensor_byte(path: Path) -> None:
    """The last byte of the file: the top byte of the last float32 of the tensor data."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def flip_header_byte(path: Path) -> None:
    """The first byte after the 8-byte header length: the JSON header no longer parses."""
    data = bytearray(path.read_bytes())
    data[8] ^= 0x01
    path.write_bytes(bytes(data))


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("pirl_learner_checkpoints_refused_total", {"reason": reason}) or 0.0


def files_under(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- unit


def test_manifest_is_written_last_and_covers_every_file(tmp_path):
    build_checkpoints(tmp_path, versions=(1,))
    c = ckpt(tmp_path, 1)
    manifest = json.loads((c / checkpoints.MANIFEST).read_text())
    assert set(manifest["files"]) == files_under(c) - {checkpoints.MANIFEST}
    assert {WEIGHTS, "learner_state.json", "pending_records.log"} <= set(manifest["files"])
    written = (c / checkpoints.MANIFEST).stat().st_mtime_ns
    assert all((c / rel).stat().st_mtime_ns <= written for rel in manifest["files"])
    checkpoints.verify(c)  # intact: no exception
    # the save left nothing half-written, and `last` points at the committed folder
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["000001", "last"] and (tmp_path / "checkpoints" / "last").resolve() == c.resolve()


@pytest.mark.parametrize(
    "damage, reason, says",
    [
        (lambda c: flip_tensor_byte(c / WEIGHTS), "hash_mismatch", f"{WEIGHTS} sha256 mismatch"),
        (lambda c: flip_header_byte(c / WEIGHTS), "hash_mismatch", f"{WEIGHTS} sha256 mismatch"),
        (lambda c: (c / WEIGHTS).write_bytes((c / WEIGHTS).read_bytes()[:-4]), "hash_mismatch", "bytes"),
        (lambda c: (c / checkpoints.MANIFEST).unlink(), "missing_manifest", "no manifest.json"),
        (
            lambda c: (c / checkpoints.MANIFEST).write_text('{"format": 1, "files": {"a": '),
            "bad_manifest",
            "unreadable",
        ),
        (
            lambda c: (c / checkpoints.MANIFEST).write_text(
                '{"format": 1, "files": {"../x": {"sha256": "0", "size": 0}}}'
            ),
            "bad_manifest",
            "leaves the checkpoint",
        ),
        (lambda c: (c / "learner_state.json").unlink(), "missing_file", "learner_state.json is missing"),
        (lambda c: (c / "algorithm" / "extra.bin").write_bytes(b"x"), "unexpected_file", "algorithm/extra.bin"),
    ],
)
def test_verify_refuses_damage(tmp_path, damage, reason, says):
    build_checkpoints(tmp_path, versions=(1,))
    c = ckpt(tmp_path, 1)
    damage(c)
    with pytest.raises(CheckpointRefusedError) as ei:
        checkpoints.verify(c)
    assert ei.value.reason == reason and says in ei.value.message, (ei.value.reason, ei.value.message)


def test_refuse_reasons_are_exported_and_list_every_reason_used(tmp_path):
    make_trainer(tmp_path)  # exports the labels at 0
    for reason in metrics.CHECKPOINT_REFUSE_REASONS:
        assert REGISTRY.get_sample_value("pirl_learner_checkpoints_refused_total", {"reason": reason}) is not None
    source = Path(checkpoints.__file__).read_text()
    used = set(re.findall(r'CheckpointRefusedError\(\s*"(\w+)"', source))
    assert used and used <= set(metrics.CHECKPOINT_REFUSE_REASONS), used - set(metrics.CHECKPOINT_REFUSE_REASONS)


def test_fallback_republishes_older_weights_under_a_new_version_and_replays_the_wal(tmp_path, caplog):
    trained = build_checkpoints(tmp_path)
    flip_tensor_byte(ckpt(tmp_path, 3) / WEIGHTS)
    # a header that does not parse, under a manifest that matches it: only loading can tell
    flip_header_byte(ckpt(tmp_path, 2) / WEIGHTS)
    checkpoints.write_manifest(ckpt(tmp_path, 2))
    checkpoints.verify(ckpt(tmp_path, 2))
    before = {r: refused(r) for r in ("hash_mismatch", "load_error")}

    t = make_trainer(tmp_path)
    with caplog.at_level("INFO"):
        assert t.resume()
    lines = [r.getMessage() for r in caplog.records if "refused:" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0] == f"checkpoint 000003 refused: {WEIGHTS} sha256 mismatch; trying the previous one"
    assert lines[1].startswith("checkpoint 000002 refused: it does not load (") and "previous one" in lines[1]
    assert refused("hash_mismatch") == before["hash_mismatch"] + 1
    assert refused("load_error") == before["load_error"] + 1
    assert t.version == 1
    # every record accepted after checkpoint 1 is back (edges deleted them once acked): the WAL
    # segments of checkpoints 1 and 2 were kept because checkpoint 1 was still kept
    assert t.store.next_sequence(ROBOT) == 3 and t.store.state()["counts"]["accepted"] == 3
    # the refused checkpoints are set aside, so that pruning does not delete the intact ones first
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["000001", "000002.refused", "000003.refused", "last"]

    with caplog.at_level("INFO"):
        t.start()
    try:
        assert "the weights of checkpoint 000001 are republished as version 4" in caplog.text
        upd = t.publisher.latest()
        assert upd.version == 4 == t.version == t.store.version
        state = load_safetensors(upd.weights)
        assert state.keys() == trained[1].keys() and all(torch.equal(state[k], trained[1][k]) for k in state)
        assert checkpoints.read_high_water(tmp_path) == 4
    finally:
        t.stop()
        t.store.wal.close()
    checkpoints.verify(ckpt(tmp_path, 4))

    # a second restart is consistent: checkpoint 4 is intact and is what robots got as version 4
    t2 = make_trainer(tmp_path)
    assert t2.resume() and t2.version == 4 and t2._settle_version() is False
    assert all(torch.equal(t2.algo.policy.rl_state_dict()[k], trained[1][k]) for k in trained[1])
    assert t2.store.next_sequence(ROBOT) == 3
    t2.store.wal.close()


def test_every_checkpoint_corrupt_is_a_clear_error(tmp_path):
    build_checkpoints(tmp_path, versions=(1, 2))
    flip_tensor_byte(ckpt(tmp_path, 2) / WEIGHTS)
    (ckpt(tmp_path, 1) / checkpoints.MANIFEST).unlink()
    with pytest.raises(NoIntactCheckpointError) as ei:
        make_trainer(tmp_path).resume()
    assert isinstance(ei.value, ValueError)  # run_cli prints it as one `error:` line, exit 2
    msg = str(ei.value)
    assert "none of the 2 checkpoint(s)" in msg and "000002: hash_mismatch" in msg and "000001: missing_manifest" in msg
    # nothing is set aside when nothing could be restored: the operator decides
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"000001", "000002", "last"}


def test_interrupted_save_leaves_no_checkpoint_and_its_leftovers_are_removed(tmp_path):
    build_checkpoints(tmp_path, versions=(1,))
    root = tmp_path / "checkpoints"
    # what a crash between save_checkpoint and the manifest / rename leaves
    (root / "000002.partial" / "pretrained_model").mkdir(parents=True)
    (root / "000002.partial.tmp").mkdir()
    (root / "last.tmp").symlink_to("000002.partial")
    t = make_trainer(tmp_path)
    assert t.resume() and t.version == 1
    assert sorted(p.name for p in root.iterdir()) == ["000001", "last"]
    t.store.wal.close()


def test_saving_a_version_again_replaces_it_whole(tmp_path):
    t = make_trainer(tmp_path)
    t.version = 5
    t.save()
    perturb(t.algo.policy, 1)
    t.save()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["000005", "last"]
    checkpoints.verify(root / "000005")
    saved = load_file(str(root / "000005" / WEIGHTS))
    live = t.algo.policy.rl_state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in live)
    t.store.wal.close()


def test_wal_is_kept_from_the_oldest_kept_checkpoint(tmp_path):
    build_checkpoints(tmp_path, versions=(1, 2, 3, 4))  # keep_checkpoints=3: 000001 is pruned
    assert [p.name for p in checkpoints.numbered(tmp_path / "checkpoints")] == ["000004", "000003", "000002"]
    assert RecordLog(tmp_path / "wal").segments() == [2, 3, 4]


def test_high_water_is_not_lowered_by_a_lost_file(tmp_path):
    build_checkpoints(tmp_path, versions=(1, 2))
    assert checkpoints.read_high_water(tmp_path) == 2
    (tmp_path / checkpoints.HIGH_WATER).write_text("{not json")
    assert checkpoints.read_high_water(tmp_path) == 2  # the checkpoints on disk stand in for it
    (tmp_path / checkpoints.HIGH_WATER).unlink()
    assert checkpoints.read_high_water(tmp_path) == 2
    assert checkpoints.read_high_water(tmp_path / "fresh") is None


# ---------------------------------------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("certs"), [ROBOT])


class Learner:
    """``pirl-learner --resume`` on ``out``; SIGTERM, then kill, when the test ends."""

    def __init__(self, out: Path, pki: dict):
        self.out, self.pki = out, pki
        self.log = out.parent / "learner.log"
        self.port_file = out.parent / "port"
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        return [
            str(BIN / "pirl-learner"),
            "--resume=true",
            "--output_dir",
            str(self.out),
            "--server.address",
            "127.0.0.1:0",
            "--server.port_file",
            str(self.port_file),
            "--tokens",
            str(self.pki["tokens"]),
            "--server.tls_cert",
            str(self.pki["server_cert"]),
            "--server.tls_key",
            str(self.pki["server_key"]),
            "--metrics.port",
            str(self.metrics_port),
            "--trainer.eval_every",
            "0",
        ]

    @staticmethod
    def env() -> dict:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def start(self) -> int:
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            if self.port_file.is_file():
                return int(self.port_file.read_text())
            time.sleep(0.2)
        raise AssertionError("pirl-learner did not start:\n" + self.log.read_text()[-3000:])

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def learner(tmp_path, pki):
    lrn = Learner(tmp_path / "learner", pki)
    try:
        yield lrn
    finally:
        if lrn.proc is not None and lrn.proc.poll() is None:
            lrn.proc.kill()
            lrn.proc.wait()


def subscribe(port: int, pki: dict) -> pirl_pb2.PolicyUpdate:
    """The first update a robot subscribing from scratch receives (raw bytes over TLS, like edge/link.py)."""
    token = json.loads(Path(pki["tokens"]).read_text())[ROBOT]
    options = [("grpc.max_receive_message_length", 256 << 20)]  # the update carries the ONNX export too
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(pki["ca_cert"]), options=options) as channel:
        stub = channel.unary_stream(
            "/pirl.v1.Learner/SubscribePolicy", request_serializer=lambda x: x, response_deserializer=lambda x: x
        )
        call = stub(
            pirl_pb2.SubscribeRequest(robot_id=ROBOT, have_version=-1).SerializeToString(),
            metadata=auth_metadata(token),
            timeout=30,
        )
        try:
            return pirl_pb2.PolicyUpdate.FromString(next(call))
        finally:
            call.cancel()


@pytest.mark.slow  # pirl-learner as a process
def test_learner_process_refuses_damaged_checkpoints_and_republishes_under_a_new_version(learner, pki):
    out = learner.out
    build_checkpoints(out)  # versions 1, 2, 3, each published: robots may hold version 3
    published_before = checkpoints.read_high_water(out)
    assert published_before == 3
    flip_tensor_byte(ckpt(out, 3) / WEIGHTS)
    flip_header_byte(ckpt(out, 2) / WEIGHTS)
    intact = load_file(str(ckpt(out, 1) / WEIGHTS))

    port = learner.start()
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{learner.metrics_port}/metrics", timeout=10).read().decode()
    upd = subscribe(port, pki)
    assert learner.stop() == 0
    log = learner.log.read_text()

    refusals = [line for line in log.splitlines() if "refused:" in line]
    assert len(refusals) == 2, log
    assert "checkpoint 000003 refused: " in refusals[0] and "checkpoint 000002 refused: " in refusals[1]
    assert all(f"{WEIGHTS} sha256 mismatch; trying the previous one" in line for line in refusals)
    counts = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^pirl_learner_checkpoints_refused_total\{reason="(\w+)"\} (\S+)$', scraped, re.M)
    }
    assert set(counts) == set(metrics.CHECKPOINT_REFUSE_REASONS)  # every reason exported, at 0 if unused
    assert sum(counts.values()) == 2 and counts["hash_mismatch"] == 2
    assert "the weights of checkpoint 000001 are republished as version 4" in log and "Traceback" not in log

    assert upd.version > published_before and upd.manifest.policy_version == upd.version
    # a version bigger than one chunk is announced without its bytes (fetched in chunks from the learner's
    # version store, learner.versions): read them where the learner serves them from, checked the same way
    weights = upd.weights or (out / "artifacts" / f"v{upd.version:06d}" / "model.safetensors").read_bytes()
    listed = {a.name: a.sha256 for a in upd.manifest.artifacts}
    assert listed["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    state = load_safetensors(weights)
    assert state and all(torch.equal(state[k], intact[k]) for k in state)
    assert checkpoints.read_high_water(out) == upd.version
    checkpoints.verify(ckpt(out, upd.version))  # a restart finds these weights under this number


@pytest.mark.slow  # pirl-learner as a process
def test_learner_process_with_every_checkpoint_corrupt_exits_with_one_error_line(tmp_path, pki):
    out = tmp_path / "learner"
    build_checkpoints(out, versions=(1, 2))
    flip_tensor_byte(ckpt(out, 2) / WEIGHTS)
    # the oldest one hashes correctly but its header does not parse: refused when loading the policy
    flip_header_byte(ckpt(out, 1) / WEIGHTS)
    checkpoints.write_manifest(ckpt(out, 1))
    lrn = Learner(out, pki)
    res = subprocess.run(lrn.args(), capture_output=True, text=True, timeout=180, env=lrn.env())
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of the 2 checkpoint(s)" in errors[0], res.stderr[-3000:]
    assert "000002: hash_mismatch" in errors[0] and "000001: load_error" in errors[0]
    assert "Traceback" not in res.stderr
    assert len([line for line in res.stderr.splitlines() if "refused:" in line]) == 2
