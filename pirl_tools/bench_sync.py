"""pirl-bench sync: a policy version synced from a learner to an edge, both real processes, over loopback TLS.

    pirl-bench sync --out=DIR [--backbone=smolvla --size=full --smolvlm-config=offline] [--chunk_bytes=2097152]
                    [--kill_at_fraction=0.5]

The learner process runs the learner's own service code (learner.service: SubscribePolicy, FetchArtifact)
on its versioned store (learner.versions); the edge process runs the edge's own Subscriber (edge.link,
edge.weight_sync) feeding a real InferenceWorker. Both build the same randomly initialised policy (the
same seed: the same frozen weights); the learner publishes versions whose trained tensors moved.

1. Version 1 is synced undisturbed: ``seconds`` (subscribe -> downloaded, verified, loaded into the spare,
   ready to swap), ``bytes`` (what travelled), ``max_message_bytes`` (the largest serialized message the
   edge received: the announcement or a chunk).
2. Version 2: when ``kill_at_fraction`` of it has been sent, the learner is killed (SIGKILL) and started
   again with ``--resume`` (it rebuilds the policy and finds version 2 on disk: the same files). The edge
   resumes from the chunks it had staged and verified; ``learner_restarts``, ``resumed_from_bytes`` and
   ``seconds_with_restart`` are recorded, and the weights the edge then holds must hash to the learner's.

Peak RSS of each process is its kernel high-water mark (VmHWM); the learner's is the larger of its two
runs. The edge's also holds the worker's two policy copies (active and spare), built before the sync:
``rss_mb_edge_before_sync`` is that baseline. Writes DIR/sync.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path

from pirl.cli import require, write_json

ROBOT = "robot-0"
VERSIONS_DIR = "artifacts"


@dataclass
class BenchSyncConfig:
    """pirl-bench sync: a learner and an edge process sync policy versions over loopback TLS (one clean, one
    with the learner killed mid-transfer and restarted with --resume); writes OUT/sync.json."""

    # output directory (required)
    out: str | None = None
    # the policy: mlp (the built-in task's default pi_rl policy, fast) or a VLA (pi0, pi05, smolvla), randomly
    # initialised as pirl-bench infer builds it
    backbone: str = "mlp"
    # VLA size: full (the released architecture) or reduced (the tests' CPU size); default: full with CUDA
    size: str | None = None
    # full-size SmolVLA: SmolVLM2-500M's architecture from the hub or from the offline copy (offline: no network)
    smolvlm_config: str = "hub"
    # VLA cameras (default 3 at full size, 1 reduced)
    cameras: int | None = None
    # VLA K (default 10 at full size, 4 reduced)
    num_denoise_steps: int | None = None
    # policy init seed (both processes: the same frozen weights)
    seed: int = 0
    # the learner's chunk size (--sync.chunk_bytes): no message of the sync is larger than this plus framing
    chunk_bytes: int = 2 << 20
    # share of version 2 sent before the learner is killed (0: no kill)
    kill_at_fraction: float = 0.5
    # give up (an error) after this many seconds
    timeout_s: float = 1800.0

    def __post_init__(self):
        from learner.versions import check_chunk_bytes
        from pirl_tools.common import check_policy_choice

        if not self.out:
            raise ValueError("out: required (the output directory)")
        check_policy_choice(self.backbone, self.size, self.smolvlm_config)
        check_chunk_bytes(self.chunk_bytes, "chunk_bytes")
        if not 0 <= self.kill_at_fraction < 1:
            raise ValueError(f"kill_at_fraction: must be in [0, 1) (got {self.kill_at_fraction})")
        require(self, at_least={"timeout_s": 1})


# ------------------------------------------------------------------------------------------- both sides


def _policy(spec: dict, version: int):
    """The bench's policy at ``version``: built from the seed, its trained tensors moved once per version."""
    from pirl_tools.bench import _infer_policy

    args = types.SimpleNamespace(**{**spec["policy"], "policy_path": None})
    policy, description = _infer_policy(args)
    policy.eval()
    for v in range(1, version + 1):
        _move(policy, spec, v)
    return policy, description


def _move(policy, spec: dict, version: int) -> None:
    """What an update does to the weights, for the bench: every trained tensor moves (a seeded step)."""
    import torch

    trained = set(policy.rl_state_names())
    g = torch.Generator().manual_seed(spec["policy"]["seed"] + 1000 * version)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name in trained:
                p.add_((1e-3 * torch.randn(p.shape, generator=g)).to(p.dtype))


