"""pirl-demo: the product's shape on one machine, on the built-in task or on the simulated robot.

    pirl-demo [--out=outputs/demo] [--target=0.9] [--time_limit=540]
    pirl-demo --robot=sim [--out=outputs/demo_robot] [--operator=scripted] [--method=NAME] [--num_envs=0]

With ``--robot=sim`` the paced edge drives the simulated LeRobot robot (``lerobot_robot_pirl_sim``:
MuJoCo physics, its camera rendered offscreen and recorded) through the Robot API, behind the safety
layer, recording the session as a LeRobotDataset; the unpaced edge and the learner's evaluation run the
same task's batched twin (``--control.env=pirl_sim``). The SFT demos are the robot's scripted expert. With
``--operator=scripted`` a scripted person labels the robot's episodes and takes over when its policy drifts
(docs/people_in_the_loop.md), and the learner runs a method of ``pirl-bench robot`` (``--method``; by default
the one that reaches 0.9 soonest there, ``noise_q_action_td``, with the person's labels back-dated by their
reaction time, ``--label_reaction_s``) on that one robot's episodes, with no simulation farm: learning from few
episodes, end to end.

1. few-shot SFT: scripted demonstrations -> LeRobotDataset -> LeRobot's training loop (reused when
   OUT/sft already holds a finished checkpoint);
2. a local CA, server and robot certificates and per-robot tokens (OUT/certs);
3. a learner process (`pirl-learner`, TLS on loopback) starting from the SFT checkpoint, and two edge
   processes (`pirl-edge`): robot-0 runs one env paced at 50 Hz (what a robot does; the control-rate
   and deadline figures come from it), robot-1 (unless --num_envs=0) runs a vector of simulated envs flat out. In a
   deployment the learner and the simulation farm are other machines; here the paced robot gets
   the first core to itself and the learner and simulation share the others, at a lower CPU
   priority (nice 10 and 15);
4. PI-RL until the learner's deterministic evaluation reaches --target (or --time-limit);
5. the edges stop, upload what they spooled and report; a table is printed and OUT/demo.json and
   OUT/demo.png are written. Logs of every process are in OUT/logs.

SIGTERM or Ctrl-C stops the edges, then the learner (SIGTERM, then SIGKILL after 10 s; a second
Ctrl-C does not cut this short) and exits with 128 + the signal number. Were the demo killed
outright, Linux sends its learner and edges SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.backend_choice import BACKENDS
from lerobot_policy_pi_rl.presets import BACKBONE_CHOICES, builtin_policy_overrides
from pirl.cli import parse_config, require, run_cli, write_json
from pirl_tools.bench_robot import (
    DECISION_DELAY_TICKS,
    METHODS,
    decision_delay_flags,
    offline_demo_flags,
    workspace_bounds_flags,
)
from pirl_tools.common import plot_curves, sft_checkpoint
from pirl_tools.processes import Interrupted, Procs, Signals, bin_path, free_port, wait_for_file

ROBOTS = ("robot-0", "robot-1")
# what --operator=scripted runs without --method: the method of `pirl-bench robot` that reaches 0.9 soonest there
# with the person's labels back-dated (BENCHMARKS.md, "The person's labels back-dated by their reaction time")
OPERATOR_METHOD = "noise_q_action_td"


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def _robots(args) -> tuple[str, ...]:
    """The edges this run starts: the paced robot, and the simulation farm unless --num_envs=0."""
    return ROBOTS if args.num_envs else ROBOTS[:1]


def _cleanup(procs: Procs, signals: Signals) -> None:
    signals.hold()
    # the edges first (they upload what they spooled while the learner still runs), then the learner
    procs.stop_all(order=(ROBOTS, ("learner",)), timeout=10)


def _run(args, signals: Signals) -> int:
    from pirl.security import make_dev_pki

    started = time.monotonic()
    out = Path(args.out)
    print("== 1/4 few-shot SFT", flush=True)
    ckpt = sft_checkpoint(
        out / "sft",
        seed=args.seed,
        num_demos=args.num_demos,
        steps=args.sft_steps,
        noise_std=0.1 if args.robot is None else 0.02,
        policy_overrides=builtin_policy_overrides(args.backbone),
        task="sim" if args.robot == "sim" else "pirl_reach",
    )
    sim = args.robot == "sim"
    control_hz = args.control_hz or (SIM_HZ if sim else 50.0)
    signals.raise_if_received()  # in case the training loop swallowed the KeyboardInterrupt

    print("== 2/4 certificates and tokens", flush=True)
    for sub in ("certs", "learner", "edges", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "learner.port").unlink(missing_ok=True)  # never read a previous run's port
    (out / "logs").mkdir(parents=True)
    robots = _robots(args)
    pki = make_dev_pki(out / "certs", list(robots))
    procs = Procs(out / "logs")
    # The robot gets a core of its own, as on real hardware; the learner and the simulation farm
    # (other machines in a deployment) share the rest. With a single core everything shares it.
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    robot_cpus, farm_cpus = ({cores[0]}, set(cores[1:])) if len(cores) >= 2 else (None, None)
    if args.robot == "sim" and len(cores) <= 2:
        # the simulated robot also renders its camera and encodes the session video: on two cores one is
        # not enough for it; it keeps its priority over the niced learner and simulation farm instead
        robot_cpus = None
    try:
        print(f"== 3/4 learner + {len(robots)} edge(s) over gRPC with TLS on loopback", flush=True)
        learner_dir = out / "learner"
        procs.start(
            "learner",
            [
                bin_path("pirl-learner"),
                "--policy_path",
                str(ckpt),
                "--output_dir",
                str(learner_dir),
                "--server.address",
                "127.0.0.1:0",
                "--server.port_file",
                str(out / "learner.port"),
                "--tokens",
                str(pki["tokens"]),
                "--server.tls_cert",
                str(pki["server_cert"]),
                "--server.tls_key",
                str(pki["server_key"]),
                *_learning_flags(args, out, sim),
                "--trainer.eval_episodes",
                str(args.eval_episodes),
                "--trainer.target_success",
                str(args.target),
                "--seed",
                str(args.seed),
                "--intake.max_version_lag",
                str(args.max_version_lag),
                *(["--trainer.eval_env=pirl_sim"] if sim else []),
            ],
            nice=10,
            cpus=farm_cpus,
        )
        port = wait_for_file(out / "learner.port", procs, "learner", timeout=120)
        address = f"127.0.0.1:{port}"
        common = [
            "--link.learner",
            address,
            "--link.tokens",
            str(pki["tokens"]),
            "--link.tls_ca",
            str(pki["ca_cert"]),
            "--policy.path",
            str(ckpt),
            "--spool.drain_timeout_s",
            "60",
            *(f"--{k}={v}" for k, v in (METHODS[args.method].get("edge", {}) if args.method else {}).items()),
        ]
        procs.start(
            "robot-0",
            [
                bin_path("pirl-edge"),
                *common,
                "--link.robot_id",
                "robot-0",
                "--control.mode",
                "paced",
                "--policy.backend",
                args.backend,
                "--control.hz",
                str(control_hz),
                *(_sim_robot_args(args, out, control_hz) if sim else []),
                "--spool.dir",
                str(out / "edges/robot-0/spool"),
                "--stats_file",
                str(out / "edges/robot-0/stats.json"),
                "--seed",
                str(args.seed + 1),
            ],
            cpus=robot_cpus,
        )
        if args.num_envs:  # the simulation farm
            procs.start(
                "robot-1",
                [
                    bin_path("pirl-edge"),
                    *common,
                    "--link.robot_id",
                    "robot-1",
                    "--control.mode",
                    "unpaced",
                    "--control.num_envs",
                    str(args.num_envs),
                    *(["--control.env=pirl_sim"] if sim else []),
                    "--spool.dir",
                    str(out / "edges/robot-1/spool"),
                    "--stats_file",
                    str(out / "edges/robot-1/stats.json"),
                    "--seed",
                    str(args.seed + 2),
                ],
                nice=15,
                cpus=farm_cpus,
            )
        status_path = learner_dir / "status.json"
        last_print, status = 0.0, {}
        while True:
            for name in ("learner", *robots):
                procs.check_alive(name)
            if status_path.is_file():
                status = json.loads(status_path.read_text())
            elapsed = time.monotonic() - started
            if time.monotonic() - last_print > 5 and status:
                curve = status.get("eval_curve") or [[0, 0, float("nan")]]
                c = status.get("counts", {})
                print(
                    f"  [{elapsed:4.0f}s] policy version {status['version']:3d}  deterministic success "
                    f"{curve[-1][2]:.3f} (v{curve[-1][0]})  records accepted {c.get('accepted', 0)}  "
                    f"duplicates {c.get('duplicate', 0)}",
                    flush=True,
                )
                last_print = time.monotonic()
            if status.get("done") or (status.get("eval_curve") and status["eval_curve"][-1][2] >= args.target):
                break
            if elapsed > args.time_limit:
                print(f"  time limit of {args.time_limit:.0f}s reached", flush=True)
                break
            time.sleep(1.0)

        print("== 4/4 stopping edges (they upload what they spooled), then the learner", flush=True)
        for name in robots:
            procs.stop(name, timeout=120)
        procs.stop("learner", timeout=60)  # it writes its final status (counts after the drain) on exit
        status = json.loads(status_path.read_text())
    finally:
        try:
            _cleanup(procs, signals)
        except Interrupted:  # the one signal that raises arrived before hold(): clean up, held now
            _cleanup(procs, signals)
    signals.raise_if_received()

    edges = {r: json.loads((out / f"edges/{r}/stats.json").read_text()) for r in robots}
    counts = status.get("counts", {})
    curve = status.get("eval_curve", [])
    paced = edges["robot-0"]
    latencies = [x for e in edges.values() for x in e["sync_latencies_s"]]
    report = {
        "backbone": args.backbone,
        "robot_type": "pirl_sim" if sim else None,
        "task": "pirl_sim" if sim else "pirl_reach",
        "sft_success": curve[0][2] if curve else float("nan"),
        "final_success": curve[-1][2] if curve else float("nan"),
        "best_success": max((c[2] for c in curve), default=float("nan")),
        "policy_versions": status.get("version", 0),
        "rollouts_sent": sum(e["records_sent"] for e in edges.values()),
        "rollouts_resent": sum(e["records_resent"] for e in edges.values()),
        "rollouts_accepted": counts.get("accepted", 0),
        "duplicates": counts.get("duplicate", 0),
        "rollouts_left_in_spools": sum(e["records_left_in_spool"] for e in edges.values()),
        # refused by the learner, or dropped by the edge as older than the learner's version lag
        "rollouts_dropped": sum(sum(e["records_refused"].values()) for e in edges.values()),
        "paced_backend": paced["backend"],
        "deadline_miss_ratio": paced["deadline_miss_ratio"],
        "paced_ticks": paced["ticks"],
        "paced_policy_swaps": paced["policy_swaps"],
        "control_rate_hz_p50": paced.get("control_rate_hz_p50"),
        "control_rate_hz_p99": paced.get("control_rate_hz_p99"),
        "sync_latency_p50_s": _pct(latencies, 50),
        "sync_latency_p99_s": _pct(latencies, 99),
        "env_steps": status.get("env_steps", 0),
        "episodes": sum(e["episodes"] for e in edges.values()),
        "paced_episodes": paced["episodes"],
        "operator": args.operator,
        "label_reaction_s": args.label_reaction_s if args.operator else None,
        "method": args.method,
        "labels": paced.get("labels", {}),
        "interventions": paced.get("interventions", 0),
        # what the paced robot spent: its control time (a fleet of real robots would spend env steps / hz)
        "paced_robot_seconds": round(paced["control_seconds"], 1),
        "safety_clamps": paced.get("safety", {}).get("clamped_ticks", 0),
        "safety_jump_limits": paced.get("safety", {}).get("limited_ticks", 0),
        "estops": paced.get("safety", {}).get("estops", 0),
        "dataset_root": paced.get("dataset", {}).get("root"),
        "dataset_frames": paced.get("dataset", {}).get("frames_written", 0),
        "dataset_episodes": paced.get("dataset", {}).get("episodes_saved", 0),
        "dataset_bytes": paced.get("dataset", {}).get("size_bytes", 0),
        "wall_seconds": round(time.monotonic() - started, 1),
        "eval_curve": curve,
        "edges": edges,
    }
    rows = [
        ("deterministic success: SFT -> final", f"{report['sft_success']:.3f} -> {report['final_success']:.3f}"),
        ("policy versions published", report["policy_versions"]),
        (
            "rollout records sent / accepted / duplicates",
            f"{report['rollouts_sent']} / {report['rollouts_accepted']} / {report['duplicates']}",
        ),
        (
            "records dropped as too old / refused; left in spools",
            f"{report['rollouts_dropped']}; {report['rollouts_left_in_spools']}",
        ),
        (
            "paced edge (robot-0) control rate p50 / p99",
            f"{report['control_rate_hz_p50']:.1f} / {report['control_rate_hz_p99']:.1f} Hz",
        ),
        (
            "paced edge deadline misses",
            f"{report['deadline_miss_ratio']:.4%} of {report['paced_ticks']} ticks, "
            f"{report['paced_policy_swaps']} policy swaps ({report['paced_backend']})",
        ),
        (
            "sync latency p50 / p99 (publish -> loaded on edge)",
            f"{report['sync_latency_p50_s'] * 1e3:.0f} / {report['sync_latency_p99_s'] * 1e3:.0f} ms",
        ),
        ("wall time", f"{report['wall_seconds']:.0f} s"),
    ]
    if sim:
        rows[-1:-1] = [
            (
                "simulated robot (robot-0): episodes, robot time",
                f"{report['paced_episodes']} episodes, {report['paced_robot_seconds']:.0f} s",
            ),
            (
                "outcomes (who decided / verdict), takeovers",
                f"{report['labels']}, {report['interventions']}",
            ),
            (
                "safety layer: clamped / jump-limited ticks, e-stops",
                f"{report['safety_clamps']} / {report['safety_jump_limits']}, {report['estops']}",
            ),
            (
                "session dataset (LeRobotDataset, camera as video)",
                f"{report['dataset_episodes']} episodes, {report['dataset_frames']} frames, "
                f"{report['dataset_bytes'] / 1e6:.1f} MB at {report['dataset_root']}",
            ),
        ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    write_json(out / "demo.json", report)
    plot_curves(
        out / "demo.png",
        [{"label": "learner deterministic eval", "curve": [(c[1], c[2]) for c in curve]}],
        f"pirl-demo ({'simulated robot' if sim else args.backbone}): learner + {len(robots)} edge(s) over gRPC",
    )
    print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}; logs in {out / 'logs'}")
    if report["final_success"] < args.target:
        print(f"the target success {args.target} was not reached within time_limit={args.time_limit:.0f}s")
        return 1 if args.require_target else 0
    return 0


SIM_HZ = 25.0  # the simulated robot's control rate (its task's physics step, lerobot_robot_pirl_sim TaskParams)


def _sim_robot_args(args, out: Path, control_hz: float) -> list[str]:
    """pirl-edge flags of the paced edge on the simulated robot: the robot and its camera, an episode
    protocol without a person (the simulator resets its scene; episodes start at once and last as long as
    the batched twin's), the session dataset."""
    from lerobot_robot_pirl_sim.vec_env import DEFAULT_MAX_STEPS

    cam = (
        f"{{front: {{type: pirl_sim, width: {args.camera_size}, height: {args.camera_size}, fps: {args.camera_fps}}}}}"
    )
    # with a person labelling, ten more ticks: time for their label after a close at the last step
    steps = DEFAULT_MAX_STEPS + (10 if args.operator else 0)
    flags = [
        "--robot.type=pirl_sim",
        f"--robot.cameras={cam}",
        f"--robot.seed={args.seed + 1}",
        "--episode.start=delay",
        "--episode.start_delay_s=0",
        f"--episode.time_limit_s={steps / control_hz}",
        f"--dataset.root={out / 'edges/robot-0/session'}",
    ]
    if args.method:  # the bench's robot: a fixed decision delay, the one the learner's evaluation models
        # (_learning_flags), and the safety layer bounded to the workspace, all the twin clips to
        flags += decision_delay_flags(DECISION_DELAY_TICKS)[0] + workspace_bounds_flags()
    if args.operator == "scripted":
        port = free_port()
        flags += [
            "--robot.id=sim0",
            f"--robot.operator_port={port}",
            f"--robot.operator_seed={args.seed}",
            f"--safety.estop_port={port}",
            "--episode.outcome=operator",
            f"--episode.label_reaction_s={args.label_reaction_s}",
        ]
        spec = METHODS[args.method] if args.method else {"interventions": True}
        if spec["interventions"]:  # the person takes over a drifting policy (as the method does in the bench)
            flags += [
                "--robot.operator_intervene_after_s=1.0",
                "--teleop.type=pirl_sim_expert",
                "--teleop.id=sim0",
                *(["--robot.operator_intervene_on_rush=true"] if spec.get("rush") else []),
            ]
    return flags


def _learning_flags(args, out: Path, sim: bool) -> list[str]:
    """pirl-learner flags of how it learns: the demo's PPO (episodes per update, evaluation period, actor
    learning rate), or with --method that method of `pirl-bench robot` (its settings replace those three), with
    the SFT demos as offline BC data where it uses them."""
    settings = {
        "trainer.episodes_per_update": args.episodes_per_update,
        "trainer.eval_every": args.eval_every,
        "algorithm.actor_lr": args.actor_lr or (3e-5 if sim else 5e-5),
    }
    flags = []
    if args.method:
        spec = METHODS[args.method]
        settings.update(spec["learner"])
        flags += offline_demo_flags(spec, out / "sft" / "data")
        if sim:  # the bench's method on the bench's terms: evaluated with the robot's decision delay
            flags += decision_delay_flags(DECISION_DELAY_TICKS)[1]
    return [f"--{k}={v}" for k, v in settings.items()] + flags


@dataclass
class DemoConfig:
    """pirl-demo: the product's shape on one machine, on the built-in task (see pirl_tools/demo.py).

    pirl-demo [--out=outputs/demo] [--target=0.9] [--time_limit=540] [--backbone=pi0] [--backend=onnxruntime]
    """

    # output directory (a finished SFT checkpoint there is reused)
    out: str = "outputs/demo"
    # stop once the learner's deterministic success reaches this (default: 0.9 on the built-in task, 0.85 on
    # the simulated robot's, whose few-shot SFT starts near 0.6)
    target: float | None = None
    # cap on the whole run, seconds (SFT included; default: 540, 1200 with --robot=sim); it stops at the target
    time_limit: float | None = None
    # learner: complete episodes per PI-RL update
    episodes_per_update: int = 128
    # learner: deterministic evaluation every this many policy versions
    eval_every: int = 5
    # learner: episodes per deterministic evaluation
    eval_episodes: int = 200
    # learner: actor learning rate (default: 5e-5 on the built-in task, the preset's 3e-5 on the simulated
    # robot's task; the rest of the algorithm is the built-in task preset)
    actor_lr: float | None = None
    # envs of the unpaced simulated edge (robot-1); 0: no simulation farm, the learner learns from the paced
    # robot alone (default: 128; 0 with --method)
    num_envs: int | None = None
    # control rate of the paced edge (robot-0), Hz (default: 50; the simulated robot's own 25 with --robot=sim)
    control_hz: float | None = None
    # 'sim': the paced edge drives the simulated LeRobot robot (MuJoCo, a rendered camera, the safety layer, a
    # session dataset) and the task is its reach-and-grasp; None: the built-in task as a paced env
    robot: str | None = None
    # --robot=sim: 'scripted' puts a scripted person at the simulated robot: they label its episodes over the
    # edge's operator port (--episode.outcome=operator) and, where the method uses takeovers, take over with the
    # scripted expert teleoperator when the policy drifts. None: the robot judges its own episodes
    operator: str | None = None
    # --robot=sim: a method of `pirl-bench robot` (METHODS in pirl_tools/bench_robot.py: its learner and edge
    # settings replace --episodes_per_update, --eval_every and --actor_lr). Default: noise_q_action_td with
    # --operator=scripted (the bench's best: off-policy noise steering with a chunk critic on TD targets, its
    # head's lr at 1e-3; the person labels),
    # else none: the demo's PPO
    method: str | None = None
    # --operator=scripted: the edge's allowance for the person's reaction (--episode.label_reaction_s), seconds: a
    # label ends the episode's records at the macro-step that ran this long before it (default: 0.3, the scripted
    # person's reaction time; 0: where the label was given)
    label_reaction_s: float = 0.3
    # --robot=sim: side of the robot's square camera image, pixels (rendered, recorded, not read by the policy)
    camera_size: int = 64
    # --robot=sim: frame rate of the robot's camera (15: rendering, encoding and the robot share one of two cores)
    camera_fps: int = 15
    # mlp (state); or LeRobot's pi0 / pi05 / smolvla at a reduced CPU size, reading the camera image, the state
    # and the task instruction (use a fresh out: the SFT checkpoint is reused)
    backbone: str = "mlp"
    # inference backend of the paced edge, as pirl-edge's policy.backend: auto = TensorRT where it can build
    # (CUDA + tensorrt with its builder), else ONNX Runtime; tensorrt falls back the same way when it cannot,
    # counted in pirl_edge_backend_fallbacks_total. The report names the backend that served
    backend: str = "torch"
    # learner: accept records this many versions old
    max_version_lag: int = 2
    # scripted demonstrations recorded for SFT
    num_demos: int = 10
    # SFT training steps (default: 2000; 1000 with --robot=sim, whose demos clone more easily: measured in
    # process on its 10 demos, deterministic success 0.555 after 1000 steps, 0.58 after 1100, 0.66 after 1200,
    # 0.745 after 1500)
    sft_steps: int | None = None
    # seed of SFT, the learner and the edges
    seed: int = 0
    # exit 1 when target is not reached
    require_target: bool = False

    def __post_init__(self):  # before SFT: a bad value must not cost minutes of work first
        sim = self.robot == "sim"
        if self.target is None:
            self.target = 0.85 if sim else 0.9
        if self.sft_steps is None:
            self.sft_steps = 1000 if sim else 2000
        if self.time_limit is None:
            self.time_limit = 1200.0 if sim else 540.0
        if self.method is None and self.operator == "scripted":
            self.method = OPERATOR_METHOD
        if self.num_envs is None:
            self.num_envs = 0 if self.method else 128
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target: must be in (0, 1] (got {self.target})")
        positive = ("episodes_per_update", "eval_every", "eval_episodes", "num_demos", "sft_steps")
        require(
            self,
            at_least={**dict.fromkeys(positive, 1), "max_version_lag": 0, "num_envs": 0, "label_reaction_s": 0},
            above=dict.fromkeys(("time_limit", "actor_lr", "control_hz"), 0),
        )
        if self.backbone not in BACKBONE_CHOICES:
            raise ValueError(f"backbone: must be one of {BACKBONE_CHOICES} (got {self.backbone!r})")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {BACKENDS} (got {self.backend!r})")
        if self.robot not in (None, "sim"):
            raise ValueError(f"robot: 'sim' (the simulated robot) or unset (got {self.robot!r})")
        if self.robot == "sim" and self.backbone != "mlp":
            raise ValueError("robot: the simulated robot's demo runs the mlp backbone (its policy reads state)")
        if self.operator not in (None, "scripted"):
            raise ValueError(f"operator: 'scripted' or unset (got {self.operator!r})")
        if self.operator is not None and self.robot != "sim":
            raise ValueError("operator: a scripted person stands at the simulated robot: give --robot=sim too")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method: one of pirl-bench robot's methods {sorted(METHODS)} (got {self.method!r})")
        if self.method is not None and self.robot != "sim":
            raise ValueError("method: the methods of pirl-bench robot run on the simulated robot: give --robot=sim")
        if self.method is not None and METHODS[self.method]["interventions"] and self.operator is None:
            raise ValueError(f"method: {self.method} learns from a person's takeovers: give --operator=scripted too")
        require(self, at_least={"camera_size": 8, "camera_fps": 1})


def main() -> None:
    cfg = parse_config(DemoConfig, prog="pirl-demo")
    run_cli(lambda: _run_interruptible(cfg))


def _run_interruptible(args) -> int:
    """SIGTERM / SIGINT: the learner and edges are stopped as at the end of a run (SIGTERM, wait, then
    SIGKILL), then one line and the exit status 128 + the signal number."""
    with Signals("pirl-demo") as signals:
        try:
            return _run(args, signals)
        except Interrupted as e:
            print(
                f"pirl-demo: interrupted by {signal.Signals(e.signum).name}; stopped the learner and edges it had "
                f"started (logs in {Path(args.out) / 'logs'})",
                file=sys.stderr,
                flush=True,
            )
            return 128 + e.signum


if __name__ == "__main__":
    main()
