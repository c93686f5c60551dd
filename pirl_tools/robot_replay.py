"""The simulated robot's recorded episodes, replayed on its twin: a check that a robot run's records are what the
twin would have produced from the same chunks.

    python -m pirl_tools.robot_replay --wal=DIR/<run>/learner/wal --policy_path=DIR/sft/train/checkpoints/last/pretrained_model

Each complete episode in the learner's write-ahead log (the segments it still keeps: the last few versions) is
reset on ``PirlSimVecEnv`` at the robot's start (the arm and the cube where its first record's observation puts
them) and stepped with its recorded chunks, the twin delaying its observations as the robot's decision does
(``obs_delay_ticks``). Reported: the largest difference between a recorded observation and the twin's at the
same macro-step (the policy's normalised units), how many outcomes agree with the twin's verdict, and how many
macro-steps the robot recorded after the twin's episode had ended (the scripted person's reaction time: steps
the twin never takes). An observation recorded at the wrong tick or a chunk applied out of line shows up as a
difference, and so does an outcome on the wrong step where the robot's own verdict ended the episode
(``robot_verdicts_differ``). Where a person or a success detector judged, their verdict is theirs, not the
simulator's: ``outcomes_agree`` then measures how often they agree with it. ``pirl-bench robot`` runs this after
every robot run (``twin_replay`` in robot.json).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# an observation the twin reproduces differs only by float32 rounding (under 1e-6 in normalised units, measured)
OBS_TOLERANCE = 1e-3


def _episodes(wal: Path) -> list[list]:
    """The complete, not aborted episodes of the write-ahead log at ``wal``, each its records in step order."""
    from learner.wal import read_entries
    from pirl.v1 import pirl_pb2

    by_episode: dict[str, list] = defaultdict(list)
    for seg in sorted(wal.glob("after-*.log")):
        for _robot, raw in read_entries(seg):
            rec = pirl_pb2.RolloutRecord()
            rec.ParseFromString(raw)
            by_episode[rec.episode_id].append(rec)
    out = []
    for recs in by_episode.values():
        recs.sort(key=lambda r: r.step_index)
        last = recs[-1]
        complete = [r.step_index for r in recs] == list(range(len(recs))) and (last.terminated or last.truncated)
        if complete and last.label.verdict != pirl_pb2.EpisodeLabel.ABORT:
            out.append(recs)
    return out


def _unnormalise(preprocessor, config, key: str, values: np.ndarray) -> np.ndarray:
    """A normalised state input back in the robot's units (the inverse of the pre-processor's normalisation)."""
    from lerobot_policy_pi_rl.input_stats import input_centre_and_spread, normalizer_stats

    got = input_centre_and_spread(config, normalizer_stats(preprocessor), key)
    if got is None:
        raise ValueError(f"the policy's pre-processor has no normalisation statistics for {key}")
    centre, spread = got
    return values * spread + centre


@dataclass
class ReplayResult:
    episodes: int  # complete, not aborted episodes replayed
    max_obs_diff: float | None  # largest |recorded - twin| observation element up to the twin's end
    outcomes_agree: int  # episodes whose success the twin judged the same (whoever judged them on the robot)
    # episodes the robot's own verdict (label source ENV, or no label) ended whose success the twin judged otherwise
    robot_verdicts_differ: int
    steps_after_close: int  # macro-steps recorded after the twin's episode had ended
    macro_steps: int  # macro-steps recorded in those episodes

    def as_dict(self) -> dict:
        return asdict(self)


def replay_on_twin(wal: Path, policy_path: Path, obs_delay_ticks: int) -> ReplayResult:
    """Replay the episodes of the write-ahead log at ``wal`` on the simulated robot's twin (see the module)."""
    import lerobot_robot_pirl_sim  # noqa: F401  (registers the pirl_sim vector env)
    import torch
    from lerobot_robot_pirl_sim.vec_env import PirlSimVecEnv

    from lerobot_policy_pi_rl.rollout import PolicyRunner
    from lerobot_policy_pi_rl.sft import load_policy
    from pirl.codec import from_tensor_msg

    policy, pre, post = load_policy(policy_path)
    env = PirlSimVecEnv(1, autoreset=False, obs_delay_ticks=obs_delay_ticks)
    runner = PolicyRunner.for_env(policy, pre, post, env)
    n_exec = policy.config.n_action_steps
    episodes = _episodes(Path(wal))
    from pirl.v1 import pirl_pb2

    diffs, agree, differ, after, steps = [], 0, 0, 0, 0
    for recs in episodes:
        first = {k: from_tensor_msg(v) for k, v in recs[0].observation.items()}
        state = _unnormalise(pre, policy.config, "observation.state", first["observation.state"])
        cube = _unnormalise(pre, policy.config, "observation.environment_state", first["observation.environment_state"])
        start = (state[:2].astype(np.float64), cube[:2].astype(np.float64))  # x.pos, y.pos; cube.x, cube.y
        raw, _ = env.reset(options={"starts": [start]})
        ended, success = False, False
        for rec in recs:
            steps += 1
            if ended:  # the robot went on after the close (a person's reaction time): the twin has stopped
                after += 1
                continue
            twin = runner.observe(raw, None)
            for k, v in rec.observation.items():
                diffs.append(float(np.abs(twin[k][0].numpy() - from_tensor_msg(v)).max()))
            if rec.HasField("intervention") and rec.intervention.executed.shape:
                # a person's teleoperator drove (some of) it: what ran is in the record, in the robot's units
                actions = np.asarray(from_tensor_msg(rec.intervention.executed), dtype=np.float32)
            else:
                chain = torch.from_numpy(np.array(from_tensor_msg(rec.chain)))
                actions = runner.to_env_actions(chain[-1][None])[0][:n_exec]
            for j in range(len(actions)):
                raw, _r, term, trunc, info = env.step(actions[j][None])
                if term[0] or trunc[0]:
                    ended, success = True, bool(info["is_success"][0])
                    break
        same = success == any(r.success for r in recs)
        agree += int(same)
        by_robot = recs[-1].label.source in (pirl_pb2.EpisodeLabel.SOURCE_UNSPECIFIED, pirl_pb2.EpisodeLabel.ENV)
        differ += int(by_robot and not same)
    return ReplayResult(len(episodes), max(diffs) if diffs else None, agree, differ, after, steps)


