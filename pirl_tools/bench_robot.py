"""pirl-bench robot: episodes and robot-time from few-shot SFT to a success target, on the simulated robot,
with people in the loop played by scripts.

    pirl-bench robot --out=DIR [--methods='[baseline, small_updates, interventions_bc]'] [--seeds='[0]']
                     [--target=0.9] [--max_episodes=1000] [--speedup=1]

Each (method, seed) run is the product's own path, as processes on this machine: ``pirl-learner`` and ONE
``pirl-edge`` in robot mode on the simulated robot (``--robot.type=pirl_sim``, lock-step physics), over gRPC
with TLS. There is no vector of simulated envs: every episode the learner trains on is one the robot ran.

- Outcomes come from a scripted person (``--robot.operator_port``, lerobot_robot_pirl_sim.operator) who
  watches the scene and labels each attempt over the edge's operator HTTP port (``--episode.outcome=operator``);
  the learner requires an outcome on every episode (``--trainer.require_outcome``).
- Methods with interventions give the edge a teleoperator (``--teleop.type=pirl_sim_expert``, the scripted
  expert) and let the scripted person take over when the policy drifts; the learner uses those segments as
  flow-matching BC data, with the SFT demonstrations as offline data (``--offline_dataset.root``).
- Simulation runs ``speedup`` times faster than real time (the loop ticks at speedup x 25 Hz; each tick
  advances the physics by 1/25 s). The edge's inference must then fit in ``decision_delay_ticks`` ticks of wall
  time (40 ms / speedup each): a chunk that comes late makes the robot hold a tick, which its twin does not
  (``deadline_misses`` in each run says how often). Robot-time is what the robot would have spent at its real rate: its env
  steps / 25 Hz. Episodes and robot-time at an evaluation are the robot's own counts (its /metrics) when the
  learner finished evaluating that version: everything the robot ran before, also episodes that were never
  trained on (stale, aborted).
- Success is the learner's deterministic evaluation on the simulated task's batched twin (``pirl_sim``, the
  same fixed episodes for every method), every ``eval_every`` versions, on the robot's terms: the edge asks
  for each chunk ``decision_delay_ticks`` ticks before the current one runs out (``--control.lead_ticks``),
  so the chunk that runs was decided from a state that many ticks old, and the twin delays its observations
  by as much (``obs_delay_ticks``). A twin without the delay scores a policy in conditions it never acts in.
  The robot's safety layer is bounded to its workspace (``--safety.action_min/max``), which is all the twin
  clips to.
- ``--runtime=twin`` runs a method's learner settings in ONE process instead (``run_pirl``: its episodes per
  update as that many copies of the robot's delayed twin, stepped together; no edge, no network, no person,
  the twin's own verdict ends each attempt), scored by the same evaluation: a control that shows what the robot
  runtime costs a method. Only methods the in-process loop can run (no takeovers, no BC data, no offline
  demos); such a run is named ``<method> (twin)``.

Writes DIR/robot.json (``runs``: method, seed, sft_success, final_success, episodes_to_target,
robot_seconds_to_target (null where a run never got there), interventions, curve; ``target``; the machine)
and DIR/robot.png (success against robot episodes, one line per run). Logs of every process: DIR/<run>/logs.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lerobot_policy_pi_rl.presets import NOISE_Q, NOISE_Q_ACTION
from pirl.cli import parse_config, require, run_cli, write_json
from pirl_tools.common import success_by_noise_std
from pirl_tools.processes import Procs, Signals, bin_path, free_port, wait_for_file

ROBOT_HZ = 25.0  # the simulated robot's control rate (lerobot_robot_pirl_sim.physics.TaskParams)
ROBOT_ID = "robot-0"
# ticks between the observation a chunk is decided from and its first action on the robot (see decision_delay_flags)
DECISION_DELAY_TICKS = 1
# the camera a detector run gives the robot: what pirl-demo --robot=sim records (and a detector is trained on)
DETECTOR_CAMERA = "{front: {type: pirl_sim, width: 64, height: 64, fps: 15}}"

_SMALL = {"trainer.episodes_per_update": 16, "trainer.eval_every": 2, "algorithm.actor_lr": 3e-5}
# off-policy noise steering's learner settings (noise_q, noise_q_action: presets.NOISE_Q, NOISE_Q_ACTION)
_NOISE_Q = {**_SMALL, "noise_method": "noise_steer", **{f"algorithm.{k}": v for k, v in NOISE_Q.items()}}
_NOISE_Q_ACTION = {**_NOISE_Q, **{f"algorithm.{k}": v for k, v in NOISE_Q_ACTION.items()}}
_NOISE_Q_ACTION_FAST = {**_NOISE_Q_ACTION, "algorithm.actor_lr": 1e-3}  # noise_q_action_fast's (see its "about")
_NOISE_Q_ACTION_TD = {**_NOISE_Q_ACTION_FAST, "algorithm.q_target": "td"}  # noise_q_action_td's
_STEERED = {"policy.noise_method": "noise_steer"}  # the edge of a noise-steering method
# Each method: what the learner and the edge are given beyond the common flags. "Today's PPO settings on that
# robot" are pirl-demo's: 128 episodes per update at actor_lr 3e-5.
METHODS: dict[str, dict] = {
    "baseline": {
        "about": "today's PPO settings (pirl-demo's): 128 episodes per update, actor_lr 3e-5",
        "learner": {"trainer.episodes_per_update": 128, "trainer.eval_every": 1, "algorithm.actor_lr": 3e-5},
        "interventions": False,
    },
    "small_updates": {
        "about": "16 episodes per update (8x more frequent, smaller updates), actor_lr 3e-5",
        "learner": _SMALL,
        "interventions": False,
    },
    "interventions_bc": {
        "about": "small_updates + a scripted person takes over drifting episodes; their segments and the SFT "
        "demos are flow-matching BC data (bc_coef 0.1); updates stop early past approx KL 0.05",
        "learner": {**_SMALL, "algorithm.bc_coef": 0.1, "algorithm.target_kl": 0.05},
        "interventions": True,
    },
    "success_bc": {
        "about": "small_updates + self-imitation: the policy's own successful chunks and the SFT demos as BC data "
        "(bc_coef 1); updates stop early past approx KL 0.05",
        "learner": {**_SMALL, "algorithm.bc_coef": 1.0, "bc.successes": "true", "algorithm.target_kl": 0.05},
        "interventions": False,
    },
    "hg_dagger": {
        "about": "no PPO gradient for the actor (ppo_coef 0): it learns only from flow-matching BC on the scripted "
        "person's takeovers and the SFT demos (HG-DAgger), actor_lr 1e-4; 16 episodes per update",
        "learner": {**_SMALL, "algorithm.ppo_coef": 0.0, "algorithm.bc_coef": 1.0, "algorithm.actor_lr": 1e-4},
        "interventions": True,
    },
    "hg_dagger_rush": {
        "about": "hg_dagger, with a person who also takes over when the gripper starts closing while the arm still "
        "moves too fast (the SFT policy's usual mistake)",
        "learner": {**_SMALL, "algorithm.ppo_coef": 0.0, "algorithm.bc_coef": 1.0, "algorithm.actor_lr": 1e-4},
        "interventions": True,
        "rush": True,
    },
    "hg_dagger_successes": {
        "about": "hg_dagger + the policy's own successful chunks as BC data",
        "learner": {
            **_SMALL,
            "algorithm.ppo_coef": 0.0,
            "algorithm.bc_coef": 1.0,
            "algorithm.actor_lr": 1e-4,
            "bc.successes": "true",
        },
        "interventions": True,
    },
    "noise_steer": {
        "about": "noise-space steering (noise_method=noise_steer): the SFT flow policy stays frozen and a small head "
        "learns, with PPO, which initial noise x_1 to hand it; actor_lr 3e-4, no entropy bonus, updates stop early "
        "past approx KL 0.05; 16 episodes per update",
        "learner": {
            **_SMALL,
            "noise_method": "noise_steer",
            "algorithm.actor_lr": 3e-4,
            "algorithm.entropy_coef": 0.0,
            "algorithm.target_kl": 0.05,
        },
        "edge": _STEERED,
        "interventions": False,
    },
    "noise_steer_successes": {
        "about": "noise-space steering trained without PPO (ppo_coef 0): the steering head imitates the initial noises "
        "x_1 of the policy's own successful episodes (its NLL of them, reward-weighted regression in noise space; "
        "the newest 1024 successful macro-steps), actor_lr 1e-3, 32 gradient steps per update; 16 episodes per update",
        "learner": {
            **_SMALL,
            "noise_method": "noise_steer",
            "algorithm.ppo_coef": 0.0,
            "algorithm.bc_coef": 1.0,
            "algorithm.actor_lr": 1e-3,
            "algorithm.entropy_coef": 0.0,
            "algorithm.update_epochs": 4,
            "algorithm.num_minibatches": 8,
            "bc.successes": "true",
            "bc.batch_size": 64,
            "bc.buffer_size": 1024,
        },
        "edge": _STEERED,
        "interventions": False,
        "offline_demos": False,
    },
    "noise_q": {
        "about": "noise-space steering trained off-policy (steer_update=q, as DSRL): the SFT flow policy stays frozen; a "
        "critic Q(o, x_1) fits the return-to-go of every steered macro-step the robot ran (replay buffer), and the "
        "steering head moves toward the x_1 it scores highest, held near N(0, I) by a prior term (q_prior_coef 1); "
        "5 critics, 200 gradient steps per update, actor_lr 3e-4, no entropy bonus; 16 episodes per update",
        "learner": _NOISE_Q,
        "edge": _STEERED,
        "interventions": False,
        "offline_demos": False,
    },
    "noise_q_action": {
        "about": "noise_q with a critic over the executed chunk instead of the noise (q_critic_input=action, DSRL's "
        "noise-aliased idea): Q(o, a) fits the return-to-go, and the steering head climbs it through the frozen "
        "flow's ODE (x_1 -> chunk); otherwise as noise_q",
        "learner": _NOISE_Q_ACTION,
        "edge": _STEERED,
        "interventions": False,
        "offline_demos": False,
    },
    "noise_q_action_fast": {
        "about": "noise_q_action with the steering head's actor_lr at 1e-3 (from 3e-4): Adam moves the head's log-std "
        "by about actor_lr per step, so at 3e-4 and 200 steps per update its std falls from 1 to 0.2 in no fewer than "
        "27 updates (430 episodes), whatever the critic says; at 1e-3, in 8",
        "learner": _NOISE_Q_ACTION_FAST,
        "edge": _STEERED,
        "interventions": False,
        "offline_demos": False,
    },
    "noise_q_action_td": {
        "about": "noise_q_action_fast whose chunk critic regresses one-step TD targets (q_target=td: the reward plus "
        "the discounted value of the next observation under the current head) instead of each macro-step's "
        "return-to-go, which carries the luck of every later chunk and left the critic unable to rank chunks "
        "within a state",
        "learner": _NOISE_Q_ACTION_TD,
        "edge": _STEERED,
        "interventions": False,
        "offline_demos": False,
    },
    "noise_q_action_td3": {
        "about": "noise_q_action_td whose target sums three macro-steps' rewards before it bootstraps (q_td_steps=3), "
        "so that a person's label, two or three macro-steps after the grasp, reaches the closing chunk's target "
        "directly instead of through the values of the steps in between (which do not show the arm's speed when "
        "the gripper closed); it did not close the gap to the robot's own verdict (BENCHMARKS.md)",
        "learner": {**_NOISE_Q_ACTION_TD, "algorithm.q_td_steps": 3},
        "edge": _STEERED,
        "interventions": False,
        "offline_demos": False,
    },
    "noise_q_action_takeovers": {
        "about": "noise_q_action with the scripted person taking over a drifting policy: their takeovers join the "
        "chunk critic's replay with the actions that ran (q_interventions), so it learns what a correction was "
        "worth; the head still only steers the frozen flow's noise",
        "learner": _NOISE_Q_ACTION,
        "edge": _STEERED,
        "interventions": True,
        "offline_demos": False,
    },
    "noise_q_action_demos": {
        "about": "noise_q_action whose chunk critic starts from the SFT demos: their macro-steps (demonstrated "
        "chunks, the return of a success) join its replay before the first update (--offline_dataset under "
        "q_critic_input=action)",
        "learner": _NOISE_Q_ACTION,
        "edge": _STEERED,
        "interventions": False,
    },
    "interventions_success_bc": {
        "about": "success_bc + the scripted person's takeovers as BC data",
        "learner": {**_SMALL, "algorithm.bc_coef": 1.0, "bc.successes": "true", "algorithm.target_kl": 0.05},
        "interventions": True,
    },
}


# who judges an attempt, and what a run's directory and method name get appended for it (operator: nothing)
OUTCOMES = {"operator": "", "detector": "detector", "robot": "robot verdict"}
RUNTIMES = ("robot", "twin")
# learner flags the in-process loop (runtime=twin) takes: these two become its settings, algorithm.* its algorithm's
TWIN_LEARNER_FLAGS = ("trainer.episodes_per_update", "trainer.eval_every")


def twin_settings(method: str) -> tuple[str | None, dict, int, int]:
    """What a method's learner settings are in the in-process loop (runtime=twin): (noise_method, algorithm
    overrides, episodes per update, evaluate every this many updates). ValueError for a method it cannot run as
    the robot does: one with takeovers, BC data or offline demos, which only the learner service gets."""
    spec = METHODS[method]
    learner = spec["learner"]
    if spec["interventions"]:
        raise ValueError(f"{method}: takeovers need the robot (runtime=robot)")
    others = [
        k for k in learner if k not in TWIN_LEARNER_FLAGS and k != "noise_method" and not k.startswith("algorithm.")
    ]
    if others:
        raise ValueError(f"{method}: the in-process loop has no {', '.join(others)} (runtime=robot)")
    if offline_demo_flags(spec, Path(".")) or float(learner.get("algorithm.bc_coef", 0)) > 0:
        raise ValueError(f"{method}: the in-process loop has no BC data or offline demos (runtime=robot)")
    algorithm = {k.removeprefix("algorithm."): v for k, v in learner.items() if k.startswith("algorithm.")}
    return (
        learner.get("noise_method"),
        algorithm,
        int(learner["trainer.episodes_per_update"]),
        int(learner["trainer.eval_every"]),
    )


@dataclass
class BenchRobotConfig:
    """pirl-bench robot: episodes and robot-time to a success target on the simulated robot (see the module)."""

    # output directory: DIR/robot.json, DIR/robot.png, DIR/sft (shared SFT), DIR/<method>-s<seed>/ per run
    out: str = "outputs/bench_robot"
    # methods to run, in order (see METHODS in pirl_tools/bench_robot.py)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    # seeds: one run per method and seed (the learner's and the robot's seed)
    seeds: list[int] = field(default_factory=lambda: [0])
    # the success target
    target: float = 0.9
    # a run stops (target not reached) once the robot has run this many episodes
    max_episodes: int = 1000
    # and after this many seconds of wall time
    max_run_s: float = 2400.0
    # the simulated robot runs this many times faster than real time (lock-step physics); at 1 the edge's
    # inference has a whole 40 ms tick, as on the robot; faster, a late chunk makes the robot hold a tick
    # (counted in deadline_misses)
    speedup: float = 1.0
    # deterministic evaluation episodes per evaluation
    eval_episodes: int = 200
    # scripted demonstrations for SFT
    num_demos: int = 10
    # SFT steps (1000: deterministic success 0.555 with the 10 demos, see pirl-demo)
    sft_steps: int = 1000
    # when the scripted person takes over (interventions methods): this many seconds of robot time into an
    # episode, if the gripper is still farther than 3 cm from the cube
    intervene_after_s: float = 1.0
    # ticks between the observation a chunk is decided from and the chunk's first action: the edge asks for the
    # next chunk this many ticks before the current one runs out (--control.lead_ticks; its inference has that
    # long), and the learner's twin evaluation delays its observations as much (obs_delay_ticks)
    decision_delay_ticks: int = DECISION_DELAY_TICKS
    # the scripted person's reaction time before a label, seconds of robot time
    reaction_s: float = 0.3
    # the edge's allowance for the person's reaction (--episode.label_reaction_s), seconds of robot time: their
    # label then ends an episode's records at the macro-step that ran this long before it (outcome=operator only;
    # 0: where the label was given, as before)
    label_reaction_s: float = 0.0
    # who judges the outcomes: 'operator' (the scripted person's labels), 'detector' (a success detector at
    # detector_path, the only success signal: the person then only takes over; the robot gets its 64x64 camera) or
    # 'robot' (the simulated robot's own verdict at the tick the gripper closes: the simulator's reward, a control
    # that shows what the person's labels cost)
    outcome: str = "operator"
    # a pirl-success train output (outcome=detector), trained on the simulated robot's 64x64 `front` camera
    detector_path: str | None = None
    # where each run happens: 'robot' (pirl-learner and one pirl-edge driving the simulated robot, as processes) or
    # 'twin' (the method's learner settings in one process on copies of the robot's delayed twin, run_pirl, on one
    # CPU thread: no edge, no network, no person; the twin's verdict ends each attempt, so outcome is not used)
    runtime: str = "robot"

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown or '(none given)'}; choose from {list(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one")
        if not 0 < self.target <= 1:
            raise ValueError(f"target: must be in (0, 1] (got {self.target})")
        require(
            self,
            "",
            at_least={
                **dict.fromkeys(("max_episodes", "eval_episodes", "num_demos", "sft_steps", "decision_delay_ticks"), 1),
                "reaction_s": 0,
                "label_reaction_s": 0,
            },
            above={"max_run_s": 0, "speedup": 0, "intervene_after_s": 0},
        )
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome: must be one of {list(OUTCOMES)} (got {self.outcome!r})")
        if (self.outcome == "detector") != (self.detector_path is not None):
            raise ValueError("detector_path: give it exactly when outcome=detector (a pirl-success train output)")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime: must be one of {list(RUNTIMES)} (got {self.runtime!r})")
        if self.runtime == "twin":
            if self.outcome != "operator":
                raise ValueError(f"outcome={self.outcome}: runtime=twin has no person or detector (the twin judges)")
            for method in self.methods:
                try:
                    twin_settings(method)
                except ValueError as e:
                    raise ValueError(f"methods: runtime=twin cannot run {e}") from None


def _scrape(port: int) -> dict[str, float]:
    """The edge's counters that matter here, from its /metrics (summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = {"pirl_edge_ticks": "ticks", "pirl_edge_episodes": "episodes", "pirl_edge_interventions": "interventions"}
    out = dict.fromkeys([*want.values(), "successes"], 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in want:
            out[want[family.name]] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        if family.name == "pirl_edge_episodes":  # the episodes the outcome source called a success
            out["successes"] = sum(
                s.value for s in family.samples if s.name.endswith("_total") and s.labels.get("reason") == "success"
            )
    return out


def decision_delay_flags(ticks: int) -> tuple[list[str], list[str]]:
    """pirl-edge and pirl-learner flags for a robot whose chunks are decided ``ticks`` ticks before they run: the
    edge asks for the next chunk that early (its inference has that long; a fixed lead, not one from measured
    latencies, so the delay does not depend on how busy the machine is), and the learner's twin evaluation
    delays its observations as much, so it scores the policy in the conditions it acts in on the robot."""
    return [f"--control.lead_ticks={ticks}"], [f"--trainer.eval_env_kwargs={{obs_delay_ticks: {ticks}}}"]


def workspace_bounds_flags() -> list[str]:
    """pirl-edge flags that bound the simulated robot's safety layer to its workspace (the gantry's reach and the
    gripper's range), as a team sets a real arm's: without them the layer takes the SFT demos' action min / max
    (+10%), and 10 demos do not span the cube's range, so the robot could not reach some cubes (measured: 0.905 ->
    0.815 on the twin under those bounds) and its twin, clipped only to the workspace, would not be its twin."""
    from lerobot_robot_pirl_sim.physics import TaskParams

    low, high = TaskParams().action_low.tolist(), TaskParams().action_high.tolist()
    return [f"--safety.action_min={low}", f"--safety.action_max={high}"]


def offline_demo_flags(spec: dict, demos: Path) -> list[str]:
    """pirl-learner flags that give a method the SFT demos (the LeRobotDataset at ``demos``) as offline data, where
    its learner settings use them (the BC term, bc_coef > 0, or a chunk critic's replay) and the method does not
    leave them out (``offline_demos``)."""
    learner = spec["learner"]
    chunk_critic = learner.get("algorithm.steer_update") == "q" and learner.get("algorithm.q_critic_input") == "action"
    if not spec.get("offline_demos", True) or not (float(learner.get("algorithm.bc_coef", 0)) > 0 or chunk_critic):
        return []
    from lerobot_robot_pirl_sim.demos import REPO_ID

    return [f"--offline_dataset.root={demos}", f"--offline_dataset.repo_id={REPO_ID}"]


def _run(cfg: BenchRobotConfig, method: str, seed: int, ckpt: Path, demos: Path, pki, signals: Signals) -> dict:
    spec = METHODS[method]
    out = Path(cfg.out) / f"{method}-s{seed}{'' if cfg.outcome == 'operator' else '-' + cfg.outcome}"
    backdated = cfg.outcome == "operator" and cfg.label_reaction_s > 0
    if backdated:
        out = out.with_name(f"{out.name}-backdated")
    shutil.rmtree(out, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    procs = Procs(out / "logs")
    metrics_port, operator_port = free_port(), free_port()
    learner_flags = [f"--{k}={v}" for k, v in spec["learner"].items()] + offline_demo_flags(spec, demos)
    started = time.monotonic()
    curve: list[dict] = []
    try:
        procs.start(
            "learner",
            [
                bin_path("pirl-learner"),
                f"--policy_path={ckpt}",
                f"--output_dir={out / 'learner'}",
                "--server.address=127.0.0.1:0",
                f"--server.port_file={out / 'learner.port'}",
                f"--tokens={pki['tokens']}",
                f"--server.tls_cert={pki['server_cert']}",
                f"--server.tls_key={pki['server_key']}",
                f"--trainer.eval_episodes={cfg.eval_episodes}",
                "--trainer.eval_env=pirl_sim",
                "--trainer.require_outcome=true",
                *decision_delay_flags(cfg.decision_delay_ticks)[1],
                f"--seed={seed}",
                *learner_flags,
            ],
            nice=10,
        )
        port = wait_for_file(out / "learner.port", procs, "learner", timeout=120)
        edge = [
            bin_path("pirl-edge"),
            f"--link.learner=127.0.0.1:{port}",
            f"--link.robot_id={ROBOT_ID}",
            f"--link.tokens={pki['tokens']}",
            f"--link.tls_ca={pki['ca_cert']}",
            f"--policy.path={ckpt}",
            "--policy.backend=torch",
            f"--control.hz={ROBOT_HZ * cfg.speedup}",
            *decision_delay_flags(cfg.decision_delay_ticks)[0],
            *workspace_bounds_flags(),
            "--robot.type=pirl_sim",
            "--robot.id=sim0",
            "--robot.cameras={}" if cfg.outcome != "detector" else f"--robot.cameras={DETECTOR_CAMERA}",
            "--robot.realtime=false",
            f"--robot.seed={seed + 1}",
            f"--robot.operator_port={operator_port}",
            f"--robot.operator_reaction_s={cfg.reaction_s}",
            f"--robot.operator_seed={seed}",
            "--episode.start=delay",
            "--episode.start_delay_s=0",
            f"--episode.outcome={cfg.outcome}",
            f"--episode.label_reaction_s={cfg.label_reaction_s / cfg.speedup if backdated else 0.0}",
            # 60 ticks (2.4 s of robot time): the robot's own step limit (max_episode_steps, 60 as the twin's) ends
            # an attempt that never closes the gripper; this ends one whose close nobody judged (a silent detector)
            f"--episode.time_limit_s={60 / (ROBOT_HZ * cfg.speedup)}",
            f"--safety.estop_port={operator_port}",
            "--dataset.enabled=false",
            f"--metrics.port={metrics_port}",
            f"--spool.dir={out / 'spool'}",
            f"--stats_file={out / 'edge_stats.json'}",
            f"--seed={seed + 2}",
            *(f"--{k}={v}" for k, v in spec.get("edge", {}).items()),
        ]
        if cfg.outcome == "detector":
            edge.append(f"--detector.path={cfg.detector_path}")
        if cfg.outcome != "operator":  # the person only takes over (where the method has takeovers)
            edge.append("--robot.operator_labels=false")
        if spec["interventions"]:
            edge += [
                "--teleop.type=pirl_sim_expert",
                "--teleop.id=sim0",
                f"--robot.operator_intervene_after_s={cfg.intervene_after_s}",
            ]
            if spec.get("rush"):
                edge.append("--robot.operator_intervene_on_rush=true")
        procs.start(ROBOT_ID, edge)
        status_path = out / "learner" / "status.json"
        seen, last_print, robot = 0, 0.0, {"ticks": 0.0, "episodes": 0.0, "interventions": 0.0, "successes": 0.0}
        before = (0.0, 0.0)  # the robot's episodes and successes at the previous evaluation
        while True:
            signals.raise_if_received()
            for name in ("learner", ROBOT_ID):
                procs.check_alive(name)
            with contextlib.suppress(OSError):  # the edge is still starting
                robot = _scrape(metrics_port)
            status = json.loads(status_path.read_text()) if status_path.is_file() else {}
            evals = status.get("eval_curve", [])
            for version, _steps, success in evals[seen:]:
                ran = robot["episodes"] - before[0]
                # the robot's own success rate (by its outcome source) over its episodes since the last evaluation:
                # the policy as it ran there (its steering noise included), a check on the twin's figure
                on_robot = round((robot["successes"] - before[1]) / ran, 3) if ran else None
                before = (robot["episodes"], robot["successes"])
                curve.append(
                    {
                        "version": version,
                        "success": success,
                        "robot_success": on_robot,
                        "episodes": int(robot["episodes"]),
                        "robot_seconds": round(robot["ticks"] / ROBOT_HZ, 1),
                        "interventions": int(robot["interventions"]),
                        "wall_s": round(time.monotonic() - started, 1),
                    }
                )
            seen = len(evals)
            if time.monotonic() - last_print > 10 and curve:
                c = curve[-1]
                print(
                    f"  [{method} s{seed} {time.monotonic() - started:5.0f}s] robot {int(robot['episodes'])} episodes "
                    f"{robot['ticks'] / ROBOT_HZ / 60:.1f} robot-min, {int(robot['interventions'])} takeovers; "
                    f"v{c['version']} success {c['success']:.3f}",
                    flush=True,
                )
                last_print = time.monotonic()
            if curve and curve[-1]["success"] >= cfg.target:
                break
            if robot["episodes"] >= cfg.max_episodes or time.monotonic() - started > cfg.max_run_s:
                break
            time.sleep(0.5)
    finally:
        signals.hold()
        procs.stop_all(order=((ROBOT_ID,), ("learner",)), timeout=30)
        signals.unhold()
    signals.raise_if_received()
    reached = next((c for c in curve if c["success"] >= cfg.target), None)
    edge_stats = json.loads((out / "edge_stats.json").read_text()) if (out / "edge_stats.json").is_file() else {}
    replay = _twin_replay(out / "learner" / "wal", ckpt, cfg.decision_delay_ticks)
    return {
        "method": _label(method, cfg),
        "about": spec["about"],
        "runtime": "robot",
        "outcome": cfg.outcome,
        "label_reaction_s": cfg.label_reaction_s if backdated else 0.0,
        "steps_after_label": edge_stats.get("steps_after_label"),
        "seed": seed,
        "decision_delay_ticks": cfg.decision_delay_ticks,
        "sft_success": curve[0]["success"] if curve else None,
        "final_success": curve[-1]["success"] if curve else None,
        "best_success": max((c["success"] for c in curve), default=None),
        "episodes_to_target": reached["episodes"] if reached else None,
        "robot_seconds_to_target": reached["robot_seconds"] if reached else None,
        "interventions": int(robot["interventions"]),
        "episodes": int(robot["episodes"]),
        "robot_seconds": round(robot["ticks"] / ROBOT_HZ, 1),
        "labels": edge_stats.get("labels"),
        # ticks the robot held because a chunk came late (its twin never holds)
        "deadline_misses": edge_stats.get("deadline_misses"),
        # the robot's last recorded episodes replayed on the twin (pirl_tools.robot_replay)
        "twin_replay": replay,
        "wall_s": round(time.monotonic() - started, 1),
        "curve": curve,
    }


def _label(method: str, cfg: BenchRobotConfig) -> str:
    """A robot run's method as robot.json names it: who judged, and whether the person's labels were back-dated."""
    if cfg.outcome != "operator":
        return f"{method} ({OUTCOMES[cfg.outcome]})"
    if cfg.label_reaction_s > 0:
        return f"{method} (labels back-dated {cfg.label_reaction_s:g} s)"
    return method


def _twin_replay(wal: Path, ckpt: Path, delay: int) -> dict:
    """The robot's episodes still in the learner's write-ahead log, replayed on the twin (pirl_tools.robot_replay):
    whether the records are what the twin makes of the same start and chunks. Printed; a replay that cannot run
    (no log left) is reported as such, not raised: the run's own figures stand."""
    from pirl_tools.robot_replay import OBS_TOLERANCE, replay_on_twin

    try:
        r = replay_on_twin(wal, ckpt, delay).as_dict()
    except (OSError, ValueError) as e:
        print(f"   twin replay of the robot's records: not run ({e})", flush=True)
        return {"error": str(e)}
    if not r["episodes"]:
        print("   twin replay of the robot's records: no complete episode left in the learner's log", flush=True)
        return r
    same = r["max_obs_diff"] <= OBS_TOLERANCE
    print(
        f"   twin replay of the robot's last {r['episodes']} episodes: observations "
        f"{'reproduced' if same else 'DIFFER'} (max difference {r['max_obs_diff']}), {r['outcomes_agree']} outcomes "
        f"agree with the twin's verdict; {r['steps_after_close']} of {r['macro_steps']} macro-steps ran after the close",
        flush=True,
    )
    return r


def _run_twin(cfg: BenchRobotConfig, method: str, seed: int, ckpt: Path) -> dict:
    """One (method, seed) run in one process (runtime=twin): run_pirl with the method's learner settings from the
    same SFT, on its episodes per update as copies of the robot's twin with the robot's decision delay, scored by
    the same evaluation as the learner's (its episodes, its noise); the result in the robot runs' shape.
    Episodes and robot-time are the twin's: every episode counted, env steps / 25 Hz."""
    import math

    import lerobot_robot_pirl_sim  # noqa: F401  (registers the pirl_sim vector env)
    import torch

    from lerobot_policy_pi_rl.learn import LearnSettings, run_pirl
    from lerobot_policy_pi_rl.presets import builtin_task_algorithm_config
    from lerobot_policy_pi_rl.sft import load_policy

    noise_method, algorithm, per_update, eval_every = twin_settings(method)
    out = Path(cfg.out) / f"{method}-s{seed}-twin"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # one thread: the figures do not depend on the machine's core count, and runs pinned side by side (taskset)
    # do not contend; the learner service's own threads are not what this compares
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.monotonic()
    try:
        policy, pre, post = load_policy(ckpt, **({"noise_method": noise_method} if noise_method else {}))
        settings = LearnSettings(
            iterations=math.ceil(cfg.max_episodes / per_update),
            num_envs=per_update,
            eval_every=eval_every,
            eval_episodes=cfg.eval_episodes,
            seed=seed,
            target_success=cfg.target,
            time_limit_s=cfg.max_run_s,
            env="pirl_sim",
            env_kwargs={"obs_delay_ticks": cfg.decision_delay_ticks},
        )
        result = run_pirl(
            policy,
            pre,
            post,
            builtin_task_algorithm_config(**algorithm),
            settings,
            progress=lambda line: print(f"  [{method} (twin) s{seed}]{line}", flush=True),
        )
    finally:
        torch.set_num_threads(threads)
    write_json(out / "history.json", result.history)
    curve = [{"version": 0, "success": result.sft_success, "robot_success": None, "episodes": 0, "robot_seconds": 0.0}]
    rollouts: list[float] = []  # the rollouts' own success since the last evaluation (the robot's robot_success)
    for row in result.history:
        rollouts.append(row["rollout_success"])
        if "eval_success" in row:
            curve.append(
                {
                    "version": row["update"],
                    "success": row["eval_success"],
                    "robot_success": round(sum(rollouts) / len(rollouts), 3),
                    "episodes": row["update"] * per_update,
                    "robot_seconds": round(row["env_steps"] / ROBOT_HZ, 1),
                }
            )
            rollouts = []
    reached = next((c for c in curve if c["success"] >= cfg.target), None)
    return {
        "method": f"{method} (twin)",
        "about": METHODS[method]["about"],
        "runtime": "twin",
        "outcome": "twin",
        "seed": seed,
        "decision_delay_ticks": cfg.decision_delay_ticks,
        "sft_success": result.sft_success,
        "final_success": result.final_success,
        "best_success": result.best_success,
        "episodes_to_target": reached["episodes"] if reached else None,
        "robot_seconds_to_target": reached["robot_seconds"] if reached else None,
        "interventions": 0,
        "episodes": result.updates * per_update,
        "robot_seconds": round(result.env_steps / ROBOT_HZ, 1),
        "labels": None,
        "deadline_misses": None,
        "wall_s": round(time.monotonic() - started, 1),
        "curve": curve,
    }


def _sft_success_by_noise_std(ckpt: Path, episodes: int, cache: Path, delay: int) -> dict[str, float]:
    """The SFT policy's deterministic success with its initial noise x_1 ~ N(0, std^2 I), on the learner's
    evaluation episodes with the robot's decision delay: the baseline a noise-steering method has to beat, since
    shrinking the noise alone (no learning) moves a few-shot flow policy toward its mode. Cached beside the SFT
    checkpoint, per number of evaluation episodes and delay (a cache scored otherwise is scored again)."""
    import lerobot_robot_pirl_sim  # noqa: F401  (registers the pirl_sim vector env)

    from learner.trainer import make_evaluator  # the learner's own evaluation: same episodes, same noise
    from lerobot_policy_pi_rl.sft import load_policy

    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("eval_episodes") == episodes and saved.get("obs_delay_ticks", 0) == delay:
            return saved["success"]
    policy, pre, post = load_policy(ckpt, noise_method="noise_steer")
    evaluate = make_evaluator(
        pre, post, episodes, policy_config=policy.config, env_name="pirl_sim", env_kwargs={"obs_delay_ticks": delay}
    )
    scores = success_by_noise_std(policy, evaluate)
    evaluate.env.close()
    write_json(cache, {"eval_episodes": episodes, "obs_delay_ticks": delay, "success": scores})
    return scores


# random initial-noise draws per evaluation episode for the SFT's noise oracle (_sft_noise_oracle)
ORACLE_DRAWS = 16


def _sft_noise_oracle(ckpt: Path, episodes: int, cache: Path, delay: int) -> dict:
    """How far steering the frozen SFT policy's initial noise could go, at best, on the learner's evaluation
    episodes (with the robot's decision delay): each episode run with ORACLE_DRAWS random noises x_1 ~ N(0, I),
    and the share of episodes at least one draw solves (`any_draw`). A noise-steering method picks one x_1 per
    chunk from what it has learned, not the best of many per episode in hindsight, so it stays below that; and
    `failing_at_0.05` counts the episodes the tempered SFT (std 0.05) fails, with how often a random draw solves
    them (`their_success_per_draw`): what the steering head must find in those states. Cached beside the SFT."""
    import math

    import lerobot_robot_pirl_sim  # noqa: F401  (registers the pirl_sim vector env)
    import torch

    from learner.trainer import make_evaluator
    from lerobot_policy_pi_rl.rollout import PolicyRunner, episode_successes
    from lerobot_policy_pi_rl.sft import load_policy

    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("eval_episodes") == episodes and saved.get("obs_delay_ticks") == delay:
            return saved
    policy, pre, post = load_policy(ckpt, noise_method="noise_steer")
    evaluate = make_evaluator(
        pre, post, episodes, policy_config=policy.config, env_name="pirl_sim", env_kwargs={"obs_delay_ticks": delay}
    )
    env, seed = evaluate.env, evaluate.seed  # the learner's evaluation episodes
    runner = PolicyRunner.for_env(policy, pre, post, env)

    def at(std: float, noise_seed: int) -> torch.Tensor:
        with torch.no_grad():
            policy.steer_head.log_std.fill_(math.log(std))
            return episode_successes(runner, env, episodes=episodes, seed=seed, noise_seed=noise_seed)

    tempered = at(0.05, seed)
    draws = torch.stack([at(1.0, seed + 1 + k) for k in range(ORACLE_DRAWS)]).float()
    env.close()
    failing = ~tempered
    result = {
        "eval_episodes": episodes,
        "obs_delay_ticks": delay,
        "draws": ORACLE_DRAWS,
        "success_per_draw": round(float(draws.mean()), 4),
        "any_draw": round(float(draws.max(dim=0).values.mean()), 4),
        "tempered_success": round(float(tempered.float().mean()), 4),
        "failing_at_0.05": int(failing.sum()),
        "their_success_per_draw": round(float(draws[:, failing].mean()), 4) if failing.any() else None,
        "their_any_draw": round(float(draws[:, failing].max(dim=0).values.mean()), 4) if failing.any() else None,
    }
    write_json(cache, result)
    return result


def run(cfg: BenchRobotConfig, command: str) -> int:
    from lerobot_policy_pi_rl.presets import builtin_policy_overrides
    from pirl.security import make_dev_pki
    from pirl_tools.common import plot_curves, sft_checkpoint

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print("== few-shot SFT (shared by every run)", flush=True)
    ckpt = sft_checkpoint(
        out / "sft",
        seed=0,
        num_demos=cfg.num_demos,
        steps=cfg.sft_steps,
        noise_std=0.02,
        policy_overrides=builtin_policy_overrides("mlp"),
        task="sim",
    )
    pki = make_dev_pki(out / "certs", [ROBOT_ID]) if cfg.runtime == "robot" else None
    by_noise = _sft_success_by_noise_std(
        ckpt, cfg.eval_episodes, out / "sft" / "success_by_noise_std.json", cfg.decision_delay_ticks
    )
    oracle = _sft_noise_oracle(ckpt, cfg.eval_episodes, out / "sft" / "noise_oracle.json", cfg.decision_delay_ticks)
    print(
        f"   SFT noise oracle: {oracle['any_draw']} of the evaluation episodes solved by at least one of "
        f"{oracle['draws']} random initial noises (one draw: {oracle['success_per_draw']})",
        flush=True,
    )
    print(f"   SFT success by the std of its initial noise x_1 (1: as trained): {by_noise}", flush=True)
    runs = []
    with Signals("pirl-bench robot") as signals:
        for method in cfg.methods:
            for seed in cfg.seeds:
                where = "" if cfg.runtime == "robot" else ", in one process on the robot's twin"
                print(f"== {method} (seed {seed}{where}): {METHODS[method]['about']}", flush=True)
                if cfg.runtime == "twin":
                    runs.append(_run_twin(cfg, method, seed, ckpt))
                else:
                    runs.append(_run(cfg, method, seed, ckpt, out / "sft" / "data", pki, signals))
                r = runs[-1]
                print(
                    f"   {method} s{seed}: SFT {r['sft_success']} -> {r['final_success']} after {r['episodes']} "
                    f"episodes ({r['robot_seconds'] / 3600:.2f} robot-h); to {cfg.target}: "
                    f"{r['episodes_to_target']} episodes, {r['robot_seconds_to_target']} robot-s",
                    flush=True,
                )
                report = {
                    "target": cfg.target,
                    "command": command,
                    "config": asdict(cfg),
                    "machine": f"{platform.machine()} {platform.processor()}, Python {platform.python_version()}",
                    "date": time.strftime("%Y-%m-%d"),
                    "sft_success_by_noise_std": by_noise,
                    "sft_noise_oracle": oracle,
                    "runs": runs,
                }
                write_json(out / "robot.json", report)
    plot_curves(
        out / "robot.png",
        [
            {"label": r["method"], "curve": [(c["episodes"], c["success"]) for c in r["curve"]]}
            for r in runs
            if r["curve"]
        ],
        f"pirl-bench robot: one simulated robot, scripted operator (target {cfg.target})"
        if cfg.runtime == "robot"
        else f"pirl-bench robot --runtime=twin: in one process on the robot's twin (target {cfg.target})",
        xlabel="robot episodes",
        target=cfg.target,
    )
    print(f"wrote {out / 'robot.json'} and {out / 'robot.png'}")
    return 0


def main() -> None:
    import sys

    cfg = parse_config(BenchRobotConfig, prog="pirl-bench robot", args=sys.argv[1:])
    run_cli(lambda: run(cfg, "pirl-bench robot " + " ".join(sys.argv[1:])))
