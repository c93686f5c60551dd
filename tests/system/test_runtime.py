"""Edge and learner as real processes over real gRPC + TLS on loopback: policy versions flow,
every record is accepted exactly once, and crashes (kill -9) of the learner or an edge lose nothing."""

import json
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from edge.records import Outcome, make_record
from helpers.cluster import BIN, HOGS, ROBOTS, Cluster, assert_every_record_accepted_once
from helpers.net import free_port
from helpers.policy import builtin_policy, sampled_decision
from pirl.refusals import judged_record
from pirl.security import auth_metadata, channel_credentials
from pirl.v1 import pirl_pb2

pytestmark = pytest.mark.slow  # learner and edges as real processes


def test_two_edges_one_learner_several_versions(cluster):
    c = cluster
    ports = free_port(), free_port()
    c.learner("--trainer.max_updates", "3", "--metrics.port", str(ports[0]))
    c.edge("robot-0", "paced", "--control.hz", "50", "--metrics.port", str(ports[1]), "--policy.backend", "onnxruntime")
    c.edge("robot-1", "unpaced")
    c.wait_version(3)
    time.sleep(1.0)
    learner_metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=10).read().decode()
    edge_metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/metrics", timeout=10).read().decode()
    for name in (
        "pirl_learner_policy_version 3.0",
        'pirl_learner_rollouts_accepted_total{robot_id="robot-0"}',
        "pirl_learner_update_duration_seconds_bucket",
        "pirl_learner_approx_kl",
        "pirl_learner_clip_fraction",
        "pirl_learner_explained_variance",
        "pirl_learner_connected_robots",
    ):
        assert name in learner_metrics, name
    for name in (
        'pirl_edge_ticks_total{robot_id="robot-0"}',
        "pirl_edge_tick_deadline_misses_total",
        "pirl_edge_inference_latency_seconds_bucket",
        "pirl_edge_policy_version",
        "pirl_edge_seconds_since_last_sync",
        "pirl_edge_spool_records",
        "pirl_edge_spool_oldest_record_age_seconds",
        'pirl_edge_backend_info{backend="onnxruntime",robot_id="robot-0"} 1.0',
        "pirl_edge_control_rate_hz",
    ):
        assert name in edge_metrics, name
    for robot in ROBOTS:
        assert c.stop(robot) == 0
    c.stop("learner")
    status = c.status()
    assert status["version"] == 3
    assert_every_record_accepted_once(c, status)
    assert status["counts"].get("duplicate", 0) == 0
    paced = c.edge_stats("robot-0")
    assert paced["policy_version"] >= 1 and paced["ticks"] > 0 and paced["backend"] == "onnxruntime"
    assert c.edge_stats("robot-1")["policy_swaps"] >= 1


def test_learner_kill9_resume_and_edge_kill9_lose_nothing(cluster):
    c = cluster
    # delivery is under test here, not freshness: accept any version lag so no record goes stale
    lag = ("--intake.max_version_lag", "1000")
    c.learner(*lag, "--trainer.max_updates", "2")
    c.edge("robot-0", "paced", "--control.hz", "50")
    c.edge("robot-1", "unpaced")
    before = c.wait_version(2)
    time.sleep(1.0)  # records keep flowing into the learner's store (no more updates)
    c.stop("learner", signal.SIGKILL)  # crash mid-run
    time.sleep(3.0)  # edges keep controlling and spooling while the learner is down
    c.learner(*lag, "--resume=true", "--trainer.max_updates", "4")
    after = c.wait_version(4)
    assert before["version"] == 2 and after["version"] == 4  # the version counter continued
    # an edge crashes mid-upload and comes back on the same spool
    c.stop("robot-1", signal.SIGKILL)
    c.edge("robot-1", "unpaced")
    c.wait_control_started("robot-1", times=2)  # the restarted edge is up (a SIGTERM during its start-up kills it)
    time.sleep(3.0)
    for robot in ROBOTS:
        assert c.stop(robot) == 0
    c.stop("learner")
    status = c.status()
    assert_every_record_accepted_once(c, status)
    paced = c.edge_stats("robot-0")
    # robot-0 kept its control loop running through the learner outage
    assert paced["ticks"] >= 0.5 * paced["control_seconds"] * 50
    assert "resumed from" in (c.dir / "learner.log").read_text()


