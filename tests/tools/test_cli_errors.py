"""A user mistake on the command line is one `error:` line naming the flag and exit status 2, before
any work starts: no traceback, no minutes of SFT first, no silent misbehaviour (a learner refusing
every record, a demo recording "-1 demonstrations", an edge exiting 0 having done nothing).

The CLIs run in-process (their main(), argv patched): each bad value must stop them while parsing,
so nothing slow happens and the test stays fast."""

from __future__ import annotations

import sys

import pytest

from edge import main as edge_main
from learner import main as learner_main
from pirl_tools import demo, init

LEARNER = ["pirl-learner", "--tokens=tokens.json"]
EDGE = ["pirl-edge", "--link.learner=127.0.0.1:1", "--link.robot_id=r", "--link.tokens=t.json", "--policy.path=p"]
CASES = [
    (learner_main.main, [*LEARNER, "--intake.max_record_bytes=-1"], "intake.max_record_bytes"),
    (learner_main.main, [*LEARNER, "--intake.max_version_lag=-1"], "intake.max_version_lag"),
    (learner_main.main, [*LEARNER, "--trainer.max_updates=-1"], "trainer.max_updates"),
    (learner_main.main, [*LEARNER, "--trainer.eval_every=-1"], "trainer.eval_every"),
    (learner_main.main, [*LEARNER, "--server.max_streams_per_robot=0"], "server.max_streams_per_robot"),
    (learner_main.main, [*LEARNER, "--trainer.target_success=1.5"], "trainer.target_success"),
    (learner_main.main, [*LEARNER, "--algorithm.update_epochs=0"], "algorithm.update_epochs"),
    (learner_main.main, [*LEARNER, "--algorithm.actor_lr=fast"], "algorithm.actor_lr"),
    (learner_main.main, [*LEARNER, "--trainer.episodes_per_updates=3"], "--trainer.episodes_per_updates"),
    (learner_main.main, ["pirl-learner"], "tokens"),
    (demo.main, ["pirl-demo", "--num_demos=-1"], "num_demos"),
    (demo.main, ["pirl-demo", "--time_limit=-5"], "time_limit"),
    (demo.main, ["pirl-demo", "--num_envs=-1"], "num_envs"),
    (demo.main, ["pirl-demo", "--episodes_per_update=-1"], "episodes_per_update"),
    (demo.main, ["pirl-demo", "--robot=sim", "--method=noise_magic"], "method"),
    (demo.main, ["pirl-demo", "--method=noise_q_action"], "method"),
    (demo.main, ["pirl-demo", "--robot=sim", "--method=noise_q_action_takeovers"], "method"),
    (demo.main, ["pirl-demo", "--config_path=missing.yaml"], "missing.yaml"),
    (edge_main.main, [*EDGE, "--control.episodes=-1"], "control.episodes"),
    (edge_main.main, [*EDGE, "--control.duration_s=-5"], "control.duration_s"),
    (edge_main.main, [*EDGE, "--control.hz=0"], "control.hz"),
    (edge_main.main, [*EDGE, "--policy.backend=cuda-magic"], "policy.backend"),
    (edge_main.main, EDGE[:-1], "policy.path"),
]


@pytest.mark.parametrize(("main", "argv", "flag"), CASES, ids=[c[1][-1] for c in CASES])
def test_bad_values_are_one_error_line_before_any_work(main, argv, flag, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder must stay empty
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as ei:
        main()
    err = capsys.readouterr().err
    assert ei.value.code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and flag in errors[0], err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_a_folder_that_is_not_a_dataset(tmp_path, monkeypatch, capsys):
    not_a_dataset = tmp_path / "somewhere"
    not_a_dataset.mkdir()
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pirl-init",
            f"--out={tmp_path / 'out'}",
            "--backbone=pi0",
            "--dataset_repo_id=me/data",
            f"--dataset_root={not_a_dataset}",
        ],
    )
    with pytest.raises(SystemExit) as ei:
        init.main()
    err = capsys.readouterr().err
    assert ei.value.code == 2
    assert err.startswith("error:") and "not a LeRobotDataset" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def _cli_configs():
    """Every draccus config a command of the project parses (``prog`` -> class)."""
    import importlib

    from edge.configuration import EdgeConfig
    from learner.configuration import LearnerConfig
    from pirl.export.onnx_export import ExportConfig
    from pirl_tools import bench, sft, success_detector

    configs = {
        "pirl-learner": LearnerConfig,
        "pirl-edge": EdgeConfig,
        "pirl-export": ExportConfig,
        "pirl-init": init.InitConfig,
        "pirl-demo": demo.DemoConfig,
        "pirl-sft": sft.SFTConfig,
        "pirl-success train": success_detector.TrainConfig,
        "pirl-success eval": success_detector.EvalConfig,
    }
    configs.update({f"pirl-bench {name}": cls for name, (cls, _) in bench.COMMANDS.items()})
    for name, (module, cls_name) in bench.MODULE_COMMANDS.items():
        configs[f"pirl-bench {name}"] = getattr(importlib.import_module(module), cls_name)
    return configs


@pytest.mark.parametrize("prog", sorted(_cli_configs()))
def test_every_command_help_prints(prog, capsys):
    """--help of every command exits 0 with its fields documented. argparse %-formats help strings, so a
    field comment such as "at or below 60%" once made `pirl-bench metaworld --help` a traceback."""
    from pirl.cli import parse_config

    with pytest.raises(SystemExit) as ei:
        parse_config(_cli_configs()[prog], prog=prog, args=["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: " + prog) and "--" in out