def _hwm_mb(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) of a process in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _write(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def _wait_file(path: Path, timeout: float, alive=None) -> dict:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f}s")
        time.sleep(0.05)
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- the learner


def _learner(spec: dict, resume: bool) -> None:
    """pirl-learner's publishing half: its service (TLS, tokens) on its versioned store; publishes version 1,
    then version 2 when told to (the ``go`` file). The first run stops sending version 2 once
    ``stall_after_bytes`` of it went out (and says so), so that the bench kills it mid-transfer."""
    from learner.service import LearnerService, Publisher, build_server
    from learner.store import PolicyShapes, RolloutStore
    from pirl.security import TokenAuthenticator, server_credentials

    work = Path(spec["dir"])
    publisher = Publisher(chunk_bytes=spec["chunk_bytes"])
    versions = publisher.version_store(work / "learner" / VERSIONS_DIR, keep=3)
    target = 2 if resume else 1
    policy, _ = _policy(spec, target)
    stall = {"after": 0 if resume else None, "sent": 0}

    class StallingService(LearnerService):
        def fetch_artifact(self, data, context):
            for raw in super().fetch_artifact(data, context):
                yield raw
                if stall["after"]:
                    stall["sent"] += len(raw)
                    if stall["sent"] >= stall["after"]:
                        _write(work / "stalled.json", {"sent": stall["sent"], "unix_s": time.time()})
                        threading.Event().wait()  # mid-transfer until the bench kills this process

    tokens = json.loads(Path(spec["pki"]["tokens"]).read_text())
    store = RolloutStore(PolicyShapes.from_policy(policy), max_version_lag=1, max_record_bytes=1 << 20)
    service = StallingService(store, publisher, TokenAuthenticator(tokens), max_record_bytes=1 << 20)
    creds = server_credentials(spec["pki"]["server_cert"], spec["pki"]["server_key"])
    server, _, _ = build_server(service, f"127.0.0.1:{spec['port']}", credentials=creds, max_message_bytes=1 << 20)
    publisher.publish(versions.publish(policy, target))
    server.start()
    _write(work / f"learner_ready_{'resume' if resume else 'first'}.json", {"unix_s": time.time()})
    if not resume:
        while not (work / "go").is_file():
            time.sleep(0.05)
        _move(policy, spec, 2)  # the same weights as a fresh build moved for versions 1 and 2
        announce = versions.publish(policy, 2)
        size = sum(a.size_bytes for a in announce.manifest.artifacts)
        stall["after"] = int(spec["kill_at_fraction"] * size)
        _write(work / "published_v2.json", {"unix_s": announce.published_unix_s, "bytes": size})
        publisher.publish(announce)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    service.stop()
    server.stop(grace=None)


# ------------------------------------------------------------------------------------------- the edge


def _edge(spec: dict) -> None:
    """pirl-edge's sync half: its Subscriber (staging, hashes, resume) feeding a real InferenceWorker."""
    import torch
    from safetensors import safe_open

    from edge.inference import InferenceWorker
    from edge.link import LearnerAddress, Subscriber, SyncClock

    work = Path(spec["dir"])
    policy, _ = _policy(spec, 0)
    # the torch backend samples with the policy itself: its golden-input check would compare it with itself
    worker = InferenceWorker(policy, None, None, robot_id=ROBOT, backend="torch", golden_check=False)
    del policy
    token = json.loads(Path(spec["pki"]["tokens"]).read_text())[ROBOT]
    link = LearnerAddress(f"127.0.0.1:{spec['port']}", ROBOT, token, ca=spec["pki"]["ca_cert"])
    sub = Subscriber(link, worker, SyncClock(ROBOT), staging_dir=work / "edge" / "policy_versions")
    rss_before = _rss_mb()
    _write(work / "edge_ready.json", {"rss_mb": rss_before})
    started = time.time()  # the learner serves version 1 already: from here it is connect, download, load
    sub.start()
    report = {}
    for version in (1, 2):
        before = dict(sub.staging.stats)
        while sub.offered < version:
            if sub.rejected:
                _write(work / "edge_failed.json", {"rejected": sub.rejected, "version": version})
                return
            time.sleep(0.02)
        done = time.time()
        worker.swap_if_pending()
        stats = dict(sub.staging.stats)
        report[f"v{version}"] = {
            "offered_unix_s": done,
            # version 1: from the subscriber's start (the version was published before the edge started);
            # version 2: from its publication (the edge was waiting for it)
            "seconds": done - started if version == 1 else dict(sub.received)[version],
            "bytes": stats["bytes_received"] - before["bytes_received"],
            "bad_chunks": stats["bad_chunks"] - before["bad_chunks"],
            "resumed_from_bytes": stats["resumed_from_bytes"],
            "max_message_bytes": stats["max_message_bytes"],
            "peak_rss_mb": _hwm_mb(),
            "serving": worker.version,
        }
        if version == 1:
            _write(work / "edge_v1.json", report["v1"])
    # the weights now serving must equal, tensor for tensor, the file the learner published (read from its
    # store on this machine one tensor at a time: no extra copy of the trained set)
    learner_file = work / "learner" / VERSIONS_DIR / "v000002" / "model.safetensors"
    serving = dict(worker.policy.named_parameters())
    with safe_open(str(learner_file), framework="pt") as f:
        names = sorted(f.keys())
        same = names == sorted(worker.policy.rl_state_names())
        same = same and all(torch.equal(serving[n].detach(), f.get_tensor(n)) for n in names)
    report["served_equals_learner_file"] = bool(same)
    report["staged_versions"] = sorted(p.name for p in (work / "edge" / "policy_versions").iterdir())
    _write(work / "edge_done.json", report)
    sub.stop()


