"""Rollout store: validation of incoming records, idempotent acks, episode assembly, batches.

Thread-safe: gRPC handler threads add records while the update thread takes batches.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from learner import metrics
from lerobot_policy_pi_rl.rollout import RolloutBatch
from pirl.codec import WireError, from_tensor_msg, spec_msg
from pirl.logs import some
from pirl.v1 import pirl_pb2


class RecordError(Exception):
    """A record the learner refuses; ``code`` is the gRPC status the stream is ended with.

    ``final``: the learner has judged this record and resending cannot change that, so the edge may
    drop it (the service marks the refusal for the edge: pirl.refusals). A refusal that is not final
    (a sequence number too far ahead, which a Register closes) keeps the record on the edge."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, *, final: bool = True):
        super().__init__(message)
        self.code, self.reason, self.message, self.final = code, reason, message, final


@dataclass(frozen=True)
class PolicyShapes:
    """What every record must look like for the current policy."""

    observation: dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype, shape): PiRLConfig.observation_spec
    chain: tuple[int, ...]  # (K + 1, H, D)
    num_steps: int
    noise_method: str
    n_action_steps: int
    token_limit: int = 0  # integer observations (token ids) must lie in [0, token_limit)
    # the robot's action dim (the policy's output_features["action"]): an intervention's executed actions
    # are [env_steps, action_dim]; 0: not checked
    action_dim: int = 0

    @classmethod
    def from_policy(cls, policy) -> PolicyShapes:
        c = policy.config
        chain = (c.num_denoise_steps + 1, c.chunk_size, c.model_action_dim)
        return cls(
            c.observation_spec(),
            chain,
            c.num_denoise_steps,
            c.noise_method,
            c.n_action_steps,
            token_limit=getattr(policy.backbone, "vocab_size", 0),
            action_dim=c.action_dim,
        )

    def to_msg(self) -> pirl_pb2.PolicySpec:
        spec = pirl_pb2.PolicySpec(
            chain=spec_msg("float32", self.chain),
            stochastic=spec_msg("bool", (self.num_steps,)),
            noise_method=self.noise_method,
            n_action_steps=self.n_action_steps,
        )
        for k, (dtype, shape) in self.observation.items():
            spec.observation[k].CopyFrom(spec_msg(dtype, shape))
        return spec


@dataclass
class Step:
    """One validated macro-step, as arrays."""

    seq: int
    step_index: int
    version: int
    observation: dict[str, np.ndarray]
    chain: np.ndarray
    stochastic: np.ndarray
    noise_level: float
    log_prob: float
    value: float
    reward: float
    terminated: bool
    truncated: bool
    success: bool
    env_steps: int
    final_observation: dict[str, np.ndarray] | None
    raw: bytes = b""  # the record as received (kept for the write-ahead log / checkpoint)
    # a teleoperator drove at least one tick: the sampled chunk is not what ran (no PPO sample; BC from
    # tick 0 on when teleop[0])
    intervened: bool = False
    executed: np.ndarray | None = None  # [env_steps, action_dim] float32 actions sent, robot units (intervention)
    teleop: np.ndarray | None = None  # [env_steps] bool: ticks the teleoperator drove (intervention)
    # who decided the outcome and what it was (pirl.v1.EpisodeLabel enum values; 0: no label)
    label_source: int = 0
    label_verdict: int = 0
    detector_score: float = 0.0

    @property
    def labelled(self) -> bool:
        return self.label_verdict != 0

    @property
    def aborted(self) -> bool:
        return self.label_verdict == pirl_pb2.EpisodeLabel.ABORT


