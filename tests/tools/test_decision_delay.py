"""The simulated robot on the same terms as its twin, on both sides: the edge asks for each chunk a fixed number
of ticks early and the learner's twin evaluation delays its observations as much; the robot's safety layer is
bounded to the workspace the twin clips to (pirl-bench robot, and pirl-demo running one of its methods)."""

from __future__ import annotations

import pytest

from pirl_tools.bench_robot import (
    DECISION_DELAY_TICKS,
    BenchRobotConfig,
    decision_delay_flags,
    workspace_bounds_flags,
)
from pirl_tools.demo import DemoConfig, _learning_flags, _sim_robot_args


def test_the_edge_asks_as_early_as_the_evaluation_delays():
    edge, learner = decision_delay_flags(3)
    assert edge == ["--control.lead_ticks=3"]
    assert learner == ["--trainer.eval_env_kwargs={obs_delay_ticks: 3}"]


def test_the_safety_layer_is_bounded_to_the_workspace_the_twin_clips_to():
    from lerobot_robot_pirl_sim import PirlSimVecEnv

    from edge.safety import SafetyConfig, resolve_bounds
    from pirl.cli import parse_config

    cfg = parse_config(SafetyConfig, prog="test", args=[f.replace("--safety.", "--") for f in workspace_bounds_flags()])
    twin = PirlSimVecEnv(1)
    # the config's bounds win over the SFT dataset's narrower min / max
    bounds = resolve_bounds(cfg, 3, dataset_stats={"min": [-0.1, -0.1, 0.0], "max": [0.1, 0.1, 100.0]})
    assert bounds.source == "config"
    assert bounds.low.tolist() == twin.action_low.tolist() and bounds.high.tolist() == twin.action_high.tolist()


def test_a_delay_below_one_tick_is_refused():
    with pytest.raises(ValueError, match="decision_delay_ticks"):
        BenchRobotConfig(decision_delay_ticks=0)


def test_the_demo_runs_a_bench_method_with_the_delay_on_both_sides_and_its_ppo_without(tmp_path):
    edge, learner = decision_delay_flags(DECISION_DELAY_TICKS)
    steered = DemoConfig(robot="sim", operator="scripted")
    assert set(edge + workspace_bounds_flags()) <= set(_sim_robot_args(steered, tmp_path, 25.0))
    assert set(learner) <= set(_learning_flags(steered, tmp_path, True))
    ppo = DemoConfig(robot="sim")  # the demo's own PPO with a simulation farm: the edge's measured lead, no delay
    assert not any(f.startswith(("--control.lead_ticks", "--safety.")) for f in _sim_robot_args(ppo, tmp_path, 25.0))
    assert not any(f.startswith("--trainer.eval_env_kwargs") for f in _learning_flags(ppo, tmp_path, True))
