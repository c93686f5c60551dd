"""Building rollout records (pirl.v1.RolloutRecord) from what the control loop saw and sampled."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pirl.codec import to_tensor_msg
from pirl.v1 import pirl_pb2


def _wire_array(t: torch.Tensor) -> np.ndarray:
    """Observation tensors travel as float32, except token ids (int64) and masks (bool)."""
    arr = t.detach().cpu().numpy()
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr


@dataclass
class Decision:
    """One sampled chunk, with what the learner needs to replay it (row ``i`` of a batch)."""

    version: int
    observation: dict[str, np.ndarray]  # normalised, per-sample (no batch dim)
    chain: np.ndarray  # [K + 1, H, D] float32
    stochastic: np.ndarray  # [K] bool
    noise_level: float
    log_prob: float
    value: float
    actions: np.ndarray  # [n_action_steps, action_dim] env actions (un-normalised)

    @classmethod
    def from_sample(
        cls, version: int, obs: dict[str, torch.Tensor], sample, env_actions: np.ndarray, i: int, n_action_steps: int
    ) -> Decision:
        """Row ``i`` of ``sample`` (an ``edge.backends.Sampled``)."""
        return cls(
            version=version,
            observation={k: _wire_array(v[i]) for k, v in obs.items()},
            chain=sample.chain[i].detach().cpu().numpy().astype(np.float32),
            stochastic=sample.stochastic[i].detach().cpu().numpy().astype(bool),
            noise_level=float(sample.noise_level[i]),
            log_prob=float(sample.log_prob[i]),
            value=float(sample.value[i]),
            actions=env_actions[i, :n_action_steps],
        )


@dataclass
class Outcome:
    """What executing a decision's chunk produced."""

    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    success: bool = False
    env_steps: int = 0
    final_observation: dict[str, np.ndarray] | None = field(default=None)
    # robot mode: what the safety layer did while the chunk ran (pirl.v1.SafetyMarks fields)
    safety: dict[str, int | bool] | None = field(default=None)
    # robot mode, on the episode's last macro-step: (source, verdict, detector score) as pirl.v1.EpisodeLabel
    # names, e.g. ("OPERATOR", "SUCCESS", 0.0)
    label: tuple[str, str, float] | None = field(default=None)
    # robot mode, when a teleoperator drove any tick of this macro-step: the actions sent ([n, action_dim],
    # robot units) and which ticks the teleoperator drove ([n] bool)
    intervention: tuple[np.ndarray, np.ndarray] | None = field(default=None)


def batch_decisions(batch, version: int, n_exec: int) -> Iterator[tuple[int, int, Decision, Outcome]]:
    """An in-process rollout batch (``lerobot_policy_pi_rl.rollout.RolloutBatch``) as an edge's records: ``(env,
    macro-step, Decision, Outcome)`` for every valid macro-step, env after env. The simulation farm spools these;
    the learner's ``episodes_to_batch`` makes the same batch of them (tests/learner/test_records_to_batch.py)."""
    T, N = batch.valid.shape
    final = batch.info["final_observation"]
    steps = batch.info["step_env_steps"]
    for j in range(N):
        for t in range(T):
            if not batch.valid[t, j]:
                break
            d = Decision(
                version=version,
                observation={k: v[t, j].numpy() for k, v in batch.observations.items()},
                chain=batch.chains[t, j].numpy(),
                stochastic=batch.stochastic[t, j].numpy(),
                noise_level=float(batch.noise_level[t, j]),
                log_prob=float(batch.log_probs[t, j]),
                value=float(batch.values[t, j]),
                actions=np.zeros((n_exec, 0), np.float32),
            )
            te, tr = bool(batch.terminated[t, j]), bool(batch.truncated[t, j])
            o = Outcome(
                reward=float(batch.rewards[t, j]),
                terminated=te,
                truncated=tr,
                success=bool(batch.episode_success[j]) and (te or tr),
                env_steps=int(steps[t, j]),
            )
            if tr:
                o.final_observation = {k: v[j].numpy() for k, v in final.items()}
            yield j, t, d, o


def make_record(robot_id: str, seq: int, episode_id: str, step_index: int, d: Decision, o: Outcome) -> bytes:
    rec = pirl_pb2.RolloutRecord(
        robot_id=robot_id,
        episode_id=episode_id,
        sequence=seq,
        step_index=step_index,
        policy_version=d.version,
        chain=to_tensor_msg(d.chain),
        stochastic=to_tensor_msg(d.stochastic),
        noise_level=d.noise_level,
        log_prob=d.log_prob,
        value=d.value,
        reward=o.reward,
        terminated=o.terminated,
        truncated=o.truncated,
        success=o.success,
        env_steps=o.env_steps,
    )
    for k, v in d.observation.items():
        rec.observation[k].CopyFrom(to_tensor_msg(v))
    if o.truncated and o.final_observation is not None:
        for k, v in o.final_observation.items():
            rec.final_observation[k].CopyFrom(to_tensor_msg(v))
    if o.safety:
        rec.safety.CopyFrom(pirl_pb2.SafetyMarks(**o.safety))
    if o.label is not None:
        source, verdict, score = o.label
        rec.label.CopyFrom(pirl_pb2.EpisodeLabel(source=source, verdict=verdict, detector_score=score))
    if o.intervention is not None:
        executed, teleop = o.intervention
        rec.intervention.executed.CopyFrom(to_tensor_msg(np.asarray(executed, np.float32)))
        rec.intervention.teleop.CopyFrom(to_tensor_msg(np.asarray(teleop, bool)))
    return rec.SerializeToString()
