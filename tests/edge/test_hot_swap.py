"""Hot swap at the edge's control rate, with real objects: the real PacedLoop at the edge's default
50 Hz, the real InferenceWorker on the ONNX Runtime backend, the real Subscriber path (hash checks,
safetensors, ``worker.offer``) fed from another thread with the learner's real policy updates
(weights + ONNX export), a real spool. Twelve versions are offered while the robot runs: ten good
ones, one whose ONNX bytes were corrupted in transit (sha256 mismatch: refused by the subscriber)
and one whose export belongs to other weights but whose hashes are consistent (a learner bug:
refused by the golden-input check). Only the network is left out (the updates are applied as the
subscriber applies a received message).

What it asserts: zero deadline misses; every good version swapped in, each at a decision (= chunk
boundary), in order; both bad versions refused, counted in pirl_edge_swap_failures_total, never
served, and the previous version served the chunks after each refusal; every served chunk is valid
PPO data of the version it is tagged with (the learner's PyTorch re-evaluation of its chain under
that version's weights gives the same log-prob and value). The spool runs without fsync (the
records are written on the worker after each delivery either way; fsync timing on a shared disk is
not what this test is about).
"""

import copy
import sys
import threading
import time

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from edge.control import LoopStats, PacedLoop, RecordWriter
from edge.inference import InferenceWorker
from edge.link import LearnerAddress, Subscriber, SyncClock, lower_thread_priority
from edge.spool import Spool
from helpers.policy import builtin_policy
from learner.trainer import policy_update_message
from lerobot_policy_pi_rl.envs.reach_grasp import ReachGraspVecEnv
from pirl.v1 import pirl_pb2

CONTROL_HZ = 50.0  # pirl-edge's default --control-hz
VERSIONS = range(1, 13)
CORRUPTED, MISMATCHED = 5, 9  # bytes flipped in transit; another version's export with consistent hashes


def metric(name, rid):
    return REGISTRY.get_sample_value(name, {"robot_id": rid}) or 0.0


def _with_artifacts(msg, files: dict[str, bytes]):
    """``msg`` carrying ``files`` instead, its manifest re-hashed to match (what a buggy learner sends)."""
    import hashlib

    blobs = {"model.safetensors": msg.weights, **files}
    manifest = pirl_pb2.Manifest(
        policy_version=msg.version,
        artifacts=[
            pirl_pb2.Artifact(name=n, sha256=hashlib.sha256(d).hexdigest(), size_bytes=len(d)) for n, d in blobs.items()
        ],
    )
    return pirl_pb2.PolicyUpdate(
        version=msg.version,
        weights=msg.weights,
        manifest=manifest,
        files=files,
        published_unix_s=msg.published_unix_s,
        trained_only=msg.trained_only,
        frozen_sha256=msg.frozen_sha256,
    )


