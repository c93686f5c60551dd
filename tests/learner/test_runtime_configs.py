"""pirl-learner and pirl-edge take draccus configs the way LeRobot's CLIs do: every field a flag with
its documentation in --help, a YAML file that round-trips, flags on top of it, one error line for a
wrong field; the learner's algorithm starts from the built-in task preset field by field."""

from __future__ import annotations

import io

import draccus
import pytest

from edge.configuration import EdgeConfig
from learner.configuration import LearnerConfig
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithmConfig
from lerobot_policy_pi_rl.presets import BuiltinTaskAlgorithmConfig
from pirl.cli import parse_config

EDGE_REQUIRED = ["--link.learner=h:1", "--link.robot_id=r", "--link.tokens=t.json", "--policy.path=p"]


def test_learner_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as ei:
        parse_config(LearnerConfig, prog="pirl-learner", args=["--help"])
    assert ei.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--algorithm.actor_lr float" in out and "the paper's 5e-6 is for a 300 M-parameter action expert" in out
    assert "--trainer.episodes_per_update int complete episodes per PI-RL update (one batch)" in out
    assert "--server.max_streams_per_robot int open calls of each streaming RPC" in out


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (
            LearnerConfig,
            [
                "--tokens=t.json",
                "--trainer.episodes_per_update=32",
                "--algorithm.actor_lr=1e-4",
                "--server.address=0.0.0.0:50051",
                "--tensorrt.batch_max=4",
                "--resume=true",
            ],
        ),
        (
            EdgeConfig,
            [
                *EDGE_REQUIRED,
                "--control.mode=unpaced",
                "--control.num_envs=8",
                "--spool.fsync=false",
                "--policy.backend=onnxruntime",
            ],
        ),
    ],
    ids=["learner", "edge"],
)
def test_a_yaml_config_round_trips_and_flags_override_it(cls, args, tmp_path):
    cfg = parse_config(cls, prog="t", args=args)
    text = io.StringIO()
    draccus.dump(cfg, text)
    path = tmp_path / "run.yaml"
    path.write_text(text.getvalue())
    assert parse_config(cls, prog="t", args=[f"--config_path={path}"]) == cfg
    again = parse_config(cls, prog="t", args=[f"--config_path={path}", "--seed=7"])
    assert again.seed == 7 and again == cfg.__class__(**{**cfg.__dict__, "seed": 7})


def test_a_wrong_field_in_a_config_file_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("tokens: t.json\ntrainer:\n  episodes_per_updte: 3\n")
    with pytest.raises(SystemExit) as ei:
        parse_config(LearnerConfig, prog="pirl-learner", args=[f"--config_path={path}"])
    err = capsys.readouterr().err.strip()
    assert ei.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("pirl-learner: error:") and "episodes_per_updte" in err


def test_the_algorithm_keeps_the_preset_for_every_field_not_given():
    """draccus builds a nested config from its class defaults, not from a default_factory's instance:
    the preset must be the class's own defaults, or one flag would silently reset the others."""
    cfg = parse_config(LearnerConfig, prog="t", args=["--tokens=t", "--algorithm.actor_lr=1e-4"])
    preset = BuiltinTaskAlgorithmConfig()
    assert cfg.algorithm.actor_lr == 1e-4
    assert (cfg.algorithm.critic_lr, cfg.algorithm.update_epochs, cfg.algorithm.weight_decay) == (
        preset.critic_lr,
        preset.update_epochs,
        preset.weight_decay,
    )
    assert preset.critic_lr != PiRLAlgorithmConfig().critic_lr  # the check above would otherwise prove nothing
    plain = cfg.algorithm.plain()
    assert type(plain) is PiRLAlgorithmConfig and plain.actor_lr == 1e-4 and plain.critic_lr == preset.critic_lr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--env.type=pirl_reach", "--control.env_kwargs={a: 1}"], "control.env_kwargs: apply to control.env"),
    ],
)
def test_edge_env_type_conflicts_are_one_error_line(args, message, capsys):
    with pytest.raises(SystemExit) as ei:
        parse_config(EdgeConfig, prog="pirl-edge", args=[*EDGE_REQUIRED, *args])
    err = capsys.readouterr().err.strip()
    assert ei.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    # a LeRobot env type parses with its own fields, as lerobot-eval takes them
    cfg = parse_config(
        EdgeConfig, prog="pirl-edge", args=[*EDGE_REQUIRED, "--env.type=pirl_reach", "--env.episode_length=30"]
    )
    assert cfg.env.type == "pirl_reach" and cfg.env.episode_length == 30
