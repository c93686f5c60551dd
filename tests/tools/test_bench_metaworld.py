"""pirl-bench metaworld end to end at a toy budget: MetaWorld's expert records demos, LeRobot's train loop runs the
SFT, PI-RL updates once, metaworld.json and the plot are written; a second call skips what is done; bad input is
one error line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("metaworld", reason="MetaWorld is part of the test extra")

from pirl.cli import parse_config  # noqa: E402
from pirl_tools.bench_metaworld import BenchMetaWorldConfig, run  # noqa: E402

TINY = [
    "--tasks=[reach-v3]",
    "--noise_method=[flow_sde,noise_q_action]",
    "--num_demos=2",
    "--max_demos=2",
    "--sft_steps=10",
    "--min_sft_steps=10",
    "--max_sft_steps=10",
    "--iterations=1",
    "--num_envs=4",
    "--eval_every=1",
    "--eval_episodes=4",
    "--max_episode_steps=60",
    "--time_limit=600",
]


@pytest.fixture
def root_logging():
    """LeRobot's train() (the SFT stage) adds a root handler bound to this test's captured stderr; later tests
    would log into that closed stream ("--- Logging error ---"): put the root logger back as it was."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_a_tiny_metaworld_benchmark_writes_its_results_and_resumes(tmp_path, capsys, root_logging):
    out = tmp_path / "mw"
    cfg = parse_config(BenchMetaWorldConfig, prog="pirl-bench metaworld", args=[f"--out={out}", *TINY])
    assert run(cfg, "pirl-bench metaworld (test)") == 0
    report = json.loads((out / "metaworld.json").read_text())
    r, steered = report["runs"]
    assert (r["task"], r["noise_method"], r["seed"]) == ("reach-v3", "flow_sde", 0)
    # noise_q_action: the same SFT (a fresh steering head hands the flow the same noise), DSRL-style settings
    assert steered["noise_method"] == "noise_q_action" and steered["sft_success"] == r["sft_success"]
    assert r["algorithm"] == {"actor_lr": 3e-5}
    assert steered["algorithm"] == {
        "actor_lr": 3e-4,
        "steer_update": "q",
        "entropy_coef": 0.0,
        "q_critic_input": "action",
    }
    assert steered["updates"] == 1 and steered["env_steps"] > 0
    assert set(report["mean_final_success_by_method"]) == {"flow_sde", "noise_q_action"}
    # the tempered-SFT bar, scored on run_pirl's evaluation: at std 1 it is the SFT score itself
    by_noise = r["sft_success_by_noise_std"]
    assert list(by_noise) == ["1.0", "0.5", "0.25", "0.05"] and by_noise["1.0"] == pytest.approx(r["sft_success"])
    assert steered["sft_success_by_noise_std"] == by_noise
    assert (out / "sft" / "reach-v3-seed0" / "success_by_noise_std.json").is_file()
    assert 0 <= r["sft_success"] <= 1 and 0 <= r["final_success"] <= 1 and r["updates"] == 1
    assert r["env_steps"] > 0 and r["wall_seconds"] > 0 and len(r["curve"]) == 2
    assert report["settings"]["variants"] == "mt1" and report["paper_mt50"]["pi0"]["flow_noise"] == 0.858
    assert (out / "metaworld.png").stat().st_size > 0
    assert (out / "metaworld_curves.png").stat().st_size > 0
    # the calibration starts at 2 demos (the ladder's top: [(1, 10), (2, 10)]) and goes down only if SFT scores
    # above the band; the chosen rung's calibration score is the SFT score run_pirl measured (same evaluation)
    trail = r["sft_calibration"]
    assert trail[0][:2] == [2, 10] and len(trail) <= 2 and (r["num_demos"], r["sft_steps"]) in ((1, 10), (2, 10))
    assert {tuple(t[:2]): t[2] for t in trail}[(r["num_demos"], 10)] == pytest.approx(r["sft_success"])
    chosen = out / "sft" / "reach-v3-seed0" / f"d{r['num_demos']}-s10"
    assert (chosen / "data" / "meta" / "info.json").is_file()
    # the demos' state statistics were widened to MetaWorld's start states (reach's goal position varies)
    assert r["start_states"] == 256
    widened = json.loads((chosen / "data" / "meta" / "pirl_start_states.json").read_text())["widened"]
    assert widened["observation.state"]["dims"]
    assert json.loads((out / "sft" / "reach-v3-seed0" / "calibration.json").read_text())["num_demos"] == r["num_demos"]
    # each method's progress lines show its own diagnostics: PPO's trust region, the steering critic's fit
    printed = capsys.readouterr().out
    assert "approx_kl" in printed and "q_loss" in printed and "steer_std" in printed
    # the same command again: the run is in metaworld.json, nothing is run twice
    assert run(cfg, "pirl-bench metaworld (test)") == 0
    assert "in " in capsys.readouterr().out and len(json.loads((out / "metaworld.json").read_text())["runs"]) == 2
    # a second RL seed from seed 0's demos and SFT (--sft_seed=0): nothing recorded or trained again, and the run
    # says which SFT it started from
    steer_only = [a for a in TINY if not a.startswith("--noise_method")] + ["--noise_method=[noise_q_action]"]
    args = [f"--out={out}", *steer_only, "--seeds=[1]", "--sft_seed=0"]
    cfg = parse_config(BenchMetaWorldConfig, prog="pirl-bench metaworld", args=args)
    assert run(cfg, "pirl-bench metaworld (test)") == 0
    assert "reusing the calibrated SFT" in capsys.readouterr().out
    runs = json.loads((out / "metaworld.json").read_text())["runs"]
    assert [(x["seed"], x["sft_seed"]) for x in runs] == [(0, 0), (0, 0), (1, 0)]
    assert runs[2]["sft_success"] == steered["sft_success"] and runs[2]["num_demos"] == steered["num_demos"]
    assert not (out / "sft" / "reach-v3-seed1").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks=[push-v9]"], "tasks: unknown MetaWorld v3 tasks ['push-v9']"),
        (["--noise_method=[ode]"], "noise_method: each must be one of"),
        (["--max_episode_steps=600"], "max_episode_steps: MetaWorld's limit is 500"),
        (["--variants=mt50"], "variants: 'mt1' or 'random'"),
        (["--start_states=-1"], "start_states: must be >= 0 (got -1)"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, args, message):
    bench = Path(sys.executable).parent / "pirl-bench"
    p = subprocess.run(
        [str(bench), "metaworld", f"--out={tmp_path / 'x'}", *args], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
