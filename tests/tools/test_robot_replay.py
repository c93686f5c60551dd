"""pirl_tools.robot_replay: a robot run's records replayed on the simulated robot's twin reproduce its observations
and outcomes, and a record written at the wrong tick does not."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from helpers.policy import save_checkpoint, sim_robot_policy
from learner.wal import encode_entry
from lerobot_policy_pi_rl.rollout import PolicyRunner
from pirl.codec import to_tensor_msg
from pirl.v1 import pirl_pb2
from pirl_tools.robot_replay import OBS_TOLERANCE, replay_on_twin


def sim_policy(tmp_path):
    """The simulated robot's small random policy, saved as a robot run's starting checkpoint."""
    policy, pre, post = sim_robot_policy(0)
    return policy, pre, post, save_checkpoint(tmp_path / "policy", policy, pre, post)


def write_episodes(
    wal, policy, pre, post, *, seeds, record_delay, decision_delay=1, takeover_at=None, wrong_outcome_by=None
):
    """Episodes of ``policy`` on the twin (observations ``decision_delay`` ticks old), written as a robot's records
    to a write-ahead log segment; the records carry the observation ``record_delay`` ticks old (a robot loop that
    recorded the wrong tick differs from ``decision_delay``). ``takeover_at``: a macro-step a teleoperator drove
    (its executed actions in the record, the policy's chunk not run). ``wrong_outcome_by``: every episode's
    outcome written the wrong way round, as judged by that label source (``ENV``: the robot's verdict; ``OPERATOR``:
    a person's)."""
    import lerobot_robot_pirl_sim  # noqa: F401
    from lerobot_robot_pirl_sim.vec_env import PirlSimVecEnv

    acting = PirlSimVecEnv(1, autoreset=False, obs_delay_ticks=decision_delay)
    recorded = PirlSimVecEnv(1, autoreset=False, obs_delay_ticks=record_delay)
    runner = PolicyRunner.for_env(policy, pre, post, acting)
    g = torch.Generator().manual_seed(0)
    lines, seq = [], 0
    for ep, seed in enumerate(seeds):
        raw, _ = acting.reset(seed=seed)
        shown, _ = recorded.reset(seed=seed)
        done, step = False, 0
        while not done:
            with torch.no_grad():
                sample = policy.sample_chains(runner.observe(raw, None), *policy.draw_noise(1, generator=g))
            actions = runner.to_env_actions(sample.actions)[0][: policy.config.n_action_steps]
            rec = pirl_pb2.RolloutRecord(robot_id="robot-0", episode_id=f"ep{ep}", sequence=seq, step_index=step)
            for k, v in runner.observe(shown, None).items():
                rec.observation[k].CopyFrom(to_tensor_msg(v[0].numpy()))
            rec.chain.CopyFrom(to_tensor_msg(sample.chain.chain[0].numpy()))
            if step == takeover_at:  # the person's actions ran instead of the chunk
                actions = np.tile(np.asarray([[0.0, 0.0, 100.0]], np.float32), (len(actions), 1))
                rec.intervention.executed.CopyFrom(to_tensor_msg(actions))
            ran = 0
            for a in actions:
                raw, _r, term, trunc, info = acting.step(a[None])
                shown, *_ = recorded.step(a[None])
                ran += 1
                if term[0] or trunc[0]:
                    done = True
                    rec.terminated, rec.truncated = bool(term[0]), bool(trunc[0] and not term[0])
                    rec.success = bool(info["is_success"][0]) != (wrong_outcome_by is not None)
                    rec.label.verdict = pirl_pb2.EpisodeLabel.SUCCESS if rec.success else pirl_pb2.EpisodeLabel.FAILURE
                    if wrong_outcome_by is not None:
                        rec.label.source = pirl_pb2.EpisodeLabel.Source.Value(wrong_outcome_by)
                    break
            rec.env_steps = ran
            lines.append(encode_entry("robot-0", rec.SerializeToString()))
            seq, step = seq + 1, step + 1
    wal.mkdir(parents=True, exist_ok=True)
    (wal / "after-000000.log").write_bytes(b"".join(lines))


def test_records_of_the_decision_tick_replay_exactly_and_a_late_record_does_not(tmp_path):
    policy, pre, post, path = sim_policy(tmp_path)
    write_episodes(tmp_path / "good", policy, pre, post, seeds=[3, 4, 5], record_delay=1, takeover_at=1)
    good = replay_on_twin(tmp_path / "good", path, obs_delay_ticks=1)
    assert good.episodes == 3 and good.outcomes_agree == 3 and good.steps_after_close == 0
    assert good.robot_verdicts_differ == 0
    assert good.max_obs_diff is not None and good.max_obs_diff <= OBS_TOLERANCE
    assert good.macro_steps > 3
    # a robot loop that recorded the observation of the tick after the decision: seen at once
    write_episodes(tmp_path / "late", policy, pre, post, seeds=[3, 4, 5], record_delay=0)
    late = replay_on_twin(tmp_path / "late", path, obs_delay_ticks=1)
    assert late.episodes == 3 and late.max_obs_diff > 100 * OBS_TOLERANCE


def test_a_robots_own_verdict_must_agree_and_a_persons_is_only_counted(tmp_path):
    """The robot's own verdict (label source ENV) is the simulator's: a different one is a records bug. A person's
    label is their judgement: the replay counts how often it agrees with the simulator, and that is all."""
    policy, pre, post, path = sim_policy(tmp_path)
    write_episodes(tmp_path / "env", policy, pre, post, seeds=[3, 4], record_delay=1, wrong_outcome_by="ENV")
    by_robot = replay_on_twin(tmp_path / "env", path, obs_delay_ticks=1)
    assert by_robot.outcomes_agree == 0 and by_robot.robot_verdicts_differ == 2
    write_episodes(tmp_path / "person", policy, pre, post, seeds=[3, 4], record_delay=1, wrong_outcome_by="OPERATOR")
    by_person = replay_on_twin(tmp_path / "person", path, obs_delay_ticks=1)
    assert by_person.outcomes_agree == 0 and by_person.robot_verdicts_differ == 0
    assert by_person.max_obs_diff <= OBS_TOLERANCE


def test_the_command_exits_1_when_the_twin_does_not_reproduce_the_records_and_2_on_a_bad_path(tmp_path):
    policy, pre, post, path = sim_policy(tmp_path)
    write_episodes(tmp_path / "late", policy, pre, post, seeds=[7], record_delay=0)
    cmd = [sys.executable, "-m", "pirl_tools.robot_replay", f"--policy_path={path}"]
    p = subprocess.run([*cmd, f"--wal={tmp_path / 'late'}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "'episodes': 1" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([*cmd, f"--wal={tmp_path / 'nope'}"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "error: wal: not a directory" in p.stderr.strip().splitlines()[-1]


def test_a_policy_path_without_weights_is_one_line(tmp_path):
    (tmp_path / "wal").mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "pirl_tools.robot_replay", f"--wal={tmp_path / 'wal'}", f"--policy_path={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "error: policy_path: no model.safetensors" in p.stderr.strip().splitlines()[-1]
