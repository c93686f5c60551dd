"""pirl-bench robot end to end, small: SFT, a learner and ONE edge on the simulated robot as processes, the
scripted person labelling and taking over, the learner training on interventions and the SFT demos; and its
one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = [sys.executable, "-m", "pirl_tools.bench", "robot"]


def test_an_unknown_method_is_one_line_and_exit_2():
    p = subprocess.run([*BENCH, "--methods=[nope]"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("pirl-bench robot: error: methods: unknown ['nope']")


def test_an_unknown_outcome_source_is_one_line_naming_the_choices():
    p = subprocess.run([*BENCH, "--outcome=person"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("pirl-bench robot: error: outcome: must be one of ['operator', 'detector', 'robot']"), last


@pytest.mark.slow
def test_a_short_run_with_interventions_writes_robot_json(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    cmd = [
        *BENCH,
        f"--out={out}",
        "--methods=[interventions_bc]",
        "--max_episodes=24",
        "--max_run_s=240",
        "--sft_steps=200",
        "--num_demos=4",
        "--eval_episodes=20",
        "--intervene_after_s=0.2",  # an SFT of 200 steps drifts: the person takes over early and often
        "--label_reaction_s=0.3",  # the edge back-dates the person's labels by their reaction time
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "robot.json").read_text())
    (run,) = report["runs"]
    assert run["method"] == "interventions_bc (labels back-dated 0.3 s)" and report["target"] == 0.9
    assert run["label_reaction_s"] == 0.3 and run["steps_after_label"] >= 1
    for key in ("sft_success", "final_success", "episodes_to_target", "robot_seconds_to_target", "interventions"):
        assert key in run
    assert run["episodes"] >= 24 and run["robot_seconds"] > 0 and run["interventions"] > 0
    assert run["decision_delay_ticks"] == 1 and run["deadline_misses"] is not None
    assert sum(run["labels"].values()) >= 24 and all(k.startswith(("OPERATOR/", "TIME_LIMIT/")) for k in run["labels"])
    assert (out / "robot.png").is_file()
    # the robot's records, takeovers included, replayed on the twin: the same observations (the person's labels are
    # their own judgement, so their agreement with the simulator's verdict is reported, not required)
    replay = run["twin_replay"]
    assert replay["episodes"] > 0 and replay["max_obs_diff"] <= 1e-3 and replay["robot_verdicts_differ"] == 0, replay
    # the learner trained: at least one update after the SFT evaluation, with BC data from the interventions
    logs = (out / "interventions_bc-s0-backdated" / "logs" / "learner.log").read_text()
    assert "bc_loss" in logs


def test_the_sft_scores_by_noise_std_are_cached_per_evaluation_episodes_and_delay(tmp_path, monkeypatch):
    """The tempered-SFT baseline is scored once per number of evaluation episodes and decision delay, on the twin
    delayed as the robot is: a cache scored on other episodes or another delay is scored again, not reported as
    if it were this run's."""
    import math

    import learner.trainer
    import lerobot_policy_pi_rl.sft
    from helpers.policy import builtin_policy
    from pirl_tools.bench_robot import _sft_success_by_noise_std
    from pirl_tools.common import NOISE_STDS

    scored, delays = [], [1]

    def make_evaluator(pre, post, episodes, **kw):
        assert kw["env_name"] == "pirl_sim" and kw["env_kwargs"] == {"obs_delay_ticks": delays[-1]}

        def evaluate(policy):  # a stand-in score that shows which std and episode count it was scored at
            scored.append(episodes)
            return round(episodes / 1000 + math.exp(float(policy.steer_head.log_std.mean())), 6)

        evaluate.env = type("Env", (), {"close": lambda self: None})()
        return evaluate

    policy = builtin_policy(0, noise_method="noise_steer")[0]
    monkeypatch.setattr(lerobot_policy_pi_rl.sft, "load_policy", lambda *a, **kw: (policy, None, None))
    monkeypatch.setattr(learner.trainer, "make_evaluator", make_evaluator)
    cache = tmp_path / "success_by_noise_std.json"
    first = _sft_success_by_noise_std(tmp_path, 200, cache, 1)
    assert first == {str(s): pytest.approx(0.2 + s) for s in NOISE_STDS} and len(scored) == len(NOISE_STDS)
    assert _sft_success_by_noise_std(tmp_path, 200, cache, 1) == first and len(scored) == len(NOISE_STDS)  # cached
    other = _sft_success_by_noise_std(tmp_path, 50, cache, 1)  # other episodes: scored again
    assert other == {str(s): pytest.approx(0.05 + s) for s in NOISE_STDS} and len(scored) == 2 * len(NOISE_STDS)
    delays.append(2)  # the same episodes with another decision delay: scored again
    _sft_success_by_noise_std(tmp_path, 50, cache, 2)
    assert len(scored) == 3 * len(NOISE_STDS)


