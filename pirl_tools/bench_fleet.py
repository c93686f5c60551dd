"""pirl-bench fleet: N simulated robots against ONE learner on this machine, and the same records through
LeRobot's own actor/learner transport side by side.

    pirl-bench fleet --out=DIR [--robots='[8,16,32]'] [--duration=60] [--rate_hz=2] [--image_side=96]

Per robot count, on loopback, everything as real processes:

* the learner: ``pirl-learner`` over TLS with one token per robot, a small pi_rl policy (the MLP backbone with
  one camera, so a record has a camera frame's size) that really trains and publishes versions;
* the robots: ``edge_processes`` processes, each running several simulated robots in threads. A robot is the
  edge's own upload path (``edge.spool.Spool`` with its fsync'ed files, ``edge.link.Uploader``,
  ``edge.link.Subscriber`` downloading and hash-checking every version) fed by a producer thread that writes
  one record (``edge.records.make_record``, fixed size) every ``1/rate_hz`` s: what the control loop would
  spool, without the policy inference (32 torch control loops do not fit 2 cores).

Phase ``paced`` (``duration`` s, then a drain): ack latency (spooled -> acked), publish fan-out (a version's
publish -> the last subscriber holding it verified), learner CPU per 1k records, lost and duplicated records.
Phase ``burst``: every robot's spool is filled with ``burst_records`` records first, then all upload at
once: records/s through our path until the last ack. Phase ``lerobot``: the same record bytes and counts,
one ``SendTransitions`` stream per robot, through LeRobot's ``lerobot.transport`` (its ``LearnerService``
servicer and ``send_bytes_in_chunks`` / ``receive_bytes_in_chunks``) as shipped (plaintext) and over TLS;
``lerobot_transport_ratio`` = our burst records/s / LeRobot's (plaintext). Writes DIR/fleet.json.

Run as ``python -m pirl_tools.bench_fleet ROLE SPEC.json`` it is one of the child processes (roles
``edges``, ``lerobot-server``, ``lerobot-clients``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from pirl.cli import require, write_json

POLICY_SEED = 0
STATE_DIM, ACTION_DIM = 8, 7  # a 7-DoF arm + gripper's state, its actions


@dataclass
class BenchFleetConfig:
    """pirl-bench fleet: N simulated robots (real edge upload code, several per process) against one
    pirl-learner over TLS, beside LeRobot's actor/learner transport with the same records; writes
    OUT/fleet.json. Robot counts are given as --robots='[8,16,32]'."""

    # output directory (required)
    out: str | None = None
    # robot counts to run, one entry of fleet.json each
    robots: list[int] = field(default_factory=lambda: [8, 16, 32])
    # seconds of the paced phase per robot count (records produced at rate_hz per robot)
    duration: float = 60.0
    # records each robot spools per second in the paced phase (a 30 Hz arm acting in chunks of 15: 2)
    rate_hz: float = 2.0
    # steps per simulated episode (its last record ends the episode; the learner trains on whole episodes)
    episode_len: int = 8
    # complete episodes per PPO update (0: the robot count)
    episodes_per_update: int = 0
    # side of the one camera frame (3 x side x side float32) each record carries: 96 -> 110.6 kB of image
    image_side: int = 96
    # records per robot in the burst phase (ours and LeRobot's alike); 0: skip both
    burst_records: int = 150
    # processes the simulated robots are spread over (threads within each); 0: min(robots, 4)
    edge_processes: int = 0
    # seconds the robots get after the paced phase to have every spooled record acked
    drain_timeout: float = 120.0
    # also run LeRobot's transport over TLS (its actor connects in plaintext as shipped)
    lerobot_tls: bool = True

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: required (the output directory)")
        if not self.robots or any(not isinstance(n, int) or n < 1 for n in self.robots):
            raise ValueError(f"robots: a list of robot counts, each >= 1 (got {self.robots})")
        if len(set(self.robots)) != len(self.robots):
            raise ValueError(f"robots: each count once (got {self.robots})")
        require(
            self,
            at_least={"episode_len": 1, "image_side": 8, "episodes_per_update": 0, "burst_records": 0},
        )
        require(self, at_least={"edge_processes": 0})
        for name in ("duration", "rate_hz", "drain_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}: must be > 0 (got {value})")


# --- the policy and the records --------------------------------------------------------------------


def _policy_checkpoint(root: Path, image_side: int) -> Path:
    """A freshly initialised pi_rl policy (MLP backbone: state + one camera), saved like an SFT checkpoint."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors

    from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
    from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy

    torch.manual_seed(POLICY_SEED)
    cfg = PiRLConfig(
        device="cpu",
        push_to_hub=False,
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
            "observation.images.cam0": PolicyFeature(FeatureType.VISUAL, (3, image_side, image_side)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
    )
    policy = PiRLPolicy(cfg)
    stats = {
        "observation.state": {"mean": torch.zeros(STATE_DIM), "std": torch.ones(STATE_DIM)},
        "action": {"mean": torch.zeros(ACTION_DIM), "std": torch.ones(ACTION_DIM)},
    }
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    path = root / "policy"
    for part in (policy, pre, post):
        part.save_pretrained(path)
    return path


def _shapes(image_side: int) -> dict:
    """What a record of that policy carries (PiRLConfig defaults: K=4, chunk 8, model action dim 7)."""
    from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig

    default = {name: f.default for name, f in PiRLConfig.__dataclass_fields__.items()}
    c = type("Defaults", (), default)  # the defaults, without building a config (which logs device warnings)
    return {
        "image": (3, image_side, image_side),
        "chain": (c.num_denoise_steps + 1, c.chunk_size, ACTION_DIM),
        "steps": c.num_denoise_steps,
        "n_action_steps": c.n_action_steps,
    }


class RecordMaker:
    """Records of a fixed size as an edge writes them (edge.records.make_record), with seeded contents."""

    def __init__(self, robot_id: str, image_side: int, episode_len: int, seed: int):
        import numpy as np

        from edge.records import Decision, Outcome

        s = _shapes(image_side)
        rng = np.random.default_rng(seed)
        self.robot_id, self.episode_len = robot_id, episode_len
        self._Decision, self._Outcome = Decision, Outcome
        self.observation = {
            "observation.images.cam0": rng.random(s["image"], dtype=np.float32),
            "observation.state": rng.standard_normal(STATE_DIM).astype(np.float32),
        }
        self.chain = rng.standard_normal(s["chain"]).astype(np.float32)
        self.stochastic = np.ones(s["steps"], bool)
        self.actions = np.zeros((s["n_action_steps"], ACTION_DIM), np.float32)
        self.n_action_steps = s["n_action_steps"]
        self.bytes_made = 0  # payload bytes spooled by spool()

    def make(self, seq: int, episode: str, step: int, version: int, *, ends: bool) -> bytes:
        from edge.records import make_record

        d = self._Decision(
            version=version,
            observation=self.observation,
            chain=self.chain,
            stochastic=self.stochastic,
            noise_level=0.5,
            log_prob=-1.0,
            value=0.0,
            actions=self.actions,
        )
        o = self._Outcome(reward=1.0 if ends else 0.0, terminated=ends, success=ends, env_steps=self.n_action_steps)
        return make_record(self.robot_id, seq, episode, step, d, o)

    def spool(self, spool, episode: str, step: int, version: int, *, ends: bool) -> int:
        """Append one record to ``spool`` under the sequence number it allocates; returns that number."""

        def payload(seq: int) -> bytes:
            data = self.make(seq, episode, step, version, ends=ends)
            self.bytes_made += len(data)
            return data

        return spool.allocate_and_append(payload)


# --- child: simulated robots (our edge code) ----------------------------------------------------


def _edges_main(spec: dict) -> None:
    """Several simulated robots in threads: producers into real spools, real uploaders and subscribers."""
    import logging

    from edge.link import LearnerAddress, Subscriber, SyncClock, Uploader
    from edge.spool import Spool

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokens = json.loads(Path(spec["tokens"]).read_text())
    phase = spec["phase"]
    robots = {}

    class TimedSpool(Spool):
        """The edge's spool, noting when each record was spooled and first acked (monotonic)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.spooled_at: dict[int, float] = {}
            self.acked_at: dict[int, float] = {}
            self.acked_wall: float = 0.0

        def ack(self, seq: int) -> bool:
            now = time.monotonic()
            ok = super().ack(seq)
            if seq in self.spooled_at and seq not in self.acked_at:
                self.acked_at[seq] = now
                self.acked_wall = time.time()
            return ok

    class Sink:
        """The inference worker's side of a version hand-over: takes every verified version."""

        def __init__(self):
            self.version = 0
            self.got: list[tuple[int, float]] = []  # (version, wall time it was offered)

        def offer(self, version, state, files, frozen_sha256=None) -> bool:
            self.version = max(self.version, version)
            self.got.append((version, time.time()))
            return True

    for rid in spec["robots"]:
        link = LearnerAddress(spec["address"], rid, tokens[rid], ca=spec["ca"])
        spool = TimedSpool(Path(spec["spool_root"]) / rid)
        clock = SyncClock(rid)
        r = {"link": link, "spool": spool, "clock": clock, "uploader": Uploader(link, spool, clock)}
        r["maker"] = RecordMaker(rid, spec["image_side"], spec["episode_len"], seed=zlib.crc32(rid.encode()))
        if phase == "paced":
            r["sink"] = Sink()
            r["subscriber"] = Subscriber(
                link, r["sink"], clock, staging_dir=Path(spec["spool_root"]) / f"{rid}.versions"
            )
        robots[rid] = r

    def wait_until(wall: float) -> None:
        while time.time() < wall:
            time.sleep(min(0.05, max(0.0, wall - time.time())))

    if phase == "burst":
        for rid, r in robots.items():
            for step in range(spec["records"]):
                seq = r["maker"].spool(r["spool"], f"{rid}-burst", step, spec["version"], ends=False)
                r["spool"].spooled_at[seq] = 0.0
        Path(spec["ready"]).write_text("ready")
        go = _wait_for_json(Path(spec["go"]))["at"]
        wait_until(go)
        cpu0 = time.process_time()  # this process's CPU (all its threads) from here to the last ack
        for r in robots.values():
            r["uploader"].start()
        deadline = time.monotonic() + spec["timeout"]
        while time.monotonic() < deadline and any(len(r["spool"]) for r in robots.values()):
            time.sleep(0.01)
        cpu = time.process_time() - cpu0
    else:
        for r in robots.values():
            r["uploader"].start()
            r["subscriber"].start()
        Path(spec["ready"]).write_text("ready")
        start = _wait_for_json(Path(spec["go"]))["at"]
        wait_until(start)
        cpu0 = time.process_time()
        stop = threading.Event()

        def produce(rid: str, r: dict, offset: float) -> None:
            period = 1.0 / spec["rate_hz"]
            t_next, n = time.monotonic() + offset, 0
            while not stop.is_set():
                delay = t_next - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
                episode, step = divmod(n, spec["episode_len"])
                version = r["sink"].version  # the version the robot runs (what the edge labels records with)
                ends = step == spec["episode_len"] - 1
                seq = r["maker"].spool(r["spool"], f"{rid}-e{episode}", step, version, ends=ends)
                r["spool"].spooled_at[seq] = time.monotonic()
                n += 1
                t_next += period

        # producers start spread over one period (robots are not in lock-step): robot-k at k/N of it
        threads = [
            threading.Thread(
                target=produce,
                args=(rid, r, spec["robots_all"].index(rid) / len(spec["robots_all"]) / spec["rate_hz"]),
                daemon=True,
            )
            for rid, r in robots.items()
        ]
        for t in threads:
            t.start()
        time.sleep(max(0.0, start + spec["duration"] - time.time()))
        stop.set()
        for t in threads:
            t.join()
        produced_until = time.time()
        deadline = time.monotonic() + spec["timeout"]
        while time.monotonic() < deadline and any(len(r["spool"]) for r in robots.values()):
            time.sleep(0.05)
        drained_at = time.time()
        cpu = time.process_time() - cpu0
    for r in robots.values():
        r["uploader"].stop()
        if "subscriber" in r:
            r["subscriber"].stop()
    result = {}
    for rid, r in robots.items():
        sp, up = r["spool"], r["uploader"]
        lat = [sp.acked_at[s] - t for s, t in sp.spooled_at.items() if s in sp.acked_at]
        result[rid] = {
            "spooled": len(sp.spooled_at),
            "acked": len(sp.acked_at),
            "acked_sequences": sorted(sp.acked_at),
            "next_sequence": sp.next_sequence,
            "left_in_spool": len(sp),
            "ack_latencies_s": lat if phase == "paced" else [],
            "last_ack_wall": sp.acked_wall,
            "bytes": r["maker"].bytes_made,
            "sent": up.sent,
            "resent": up.resent,
            "duplicate_acks": up.duplicates,
            "refused": dict(up.refused),
            "versions": r["sink"].got if "sink" in r else [],
            "version_latencies_s": r["subscriber"].received if "subscriber" in r else [],
        }
        sp.close()
    out = {"robots": result, "cpu_s": cpu}
    if phase == "paced":
        out.update(produced_until=produced_until, drained_at=drained_at)
    Path(spec["result"]).write_text(json.dumps(out))


def _wait_for_json(path: Path, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:  # written while we read it
                pass
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f}s")


# --- children: LeRobot's transport ---------------------------------------------------------------


def _lerobot_server_main(spec: dict) -> None:
    """LeRobot's LearnerService servicer in a gRPC server, sized for the fleet; a thread drains its
    transition queue counting messages and bytes (never unpickling them: they came over a network)."""
    import queue
    import signal
    from concurrent import futures

    import grpc
    from lerobot.rl.learner_service import LearnerService
    from lerobot.transport import services_pb2_grpc
    from lerobot.transport.utils import MAX_MESSAGE_SIZE

    shutdown = threading.Event()
    transitions: queue.Queue = queue.Queue()
    service = LearnerService(
        shutdown_event=shutdown,
        parameters_queue=queue.Queue(),
        seconds_between_pushes=3600.0,
        transition_queue=transitions,
        interaction_message_queue=queue.Queue(),
    )
    # LeRobot's learner uses MAX_WORKERS=3 threads (built for one actor): one per robot here, so that N
    # streams run at once as N actors would need
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=spec["streams"] + 4),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
            ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
        ],
    )
    services_pb2_grpc.add_LearnerServiceServicer_to_server(service, server)
    if spec.get("tls_cert"):
        creds = grpc.ssl_server_credentials([(Path(spec["tls_key"]).read_bytes(), Path(spec["tls_cert"]).read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stats = {"messages": 0, "bytes": 0, "first_wall": 0.0, "last_wall": 0.0}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def count():
        while not stop.is_set():
            try:
                data = transitions.get(timeout=0.1)
            except queue.Empty:
                continue
            now = time.time()
            stats["first_wall"] = stats["first_wall"] or now
            stats["messages"] += 1
            stats["bytes"] += len(data)
            stats["last_wall"] = now
            if stats["messages"] == spec["expected"]:
                Path(spec["result"]).write_text(json.dumps(stats))

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    tmp = Path(spec["port_file"] + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(spec["port_file"])
    stop.wait()
    shutdown.set()
    server.stop(2)
    if not Path(spec["result"]).is_file():
        Path(spec["result"]).write_text(json.dumps(stats))


def _lerobot_clients_main(spec: dict) -> None:
    """One LeRobot actor-style client per robot: SendTransitions with every record chunked by
    LeRobot's send_bytes_in_chunks, over the channel options of its actor (grpc_channel_options)."""
    import grpc
    from lerobot.transport import services_pb2, services_pb2_grpc
    from lerobot.transport.utils import grpc_channel_options, send_bytes_in_chunks

    payloads = {}
    for rid in spec["robots"]:
        maker = RecordMaker(rid, spec["image_side"], spec["episode_len"], seed=zlib.crc32(rid.encode()))
        first = spec["first_sequence"][rid]  # the bytes our robot spooled for its burst, sequence numbers included
        payloads[rid] = [
            maker.make(first + i, f"{rid}-burst", i, spec["version"], ends=False) for i in range(spec["records"])
        ]
    ends: dict[str, float] = {}

    def send(rid: str) -> None:
        # as LeRobot's actor does: a channel, Ready (establish_learner_connection), then one stream; timed
        # from the go signal like our robots, which open their channel and Register then
        if spec.get("ca"):
            creds = grpc.ssl_channel_credentials(Path(spec["ca"]).read_bytes())
            channel = grpc.secure_channel(spec["address"], creds, grpc_channel_options())
        else:  # what LeRobot's actor does (actor.learner_service_client)
            channel = grpc.insecure_channel(spec["address"], grpc_channel_options())
        with channel:
            stub = services_pb2_grpc.LearnerServiceStub(channel)
            stub.Ready(services_pb2.Empty(), timeout=30)

            def stream():
                for data in payloads[rid]:
                    yield from send_bytes_in_chunks(data, services_pb2.Transition, silent=True)

            stub.SendTransitions(stream(), timeout=spec["timeout"])
        ends[rid] = time.time()

    Path(spec["ready"]).write_text("ready")
    go = _wait_for_json(Path(spec["go"]))["at"]
    while time.time() < go:
        time.sleep(0.005)
    threads = [threading.Thread(target=send, args=(rid,)) for rid in spec["robots"]]
    cpu0 = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(spec["result"]).write_text(json.dumps({"ends": ends, "cpu_s": time.process_time() - cpu0}))


# --- the orchestrator ------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _split(items: list[str], parts: int) -> list[list[str]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 4) if values else None


class _Children:
    """Child processes of one robot count (pirl_tools.processes.Procs: always stopped)."""

    def __init__(self, logs: Path):
        from pirl_tools.processes import Procs

        self.procs = Procs(logs)
        self.n = 0

    def role(self, role: str, spec: dict, path: Path, name: str):
        path.write_text(json.dumps(spec))
        return self.procs.start(name, [sys.executable, "-m", "pirl_tools.bench_fleet", role, str(path)])

    def wait(self, names: list[str], files: list[Path], timeout: float, what: str) -> None:
        from pirl_tools.processes import ChildFailedError

        deadline = time.monotonic() + timeout
        while not all(f.is_file() for f in files):
            for n in names:
                p = self.procs.procs[n]
                if p.poll() is not None and p.returncode != 0:
                    self.procs.check_alive(n)
            if time.monotonic() > deadline:
                raise ChildFailedError(f"{what}: not done within {timeout:.0f}s (logs in {self.procs.logs})")
            time.sleep(0.05)


def _run_count(cfg: BenchFleetConfig, n: int, root: Path) -> dict:
    from pirl.security import make_dev_pki
    from pirl_tools.processes import bin_path, wait_for_file

    shutil.rmtree(root, ignore_errors=True)
    (root / "logs").mkdir(parents=True)
    robots = [f"robot-{i:02d}" for i in range(n)]
    pki = make_dev_pki(root / "pki", robots, hosts=["localhost", "127.0.0.1"])
    policy = _policy_checkpoint(root, cfg.image_side)
    kids = _Children(root / "logs")
    procs = kids.procs
    groups = _split(robots, cfg.edge_processes or min(n, 4))
    episodes_per_update = cfg.episodes_per_update or n
    record_bytes = len(RecordMaker("robot-00", cfg.image_side, cfg.episode_len, 0).make(0, "e", 0, 0, ends=False))
    try:
        procs.start(
            "learner",
            [
                bin_path("pirl-learner"),
                f"--policy_path={policy}",
                f"--output_dir={root / 'learner'}",
                "--server.address=127.0.0.1:0",
                f"--server.port_file={root / 'learner.port'}",
                f"--tokens={pki['tokens']}",
                f"--server.tls_cert={pki['server_cert']}",
                f"--server.tls_key={pki['server_key']}",
                f"--trainer.episodes_per_update={episodes_per_update}",
                "--trainer.eval_every=0",
                "--trainer.export_onnx=false",  # versions are weights only (edges on torch)
                "--intake.max_version_lag=1000",  # robots label records with the version they run; none refused
                f"--intake.max_record_bytes={max(4 << 20, 2 * record_bytes)}",
                "--metrics.port=0",
            ],
        )
        port = wait_for_file(root / "learner.port", procs, "learner", timeout=300)
        address = f"127.0.0.1:{port}"
        learner_pid = procs.procs["learner"].pid
        common = {
            "address": address,
            "ca": str(pki["ca_cert"]),
            "tokens": str(pki["tokens"]),
            "image_side": cfg.image_side,
            "episode_len": cfg.episode_len,
            "spool_root": str(root / "spools"),
        }

        # --- paced: the fleet at its control rate
        names, ready, results = [], [], []
        go = root / "paced.go"
        for i, group in enumerate(groups):
            names.append(f"edges-paced-{i}")
            ready.append(root / f"paced-{i}.ready")
            results.append(root / f"paced-{i}.json")
            spec = {
                **common,
                "phase": "paced",
                "robots": group,
                "robots_all": robots,
                "rate_hz": cfg.rate_hz,
                "duration": cfg.duration,
                "timeout": cfg.drain_timeout,
                "ready": str(ready[-1]),
                "go": str(go),
                "result": str(results[-1]),
            }
            kids.role("edges", spec, root / f"paced-{i}.spec.json", names[-1])
        kids.wait(names + ["learner"], ready, 300, "simulated robots starting")
        start = time.time() + 1.0
        go.write_text(json.dumps({"at": start}))
        while time.time() < start:
            time.sleep(0.005)
        cpu0 = _cpu_seconds(learner_pid)
        load_at_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine shows here
        kids.wait(names, results, cfg.duration + cfg.drain_timeout + 120, "the paced phase")
        cpu_paced = _cpu_seconds(learner_pid) - cpu0
        paced = [json.loads(p.read_text()) for p in results]
        for name in names:
            procs.stop(name)
        entry = _paced_figures(cfg, n, paced, start, cpu_paced, root)
        entry["load_average_1_5_15_at_start"] = load_at_start

        # --- burst: everything spooled first, then all robots upload at once (ours), and LeRobot's transport
        if cfg.burst_records:
            status = json.loads((root / "learner" / "status.json").read_text())
            entry["burst"] = _burst_ours(cfg, kids, groups, common, root, status["version"], learner_pid)
            same = {  # LeRobot's clients send the very records our robots sent in the burst
                "version": status["version"],
                "first_sequence": {rid: r["next_sequence"] for rid, r in entry["_robots"].items()},
            }
            entry["lerobot"] = {"plaintext": _burst_lerobot(cfg, kids, groups, n, root, pki, same, tls=False)}
            if cfg.lerobot_tls:
                entry["lerobot"]["tls"] = _burst_lerobot(cfg, kids, groups, n, root, pki, same, tls=True)
            entry["lost_in_paced_phase"] = entry["lost"]
            entry["lost"] += entry["burst"]["lost"]  # lost counts both phases
            ours = entry["burst"]["records_per_s"]
            theirs = entry["lerobot"]["plaintext"]["records_per_s"]
            entry["lerobot_transport_ratio"] = round(ours / theirs, 4) if theirs else None
            if cfg.lerobot_tls:
                tls = entry["lerobot"]["tls"]["records_per_s"]
                entry["lerobot_transport_ratio_tls"] = round(ours / tls, 4) if tls else None

        # the learner's own count, after it stopped (status.json is written on the way out)
        procs.stop("learner", timeout=120)
        final = json.loads((root / "learner" / "status.json").read_text())
        _count_duplicates(entry, final, root, robots)
        entry["episodes_per_update"] = episodes_per_update
        entry["edge_processes"] = len(groups)
        return entry
    finally:
        procs.stop_all(order=(tuple(n for n in procs.procs if n != "learner"), ("learner",)))


def _paced_figures(cfg, n: int, parts: list[dict], start: float, cpu: float, root: Path) -> dict:
    robots = {rid: r for part in parts for rid, r in part["robots"].items()}
    spooled = sum(r["spooled"] for r in robots.values())
    acked = sum(r["acked"] for r in robots.values())
    lat = [x for r in robots.values() for x in r["ack_latencies_s"]]
    produced_until = max(p["produced_until"] for p in parts)
    drained = max(p["drained_at"] for p in parts)
    # fan-out: a version published during the phase, counted when every robot verified and took it;
    # its fan-out time is the slowest robot's publish -> verified-and-offered latency
    per_version: dict[int, list[float]] = {}
    for r in robots.values():
        for (version, when), (_, latency) in zip(r["versions"], r["version_latencies_s"], strict=True):
            if when - latency >= start:  # published after the robots were up (not the version they joined on)
                per_version.setdefault(version, []).append(latency)
    complete = {v: max(ls) for v, ls in per_version.items() if len(ls) == n}
    wall = drained - start
    return {
        "robots": n,
        "records_per_s": round(acked / wall, 3),
        "mb_per_s": round(acked * (sum(r["bytes"] for r in robots.values()) / max(1, spooled)) / wall / 1e6, 3),
        "offered_records_per_s": round(n * cfg.rate_hz, 3),
        "ack_latency_p50_s": _pct(lat, 50),
        "ack_latency_p99_s": _pct(lat, 99),
        "ack_latency_max_s": round(max(lat), 4) if lat else None,
        "publish_fanout_p50_s": _pct(list(complete.values()), 50),
        "publish_fanout_p99_s": _pct(list(complete.values()), 99),
        "versions_published_in_phase": len(per_version),
        "versions_reaching_every_robot": len(complete),
        "learner_cpu_s_per_1k_records": round(cpu / acked * 1000, 3) if acked else None,
        "learner_cpu_s": round(cpu, 2),
        "robots_cpu_s_per_1k_records": round(sum(p["cpu_s"] for p in parts) / acked * 1000, 3) if acked else None,
        "lost": spooled - acked,
        "record_bytes": round(sum(r["bytes"] for r in robots.values()) / max(1, spooled)),
        "records_spooled": spooled,
        "records_acked": acked,
        "resent": sum(r["resent"] for r in robots.values()),
        "refused": sum(sum(r["refused"].values()) for r in robots.values()),
        "seconds_producing": round(produced_until - start, 2),
        "seconds_to_drain_after": round(drained - produced_until, 2),
        "_robots": robots,
    }


def _burst_ours(cfg, kids: _Children, groups, common: dict, root: Path, version: int, learner_pid: int) -> dict:
    names, ready, results = [], [], []
    go = root / "burst.go"
    for i, group in enumerate(groups):
        names.append(f"edges-burst-{i}")
        ready.append(root / f"burst-{i}.ready")
        results.append(root / f"burst-{i}.json")
        spec = {
            **common,
            "phase": "burst",
            "robots": group,
            "records": cfg.burst_records,
            "version": version,
            "timeout": cfg.drain_timeout,
            "ready": str(ready[-1]),
            "go": str(go),
            "result": str(results[-1]),
        }
        kids.role("edges", spec, root / f"burst-{i}.spec.json", names[-1])
    kids.wait(names, ready, 300, "filling the spools for the burst")
    start = time.time() + 0.5
    go.write_text(json.dumps({"at": start}))
    while time.time() < start:
        time.sleep(0.002)
    cpu0 = _cpu_seconds(learner_pid)
    kids.wait(names, results, cfg.drain_timeout + 120, "the burst")
    cpu = _cpu_seconds(learner_pid) - cpu0
    parts = [json.loads(p.read_text()) for p in results]
    robots = {rid: r for part in parts for rid, r in part["robots"].items()}
    robots_cpu = sum(part["cpu_s"] for part in parts)
    for name in names:
        kids.procs.stop(name)
    acked = sum(r["acked"] for r in robots.values())
    end = max(r["last_ack_wall"] for r in robots.values())
    return {
        "records": sum(r["spooled"] for r in robots.values()),
        "bytes": sum(r["bytes"] for r in robots.values()),
        "acked": acked,
        "lost": sum(r["spooled"] - r["acked"] for r in robots.values()),
        "seconds": round(end - start, 3),
        "records_per_s": round(acked / (end - start), 3) if acked else 0.0,
        "mb_per_s": round(sum(r["bytes"] for r in robots.values()) / (end - start) / 1e6, 3) if acked else 0.0,
        "learner_cpu_s_per_1k_records": round(cpu / acked * 1000, 3) if acked else None,
        "robots_cpu_s_per_1k_records": round(robots_cpu / acked * 1000, 3) if acked else None,
        "_robots": robots,
    }


def _burst_lerobot(cfg, kids: _Children, groups, n: int, root: Path, pki: dict, same: dict, *, tls: bool) -> dict:
    from pirl_tools.processes import wait_for_file

    tag = "tls" if tls else "plain"
    port_file, result = root / f"lerobot-{tag}.port", root / f"lerobot-{tag}-server.json"
    spec = {"streams": n, "expected": n * cfg.burst_records, "port_file": str(port_file), "result": str(result)}
    if tls:
        spec.update(tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]))
    server = f"lerobot-server-{tag}"
    kids.role("lerobot-server", spec, root / f"{server}.spec.json", server)
    port = wait_for_file(port_file, kids.procs, server, timeout=120)
    names, ready, results = [], [], []
    go = root / f"lerobot-{tag}.go"
    for i, group in enumerate(groups):
        names.append(f"lerobot-clients-{tag}-{i}")
        ready.append(root / f"lerobot-{tag}-{i}.ready")
        results.append(root / f"lerobot-{tag}-{i}.json")
        cspec = {
            "address": f"{'localhost' if tls else '127.0.0.1'}:{port}",
            "ca": str(pki["ca_cert"]) if tls else None,
            "robots": group,
            "records": cfg.burst_records,
            **same,
            "image_side": cfg.image_side,
            "episode_len": cfg.episode_len,
            "timeout": cfg.drain_timeout,
            "ready": str(ready[-1]),
            "go": str(go),
            "result": str(results[-1]),
        }
        kids.role("lerobot-clients", cspec, root / f"{names[-1]}.spec.json", names[-1])
    kids.wait(names + [server], ready, 300, "LeRobot clients starting")
    server_pid = kids.procs.procs[server].pid
    start = time.time() + 0.5
    go.write_text(json.dumps({"at": start}))
    while time.time() < start:
        time.sleep(0.002)
    cpu0 = _cpu_seconds(server_pid)
    kids.wait(names + [server], results + [result], cfg.drain_timeout + 120, "LeRobot's transport burst")
    cpu = _cpu_seconds(server_pid) - cpu0
    got = json.loads(result.read_text())
    clients_cpu = sum(json.loads(p.read_text())["cpu_s"] for p in results)
    for name in (*names, server):
        kids.procs.stop(name)
    received = got["messages"]
    seconds = got["last_wall"] - start
    return {
        "records": n * cfg.burst_records,
        "received": received,
        "bytes_received": got["bytes"],
        "seconds": round(seconds, 3),
        "records_per_s": round(received / seconds, 3) if received else 0.0,
        "mb_per_s": round(got["bytes"] / seconds / 1e6, 3) if received else 0.0,
        "server_cpu_s_per_1k_records": round(cpu / received * 1000, 3) if received else None,
        "clients_cpu_s_per_1k_records": round(clients_cpu / received * 1000, 3) if received else None,
    }


def _count_duplicates(entry: dict, final: dict, root: Path, robots: list[str]) -> None:
    """duplicates: records the learner accepted beyond the distinct records robots had acked, plus any
    robot whose acked sequences the learner does not hold as exactly 0..next-1 (nothing twice, no gap)."""
    acked_by_robot: dict[str, set[int]] = {rid: set() for rid in robots}
    next_seq: dict[str, int] = {}
    for phase in (entry["_robots"], entry.get("burst", {}).get("_robots", {})):  # paced, then burst
        for rid, r in phase.items():
            acked_by_robot[rid] |= set(r["acked_sequences"])
            next_seq[rid] = max(next_seq.get(rid, 0), r["next_sequence"])
    distinct = sum(len(s) for s in acked_by_robot.values())
    accepted = final["counts"].get("accepted", 0)
    mismatched = [
        rid
        for rid in robots
        if final["acked"].get(rid) != {"below": next_seq.get(rid, 0), "above": []}
        or acked_by_robot[rid] != set(range(next_seq.get(rid, 0)))
    ]
    entry["duplicates"] = accepted - distinct
    entry["learner_accepted"] = accepted
    entry["learner_recognised_resends"] = final["counts"].get("duplicate", 0)
    entry["robots_with_sequence_mismatch"] = mismatched
    entry["learner_updates"] = final.get("updates")
    entry["learner_version"] = final.get("version")
    entry.pop("_robots", None)
    if "burst" in entry:
        entry["burst"].pop("_robots", None)


def run(cfg: BenchFleetConfig, command: str) -> int:
    from pirl_tools.common import run_report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    entries = []
    for n in cfg.robots:
        print(
            f"[fleet] {n} robots: learner + {min(n, cfg.edge_processes or 4)} robot processes, {cfg.duration:.0f}s paced"
        )
        started = time.monotonic()
        e = _run_count(cfg, n, out / "runs" / f"robots{n}")
        e["load_average_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
        e["wall_seconds"] = round(time.monotonic() - started, 1)
        entries.append(e)
        print(
            f"[fleet] {n} robots: {e['records_per_s']} rec/s ({e['mb_per_s']} MB/s), ack p50/p99 "
            f"{e['ack_latency_p50_s']}/{e['ack_latency_p99_s']} s, fan-out p99 {e['publish_fanout_p99_s']} s, "
            f"lost {e['lost']}, duplicates {e['duplicates']}, LeRobot ratio {e.get('lerobot_transport_ratio')}"
        )
        report = {**run_report(command), **_head(cfg, load_before), "fleet": entries}
        write_json(out / "fleet.json", report)
    _plot(out / "fleet.png", entries)
    print(f"wrote {out / 'fleet.json'} and {out / 'fleet.png'}")
    return 0


def _plot(path: Path, entries: list[dict]) -> None:
    """Latencies against robots (paced phase) and burst records/s, ours beside LeRobot's transport."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [e["robots"] for e in entries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("ack_latency_p50_s", "ack p50"),
        ("ack_latency_p99_s", "ack p99"),
        ("publish_fanout_p99_s", "publish fan-out p99"),
    ):
        left.plot(n, [e[key] if e[key] is not None else float("nan") for e in entries], "o-", label=label)
    left.set(xlabel="robots", ylabel="seconds", title="paced: one learner, TLS", xticks=n)
    left.legend()
    bars = [("ours (TLS, validated, WAL, acked)", lambda e: e.get("burst", {}).get("records_per_s"))]
    bars.append(
        ("LeRobot transport (plaintext)", lambda e: e.get("lerobot", {}).get("plaintext", {}).get("records_per_s"))
    )
    bars.append(("LeRobot transport (TLS)", lambda e: e.get("lerobot", {}).get("tls", {}).get("records_per_s")))
    width = 0.8 / len(bars)
    for i, (label, get) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width  # the group centred on its tick
        right.bar([j + offset for j in range(len(n))], [get(e) or 0 for e in entries], width, label=label)
    right.set(
        xlabel="robots", ylabel="records/s", title="burst: same records through each transport", xticks=range(len(n))
    )
    right.set_xticklabels(n)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _head(cfg: BenchFleetConfig, load_before: list[float]) -> dict:
    s = _shapes(cfg.image_side)
    return {
        "load_average_1_5_15_before": load_before,
        "setup": {
            "learner": "one pirl-learner process over TLS (per-robot tokens), a freshly initialised pi_rl policy "
            f"(MLP backbone, state {STATE_DIM} + one {s['image'][1]}x{s['image'][2]} camera, action {ACTION_DIM}) "
            "that trains (PPO on CPU) and publishes every version as chunked weights (no ONNX export)",
            "robots": "simulated robots as threads in a few processes (edge_processes per entry): each the edge's "
            "real Spool (fsync'ed files), Uploader and Subscriber (downloads and hash-checks every version) fed "
            "by a producer writing edge.records.make_record records at rate_hz; no policy inference on the robots",
            "record": f"one camera frame {s['image']} float32 + state + chain {s['chain']} float32 and the scalars",
            "rate_hz": cfg.rate_hz,
            "duration_s": cfg.duration,
            "episode_len": cfg.episode_len,
            "burst_records_per_robot": cfg.burst_records,
        },
        "notes": {
            "records_per_s": "paced phase: records acked / (phase start -> last record acked after the drain)",
            "ack_latency": "per record: spooled (Spool append returned) -> the learner's ack reached the robot",
            "publish_fanout": "per version published during the paced phase and taken by every robot: the slowest "
            "robot's publish -> downloaded, sha256-checked and handed to its worker (Subscriber's latency)",
            "learner_cpu_s_per_1k_records": "paced phase: learner process CPU (user+system, /proc, its PPO updates "
            "and version publishing included) / records acked * 1000; burst.learner_cpu_s_per_1k_records: intake "
            "only (burst records end no episode, so no update runs)",
            "robots_cpu_s_per_1k_records": "CPU of the robots' processes (all their threads: producers or "
            "spool reads, uploads, subscriptions) per 1k records acked, same windows; LeRobot: "
            "clients_cpu_s_per_1k_records and server_cpu_s_per_1k_records",
            "lost": "records spooled but never acked within drain_timeout, paced and burst phases together "
            "(lost_in_paced_phase, burst.lost)",
            "duplicates": "records the learner accepted (counted) minus distinct records the robots saw acked; "
            "resends it recognised and acked as DUPLICATE are learner_recognised_resends",
            "lerobot_transport_ratio": "burst records/s of ours (TLS + token per call, each record validated "
            "against the policy's shapes, appended to the write-ahead log and acked; robots read it from a "
            "durable spool) / burst records/s of LeRobot 0.6.1's transport as its actor connects (plaintext, no "
            "auth, no ack, no validation, no durability: records land in an in-memory queue that a counter drains "
            "without unpickling). Same processes, robots per process, record bytes and records per robot; one "
            "SendTransitions stream per robot, each record chunked by send_bytes_in_chunks; LeRobot's server gets "
            "one thread per robot (its learner's MAX_WORKERS=3 serves one actor). lerobot_transport_ratio_tls: "
            "the same with LeRobot's server on TLS",
        },
    }


if __name__ == "__main__":
    role, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    {"edges": _edges_main, "lerobot-server": _lerobot_server_main, "lerobot-clients": _lerobot_clients_main}[role](spec)
