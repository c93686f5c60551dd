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

LEARNER = ["pirl-learner", "--tokens", "tokens.json"]
EDGE = ["pirl-edge", "--learner", "127.0.0.1:1", "--robot-id", "r", "--tokens", "t.json", "--policy-path", "p"]
CASES = [
    (learner_main.main, [*LEARNER, "--max-record-bytes", "-1"], "--max-record-bytes"),
    (learner_main.main, [*LEARNER, "--max-version-lag", "-1"], "--max-version-lag"),
    (learner_main.main, [*LEARNER, "--max-updates", "-1"], "--max-updates"),
    (learner_main.main, [*LEARNER, "--eval-every", "-1"], "--eval-every"),
    (learner_main.main, [*LEARNER, "--max-streams-per-robot", "0"], "--max-streams-per-robot"),
    (learner_main.main, [*LEARNER, "--target-success", "1.5"], "--target-success"),
    (demo.main, ["pirl-demo", "--num-demos", "-1"], "--num-demos"),
    (demo.main, ["pirl-demo", "--time-limit", "-5"], "--time-limit"),
    (demo.main, ["pirl-demo", "--num-envs", "-1"], "--num-envs"),
    (demo.main, ["pirl-demo", "--episodes-per-update", "-1"], "--episodes-per-update"),
    (edge_main.main, [*EDGE, "--episodes", "-1"], "--episodes"),
    (edge_main.main, [*EDGE, "--duration", "-5"], "--duration"),
    (edge_main.main, [*EDGE, "--control-hz", "0"], "--control-hz"),
]


@pytest.mark.parametrize(("main", "argv", "flag"), CASES, ids=[" ".join(c[1][-2:]) for c in CASES])
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
            "--out",
            str(tmp_path / "out"),
            "--backbone",
            "pi0",
            "--dataset-repo-id",
            "me/data",
            "--dataset-root",
            str(not_a_dataset),
        ],
    )
    with pytest.raises(SystemExit) as ei:
        init.main()
    err = capsys.readouterr().err
    assert ei.value.code == 2
    assert err.startswith("error:") and "not a LeRobotDataset" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
