"""pirl-edge: run a pi_rl policy on a robot or simulated env, record rollouts, sync with the learner.

    pirl-edge --learner 127.0.0.1:50051 --robot-id robot-0 --tokens certs/tokens.json \\
              --tls-ca certs/ca.pem --policy-path SFT/pretrained_model [--mode paced --control-hz 50]

The control loop keeps running on the policy it has when the learner is unreachable; records wait
in the on-disk spool (--spool-dir) and are uploaded when it comes back. New policy versions are
hash-checked and swapped in at a chunk boundary. On SIGTERM / SIGINT (or when --duration or
--episodes is reached) it stops controlling, uploads what is spooled (up to --drain-timeout
seconds) and writes --stats-file.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from edge.backend_choice import BACKENDS
from lerobot_policy_pi_rl.samplers import RL_NOISE_METHODS
from pirl.cli import check_bounds, run_cli, write_json
from pirl.export.trt_engine import add_tensorrt_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pirl-edge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--learner", required=True, help="learner address host:port")
    p.add_argument("--robot-id", required=True)
    p.add_argument("--tokens", required=True, help="JSON file {robot_id: token}; this robot's entry is used")
    p.add_argument("--tls-ca", help="CA certificate that signed the learner's certificate (enables TLS)")
    p.add_argument("--tls-client-cert", help="client certificate for mutual TLS")
    p.add_argument("--tls-client-key", help="client private key for mutual TLS")
    p.add_argument("--insecure", action="store_true", help="allow plaintext to a non-loopback learner")
    p.add_argument("--policy-path", required=True, help="initial policy (LeRobot pretrained_model dir): version 0")
    p.add_argument("--noise-method", choices=RL_NOISE_METHODS, help="must match the learner's")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="inference backend of the paced loop; auto = TensorRT when tensorrt and CUDA are present, "
        "else ONNX Runtime (CUDA provider when available), else PyTorch; a backend that cannot "
        "load falls back (logged, counted) to the next; the unpaced simulation loop samples "
        "with PyTorch",
    )
    p.add_argument(
        "--golden-check",
        choices=["on", "off"],
        default="on",
        help="compare every newly prepared backend with the PyTorch policy on a fixed input before it "
        "serves; a mismatch refuses the version (default on)",
    )
    p.add_argument("--env", default="pirl_reach", help="'pirl_reach' (built-in task) or a gymnasium id")
    p.add_argument("--task", help="language instruction for VLA policies (default: the env's task description)")
    p.add_argument(
        "--mode",
        choices=["paced", "unpaced"],
        default="paced",
        help="paced: one env at --control-hz (a robot); unpaced: --num-envs sims flat out",
    )
    p.add_argument("--control-hz", type=float, default=50.0)
    p.add_argument("--num-envs", type=int, default=64, help="unpaced mode only")
    p.add_argument("--spool-dir", help="default: outputs/edge/<robot-id>/spool")
    p.add_argument("--spool-max-records", type=int, default=100_000)
    p.add_argument(
        "--spool-fsync",
        choices=["on", "off"],
        help="fsync every spooled record (default: on in paced mode, off in unpaced simulation, "
        "where records survive an edge crash but not a power loss)",
    )
    p.add_argument("--duration", type=float, help="seconds to run (default: until signalled)")
    p.add_argument("--episodes", type=int, help="episodes to run (default: until signalled)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to upload the spool at exit")
    p.add_argument("--stats-file", help="write a JSON summary here at exit")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    p.add_argument("--metrics-address", default="127.0.0.1")
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of the policy: the torch backend samples there; ONNX Runtime and TensorRT take host inputs (default cpu)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_tensorrt_arguments(p, cache_default_help="default: outputs/edge/<robot-id>/tensorrt-cache")
    return p


def run(args) -> int:
    trt_settings = settings_from_args(args, cache_dir=f"outputs/edge/{args.robot_id}/tensorrt-cache")
    import torch
    from prometheus_client import start_http_server

    from edge import metrics
    from edge.control import LoopStats, PacedLoop, RecordWriter, UnpacedLoop
    from edge.inference import InferenceWorker
    from edge.link import Heartbeat, LearnerAddress, Subscriber, SyncClock, Uploader
    from edge.spool import Spool
    from lerobot_policy_pi_rl.envs import BUILTIN_NAMES, builtin_obs_kwargs, make_vec_env
    from lerobot_policy_pi_rl.rollout import env_task
    from lerobot_policy_pi_rl.sft import load_policy
    from pirl.security import is_loopback, load_tokens

    logging.getLogger().setLevel(logging.INFO)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # leave cores to the control loop and the other processes
    # the control thread shares the GIL with the worker, uploader and subscriber threads: a short
    # switch interval (default 5 ms) keeps its wake-up latency well under a 20 ms tick
    sys.setswitchinterval(0.0005)
    tokens = load_tokens(args.tokens)
    if args.robot_id not in tokens:
        raise KeyError(f"--tokens has no entry for robot {args.robot_id!r}")
    if not args.tls_ca and not is_loopback(args.learner) and not args.insecure:
        raise ValueError(f"refusing plaintext to non-loopback learner {args.learner}: pass --tls-ca (or --insecure)")
    link = LearnerAddress(
        args.learner, args.robot_id, tokens[args.robot_id], args.tls_ca, args.tls_client_cert, args.tls_client_key
    )

    overrides = {"noise_method": args.noise_method} if args.noise_method else {}
    policy, pre, post = load_policy(args.policy_path, device=args.device, **overrides)
    num_envs = args.num_envs if args.mode == "unpaced" else 1
    env_kwargs = builtin_obs_kwargs(policy.config) if args.env in BUILTIN_NAMES else {}
    env = make_vec_env(args.env, num_envs, autoreset=False, **env_kwargs)
    spool_dir = Path(args.spool_dir or f"outputs/edge/{args.robot_id}/spool")
    fsync = (args.spool_fsync or ("on" if args.mode == "paced" else "off")) == "on"
    # quarantining happens mostly here, at open after a crash: count it, and export both metrics at once
    spool = Spool(
        spool_dir,
        max_records=args.spool_max_records,
        fsync=fsync,
        on_quarantine=metrics.spool_quarantine_hook(args.robot_id),
    )
    metrics.update_spool_quarantine(args.robot_id, spool)
    pending = spool.stats()["records"]
    if pending:
        logging.info("spool %s holds %d unacked records from an earlier run: they will be uploaded", spool_dir, pending)

    stats = LoopStats()
    # the unpaced simulation loop samples whole batches with the PyTorch policy: preparing another
    # backend for every version there would only cost time (and, for a VLA, a local export)
    backend = args.backend if args.mode == "paced" else "torch"
    if backend != args.backend:
        logging.info("unpaced mode samples with PyTorch: --backend %s applies to the paced loop only", args.backend)
    worker = InferenceWorker(
        policy,
        pre,
        post,
        robot_id=args.robot_id,
        seed=args.seed,
        backend=backend,
        task=args.task or env_task(env),
        tensorrt_settings=trt_settings,
        golden_check=args.golden_check == "on",
    )
    logging.info("inference backend: %s", worker.backend)
    writer = RecordWriter(spool, args.robot_id, stats)
    clock = SyncClock(args.robot_id)
    uploader = Uploader(link, spool, clock, backend=worker.backend)
    subscriber = Subscriber(link, worker, clock)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    uploader.start()
    subscriber.start()
    if args.mode == "paced":
        loop = PacedLoop(env, worker, writer, robot_id=args.robot_id, control_hz=args.control_hz, seed=args.seed)
    else:
        loop = UnpacedLoop(env, worker, writer, robot_id=args.robot_id, seed=args.seed)
    heartbeat = Heartbeat(link, worker, spool, clock, rate_fn=lambda: getattr(loop, "current_rate", 0.0))
    heartbeat.start()
    logging.info("%s control of %s started (%s)", args.mode, args.env, args.robot_id)
    started = time.time()
    loop.run(stop, duration_s=args.duration, max_episodes=args.episodes)
    control_seconds = time.time() - started
    worker.stop()  # finishes queued jobs first: every finished step is in the spool now

    deadline = time.monotonic() + args.drain_timeout
    while spool.stats()["records"] and time.monotonic() < deadline:
        time.sleep(0.1)
    left = spool.stats()["records"]
    if left:
        logging.warning(
            "%d records still unacked after %.0fs: they stay in %s for the next run",
            left,
            args.drain_timeout,
            spool_dir,
        )
    uploader.stop()
    subscriber.stop()
    heartbeat.stop()
    summary = {
        "robot_id": args.robot_id,
        "mode": args.mode,
        "backend": worker.backend,
        "control_hz": args.control_hz,
        "control_seconds": control_seconds,
        **stats.summary(),
        "records_sent": uploader.sent,
        "records_resent": uploader.resent,
        "records_acked": uploader.acked,
        "records_duplicate_acks": uploader.duplicates,
        "records_refused": dict(uploader.refused),
        "records_left_in_spool": left,
        "policy_version": worker.version,
        "policy_swaps": len(worker.swap_times),
        "versions_rejected": subscriber.rejected,
        "backend_fallbacks": [f.__dict__ for f in worker.fallbacks],
        "versions_refused_by_worker": worker.refused,
        "sync_latencies_s": [lat for _, lat in subscriber.received],
    }
    if args.stats_file:
        write_json(Path(args.stats_file), summary)
    logging.info(
        "edge %s done: %s", args.robot_id, json.dumps({k: v for k, v in summary.items() if k != "sync_latencies_s"})
    )
    spool.close()
    return 0


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    check_bounds(
        parser,
        args,
        at_least={"num_envs": 1, "episodes": 1, "spool_max_records": 1, "drain_timeout": 0, "metrics_port": 0},
        above={"control_hz": 0, "duration": 0},
    )
    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