@pytest.fixture
def edge_process_settings():
    """What pirl-edge sets for its process (edge/main.py): one torch thread, a 0.5 ms GIL switch interval."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)
    yield
    torch.set_num_threads(threads)
    sys.setswitchinterval(interval)


@pytest.mark.slow  # a real paced loop at 50 Hz for several seconds
def test_zero_missed_ticks_across_swaps_and_bad_artifacts_are_refused(tmp_path, edge_process_settings):
    rid = "hot-swap"
    policy, pre, post = builtin_policy(0)  # the default policy of the built-in task (what pirl-demo runs)
    policy.eval()

    # the learner's side, made beforehand: one update (weights + ONNX export) per version
    learner = copy.deepcopy(policy)
    states, msgs = {0: copy.deepcopy(policy.state_dict())}, {}
    g = torch.Generator().manual_seed(1)
    for v in VERSIONS:
        with torch.no_grad():
            for p in learner.rl_actor_parameters() + learner.rl_critic_parameters():  # what PI-RL trains
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        states[v] = copy.deepcopy(learner.state_dict())
        msgs[v] = policy_update_message(learner, v, tmp_path / "artifacts")
    data = bytearray(msgs[CORRUPTED].files["onnx/model.onnx"])
    data[len(data) // 2] ^= 0x01
    msgs[CORRUPTED].files["onnx/model.onnx"] = bytes(data)
    msgs[MISMATCHED] = _with_artifacts(msgs[MISMATCHED], dict(msgs[MISMATCHED - 1].files))
    good = [v for v in VERSIONS if v not in (CORRUPTED, MISMATCHED)]
    assert len(good) >= 10

    # the robot's side
    worker = InferenceWorker(policy, pre, post, robot_id=rid, backend="onnxruntime")
    assert worker.backend == "onnxruntime"
    stats = LoopStats()
    spool = Spool(tmp_path / "spool", fsync=False)
    loop = PacedLoop(
        ReachGraspVecEnv(1, autoreset=False),
        worker,
        RecordWriter(spool, rid, stats),
        robot_id=rid,
        control_hz=CONTROL_HZ,
    )
    subscriber = Subscriber(LearnerAddress("127.0.0.1:1", rid, "token"), worker, SyncClock(rid))
    delivered: list[tuple[float, object]] = []  # (time, Decision) as the control loop receives them
    deliver = loop._deliver
    loop._deliver = lambda d, *request: (delivered.append((time.perf_counter(), d)), deliver(d, *request))
    failures0, swaps0 = metric("pirl_edge_swap_failures_total", rid), metric("pirl_edge_policy_swaps_total", rid)

    stop = threading.Event()
    refused_windows: dict[int, tuple[float, float]] = {}  # bad version -> (offered, next good offered)
    errors: list[str] = []

    def learner_side():  # what the subscriber thread does when updates arrive
        lower_thread_priority()
        try:
            time.sleep(0.3)
            for v in VERSIONS:
                started = time.perf_counter()
                subscriber._apply(msgs[v])
                if v in good:
                    deadline = time.monotonic() + 10
                    while worker.version != v and time.monotonic() < deadline:
                        time.sleep(0.005)
                    if worker.version != v:
                        errors.append(f"version {v} was not swapped in within 10 s")
                else:
                    refused_windows[v] = (started, 0.0)
                    time.sleep(0.25)  # >= 3 chunk boundaries at 4 actions x 20 ms
                for bad, (t0, t1) in refused_windows.items():
                    if t1 == 0.0 and v != bad:
                        refused_windows[bad] = (t0, started)
                time.sleep(0.05)
            time.sleep(0.3)
        except Exception as e:  # noqa: BLE001  reported by the main thread
            errors.append(repr(e))
        finally:
            stop.set()

    worker.start()
    feeder = threading.Thread(target=learner_side, name="learner-side")
    feeder.start()
    started = time.perf_counter()
    loop.run(stop, duration_s=60)
    run_seconds = time.perf_counter() - started
    feeder.join(10)
    worker.stop()
    spool.close()

    s = stats.summary()
    print(
        f"\nhot swap: {len(worker.swap_times)} swaps, {s['ticks']} ticks in {run_seconds:.1f}s, "
        f"{s['deadline_misses']} deadline misses (late {s['late_ticks']}, starved {s['starved_ticks']}), "
        f"tick interval p50/p99 {s.get('tick_interval_ms_p50', 0):.2f}/{s.get('tick_interval_ms_p99', 0):.2f} ms, "
        f"prepare s {[e.get('prepare_seconds') for e in worker.prepare_log]}"
    )
    assert not errors, errors
    assert s["ticks"] >= 0.9 * CONTROL_HZ * run_seconds
    assert s["deadline_misses"] == 0, s

    # every good version swapped in, in order, at decisions (chunk boundaries); bad ones never served
    assert sorted(worker.swap_times) == good and worker.version == good[-1]
    assert metric("pirl_edge_policy_swaps_total", rid) - swaps0 == len(good)
    versions = [d.version for _, d in delivered]
    assert versions == sorted(versions), "a decision went back to an older version"
    assert set(versions) == {0, *good}

    # both bad versions refused and counted; the previous version kept serving after each refusal
    assert subscriber.rejected == 1 and worker.refused == 1
    assert "golden-input check failed" in [e for e in worker.prepare_log if e["version"] == MISMATCHED][0]["refused"]
    assert metric("pirl_edge_swap_failures_total", rid) - failures0 == 2
    for bad, (t0, t1) in refused_windows.items():
        during = [d.version for t, d in delivered if t0 < t < t1]
        assert len(during) >= 2 and set(during) == {bad - 1}, (bad, during)

    # every chunk is valid PPO data of its version: the learner's re-evaluation reproduces it
    replay = copy.deepcopy(policy)
    for v in (0, *good):
        replay.load_state_dict(states[v])
        batch = [d for _, d in delivered if d.version == v][:8]
        assert batch, v
        obs = {k: torch.from_numpy(np.stack([d.observation[k] for d in batch])) for k in batch[0].observation}
        with torch.no_grad():
            ev = replay.evaluate_chains(
                obs,
                torch.from_numpy(np.stack([d.chain for d in batch])),
                torch.from_numpy(np.stack([d.stochastic for d in batch])),
                noise_level=torch.tensor([d.noise_level for d in batch]),
            )
        torch.testing.assert_close(ev.log_prob, torch.tensor([d.log_prob for d in batch]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ev.value, torch.tensor([d.value for d in batch]), rtol=1e-4, atol=1e-4)


def test_the_preparing_thread_runs_below_the_control_loop_priority():
    import os

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def preparing():
        seen["ok"] = lower_thread_priority()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=preparing)
    t.start()
    t.join()
    assert seen["ok"] and seen["nice"] >= max(main, 10)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main  # only that thread
