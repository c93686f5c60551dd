"""pirl-learner: serve pirl.v1.Learner, run PI-RL updates as rollouts arrive, publish every version.

    pirl-learner --policy_path=SFT/pretrained_model --tokens=certs/tokens.json \\
                 --server.tls_cert=certs/server.pem --server.tls_key=certs/server.key
    pirl-learner --output_dir=outputs/learner --resume=true ...      # continue after a crash
    pirl-learner --config_path=learner.yaml --algorithm.actor_lr=5e-5   # a file, with flags on top

    torchrun --nproc_per_node 8 --no-python pirl-learner --device=cuda ...   # updates on 8 GPUs

Every field of learner/configuration.py's LearnerConfig is a flag (--help lists them with their
documentation). Under torchrun rank 0 is the learner robots talk to and the other ranks share its
updates (learner/distributed.py, docs/scale.md). Refuses to listen on a non-loopback address without TLS unless
--server.insecure=true is given.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from pathlib import Path

from learner.configuration import LearnerConfig
from pirl.cli import parse_config, run_cli


def serve(cfg: LearnerConfig) -> int:
    from learner.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return _serve(cfg)
    from learner.distributed import Group, check_supported, rank_device

    logging.getLogger().setLevel(logging.INFO)
    check_supported(cfg.algorithm)  # every rank refuses it alike, before any collective
    cfg = replace(cfg, device=rank_device(cfg.device))  # cuda -> cuda:LOCAL_RANK
    group = Group(cfg.device, cfg.distributed.timeout_s)
    try:
        return _serve(cfg, group) if group.leader else _follow(cfg, group)
    finally:
        group.close()


def _follow(cfg: LearnerConfig, group) -> int:
    """Ranks 1..N-1: the same policy and optimizers as rank 0 (from the checkpoint it resumed from, or the SFT
    checkpoint), then every update rank 0 sends, until it sends STOP. No service, store or checkpoints."""
    import torch

    from learner.distributed import attach, follow_until_stop, start_replicas
    from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, load_checkpoint
    from lerobot_policy_pi_rl.sft import load_policy

    logging.getLogger().setLevel(logging.INFO)
    torch.manual_seed(cfg.seed)
    name = group.checkpoint()  # the checkpoint rank 0 resumed from (after checking it), or None
    ckpt = Path(cfg.output_dir) / "checkpoints" / f"{name:06d}" if name is not None else None
    overrides = {"noise_method": cfg.noise_method} if cfg.noise_method else {}
    policy, _, _ = load_policy(
        ckpt / "pretrained_model" if ckpt is not None else Path(cfg.policy_path), device=cfg.device, **overrides
    )
    algo = PiRLAlgorithm(policy, cfg.algorithm.plain())
    attach(algo, group, cfg.distributed.strategy)  # fsdp2: sharded in start_replicas, after the checkpoint
    if ckpt is not None:
        load_checkpoint(ckpt, algo)  # optimizer states, update counter (lr schedule, noise level), RNG
        logging.info("rank %d: resumed from checkpoint %s, as rank 0", group.rank, ckpt.name)
    start_replicas(algo, group)
    updates = follow_until_stop(algo, group)
    logging.info("rank %d: done after %d updates", group.rank, updates)
    return 0


def _serve(cfg: LearnerConfig, group=None) -> int:
    import torch
    from prometheus_client import start_http_server

    from learner.checkpoints import CheckpointPicker, numbered
    from learner.service import LearnerService, Publisher, build_health_server, build_server
    from learner.store import PolicyShapes, RolloutStore
    from learner.trainer import Trainer, choose_evaluator
    from learner.wal import RecordLog
    from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm
    from lerobot_policy_pi_rl.sft import load_policy
    from pirl.security import TokenAuthenticator, check_bind_allowed, load_tokens, server_credentials

    logging.getLogger().setLevel(logging.INFO)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    found = numbered(out / "checkpoints")
    if found and not cfg.resume:
        raise FileExistsError(
            f"{out} already holds checkpoints: pass --resume=true to continue, or use a new --output_dir"
        )
    # --resume: every numbered checkpoint, newest first, is checked against its manifest before it is
    # loaded (not only what `last` points to); refused ones are logged and counted, an older one is used
    picker = CheckpointPicker(out / "checkpoints") if cfg.resume and found else None
    policy_path = None if picker is not None else Path(cfg.policy_path) if cfg.policy_path else None
    if picker is None and policy_path is None:
        raise ValueError("policy_path: required (no checkpoint to resume from in output_dir)")
    srv = cfg.server
    tls = bool(srv.tls_cert)
    check_bind_allowed(srv.address, tls=tls, insecure=srv.insecure)
    tokens = load_tokens(cfg.tokens)
    trt_settings = None
    if cfg.trainer.export_tensorrt:
        from pirl.export.trt_engine import tensorrt_unavailable_reason

        trt_settings = replace(cfg.tensorrt, cache_dir=cfg.tensorrt.cache_dir or str(out / "tensorrt-cache"))
        why = tensorrt_unavailable_reason()
        if why is not None:
            raise ValueError(f"trainer.export_tensorrt: TensorRT cannot build engines here: {why}")
    creds = server_credentials(srv.tls_cert, srv.tls_key, srv.tls_client_ca) if tls else None

    overrides = {"noise_method": cfg.noise_method} if cfg.noise_method else {}
    if picker is not None:  # the policy of the newest checkpoint that verifies and loads
        policy, pre, post = picker.load(
            lambda ckpt: load_policy(ckpt / "pretrained_model", device=cfg.device, **overrides)
        )
    else:
        policy, pre, post = load_policy(policy_path, device=cfg.device, **overrides)
    bc_data = None
    if cfg.algorithm.bc_coef > 0:  # the BC term's data: interventions as they come, and the offline set if given
        from learner.bc_data import BCData

        bc_data = BCData(policy, pre, cfg.bc, cfg.offline_dataset, seed=cfg.seed)
        if bc_data.offline is None:
            logging.info(
                "algorithm.bc_coef=%g and no --offline_dataset.root: the BC term trains on teleoperator "
                "interventions only; until the first one arrives, updates have no BC term",
                cfg.algorithm.bc_coef,
            )
    algo = PiRLAlgorithm(policy, cfg.algorithm.plain(), demo_iterator=None if bc_data is None else iter(bc_data))
    a = cfg.algorithm
    if cfg.offline_dataset.root is not None and a.chunk_critic:
        from learner.critic_demos import demonstrated_macro_steps

        n = algo.replay_demonstrations(*demonstrated_macro_steps(cfg.offline_dataset, policy, pre, a.gamma))
        logging.info(
            "the chunk critic's replay starts with %d demonstrated macro-steps from %s", n, cfg.offline_dataset.root
        )
    if group is not None:
        from learner.distributed import attach

        attach(algo, group, cfg.distributed.strategy)  # each minibatch split over the ranks, gradients summed
    wal = RecordLog(out / "wal", fsync=cfg.intake.wal_fsync)
    store = RolloutStore(
        PolicyShapes.from_policy(policy),
        max_version_lag=cfg.intake.max_version_lag,
        max_record_bytes=cfg.intake.max_record_bytes,
        wal=wal,
        max_sequence_ahead=cfg.intake.max_sequence_ahead,
        require_outcome=cfg.trainer.require_outcome,
    )
    publisher = Publisher(chunk_bytes=cfg.sync.chunk_bytes)
    evaluator = choose_evaluator(cfg.trainer, policy, pre, post, env_cfg=cfg.env)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        algo,
        store,
        publisher,
        out,
        cfg.trainer,
        pre,
        post,
        evaluator,
        tensorrt=trt_settings,
        bc_data=bc_data,
        group=group,
    )
    if picker is not None:
        trainer.resume(picker)  # the state of the same checkpoint (or an older one if that one does not load)
    elif cfg.resume:
        logging.info("resume: no checkpoint in %s yet, starting from %s", out, policy_path)
    if group is not None:  # the other ranks load what this rank resumed from, then take its weights
        from learner.distributed import start_replicas

        resumed = picker.current() if picker is not None else None
        group.checkpoint(None if resumed is None else int(resumed.name))
        start_replicas(algo, group)

    limits = srv.limits()
    service = LearnerService(
        store,
        publisher,
        TokenAuthenticator(tokens),
        max_record_bytes=cfg.intake.max_record_bytes,
        contacts_path=out / "robots_last_seen.json",
        limits=limits,
    )
    server, port, health_servicer = build_server(
        service,
        srv.address,
        credentials=creds,
        max_message_bytes=2 * cfg.intake.max_record_bytes,
        workers=srv.max_concurrent_calls or None,
    )
    logging.info(
        "call slots: %d (%d robots, %d streams of each kind per robot)",
        srv.max_concurrent_calls or limits.call_slots(len(tokens)),
        len(tokens),
        limits.per_robot,
    )
    health_server = build_health_server(health_servicer, srv.health_address)[0] if srv.health_address else None
    if cfg.metrics.port:
        start_http_server(cfg.metrics.port, addr=cfg.metrics.address)
    trainer.start()
    server.start()
    if health_server is not None:
        health_server.start()
    host = srv.address.rsplit(":", 1)[0]
    logging.info(
        "learner serving on %s:%d (%s) at policy version %d", host, port, "TLS" if tls else "plaintext", trainer.version
    )
    if srv.port_file:
        tmp = Path(srv.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(srv.port_file)

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
    from lerobot.utils.import_utils import register_third_party_plugins

    # every installed lerobot_* plugin, before --env.type is parsed (an env type) or the evaluation env is built
    register_third_party_plugins()
    cfg = parse_config(LearnerConfig, prog="pirl-learner")
    run_cli(lambda: serve(cfg))


if __name__ == "__main__":
    main()