def test_learner_refuses_plaintext_on_a_public_address(runtime_setup):
    root, ckpt, pki = runtime_setup
    res = subprocess.run(
        [
            str(BIN / "pirl-learner"),
            "--policy_path",
            str(ckpt),
            "--tokens",
            str(pki["tokens"]),
            "--server.address",
            "0.0.0.0:0",
            "--output_dir",
            str(root / "refuse"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and "server.insecure" in res.stderr and "Traceback" not in res.stderr


def test_edge_refuses_unknown_robot_cleanly(runtime_setup):
    root, ckpt, pki = runtime_setup
    res = subprocess.run(
        [
            str(BIN / "pirl-edge"),
            "--link.learner",
            "127.0.0.1:1",
            "--link.robot_id",
            "robot-9",
            "--link.tokens",
            str(pki["tokens"]),
            "--policy.path",
            str(ckpt),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "robot-9" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("cmd", ["pirl-edge", "pirl-learner", "pirl-certs", "pirl-demo", "pirl-bench", "pirl-sft"])
def test_console_scripts_have_help(cmd):
    res = subprocess.run([str(BIN / cmd), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "usage:" in res.stdout


class Client:
    """Raw pirl.v1 calls over TLS to a cluster's learner, as any robot of the fleet."""

    def __init__(self, c: Cluster):
        self.tokens = json.loads(Path(c.pki["tokens"]).read_text())
        self.channel = grpc.secure_channel(f"127.0.0.1:{c.port}", channel_credentials(c.pki["ca_cert"]))
        self.held = []
        self._closed = threading.Event()

    def call(self, name, kind):
        raw = lambda x: x  # noqa: E731
        return getattr(self.channel, kind)(
            f"/pirl.v1.Learner/{name}", request_serializer=raw, response_deserializer=raw
        )

    def md(self, robot):
        return auth_metadata(self.tokens[robot])

    def register(self, robot) -> pirl_pb2.RegisterResponse:
        req = pirl_pb2.RegisterRequest(robot_id=robot).SerializeToString()
        return pirl_pb2.RegisterResponse.FromString(
            self.call("Register", "unary_unary")(req, metadata=self.md(robot), timeout=10)
        )

    def wait_serving(self, c: Cluster, robot="robot-1", timeout=120.0):
        deadline = time.monotonic() + timeout
        while True:
            assert c.procs["learner"].poll() is None, (c.dir / "learner.log").read_text()[-3000:]
            try:
                return self.register(robot)
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def hold(self, robot, rpc):
        """One long-lived call that sends nothing (a subscription to a version that never comes, or an
        idle rollout stream), kept until close()."""
        if rpc == "SubscribePolicy":
            req = pirl_pb2.SubscribeRequest(robot_id=robot, have_version=1 << 40).SerializeToString()
            call = self.call(rpc, "unary_stream")(req, metadata=self.md(robot))
        else:

            def nothing_until_closed():
                self._closed.wait()
                yield from ()

            call = self.call(rpc, "stream_stream")(nothing_until_closed(), metadata=self.md(robot))
        self.held.append(call)
        return call

    def close(self):
        self._closed.set()
        for call in self.held:
            call.cancel()
        self.channel.close()


def settled(calls, wait=1.5):
    """(still open, ended) after the server had ``wait`` s to refuse what it refuses."""
    time.sleep(wait)
    return [x for x in calls if not x.done()], [x for x in calls if x.done()]


def test_learner_at_its_call_limit_keeps_edge_records(cluster):
    """gRPC refuses calls past the learner's call slots with RESOURCE_EXHAUSTED ("Concurrent RPC limit
    exceeded"): the edge must keep every record through it and upload them once there is room."""
    c = cluster
    c.learner(
        "--server.max_concurrent_calls", "4", "--trainer.episodes_per_update", "100000"
    )  # no updates: nothing goes stale
    client = Client(c)
    try:
        client.wait_serving(c)
        held = [client.hold(h, "SubscribePolicy") for h in HOGS for _ in range(2)]  # 4 of 4 slots
        assert len(settled(held)[0]) == 4
        with pytest.raises(grpc.RpcError) as ei:
            client.register("robot-1")
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and judged_record(ei.value) is None
        c.edge("robot-0", "unpaced", "--control.episodes", "32", "--spool.drain_timeout_s", "120")
        log = c.dir / "robot-0.log"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "at a limit" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.5)
        time.sleep(5.0)  # the edge keeps recording, and retrying, against a full learner
        spooled = len(list((c.dir / "robot-0" / "spool").glob("*.rec")))
        assert spooled > 0 and "at a limit" in log.read_text(), log.read_text()[-3000:]
        for call in held:  # room again
            call.cancel()
        assert c.procs["robot-0"].wait(180) == 0, log.read_text()[-3000:]
    finally:
        client.close()
    c.stop("learner")
    status, stats = c.status(), c.edge_stats("robot-0")
    from edge.spool import Spool

    with Spool(c.dir / "robot-0" / "spool") as spool:
        allocated = spool.next_sequence
    assert stats["records_left_in_spool"] == 0 and stats["records_refused"] == {}, stats
    assert allocated >= spooled
    assert status["acked"]["robot-0"] == {"below": allocated, "above": []}
    assert status["counts"]["accepted"] == allocated and status["counts"].get("duplicate", 0) == 0


def test_one_robot_holding_many_streams_does_not_lock_out_another(cluster):
    c = cluster
    metrics_port = free_port()
    c.learner("--metrics.port", str(metrics_port))  # call slots sized for the fleet's 4 robots
    client = Client(c)
    try:
        client.wait_serving(c)
        calls = [client.hold("hog-0", rpc) for _ in range(50) for rpc in ("StreamRollouts", "SubscribePolicy")]
        open_, ended = settled(calls)
        assert len(open_) == 4 and len(ended) == 96  # the per-robot limit: 2 of each kind
        assert {x.code() for x in ended} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        decision = sampled_decision(builtin_policy(0)[0].eval())
        start = time.monotonic()
        resp = client.register("robot-1")
        rec = make_record(
            "robot-1",
            resp.next_sequence,
            "ep-0",
            0,
            decision,
            Outcome(reward=1.0, terminated=True, success=True, env_steps=4),
        )
        acks = [
            pirl_pb2.RolloutAck.FromString(raw)
            for raw in client.call("StreamRollouts", "stream_stream")(
                iter([rec]), metadata=client.md("robot-1"), timeout=10
            )
        ]
        elapsed = time.monotonic() - start
        assert [a.status for a in acks] == [pirl_pb2.RolloutAck.ACCEPTED]
        assert elapsed < 1.0, elapsed
        time.sleep(0.5)  # robot-1's finished stream leaves the open-streams gauge
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        shown = "\n".join(line for line in text.splitlines() if line.startswith("pirl_learner_streams"))
        for rpc, kind in (("StreamRollouts", 0), ("SubscribePolicy", 1)):
            # in a burst of 100 calls some find every slot taken and gRPC refuses them before the learner
            # sees them; the rest are refused by the per-robot limit, and counted
            by_limit = sum("per-robot limit" in x.details() for x in ended if calls.index(x) % 2 == kind)
            assert by_limit > 0
            assert f'pirl_learner_streams_refused_total{{robot_id="hog-0",rpc="{rpc}"}} {by_limit:.1f}' in text, shown
            assert f'pirl_learner_streams_open{{rpc="{rpc}"}} 2.0' in text, shown
    finally:
        client.close()
    c.stop("learner")
