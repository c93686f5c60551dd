"""pirl-bench schedule: a paced edge whose inference takes as long as a real VLA's, across policy swaps.

    pirl-bench schedule --out=DIR --latency_ms=60 --control_hz=50 --swaps=10
    pirl-bench schedule --out=DIR --latency_ms=150 --control_hz=30

The edge's own control path (edge.control.PacedLoop, edge.inference.InferenceWorker, edge.control.RecordWriter
and the spool) drives the built-in task at ``control_hz``. The inference backend is the real sampler with a
test double on top that sleeps until ``latency_ms`` (plus uniform jitter) has passed since the call began, so
every chunk takes as long as a real-size VLA's would on a robot's GPU. While the loop runs, ``swaps`` new
policy versions (the trained tensors perturbed, as an update would) are offered from a lower-priority thread,
as the edge's subscriber does. Afterwards every spooled record is replayed by the policy of its version (the
learner's re-evaluation of the recorded chain from the recorded decision observation) and the ratio
exp(log_prob_replayed - log_prob_recorded) is compared with 1.

Writes DIR/schedule.json: ``deadline_miss_ratio``, ``ticks``, ``swaps``, the lead the loop settled on,
``replay_max_abs_ratio_minus_1`` and the settings; with ``baseline`` (default) the same run with the one-tick
schedule the edge had before, side by side, under ``baseline_one_tick``.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pirl.cli import require, write_json
from pirl_tools.common import run_report


@dataclass
class BenchScheduleConfig:
    # output directory: DIR/schedule.json (and DIR/spool, the records it replays)
    out: str = ""
    # how long one chunk's inference takes, milliseconds (the real sampler runs, then a sleep fills the rest)
    latency_ms: float = 60.0
    # uniform jitter on that latency, as a fraction of it (0.1: each call takes 0.9x to 1.1x latency_ms)
    jitter: float = 0.1
    # control rate of the paced loop, Hz
    control_hz: float = 50.0
    # policy versions swapped in while the loop runs (evenly spread over duration_s)
    swaps: int = 10
    # seconds of paced control
    duration_s: float = 60.0
    # actions executed per chunk (the policy's n_action_steps; its chunk_size is at least this). A chunk must
    # last longer than the latency: 8 actions are 160 ms at 50 Hz and 267 ms at 30 Hz
    n_action_steps: int = 8
    # the lead: None measures it (edge/chunk_schedule.py); a number fixes it (1: today's one-tick schedule)
    lead_ticks: int | None = None
    # percentile of recent latencies, plus lead_margin_ms, that sets the measured lead
    lead_percentile: float = 99.0
    # milliseconds added to that percentile
    lead_margin_ms: float = 5.0
    # seed of the policy's initialisation, the sampler's noise, the versions and the jitter
    seed: int = 0
    # also run the one-tick schedule (lead_ticks=1: the next chunk asked for at the current one's last tick)
    # side by side, as the baseline ("baseline_one_tick" in the JSON)
    baseline: bool = True

    def __post_init__(self):
        if not self.out:
            raise ValueError("out: required (the output directory)")
        require(
            self,
            at_least={"swaps": 0, "n_action_steps": 1, "lead_ticks": 1, "lead_margin_ms": 0, "jitter": 0},
            above={"latency_ms": 0, "control_hz": 0, "duration_s": 0},
        )
        if self.jitter >= 1:
            raise ValueError(f"jitter: must be below 1 (got {self.jitter})")
        if not 0 < self.lead_percentile <= 100:
            raise ValueError(f"lead_percentile: must be in (0, 100] (got {self.lead_percentile})")


class SleepingBackend:
    """A test double over a real inference backend: sample() runs it, then sleeps until the call has taken
    ``latency_s`` (times 1 +- jitter). Everything else is the wrapped backend's (prepare, spare, name)."""

    def __init__(self, inner, latency_s: float, jitter: float, rng: np.random.Generator):
        self.inner, self.latency_s, self.jitter, self.rng = inner, latency_s, jitter, rng
        self._lock = threading.Lock()

    def sample(self, *args, **kwargs):
        started = time.perf_counter()
        out = self.inner.sample(*args, **kwargs)
        with self._lock:
            target = self.latency_s * (1.0 + self.jitter * float(self.rng.uniform(-1.0, 1.0)))
        left = target - (time.perf_counter() - started)
        if left > 0:
            time.sleep(left)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _policy(cfg: BenchScheduleConfig):
    """The default pi_rl policy for the built-in task's shapes, freshly initialised."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_pre_post_processors

    from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
    from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy
    from lerobot_policy_pi_rl.sft import dataset_features

    feats = dataset_features("state", 32)  # the built-in task: state 6, action 3
    state, action = tuple(feats["observation.state"]["shape"]), tuple(feats["action"]["shape"])
    torch.manual_seed(cfg.seed)
    pcfg = PiRLConfig(
        device="cpu",
        push_to_hub=False,
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, state)},
        output_features={"action": PolicyFeature(FeatureType.ACTION, action)},
        chunk_size=max(8, cfg.n_action_steps),
        n_action_steps=cfg.n_action_steps,
    )
    policy = PiRLPolicy(pcfg).eval()
    # the built-in task ends an episode at the first grasp (action[2] > 0): a grasp action centred well
    # below 0 keeps the untrained policy's episodes to their full length, so the loop mostly ticks
    grasp_low = torch.zeros(action)
    grasp_low[-1] = -1.5
    stats = {
        "observation.state": {"mean": torch.zeros(state), "std": torch.ones(state)},
        "action": {"mean": grasp_low, "std": torch.full(action, 0.5)},
    }
    pre, post = make_pre_post_processors(pcfg, dataset_stats=stats)
    return policy, pre, post


def _versions(policy, swaps: int, seed: int) -> dict[int, dict]:
    """Version -> the trained tensors (rl_state_dict) an update would publish: small random steps."""
    import torch

    learner = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(seed + 1)
    out = {0: {k: v.clone() for k, v in learner.rl_state_dict().items()}}
    for v in range(1, swaps + 1):
        with torch.no_grad():
            for p in learner.rl_actor_parameters() + learner.rl_critic_parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        out[v] = {k: t.clone() for k, t in learner.rl_state_dict().items()}
    return out


def replay_ratios(policy, versions: dict[int, dict], records: list) -> np.ndarray:
    """exp(replayed - recorded log-prob) of every record, each replayed by the policy of its version."""
    import torch

    from pirl.codec import from_tensor_msg

    replay = copy.deepcopy(policy).eval()
    ratios = []
    for v in sorted({r.policy_version for r in records}):
        replay.load_state_dict(versions[v], strict=False)
        batch = [r for r in records if r.policy_version == v]
        obs = {
            k: torch.from_numpy(np.stack([from_tensor_msg(r.observation[k]) for r in batch]))
            for k in batch[0].observation
        }
        with torch.no_grad():
            ev = replay.evaluate_chains(
                obs,
                torch.from_numpy(np.stack([from_tensor_msg(r.chain) for r in batch])),
                torch.from_numpy(np.stack([from_tensor_msg(r.stochastic) for r in batch])),
                noise_level=torch.tensor([r.noise_level for r in batch]),
            )
        recorded = torch.tensor([r.log_prob for r in batch], dtype=torch.float64)
        ratios.append(torch.exp(ev.log_prob.double() - recorded).numpy())
    return np.concatenate(ratios) if ratios else np.zeros(0)


def measure(cfg: BenchScheduleConfig, lead_ticks: int | None, spool_dir: Path) -> dict:
    """One paced run with the lead measured (``lead_ticks`` None) or fixed; its figures."""
    import shutil

    import torch

    from edge.chunk_schedule import LeadTime
    from edge.control import LoopStats, PacedLoop, RecordWriter
    from edge.inference import InferenceWorker
    from edge.link import lower_thread_priority
    from edge.spool import Spool
    from lerobot_policy_pi_rl.envs.reach_grasp import ReachGraspVecEnv
    from pirl.v1 import pirl_pb2

    # what pirl-edge sets for its process (edge/main.py): one torch thread, a short GIL switch interval
    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)
    policy, pre, post = _policy(cfg)
    versions = _versions(policy, cfg.swaps, cfg.seed)
    worker = InferenceWorker(policy, pre, post, robot_id="schedule", backend="torch", seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    worker._active_backend = SleepingBackend(worker._active_backend, cfg.latency_ms / 1e3, cfg.jitter, rng)
    worker._spare_backend = SleepingBackend(worker._spare_backend, cfg.latency_ms / 1e3, cfg.jitter, rng)
    if spool_dir.exists():  # a rerun replays its own records only
        shutil.rmtree(spool_dir)
    stats = LoopStats()
    spool = Spool(spool_dir, fsync=True)  # as a paced edge keeps it
    writer = RecordWriter(spool, "schedule", stats)
    lead = LeadTime(
        1.0 / cfg.control_hz,
        fixed_ticks=lead_ticks,
        percentile=cfg.lead_percentile,
        margin_s=cfg.lead_margin_ms / 1e3,
    )
    env = ReachGraspVecEnv(1, autoreset=False)
    loop = PacedLoop(env, worker, writer, robot_id="schedule", control_hz=cfg.control_hz, seed=cfg.seed, lead=lead)
    stop = threading.Event()
    offered: list[dict] = []

    def subscriber():  # what edge.link.Subscriber does with each new version, spread over the run
        lower_thread_priority()
        for v in range(1, cfg.swaps + 1):
            if stop.wait(cfg.duration_s / (cfg.swaps + 1)):
                return
            t0 = time.perf_counter()
            ok = worker.offer(v, versions[v], frozen_sha256=worker.frozen_sha256)
            offered.append({"version": v, "accepted": ok, "offer_seconds": round(time.perf_counter() - t0, 4)})

    worker.start()
    feeder = threading.Thread(target=subscriber, name="pirl-subscriber", daemon=True)
    feeder.start()
    started = time.perf_counter()
    loop.run(stop, duration_s=cfg.duration_s)
    seconds = time.perf_counter() - started
    stop.set()
    feeder.join(timeout=30)
    worker.stop()
    writer.close()
    env.close()

    records = []
    for _seq, blob in spool.pending():
        r = pirl_pb2.RolloutRecord()
        r.ParseFromString(blob)
        records.append(r)
    spool.close()
    ratios = replay_ratios(policy, versions, records)
    s = stats.summary()
    history = np.asarray(lead.history)
    return {
        "lead": "measured" if lead_ticks is None else f"fixed at {lead_ticks} tick(s)",
        "deadline_miss_ratio": s["deadline_miss_ratio"],
        "ticks": s["ticks"],
        "swaps": len(worker.swap_times),
        "deadline_misses": s["deadline_misses"],
        "late_ticks": s["late_ticks"],
        "starved_ticks": s["starved_ticks"],
        "control_seconds": round(seconds, 3),
        "episodes": s["episodes"],
        "reset_wait_s": round(s["reset_wait_s"], 3),
        "records": len(records),
        "record_versions": sorted({r.policy_version for r in records}),
        "replay_max_abs_ratio_minus_1": float(np.abs(ratios - 1.0).max()) if ratios.size else None,
        "lead_ticks_final": lead.ticks(cfg.n_action_steps),
        "lead_ticks_seen": sorted({min(int(x), cfg.n_action_steps) for x in history}) if history.size else [],
        "inference_budget_ms_final": round(1e3 * lead.budget_s(), 2),
        "tick_interval_ms_p50": s.get("tick_interval_ms_p50"),
        "tick_interval_ms_p99": s.get("tick_interval_ms_p99"),
        "versions_offered": offered,
    }


def run(cfg: BenchScheduleConfig, command: str) -> int:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"pirl-bench schedule: {cfg.duration_s:.0f}s at {cfg.control_hz:g} Hz, inference {cfg.latency_ms:g} ms "
        f"(+-{100 * cfg.jitter:.0f}%), {cfg.n_action_steps} actions per chunk, {cfg.swaps} swaps",
        flush=True,
    )
    result = {**run_report(command), **measure(cfg, cfg.lead_ticks, out / "spool")}
    _say(result, out)
    if cfg.baseline and cfg.lead_ticks != 1:
        # side by side, in the same process and conditions: the schedule the edge had before (ask at the
        # chunk's last tick, one tick period for inference)
        base = measure(cfg, 1, out / "spool_one_tick")
        _say(base, out)
        result["baseline_one_tick"] = base
    result["settings"] = {
        "latency_ms": cfg.latency_ms,
        "jitter": cfg.jitter,
        "control_hz": cfg.control_hz,
        "duration_s": cfg.duration_s,
        "n_action_steps": cfg.n_action_steps,
        "lead_ticks": cfg.lead_ticks,
        "lead_percentile": cfg.lead_percentile,
        "lead_margin_ms": cfg.lead_margin_ms,
        "seed": cfg.seed,
        "backend": "the torch sampler of the built-in task's pi_rl policy, then a sleep to latency_ms",
    }
    write_json(out / "schedule.json", result)
    print(f"-> {out / 'schedule.json'}", flush=True)
    return 0


def _say(r: dict, out: Path) -> None:
    ratio = r["replay_max_abs_ratio_minus_1"]
    print(
        f"  lead {r['lead']}: {r['ticks']} ticks, deadline_miss_ratio {r['deadline_miss_ratio']:.5f} "
        f"({r['deadline_misses']} misses), {r['swaps']} swaps, lead {r['lead_ticks_final']} ticks, "
        f"{r['records']} records replay to |ratio - 1| = {ratio if ratio is None else f'{ratio:.2e}'}",
        flush=True,
    )
