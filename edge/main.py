"""pirl-edge: run a pi_rl policy on a robot or simulated env, record rollouts, sync with the learner.

    pirl-edge --link.learner=127.0.0.1:50051 --link.robot_id=robot-0 --link.tokens=certs/tokens.json \\
              --link.tls_ca=certs/ca.pem --policy.path=SFT/pretrained_model [--control.mode=paced --control.hz=50]

Every field of edge/configuration.py's EdgeConfig is a flag (--help lists them with their
documentation; --config_path=edge.yaml reads them from a file). The control loop keeps running on the
policy it has when the learner is unreachable; records wait in the on-disk spool (spool.dir) and are
uploaded when it comes back. New policy versions are hash-checked and swapped in at a chunk boundary.
On SIGTERM / SIGINT (or when control.duration_s or control.episodes is reached) it stops controlling,
uploads what is spooled (up to spool.drain_timeout_s seconds) and writes stats_file.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from edge.configuration import EdgeConfig
from pirl.cli import parse_config, run_cli, write_json


def run(cfg: EdgeConfig) -> int:
    link_cfg, pol, ctl = cfg.link, cfg.policy, cfg.control
    robot_id = link_cfg.robot_id
    trt_settings = replace(cfg.tensorrt, cache_dir=cfg.tensorrt.cache_dir or f"outputs/edge/{robot_id}/tensorrt-cache")
    import torch
    from prometheus_client import start_http_server

    from edge import metrics
    from edge.chunk_schedule import LeadTime
    from edge.control import LoopStats, PacedLoop, RecordWriter, UnpacedLoop
    from edge.inference import InferenceWorker
    from edge.link import Heartbeat, LearnerAddress, Subscriber, SyncClock, Uploader
    from edge.robot_loop import RobotLoopStats
    from edge.robot_mode import RobotSide
    from edge.spool import Spool
    from lerobot_policy_pi_rl.envs import open_sim_env, require_known_env, sim_env_kwargs
    from lerobot_policy_pi_rl.rollout import PolicyRunner, env_mismatch, env_task
    from lerobot_policy_pi_rl.sft import load_policy
    from pirl.security import is_loopback, load_tokens

    logging.getLogger().setLevel(logging.INFO)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)  # leave cores to the control loop and the other processes
    # the control thread shares the GIL with the worker, uploader and subscriber threads: a short
    # switch interval (default 5 ms) keeps its wake-up latency well under a 20 ms tick
    sys.setswitchinterval(0.0005)
    tokens = load_tokens(link_cfg.tokens)
    if robot_id not in tokens:
        raise KeyError(f"link.tokens: {link_cfg.tokens} has no entry for robot {robot_id!r}")
    if not link_cfg.tls_ca and not is_loopback(link_cfg.learner) and not link_cfg.insecure:
        raise ValueError(
            f"refusing plaintext to non-loopback learner {link_cfg.learner}: set link.tls_ca (or link.insecure=true)"
        )
    link = LearnerAddress(
        link_cfg.learner, robot_id, tokens[robot_id], link_cfg.tls_ca, link_cfg.tls_client_cert, link_cfg.tls_client_key
    )

    overrides = {"noise_method": pol.noise_method} if pol.noise_method else {}
    policy, pre, post = load_policy(pol.path, device=pol.device, **overrides)
    lead = LeadTime.for_control(ctl, policy.config.n_action_steps)  # checks control.lead_ticks fits the policy
    env = robot = None
    if cfg.robot is not None:
        # everything that can refuse to start does so before the spool is opened: a robot that is not
        # there, a policy that does not fit it, missing action bounds
        robot_side = RobotSide.start(cfg, policy, post)
        robot, task = robot_side.robot, pol.task
    else:
        sim_env = cfg.env if cfg.env is not None else ctl.env
        if cfg.env is None:
            require_known_env(ctl.env, "control.env", "; drive a robot with --robot.type=...")
        field_name = f"env.type={cfg.env.type}" if cfg.env is not None else f"control.env={ctl.env}"
        num_envs = ctl.num_envs if ctl.mode == "unpaced" else 1
        try:
            kwargs = sim_env_kwargs(sim_env, policy.config, ctl.success_key, ctl.env_kwargs, ctl.async_envs)
        except ValueError as e:
            raise ValueError(f"control: {e}") from None
        env = open_sim_env(sim_env, num_envs, field_name, autoreset=False, **kwargs)
        task = pol.task or env_task(env)
        why = env_mismatch(PolicyRunner.for_env(policy, pre, post, env, task=task), env)
        if why is not None:
            env.close()
            raise ValueError(f"{field_name} does not fit the policy {pol.path}: {why}")
    spool_dir = Path(cfg.spool.dir or f"outputs/edge/{robot_id}/spool")
    fsync = cfg.spool.fsync if cfg.spool.fsync is not None else ctl.mode == "paced"
    # quarantining happens mostly here, at open after a crash: count it, and export both metrics at once
    spool = Spool(
        spool_dir,
        max_records=cfg.spool.max_records,
        fsync=fsync,
        on_quarantine=metrics.spool_quarantine_hook(robot_id),
    )
    metrics.update_spool_quarantine(robot_id, spool)
    pending = spool.stats()["records"]
    if pending:
        logging.info("spool %s holds %d unacked records from an earlier run: they will be uploaded", spool_dir, pending)

    stats = RobotLoopStats() if robot is not None else LoopStats()
    # the unpaced simulation loop samples whole batches with the PyTorch policy: preparing another
    # backend for every version there would only cost time (and, for a VLA, a local export)
    backend = pol.backend if ctl.mode == "paced" else "torch"
    if backend != pol.backend:
        logging.info("unpaced mode samples with PyTorch: policy.backend=%s applies to the paced loop only", pol.backend)
    worker = InferenceWorker(
        policy,
        pre,
        post,
        robot_id=robot_id,
        seed=cfg.seed,
        backend=backend,
        task=task,
        env_processor=getattr(env, "processor", None),
        tensorrt_settings=trt_settings,
        golden_check=pol.golden_check,
    )
    logging.info("inference backend: %s", worker.backend)
    writer = RecordWriter(spool, robot_id, stats)
    clock = SyncClock(robot_id)
    uploader = Uploader(link, spool, clock, backend=worker.backend)
    # downloaded policy versions are staged beside the spool (a download resumes there after a restart)
    subscriber = Subscriber(link, worker, clock, staging_dir=spool_dir.parent / "policy_versions")
    if cfg.metrics.port:
        start_http_server(cfg.metrics.port, addr=cfg.metrics.address)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    uploader.start()
    subscriber.start()
    if robot is not None:
        loop = robot_side.loop(worker, writer, stop, lead=lead)
        what = f"robot {cfg.robot.type}"
    elif ctl.mode == "paced":
        loop = PacedLoop(env, worker, writer, robot_id=robot_id, control_hz=ctl.hz, seed=cfg.seed, lead=lead)
    else:
        loop = UnpacedLoop(env, worker, writer, robot_id=robot_id, seed=cfg.seed)
    if robot is None:
        what = f"env.type={cfg.env.type}" if cfg.env is not None else ctl.env
    heartbeat = Heartbeat(link, worker, spool, clock, rate_fn=lambda: getattr(loop, "current_rate", 0.0))
    heartbeat.start()
    logging.info("%s control of %s started (%s)", ctl.mode, what, robot_id)
    started = time.time()
    try:
        loop.run(stop, duration_s=ctl.duration_s, max_episodes=ctl.episodes)
    finally:
        control_seconds = time.time() - started
        if robot is not None:
            robot_side.close(loop)  # records queued, the dataset finalized, the robot disconnected
    worker.stop()  # finishes queued jobs first
    writer.close()  # writes the queued records: every finished step is in the spool now

    deadline = time.monotonic() + cfg.spool.drain_timeout_s
    while spool.stats()["records"] and time.monotonic() < deadline:
        time.sleep(0.1)
    left = spool.stats()["records"]
    if left:
        logging.warning(
            "%d records still unacked after %.0fs: they stay in %s for the next run",
            left,
            cfg.spool.drain_timeout_s,
            spool_dir,
        )
    uploader.stop()
    subscriber.stop()
    heartbeat.stop()
    summary = {
        "robot_id": robot_id,
        "mode": ctl.mode,
        "backend": worker.backend,
        "control_hz": ctl.hz,
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
        "lead_ticks_final": getattr(loop, "lead", None) and loop.lead.ticks(policy.config.n_action_steps),
        "inference_budget_ms": getattr(loop, "lead", None) and round(1e3 * loop.lead.budget_s(), 2),
        "versions_rejected": subscriber.rejected,
        "backend_fallbacks": [f.__dict__ for f in worker.fallbacks],
        "versions_refused_by_worker": worker.refused,
        "sync_latencies_s": [lat for _, lat in subscriber.received],
    }
    if robot is not None:
        summary.update(robot_side.summary())
    if cfg.stats_file:
        write_json(Path(cfg.stats_file), summary)
    logging.info(
        "edge %s done: %s", robot_id, json.dumps({k: v for k, v in summary.items() if k != "sync_latencies_s"})
    )
    spool.close()
    return 0


def main() -> None:
    from edge.devices import register_devices

    # LeRobot's robot and camera types and every installed lerobot_* plugin, before --robot.type is parsed
    register_devices()
    cfg = parse_config(EdgeConfig, prog="pirl-edge")
    run_cli(lambda: run(cfg))


if __name__ == "__main__":
    main()