def test_the_noise_oracle_counts_episodes_some_random_noise_solves(tmp_path, monkeypatch):
    """The SFT's noise oracle runs the same evaluation episodes once at std 0.05 and ORACLE_DRAWS times with other
    random noises at std 1, and reports per episode: solved by any draw, and how the draws do on the episodes the
    tempered run fails. Cached per evaluation episodes and delay."""
    import math

    import torch

    import learner.trainer
    import lerobot_policy_pi_rl.rollout
    import lerobot_policy_pi_rl.sft
    from helpers.policy import builtin_policy
    from pirl_tools.bench_robot import ORACLE_DRAWS, _sft_noise_oracle

    calls = []

    def make_evaluator(pre, post, episodes, **kw):
        assert kw["env_name"] == "pirl_sim" and kw["env_kwargs"] == {"obs_delay_ticks": 1}
        evaluate = lambda policy: None  # noqa: E731  (only its env is used)
        evaluate.env = type("Env", (), {"close": lambda self: None, "num_envs": 10})()
        evaluate.seed = 1_000_000
        return evaluate

    def episode_successes(runner, env, *, episodes, seed, noise_seed=None):
        std = math.exp(float(policy.steer_head.log_std.mean()))
        calls.append((round(std, 2), noise_seed))
        j = torch.arange(episodes)
        if std < 0.5:  # tempered: the first 90% of the episodes succeed
            return j < int(0.9 * episodes)
        k = noise_seed - seed - 1  # draw k solves every episode j with (j + k) % 8 == 0, and episode 0 always
        return ((j + k) % 8 == 0) | (j == 0)

    policy = builtin_policy(0, noise_method="noise_steer")[0]
    monkeypatch.setattr(lerobot_policy_pi_rl.sft, "load_policy", lambda *a, **kw: (policy, None, None))
    monkeypatch.setattr(learner.trainer, "make_evaluator", make_evaluator)
    monkeypatch.setattr(lerobot_policy_pi_rl.rollout.PolicyRunner, "for_env", staticmethod(lambda *a: None))
    monkeypatch.setattr(lerobot_policy_pi_rl.rollout, "episode_successes", episode_successes)
    cache = tmp_path / "noise_oracle.json"
    got = _sft_noise_oracle(tmp_path, 80, cache, 1)
    # one tempered run on the evaluation's own noise, then ORACLE_DRAWS draws with other noises, all at std 1
    assert calls[0] == (0.05, 1_000_000) and len(calls) == 1 + ORACLE_DRAWS
    assert {c[0] for c in calls[1:]} == {1.0} and len({c[1] for c in calls}) == len(calls)
    assert got["tempered_success"] == 0.9 and got["failing_at_0.05"] == 8
    assert got["any_draw"] == 1.0  # 16 draws cover every residue mod 8
    assert got["success_per_draw"] == pytest.approx((2 * 10 + 14 * 11) / (16 * 80), abs=1e-4)
    assert got["their_any_draw"] == 1.0 and got["their_success_per_draw"] == 0.125
    assert _sft_noise_oracle(tmp_path, 80, cache, 1) == got and len(calls) == 1 + ORACLE_DRAWS  # cached


def test_twin_runtime_refuses_what_only_the_robot_has_in_one_line():
    p = subprocess.run([*BENCH, "--runtime=twin", "--methods=[interventions_bc]"], capture_output=True, text=True)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert (
        last
        == "pirl-bench robot: error: methods: runtime=twin cannot run interventions_bc: takeovers need the robot (runtime=robot)"
    ), last
    p = subprocess.run([*BENCH, "--runtime=twin", "--outcome=robot"], capture_output=True, text=True)
    assert p.returncode == 2 and "runtime=twin has no person or detector" in p.stderr.strip().splitlines()[-1]
    p = subprocess.run([*BENCH, "--runtime=process"], capture_output=True, text=True)
    assert p.returncode == 2 and "runtime: must be one of ['robot', 'twin']" in p.stderr.strip().splitlines()[-1]


