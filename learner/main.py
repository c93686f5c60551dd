"""pirl-learner: serve pirl.v1.Learner, run PI-RL updates as rollouts arrive, publish every version.

    pirl-learner --policy-path SFT/pretrained_model --tokens certs/tokens.json \\
                 --tls-cert certs/server.pem --tls-key certs/server.key [--address 127.0.0.1:50051]
    pirl-learner --output-dir outputs/learner --resume ...      # continue after a crash

Refuses to listen on a non-loopback address without TLS unless --insecure is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from lerobot_policy_pi_rl.presets import builtin_task_algorithm_config
from lerobot_policy_pi_rl.samplers import RL_NOISE_METHODS
from pirl.cli import check_bounds, run_cli
from pirl.export.trt_engine import add_tensorrt_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pirl-learner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--policy-path", help="SFT checkpoint (a LeRobot pretrained_model dir); not needed with --resume")
    p.add_argument("--output-dir", default="outputs/learner", help="checkpoints/, status.json")
    p.add_argument("--address", default="127.0.0.1:50051", help="host:port to listen on (port 0: any free port)")
    p.add_argument("--port-file", help="write the bound port here once serving (for scripts and tests)")
    p.add_argument("--tokens", required=True, help="JSON file {robot_id: token} of the robots allowed to connect")
    p.add_argument("--tls-cert", help="server certificate (PEM)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback address")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in OUTPUT_DIR/checkpoints (each is checked against "
        "its manifest of sha256 hashes; refused ones are logged, counted and set aside)",
    )
    p.add_argument("--noise-method", choices=RL_NOISE_METHODS, help="override the policy's sampler")
    p.add_argument("--episodes-per-update", type=int, default=64)
    p.add_argument("--max-updates", type=int, default=0, help="stop updating after this many (0: never)")
    p.add_argument("--max-version-lag", type=int, default=1, help="accept records this many versions old")
    p.add_argument("--max-record-bytes", type=int, default=4 << 20)
    p.add_argument(
        "--max-sequence-ahead",
        type=int,
        default=1 << 16,
        help="refuse a record whose sequence is this far or more above the robot's lowest unacked one "
        "(bounds what the learner remembers per robot; the edge keeps such records and registers again)",
    )
    p.add_argument(
        "--max-streams-per-robot",
        type=int,
        default=2,
        help="open calls of each streaming RPC (rollouts, policy subscription) one robot may hold; one more "
        "is refused, so no robot can take the call slots of the others",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=120.0,
        help="close a rollout stream that carried no record for this many seconds (0: never)",
    )
    p.add_argument(
        "--max-concurrent-calls",
        type=int,
        default=0,
        help="calls the server admits at once (0: sized for the fleet in --tokens: every robot's streams "
        "at --max-streams-per-robot, plus 8 for Register / Heartbeat / health)",
    )
    p.add_argument(
        "--wal-fsync",
        action="store_true",
        help="fsync every accepted record before acking it (power-loss safe, slower)",
    )
    p.add_argument("--algorithm-config", help="JSON of PiRLAlgorithmConfig fields (default: the built-in task preset)")
    p.add_argument("--actor-lr", type=float, help="override algorithm.actor_lr")
    p.add_argument(
        "--eval-every", type=int, default=5, help="deterministic eval on the built-in task every N versions (0: off)"
    )
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument("--target-success", type=float, help="stop updating once deterministic eval reaches this")
    p.add_argument(
        "--no-export-onnx",
        action="store_true",
        help="publish weights only (edges on ONNX Runtime then export each version themselves)",
    )
    p.add_argument(
        "--export-tensorrt",
        action="store_true",
        help="also build a TensorRT engine of every version and publish it with the export (needs "
        "tensorrt with its builder and a GPU here; edges use it only when their TensorRT version, "
        "GPU and --trt-* settings match, so pass them the same --trt-* flags)",
    )
    p.add_argument(
        "--health-address",
        help="also serve the standard gRPC health service, and nothing else, in plaintext on host:port "
        "(for Kubernetes gRPC probes and the container healthcheck, which cannot speak TLS)",
    )
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")
    p.add_argument("--metrics-address", default="127.0.0.1")
    p.add_argument(
        "--device", default="cpu", help="torch device of the policy and its PPO updates (cuda for a VLA; default cpu)"
    )
    p.add_argument("--seed", type=int, default=0)
    add_tensorrt_arguments(p, cache_default_help="default: OUTPUT_DIR/tensorrt-cache")
    return p


def _algorithm_config(args):
    overrides = {}
    if args.algorithm_config:
        path = Path(args.algorithm_config)
        if not path.is_file():
            raise FileNotFoundError(f"--algorithm-config: no such file {path}")
        overrides = json.loads(path.read_text())
        if not isinstance(overrides, dict):
            raise ValueError(f"--algorithm-config: {path} must hold a JSON object of PiRLAlgorithmConfig fields")
        overrides.pop("type", None)
    if args.actor_lr is not None:
        overrides["actor_lr"] = args.actor_lr
    try:
        return builtin_task_algorithm_config(**overrides)
    except TypeError as e:
        raise ValueError(f"--algorithm-config: {e}") from None


def serve(args) -> int:
    import torch
    from prometheus_client import start_http_server

    from learner.checkpoints import CheckpointPicker, numbered
    from learner.service import LearnerService, Publisher, build_health_server, build_server
    from learner.store import PolicyShapes, RolloutStore
    from learner.streams import StreamLimits
    from learner.trainer import Trainer, TrainerSettings, make_evaluator
    from learner.wal import RecordLog
    from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm
    from lerobot_policy_pi_rl.sft import load_policy
    from pirl.security import TokenAuthenticator, check_bind_allowed, load_tokens, server_credentials

    logging.getLogger().setLevel(logging.INFO)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    found = numbered(out / "checkpoints")
    if found and not args.resume:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, or use a new --output-dir")
    # --resume: every numbered checkpoint, newest first, is checked against its manifest before it is
    # loaded (not only what `last` points to); refused ones are logged and counted, an older one is used
    picker = CheckpointPicker(out / "checkpoints") if args.resume and found else None
    policy_path = None if picker is not None else Path(args.policy_path) if args.policy_path else None
    if picker is None and policy_path is None:
        raise ValueError("--policy-path is required (no checkpoint to resume from in --output-dir)")
    tls = bool(args.tls_cert or args.tls_key)
    if tls and not (args.tls_cert and args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    check_bind_allowed(args.address, tls=tls, insecure=args.insecure)
    tokens = load_tokens(args.tokens)
    trt_settings = None
    if args.export_tensorrt:
        from pirl.export.trt_engine import tensorrt_unavailable_reason

        if args.no_export_onnx:
            raise ValueError("--export-tensorrt builds the engine from the ONNX export: drop --no-export-onnx")
        trt_settings = settings_from_args(args, cache_dir=str(out / "tensorrt-cache"))
        why = tensorrt_unavailable_reason()
        if why is not None:
            raise ValueError(f"--export-tensorrt: TensorRT cannot build engines here: {why}")
    creds = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if tls else None

    overrides = {"noise_method": args.noise_method} if args.noise_method else {}
    if picker is not None:  # the policy of the newest checkpoint that verifies and loads
        policy, pre, post = picker.load(
            lambda ckpt: load_policy(ckpt / "pretrained_model", device=args.device, **overrides)
        )
    else:
        policy, pre, post = load_policy(policy_path, device=args.device, **overrides)
    algo = PiRLAlgorithm(policy, _algorithm_config(args))
    wal = RecordLog(out / "wal", fsync=args.wal_fsync)
    store = RolloutStore(
        PolicyShapes.from_policy(policy),
        max_version_lag=args.max_version_lag,
        max_record_bytes=args.max_record_bytes,
        wal=wal,
        max_sequence_ahead=args.max_sequence_ahead,
    )
    publisher = Publisher()
    evaluator = make_evaluator(pre, post, args.eval_episodes, policy_config=policy.config) if args.eval_every else None
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        algo,
        store,
        publisher,
        out,
        TrainerSettings(
            episodes_per_update=args.episodes_per_update,
            max_updates=args.max_updates,
            eval_every=args.eval_every,
            eval_episodes=args.eval_episodes,
            target_success=args.target_success,
            export_onnx=not args.no_export_onnx,
            export_tensorrt=args.export_tensorrt,
            tensorrt=trt_settings,
        ),
        pre,
        post,
        evaluator,
    )
    if picker is not None:
        trainer.resume(picker)  # the state of the same checkpoint (or an older one if that one does not load)
    elif args.resume:
        logging.info("--resume: no checkpoint in %s yet, starting from %s", out, policy_path)

    limits = StreamLimits(per_robot=args.max_streams_per_robot, idle_timeout_s=args.stream_idle_timeout)
    service = LearnerService(
        store,
        publisher,
        TokenAuthenticator(tokens),
        max_record_bytes=args.max_record_bytes,
        contacts_path=out / "robots_last_seen.json",
        limits=limits,
    )
    server, port, health_servicer = build_server(
        service,
        args.address,
        credentials=creds,
        max_message_bytes=2 * args.max_record_bytes,
        workers=args.max_concurrent_calls or None,
    )
    logging.info(
        "call slots: %d (%d robots, %d streams of each kind per robot)",
        args.max_concurrent_calls or limits.call_slots(len(tokens)),
        len(tokens),
        limits.per_robot,
    )
    health_server = build_health_server(health_servicer, args.health_address)[0] if args.health_address else None
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)
    trainer.start()
    server.start()
    if health_server is not None:
        health_server.start()
    host = args.address.rsplit(":", 1)[0]
    logging.info(
        "learner serving on %s:%d (%s) at policy version %d", host, port, "TLS" if tls else "plaintext", trainer.version
    )
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logging.info("shutting down")
    health_servicer.enter_graceful_shutdown()  # probes see NOT_SERVING while the streams drain
    service.stop()
    server.stop(grace=2).wait()
    if health_server is not None:
        health_server.stop(grace=0)
    trainer.stop()
    return 0


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    one = ("episodes_per_update", "eval_episodes", "max_sequence_ahead", "max_streams_per_robot", "max_record_bytes")
    zero = ("stream_idle_timeout", "max_concurrent_calls", "max_version_lag", "max_updates", "eval_every")
    check_bounds(
        parser,
        args,
        at_least={**dict.fromkeys(one, 1), **dict.fromkeys(zero, 0), "metrics_port": 0},
        above={"actor_lr": 0, "target_success": 0},
    )
    if args.target_success is not None and args.target_success > 1:
        parser.error(f"--target-success must be <= 1 (got {args.target_success:g})")
    run_cli(lambda: serve(args))


if __name__ == "__main__":
    main()