def decode_record(rec: pirl_pb2.RolloutRecord, shapes: PolicyShapes, max_bytes: int) -> Step:
    """Check shapes, dtypes and finiteness; raise RecordError(INVALID_ARGUMENT) naming the field."""

    def bad(what: str) -> RecordError:
        return RecordError(grpc.StatusCode.INVALID_ARGUMENT, "invalid", f"record seq={rec.sequence}: {what}")

    if rec.sequence < 0:
        raise bad("sequence must be >= 0")
    if not rec.episode_id:
        raise bad("episode_id is empty")
    if rec.step_index < 0 or rec.env_steps < 0:
        raise bad("step_index and env_steps must be >= 0")

    def obs_map(m, name) -> dict[str, np.ndarray]:
        keys, expected = set(m.keys()), set(shapes.observation)
        if keys != expected:  # named a few at a time: a peer can send any number of keys
            raise bad(
                f"{name} keys differ from the policy's: missing {some(expected - keys)}, "
                f"unexpected {some(keys - expected)} ({len(keys)} keys, {len(expected)} expected)"
            )
        out = {}
        for k, (dtype, shape) in shapes.observation.items():
            try:
                arr = from_tensor_msg(m[k], expect_dtype=dtype, expect_shape=shape, max_bytes=max_bytes)
            except WireError as e:
                raise bad(f"{name}['{k}']: {e}") from None
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise bad(f"{name}['{k}'] has non-finite values")
            if arr.dtype.kind == "i" and arr.size and (arr.min() < 0 or arr.max() >= shapes.token_limit):
                raise bad(f"{name}['{k}'] has token ids outside [0, {shapes.token_limit})")
            out[k] = arr
        return out

    obs = obs_map(rec.observation, "observation")
    try:
        chain = from_tensor_msg(rec.chain, expect_dtype="float32", expect_shape=shapes.chain, max_bytes=max_bytes)
    except WireError as e:
        raise bad(f"chain: {e}") from None
    try:
        stochastic = from_tensor_msg(rec.stochastic, expect_dtype="bool", expect_shape=(shapes.num_steps,))
    except WireError as e:
        raise bad(f"stochastic: {e}") from None
    if not np.isfinite(chain).all():
        raise bad("chain has non-finite values")
    for name in ("noise_level", "log_prob", "value", "reward"):
        if not math.isfinite(getattr(rec, name)):
            raise bad(f"{name} is not finite ({getattr(rec, name)})")
    if rec.terminated and rec.truncated:
        raise bad("terminated and truncated are both set")
    final = None
    if rec.truncated:
        final = obs_map(rec.final_observation, "final_observation")
    elif len(rec.final_observation):
        raise bad("final_observation is only allowed on a truncated step")
    label = _decode_label(rec, bad)
    executed, teleop = _decode_intervention(rec, shapes, max_bytes, bad)
    return Step(
        seq=rec.sequence,
        step_index=rec.step_index,
        version=rec.policy_version,
        observation=obs,
        chain=chain,
        stochastic=stochastic.astype(bool),
        noise_level=rec.noise_level,
        log_prob=rec.log_prob,
        value=rec.value,
        reward=rec.reward,
        terminated=rec.terminated,
        truncated=rec.truncated,
        success=rec.success,
        env_steps=rec.env_steps,
        final_observation=final,
        intervened=teleop is not None and bool(teleop.any()),
        executed=executed,
        teleop=teleop,
        label_source=label[0],
        label_verdict=label[1],
        detector_score=label[2],
    )


def _decode_label(rec: pirl_pb2.RolloutRecord, bad) -> tuple[int, int, float]:
    """(source, verdict, detector score) of the record's EpisodeLabel; (0, 0, 0.0) without one."""
    if not rec.HasField("label"):
        return 0, 0, 0.0
    lab = rec.label
    E = pirl_pb2.EpisodeLabel
    if not (rec.terminated or rec.truncated):
        raise bad("label is only allowed on an episode's last record (terminated or truncated)")
    # proto3 enums are open: a peer can send any integer
    sources = [v for v in E.Source.values() if v != E.SOURCE_UNSPECIFIED]
    verdicts = [v for v in E.Verdict.values() if v != E.VERDICT_UNSPECIFIED]
    if lab.source not in sources:
        raise bad(f"label.source is {lab.source}; must be one of {[E.Source.Name(v) for v in sources]}")
    if lab.verdict not in verdicts:
        raise bad(f"label.verdict is {lab.verdict}; must be one of {[E.Verdict.Name(v) for v in verdicts]}")
    if not (math.isfinite(lab.detector_score) and 0.0 <= lab.detector_score <= 1.0):
        raise bad(f"label.detector_score must be a probability in [0, 1] (got {lab.detector_score})")
    return lab.source, lab.verdict, float(lab.detector_score)