def test_twin_settings_are_the_methods_learner_settings():
    """runtime=twin runs exactly the flags the learner would get: episodes per update, evaluation cadence, noise
    method and every algorithm.* value; methods with BC data, offline demos or takeovers are refused."""
    from pirl_tools.bench_robot import METHODS, twin_settings

    noise_method, algorithm, per_update, eval_every = twin_settings("noise_q_action_fast")
    assert (noise_method, per_update, eval_every) == ("noise_steer", 16, 2)
    assert algorithm == {
        k.removeprefix("algorithm."): v
        for k, v in METHODS["noise_q_action_fast"]["learner"].items()
        if k.startswith("algorithm.")
    }
    assert (
        algorithm["actor_lr"] == 1e-3 and algorithm["steer_update"] == "q" and algorithm["q_critic_input"] == "action"
    )
    assert twin_settings("baseline") == (None, {"actor_lr": 3e-5}, 128, 1)
    for method, why in (
        ("hg_dagger", "takeovers"),
        ("success_bc", "bc.successes"),
        ("noise_q_action_demos", "offline demos"),
    ):
        with pytest.raises(ValueError, match=why):
            twin_settings(method)


def test_a_twin_run_reports_the_robot_runs_fields(tmp_path, monkeypatch):
    """A twin run's record has the robot runs' shape: its episodes are its updates x episodes per update, its
    robot-time the twin's env steps at 25 Hz, robot_success the rollouts' own success since the last evaluation;
    run_pirl gets the method's settings, the delayed twin and the target."""
    import lerobot_policy_pi_rl.learn
    import lerobot_policy_pi_rl.sft
    from lerobot_policy_pi_rl.learn import LearnResult
    from pirl_tools.bench_robot import BenchRobotConfig, _run_twin

    seen = {}

    def run_pirl(policy, pre, post, algo, settings, progress=None):
        seen.update(algo=algo, settings=settings)
        history = [
            {"update": 1, "env_steps": 500, "rollout_success": 0.5},
            {"update": 2, "env_steps": 1000, "rollout_success": 0.7, "eval_success": 0.8},
            {"update": 3, "env_steps": 1400, "rollout_success": 0.9},
            {"update": 4, "env_steps": 1800, "rollout_success": 0.8, "eval_success": 0.91},
        ]
        return LearnResult(0.6, 0.91, 0.91, 1800, 4, 1.0, [], history)

    monkeypatch.setattr(lerobot_policy_pi_rl.sft, "load_policy", lambda *a, **kw: (kw, None, None))
    monkeypatch.setattr(lerobot_policy_pi_rl.learn, "run_pirl", run_pirl)
    cfg = BenchRobotConfig(out=str(tmp_path), runtime="twin", methods=["noise_q_action_fast"], max_episodes=500)
    run = _run_twin(cfg, "noise_q_action_fast", 3, tmp_path / "sft")
    s = seen["settings"]
    assert (s.num_envs, s.eval_every, s.seed, s.iterations, s.target_success) == (16, 2, 3, 32, 0.9)
    assert s.env == "pirl_sim" and s.env_kwargs == {"obs_delay_ticks": 1}
    assert seen["algo"].actor_lr == 1e-3 and seen["algo"].steer_update == "q"
    assert run["method"] == "noise_q_action_fast (twin)" and run["runtime"] == "twin"
    assert [(c["episodes"], c["success"], c["robot_success"]) for c in run["curve"]] == [
        (0, 0.6, None),
        (32, 0.8, 0.6),
        (64, 0.91, 0.85),
    ]
    assert run["episodes_to_target"] == 64 and run["robot_seconds_to_target"] == 72.0
    assert run["episodes"] == 64 and run["robot_seconds"] == 72.0
    assert (tmp_path / "noise_q_action_fast-s3-twin" / "history.json").is_file()
