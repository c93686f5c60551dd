"""Edge and learner as real processes over real gRPC + TLS on loopback: policy versions flow,
every record is accepted exactly once, and crashes (kill -9) of the learner or an edge lose nothing."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from builtin_policy import builtin_policy, sampled_decision, save_checkpoint

from edge.records import Outcome, make_record
from pirl.refusals import judged_record
from pirl.security import auth_metadata, channel_credentials, make_dev_pki
from pirl.v1 import pirl_pb2

BIN = Path(sys.executable).parent
ROBOTS = ["robot-0", "robot-1"]
HOGS = ["hog-0", "hog-1"]  # robots of the fleet (tokens) that only hold calls open


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    ckpt = save_checkpoint(root / "policy", *builtin_policy(0))
    pki = make_dev_pki(root / "certs", ROBOTS + HOGS)
    return root, ckpt, pki


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path, ckpt: Path, pki: dict, name: str):
        self.dir = root / name
        self.dir.mkdir()
        self.ckpt, self.pki = ckpt, pki
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name, cmd):
        log = open(self.dir / f"{name}.log", "a")  # noqa: SIM115  the child writes to it for its lifetime
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def learner(self, *extra):
        self._start(
            "learner",
            [
                str(BIN / "pirl-learner"),
                "--policy-path",
                str(self.ckpt),
                "--output-dir",
                str(self.dir / "learner"),
                "--address",
                f"127.0.0.1:{self.port}",
                "--tokens",
                str(self.pki["tokens"]),
                "--tls-cert",
                str(self.pki["server_cert"]),
                "--tls-key",
                str(self.pki["server_key"]),
                "--episodes-per-update",
                "16",
                "--eval-every",
                "0",
                "--max-version-lag",
                "3",
                *extra,
            ],
        )

    def edge(self, robot, mode, *extra):
        self._start(
            robot,
            [
                str(BIN / "pirl-edge"),
                "--learner",
                f"127.0.0.1:{self.port}",
                "--robot-id",
                robot,
                "--tokens",
                str(self.pki["tokens"]),
                "--tls-ca",
                str(self.pki["ca_cert"]),
                "--policy-path",
                str(self.ckpt),
                "--mode",
                mode,
                "--num-envs",
                "16",
                "--spool-dir",
                str(self.dir / robot / "spool"),
                "--stats-file",
                str(self.dir / robot / "stats.json"),
                "--drain-timeout",
                "60",
                *extra,
            ],
        )

    def status(self) -> dict:
        p = self.dir / "learner" / "status.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def wait_version(self, version: int, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                assert p.poll() is None or name != "learner", (self.dir / "learner.log").read_text()[-3000:]
            st = self.status()
            if st.get("version", -1) >= version:
                return st
            time.sleep(0.3)
        raise AssertionError(
            f"learner did not reach version {version}: {self.status()}\n"
            + (self.dir / "learner.log").read_text()[-3000:]
        )

    def stop(self, name, sig=signal.SIGTERM, timeout=120):
        p = self.procs[name]
        p.send_signal(sig)
        return p.wait(timeout)

    def edge_stats(self, robot) -> dict:
        return json.loads((self.dir / robot / "stats.json").read_text())

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def cluster(setup, request):
    root, ckpt, pki = setup
    c = Cluster(root, ckpt, pki, request.node.name)
    yield c
    c.close()


def assert_every_record_accepted_once(c: Cluster, status: dict):
    total = 0
    for robot in ROBOTS:
        stats = c.edge_stats(robot)
        assert stats["records_left_in_spool"] == 0, stats
        assert stats["records_refused"] == {}, stats
        from edge.spool import Spool

        with Spool(c.dir / robot / "spool") as spool:
            allocated = spool.next_sequence
        # A record whose spool write was cut by a kill -9 never existed durably: its temporary file
        # is removed when the edge restarts (logged) and its sequence number is never reused; the
        # edge tells the learner so and the learner closes that gap. Every other sequence 0..N-1
        # the edge allocated must have been accepted, exactly once.
        torn = {
            int(m)
            for m in re.findall(r"removing leftover temporary file (\d+)\.rec", (c.dir / f"{robot}.log").read_text())
        }
        assert status["acked"][robot] == {"below": allocated, "above": []}, (robot, status["acked"][robot], allocated)
        total += allocated - len(torn)
    assert status["counts"]["accepted"] == total
    assert not any(k.startswith("rejected_") for k in status["counts"]), status["counts"]


def test_two_edges_one_learner_several_versions(cluster):
    c = cluster
    ports = free_port(), free_port()
    c.learner("--max-updates", "3", "--metrics-port", str(ports[0]))
    c.edge("robot-0", "paced", "--control-hz", "50", "--metrics-port", str(ports[1]), "--backend", "onnxruntime")
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
    lag = ("--max-version-lag", "1000")
    c.learner(*lag, "--max-updates", "2")
    c.edge("robot-0", "paced", "--control-hz", "50")
    c.edge("robot-1", "unpaced")
    before = c.wait_version(2)
    time.sleep(1.0)  # records keep flowing into the learner's store (no more updates)
    c.stop("learner", signal.SIGKILL)  # crash mid-run
    time.sleep(3.0)  # edges keep controlling and spooling while the learner is down
    c.learner(*lag, "--resume", "--max-updates", "4")
    after = c.wait_version(4)
    assert before["version"] == 2 and after["version"] == 4  # the version counter continued
    # an edge crashes mid-upload and comes back on the same spool
    c.stop("robot-1", signal.SIGKILL)
    c.edge("robot-1", "unpaced")
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


def test_learner_refuses_plaintext_on_a_public_address(setup):
    root, ckpt, pki = setup
    res = subprocess.run(
        [
            str(BIN / "pirl-learner"),
            "--policy-path",
            str(ckpt),
            "--tokens",
            str(pki["tokens"]),
            "--address",
            "0.0.0.0:0",
            "--output-dir",
            str(root / "refuse"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and "--insecure" in res.stderr and "Traceback" not in res.stderr


def test_edge_refuses_unknown_robot_cleanly(setup):
    root, ckpt, pki = setup
    res = subprocess.run(
        [
            str(BIN / "pirl-edge"),
            "--learner",
            "127.0.0.1:1",
            "--robot-id",
            "robot-9",
            "--tokens",
            str(pki["tokens"]),
            "--policy-path",
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
    c.learner("--max-concurrent-calls", "4", "--episodes-per-update", "100000")  # no updates: nothing goes stale
    client = Client(c)
    try:
        client.wait_serving(c)
        held = [client.hold(h, "SubscribePolicy") for h in HOGS for _ in range(2)]  # 4 of 4 slots
        assert len(settled(held)[0]) == 4
        with pytest.raises(grpc.RpcError) as ei:
            client.register("robot-1")
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and judged_record(ei.value) is None
        c.edge("robot-0", "unpaced", "--episodes", "32", "--drain-timeout", "120")
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
    c.learner("--metrics-port", str(metrics_port))  # call slots sized for the fleet's 4 robots
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