def _decode_intervention(
    rec: pirl_pb2.RolloutRecord, shapes: PolicyShapes, max_bytes: int, bad
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(executed [env_steps, action_dim] float32, teleop [env_steps] bool), or (None, None) without one."""
    if not rec.HasField("intervention"):
        return None, None
    n = rec.env_steps
    try:
        executed = from_tensor_msg(
            rec.intervention.executed,
            expect_dtype="float32",
            expect_shape=(n, shapes.action_dim or None),
            max_bytes=max_bytes,
        )
    except WireError as e:
        raise bad(f"intervention.executed ([env_steps={n}, action_dim={shapes.action_dim or '?'}]): {e}") from None
    try:
        teleop = from_tensor_msg(rec.intervention.teleop, expect_dtype="bool", expect_shape=(n,), max_bytes=max_bytes)
    except WireError as e:
        raise bad(f"intervention.teleop ([env_steps={n}]): {e}") from None
    if not np.isfinite(executed).all():
        raise bad("intervention.executed has non-finite values")
    return executed, teleop.astype(bool)


class AckedSequences:
    """Acked sequence numbers of one robot: a contiguous low watermark plus a sparse set above it."""

    def __init__(self, below: int = 0, above: set[int] | None = None):
        self.below = below  # every seq < below is acked
        self.above = {s for s in (above or ()) if s >= below}
        self._compact()

    def __contains__(self, seq: int) -> bool:
        return seq < self.below or seq in self.above

    def add(self, seq: int) -> None:
        if seq >= self.below:
            self.above.add(seq)
            self._compact()

    def _compact(self) -> None:
        while self.below in self.above:
            self.above.discard(self.below)
            self.below += 1

    def to_json(self) -> dict:
        return {"below": self.below, "above": sorted(self.above)}

    @classmethod
    def from_json(cls, d: dict) -> AckedSequences:
        return cls(int(d["below"]), {int(x) for x in d["above"]})


@dataclass
class Episode:
    robot_id: str
    episode_id: str
    steps: list[Step] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.steps) and (self.steps[-1].terminated or self.steps[-1].truncated)


# An edge streams its spool in sequence order with at most a few hundred records in flight; gaps
# from records it dropped itself are closed by its next Register or Heartbeat. 65,536 leaves room
# for both and bounds the acked set to 64 Ki numbers per robot.
DEFAULT_MAX_SEQUENCE_AHEAD = 1 << 16


class RolloutStore:
    """Accepts records exactly once per (robot id, sequence) and hands out complete episodes."""

    def __init__(
        self,
        shapes: PolicyShapes,
        *,
        max_version_lag: int,
        max_record_bytes: int,
        wal=None,
        max_sequence_ahead: int = DEFAULT_MAX_SEQUENCE_AHEAD,
        require_outcome: bool = False,
    ):
        self.shapes = shapes
        # refuse an episode's last record without an EpisodeLabel (trainer.require_outcome)
        self.require_outcome = require_outcome
        self.wal = wal  # learner.wal.RecordLog: every accepted record is logged before its ack
        self.max_version_lag = max_version_lag
        self.max_record_bytes = max_record_bytes
        # a new sequence must lie below (robot's acked watermark + this): the acked set above the
        # watermark can never hold more than this many numbers per robot
        self.max_sequence_ahead = max_sequence_ahead
        self.version = 0
        self._lock = threading.Condition()
        self._acked: dict[str, AckedSequences] = defaultdict(AckedSequences)
        self._open: dict[tuple[str, str], Episode] = {}
        self._complete: list[Episode] = []
        # accepted, duplicate, rejected_<reason>, episodes, stale_episodes, intervened_steps, aborted_episodes
        self.counts = defaultdict(int)

    # --- intake (gRPC threads) --------------------------------------------------------------------

    def next_sequence(self, robot_id: str) -> int:
        with self._lock:
            return self._acked[robot_id].below

    def add(self, robot_id: str, rec: pirl_pb2.RolloutRecord, raw: bytes = b"") -> int:
        """Validate and store ``rec`` (``raw``: its bytes, for the write-ahead log); return ACCEPTED or
        DUPLICATE, or raise RecordError."""
        if rec.robot_id != robot_id:
            raise RecordError(
                grpc.StatusCode.PERMISSION_DENIED,
                "robot_mismatch",
                f"record robot_id {rec.robot_id!r} does not match the authenticated robot {robot_id!r}",
            )
        if rec.sequence < 0 or rec.policy_version < 0:
            raise RecordError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid",
                f"record seq={rec.sequence}: sequence and policy_version must be >= 0 "
                f"(policy_version={rec.policy_version})",
            )
        with self._lock:
            acked = self._acked[robot_id]
            if rec.sequence in acked:
                self.counts["duplicate"] += 1
                return pirl_pb2.RolloutAck.DUPLICATE
            current, watermark = self.version, acked.below
        if rec.sequence >= watermark + self.max_sequence_ahead:
            raise RecordError(
                grpc.StatusCode.OUT_OF_RANGE,
                "sequence_ahead",
                f"record seq={rec.sequence} is more than {self.max_sequence_ahead} ahead of the lowest "
                f"sequence not yet acked ({watermark}); register again to close the gap",
                final=False,
            )
        if rec.policy_version > current:
            raise RecordError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "future_version",
                f"record seq={rec.sequence} claims policy version {rec.policy_version} > current {current}",
            )
        if rec.policy_version < current - self.max_version_lag:
            raise RecordError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "stale_version",
                f"record seq={rec.sequence} is from policy version {rec.policy_version}; the learner is at "
                f"{current} and accepts a lag of {self.max_version_lag}",
            )
        step = decode_record(rec, self.shapes, self.max_record_bytes)
        if self.require_outcome and (step.terminated or step.truncated) and not step.labelled:
            raise RecordError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no_outcome",
                f"record seq={rec.sequence} ends episode {rec.episode_id!r} without an outcome label, and this learner "
                "requires one (--trainer.require_outcome=true): start the edge with an outcome source (operator "
                "labels or a success detector: pirl-edge --episode.outcome=operator or --episode.outcome=detector), "
                "or run the learner with --trainer.require_outcome=false",
            )
        step.raw = raw or rec.SerializeToString()
        with self._lock:
            if step.seq in self._acked[robot_id]:  # a concurrent resend won the race
                self.counts["duplicate"] += 1
                return pirl_pb2.RolloutAck.DUPLICATE
            if self.wal is not None:
                self.wal.append(robot_id, step.raw)
            self._insert(robot_id, rec.episode_id, step)
            self.counts["accepted"] += 1
            if step.intervened:
                self.counts["intervened_steps"] += 1
                metrics.LEARNER_INTERVENED_STEPS.inc()
            return pirl_pb2.RolloutAck.ACCEPTED

    def restore(self, robot_id: str, raw: bytes, *, pending: bool) -> bool:
        """Re-insert a record after a restart (it was validated when it arrived).

        ``pending=True``: a checkpoint's not-yet-used record (acked in that checkpoint's state).
        ``pending=False``: a write-ahead-log entry, skipped when the checkpoint already counts it as
        acked (it was accepted before the snapshot: either pending, or used by an update).
        """
        rec = pirl_pb2.RolloutRecord.FromString(raw)
        step = decode_record(rec, self.shapes, self.max_record_bytes)
        step.raw = raw
        with self._lock:
            if not pending:
                if step.seq in self._acked[robot_id]:
                    return False
                self.counts["accepted"] += 1  # accepted after the checkpoint's counts were taken
                self.counts["intervened_steps"] += step.intervened
            self._insert(robot_id, rec.episode_id, step)
            return True

    def _insert(self, robot_id: str, episode_id: str, step: Step) -> None:
        """Add a step to its episode and ack its sequence (caller holds the lock)."""
        key = (robot_id, episode_id)
        ep = self._open.setdefault(key, Episode(robot_id, episode_id))
        ep.steps.append(step)
        ep.steps.sort(key=lambda s: s.step_index)
        if ep.done:
            del self._open[key]
            self._complete.append(ep)
            self.counts["episodes"] += 1
            self._lock.notify_all()
        self._acked[robot_id].add(step.seq)

    def forget_below(self, robot_id: str, sequence: int) -> None:
        """The robot will never send a sequence below ``sequence`` that we have not acked: treat the
        gaps as closed, so the acked set stays a watermark instead of growing without bound."""
        with self._lock:
            acked = self._acked[robot_id]
            if sequence > acked.below:
                acked.below = sequence
                acked.above = {s for s in acked.above if s >= sequence}
                acked._compact()

    def reject(self, reason: str) -> None:
        with self._lock:
            self.counts[f"rejected_{reason}"] += 1

    # --- batches (update thread) ------------------------------------------------------------------

    def wait_for_episodes(self, n: int, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self._complete) >= n, timeout=timeout)

    def take_episodes(self, n: int, *, whole: bool = False) -> list[Episode]:
        """Up to ``n`` complete episodes whose every step is within the allowed version lag (``whole``: ``n``
        or none, the fresh ones staying for the next call). Stale episodes and episodes an operator aborted
        (label verdict ABORT) are dropped here; an aborted one is never trained on (neither PPO nor BC)."""
        with self._lock:
            fresh, stale, aborted = [], [], 0
            for ep in self._complete:
                if ep.steps[-1].aborted:
                    aborted += 1
                    continue
                ok = min(s.version for s in ep.steps) >= self.version - self.max_version_lag
                (fresh if ok else stale).append(ep)
            self.counts["aborted_episodes"] += aborted
            metrics.LEARNER_ABORTED_EPISODES.inc(aborted)
            self.counts["stale_episodes"] += len(stale)
            metrics.LEARNER_STALE_EPISODES.inc(len(stale))
            if whole and len(fresh) < n:  # keep them: the update waits for a full batch
                take, self._complete = [], fresh
            else:
                take, self._complete = fresh[:n], fresh[n:]
            # unfinished episodes that can no longer complete within the lag: forget them
            oldest = self.version - self.max_version_lag
            for key in [k for k, ep in self._open.items() if ep.steps[-1].version < oldest]:
                del self._open[key]
                self.counts["stale_episodes"] += 1
                metrics.LEARNER_STALE_EPISODES.inc()
            return take

    def set_version(self, version: int) -> None:
        with self._lock:
            self.version = version

    def pending_episodes(self) -> int:
        with self._lock:
            return len(self._complete)

    # --- persistence (checkpoints) ----------------------------------------------------------------

    def _state_locked(self) -> dict:
        return {"acked": {r: a.to_json() for r, a in self._acked.items()}, "counts": dict(self.counts)}

    def state(self) -> dict:
        with self._lock:
            return self._state_locked()

    def checkpoint_snapshot(self, version: int) -> tuple[dict, list[tuple[str, bytes]]]:
        """(state, records not yet used by an update) for checkpoint ``version``; atomically with the
        snapshot, the write-ahead log moves on to segment ``version``."""
        with self._lock:
            state = self._state_locked()
            pending = [(ep.robot_id, s.raw) for ep in [*self._open.values(), *self._complete] for s in ep.steps]
            if self.wal is not None:
                self.wal.start_segment(version)
            return state, pending

    def load_state(self, state: dict) -> None:
        with self._lock:
            self._acked = defaultdict(
                AckedSequences, {r: AckedSequences.from_json(a) for r, a in state["acked"].items()}
            )
            self.counts = defaultdict(int, state.get("counts", {}))


def episodes_to_batch(episodes: list[Episode], policy, normalize_actions=None) -> RolloutBatch:
    """Time-major RolloutBatch (padded with invalid steps) from complete episodes; ``intervened`` marks the
    macro-steps a teleoperator drove (in the GAE, out of every policy loss). With ``normalize_actions`` (robot
    units -> the policy's normalised action space) the actions that ran on those steps are ``executed_actions``
    (what the chunk critic learns takeovers from)."""
    n = len(episodes)
    T = max(len(ep.steps) for ep in episodes)
    K1, H, D = episodes[0].steps[0].chain.shape
    obs_keys = list(episodes[0].steps[0].observation)
    first = episodes[0].steps[0].observation
    obs = {k: torch.zeros(T, n, *first[k].shape, dtype=torch.from_numpy(first[k][:0]).dtype) for k in obs_keys}
    chains = torch.zeros(T, n, K1, H, D)
    stochastic = torch.zeros(T, n, K1 - 1, dtype=torch.bool)
    f = {name: torch.zeros(T, n) for name in ("noise_level", "log_prob", "value", "reward", "bootstrap")}
    b = {name: torch.zeros(T, n, dtype=torch.bool) for name in ("terminated", "truncated", "valid", "intervened")}
    returns, success = torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    final_obs: dict[str, list] = {k: [] for k in obs_keys}
    final_at: list[tuple[int, int]] = []
    env_steps = 0
    for j, ep in enumerate(episodes):
        for t, s in enumerate(ep.steps):
            for k in obs_keys:
                obs[k][t, j] = torch.from_numpy(s.observation[k])
            chains[t, j] = torch.from_numpy(s.chain)
            stochastic[t, j] = torch.from_numpy(s.stochastic)
            f["noise_level"][t, j], f["log_prob"][t, j], f["value"][t, j] = s.noise_level, s.log_prob, s.value
            f["reward"][t, j] = s.reward
            b["terminated"][t, j], b["truncated"][t, j], b["valid"][t, j] = s.terminated, s.truncated, True
            b["intervened"][t, j] = s.intervened
            returns[j] += s.reward
            success[j] |= s.success
            env_steps += s.env_steps
            if s.truncated:
                for k in obs_keys:
                    final_obs[k].append(torch.from_numpy(s.final_observation[k]))
                final_at.append((t, j))
    executed_actions = None
    taken = [(t, j, s) for j, ep in enumerate(episodes) for t, s in enumerate(ep.steps) if s.intervened]
    if normalize_actions is not None and taken:
        executed_actions = torch.zeros(T, n, H, D)
        with torch.no_grad():
            for t, j, s in taken:
                ran = torch.from_numpy(np.ascontiguousarray(s.executed[:H], dtype=np.float32))
                normalised = normalize_actions(ran.to(policy.action_mask.device)).float().cpu()
                executed_actions[t, j, : ran.shape[0], : ran.shape[1]] = normalised
    if final_at:  # bootstrap V(final observation) of truncated episodes with the current critic
        with torch.no_grad():
            device = policy.action_mask.device
            v = policy.predict_value({k: torch.stack(vs).to(device) for k, vs in final_obs.items()}).cpu()
        for (t, j), value in zip(final_at, v.tolist(), strict=True):
            f["bootstrap"][t, j] = value
    return RolloutBatch(
        observations=obs,
        chains=chains,
        stochastic=stochastic,
        noise_level=f["noise_level"],
        log_probs=f["log_prob"],
        values=f["value"],
        rewards=f["reward"],
        terminated=b["terminated"],
        truncated=b["truncated"],
        valid=b["valid"],
        bootstrap_values=f["bootstrap"],
        episode_returns=returns,
        episode_success=success,
        group_ids=torch.arange(n),
        env_steps=env_steps,
        intervened=b["intervened"],
        executed_actions=executed_actions,
    )