# ------------------------------------------------------------------------------------------- the bench


def run(cfg: BenchSyncConfig, command: str) -> int:
    from learner.versions import ANNOUNCE, version_dir_name
    from pirl.security import make_dev_pki
    from pirl.v1 import pirl_pb2
    from pirl_tools.common import run_report
    from pirl_tools.processes import Procs, Signals, free_port

    out = Path(cfg.out)
    work = out / "work"
    if work.exists():
        import shutil

        shutil.rmtree(work)  # a fresh learner store and edge staging every run
    (work / "logs").mkdir(parents=True)
    pki = make_dev_pki(work / "certs", [ROBOT])
    policy = {
        k: getattr(cfg, k) for k in ("backbone", "size", "smolvlm_config", "cameras", "num_denoise_steps", "seed")
    }
    spec = {
        "dir": str(work),
        "port": free_port(),
        "chunk_bytes": cfg.chunk_bytes,
        "kill_at_fraction": cfg.kill_at_fraction,
        "policy": policy,
        "pki": {k: str(pki[k]) for k in ("ca_cert", "server_cert", "server_key", "tokens")},
    }
    (work / "spec.json").write_text(json.dumps(spec))
    me = [sys.executable, "-m", "pirl_tools.bench_sync", "--spec", str(work / "spec.json")]
    procs = Procs(work / "logs")
    peak = {"learner": 0.0, "edge": 0.0}
    stop_polling = threading.Event()

    def poll():  # the kernel's high-water mark of each child, read until it is gone
        while not stop_polling.wait(0.2):
            for name, p in list(procs.procs.items()):
                role = "learner" if name.startswith("learner") else "edge"
                mb = _hwm_mb(p.pid)
                if mb is not None:
                    peak[role] = max(peak[role], mb)

    poller = threading.Thread(target=poll, daemon=True)
    deadline = time.monotonic() + cfg.timeout_s

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    restarts, killed_at = 0, None
    with Signals("pirl-bench sync"):
        try:
            poller.start()
            procs.start("learner", [*me, "--role", "learner"])
            _wait_file(work / "learner_ready_first.json", left(), lambda: procs.check_alive("learner"))
            procs.start("edge", [*me, "--role", "edge"])
            edge_ready = _wait_file(work / "edge_ready.json", left(), lambda: procs.check_alive("edge"))
            v1 = _wait_file(work / "edge_v1.json", left(), lambda: _edge_ok(procs, work))
            (work / "go").write_text("")
            published = _wait_file(work / "published_v2.json", left(), lambda: procs.check_alive("learner"))
            if cfg.kill_at_fraction > 0:
                stalled = _wait_file(work / "stalled.json", left(), lambda: procs.check_alive("learner"))
                learner = procs.procs["learner"]
                peak["learner"] = max(peak["learner"], _hwm_mb(learner.pid) or 0.0)
                os.kill(learner.pid, signal.SIGKILL)  # mid-transfer, no goodbye
                learner.wait()
                killed_at = stalled["sent"]
                restarts += 1
                procs.start("learner-resume", [*me, "--role", "learner", "--resume"])
                _wait_file(work / "learner_ready_resume.json", left(), lambda: procs.check_alive("learner-resume"))
            done = _wait_file(work / "edge_done.json", left(), lambda: _edge_ok(procs, work))
            time.sleep(0.5)  # one more high-water reading of both
        finally:
            stop_polling.set()
            procs.stop_all((("edge",), ("learner", "learner-resume")))

    store = work / "learner" / VERSIONS_DIR
    ann = {v: pirl_pb2.PolicyUpdate.FromString((store / version_dir_name(v) / ANNOUNCE).read_bytes()) for v in (1, 2)}
    trained = {a.name: a for a in ann[2].manifest.artifacts}["model.safetensors"]
    v2 = done["v2"]
    announce_bytes = max(a.ByteSize() + 9 for a in ann.values())  # + published_unix_s, set when published
    with open(store / version_dir_name(2) / "model.safetensors", "rb") as f:
        one_message = pirl_pb2.PolicyUpdate(version=2, weights=f.read(), manifest=ann[2].manifest, trained_only=True)
    # the path before chunking: one PolicyUpdate with the weights inline (and, with export_onnx, the whole
    # ONNX export with every weight embedded on top)
    one_message_bytes = one_message.ByteSize()
    del one_message
    result = {
        "policy": policy,
        "chunk_bytes": cfg.chunk_bytes,
        "seconds": round(v1["seconds"], 3),
        "bytes": v1["bytes"],
        "max_message_bytes": max(v1["max_message_bytes"], v2["max_message_bytes"], announce_bytes),
        "max_chunk_message_bytes": max(v1["max_message_bytes"], v2["max_message_bytes"]),
        "announce_bytes": announce_bytes,
        "peak_rss_mb_learner": round(peak["learner"], 1),
        "peak_rss_mb_edge": round(max(peak["edge"], v2["peak_rss_mb"] or 0.0), 1),
        "rss_mb_edge_before_sync": round(edge_ready["rss_mb"], 1),
        "trained_bytes": trained.size_bytes,
        "trained_chunks": len(trained.chunk_sha256),
        "throughput_mb_s": round(v1["bytes"] / 2**20 / v1["seconds"], 1),
        "learner_restarts": restarts,
        "killed_after_bytes_sent": killed_at,
        "resumed_from_bytes": v2["resumed_from_bytes"],
        "bytes_with_restart": v2["bytes"],  # all of version 2's bytes that travelled, before and after the kill
        "bytes_resent": v2["bytes"] - trained.size_bytes,
        "seconds_with_restart": round(v2["offered_unix_s"] - published["unix_s"], 3),
        "bad_chunks": v1["bad_chunks"] + v2["bad_chunks"],
        "served_version": v2["serving"],
        # the edge verified the file it loaded against the announced sha256 before loading it; what it
        # serves after the swap equals the learner's published file tensor for tensor
        "hash_match": done["served_equals_learner_file"] and staged_sha256(work, trained) == trained.sha256,
        "edge_staged_versions": done["staged_versions"],
        "learner_kept_versions": sorted(p.name for p in store.iterdir()),
        "one_message_bytes": one_message_bytes,
    }
    report = run_report(command, [result])
    write_json(out / "sync.json", report)
    print(json.dumps(result, indent=2))
    if not result["hash_match"] or result["served_version"] != 2:
        raise ValueError("the edge does not serve version 2 with the learner's weights: see sync.json")
    return 0


def staged_sha256(work: Path, artifact) -> str:
    """sha256 of the edge's staged, verified copy of version 2's ``artifact``."""
    h = hashlib.sha256()
    with open(work / "edge" / "policy_versions" / "v000002" / artifact.name, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


def _edge_ok(procs, work: Path) -> None:
    procs.check_alive("edge")
    failed = work / "edge_failed.json"
    if failed.is_file():
        raise ValueError(f"the edge refused a version: {failed.read_text()} (see {work / 'logs' / 'edge.log'})")


def _child(argv: list[str]) -> None:
    import logging

    parser = argparse.ArgumentParser(description="pirl-bench sync's learner / edge process (internal)")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--role", choices=("learner", "edge"), required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(Path(args.spec).read_text())
    if args.role == "learner":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # taken by sigwait
        _learner(spec, args.resume)
    else:
        _edge(spec)


if __name__ == "__main__":
    _child(sys.argv[1:])