@dataclass
class RobotReplayConfig:
    """python -m pirl_tools.robot_replay: a robot run's recorded episodes replayed on its twin (see the module)."""

    # a robot run's learner/wal directory (pirl-bench robot: DIR/<method>-s<seed>/learner/wal)
    wal: str = ""
    # the policy the run started from (its normalisation statistics and chunk length); for pirl-bench robot:
    # DIR/sft/train/checkpoints/last/pretrained_model
    policy_path: str = ""
    # the robot's decision delay in ticks (pirl-bench robot's decision_delay_ticks)
    obs_delay_ticks: int = 1

    def __post_init__(self):
        if not self.wal or not Path(self.wal).is_dir():
            raise ValueError(f"wal: not a directory: {self.wal!r} (a robot run's learner/wal)")
        if not self.policy_path or not (Path(self.policy_path) / "model.safetensors").is_file():
            raise ValueError(f"policy_path: no model.safetensors in {self.policy_path!r}")
        if self.obs_delay_ticks < 0:
            raise ValueError(f"obs_delay_ticks: must be >= 0 (got {self.obs_delay_ticks})")


def main() -> None:
    """Prints the result; exit 1 when the twin does not reproduce the records (an observation off by more than
    OBS_TOLERANCE, a robot's own verdict the twin judged otherwise, or no episode to replay)."""
    from pirl.cli import parse_config, run_cli

    cfg = parse_config(RobotReplayConfig, prog="python -m pirl_tools.robot_replay", args=sys.argv[1:])

    def run() -> int:
        r = replay_on_twin(Path(cfg.wal), Path(cfg.policy_path), cfg.obs_delay_ticks)
        print(r.as_dict())
        ok = r.episodes > 0 and r.max_obs_diff is not None and r.max_obs_diff <= OBS_TOLERANCE
        return 0 if ok and r.robot_verdicts_differ == 0 else 1

    run_cli(run)


if __name__ == "__main__":
    main()
