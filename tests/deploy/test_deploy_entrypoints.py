"""The images' entrypoints, run outside a container exactly as the Dockerfiles run them:
deploy/docker/{edge,learner}-entrypoint.sh turn PIRL_* settings into flags (--help, config file,
errors), and a learner + edge started through them serve, sync and pass the containers' healthchecks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.deploy import DOCKER, ROOT, Processes, make_checkpoint, process_env, wait_until
from helpers.net import free_port
from pirl.security import make_dev_pki

pytestmark = pytest.mark.slow  # the container entrypoints start real processes

EDGE = str(DOCKER / "edge-entrypoint.sh")
LEARNER = str(DOCKER / "learner-entrypoint.sh")


def run(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def stub_bin(tmp_path) -> Path:
    """pirl-edge / pirl-learner stand-ins that print the argv they were given, one per line."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("pirl-edge", "pirl-learner"):
        script = d / name
        script.write_text('#!/bin/sh\nprintf \'%s\\n\' "$0" "$@"\n')
        script.chmod(0o755)
    return d


def argv_from(stub_bin: Path, script: str, *args: str, config: Path | None = None, **env: str) -> list[str]:
    e = process_env(**env)
    e["PATH"] = f"{stub_bin}:{e['PATH']}"
    if config is not None:
        e["PIRL_CONFIG"] = str(config)
    res = run([script, *args], e)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    return lines[1:]  # drop $0


# ------------------------------------------------------------------------------------ the Dockerfiles


@pytest.mark.parametrize(
    "dockerfile, script", [("Dockerfile.edge", "edge-entrypoint.sh"), ("Dockerfile.learner", "learner-entrypoint.sh")]
)
def test_dockerfiles_use_these_entrypoints_and_healthchecks(dockerfile, script):
    text = (ROOT / dockerfile).read_text()
    kind = script.split("-")[0]
    assert f'ENTRYPOINT ["/opt/pirl/{script}"]' in text
    assert re.search(
        rf"COPY deploy/docker/{script} deploy/docker/entrypoint-lib.sh "
        rf"deploy/docker/healthcheck-{kind}.py /opt/pirl/",
        text,
    )
    assert f'CMD ["python", "/opt/pirl/healthcheck-{kind}.py"]' in text
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)


# ------------------------------------------------------------------------------------ flag mapping


@pytest.mark.parametrize("script, prog", [(EDGE, "pirl-edge"), (LEARNER, "pirl-learner")])
def test_help_lists_the_variables_then_the_programs_own_help(script, prog):
    res = run([script, "--help"], process_env())
    assert res.returncode == 0, res.stderr
    assert "PIRL_TOKENS" in res.stdout and "PIRL_CONFIG" in res.stdout
    assert f"usage: {prog}" in res.stdout


@pytest.mark.parametrize("script, prog", [(EDGE, "pirl-edge"), (LEARNER, "pirl-learner")])
def test_every_mapped_variable_becomes_a_flag_the_program_has(script, prog):
    text = Path(script).read_text()
    mapped = dict(re.findall(r"^(?:opt|switch|switch_not) (PIRL_[A-Z0-9_]+) (--[a-z_.]+)$", text, re.MULTILINE))
    assert len(mapped) >= 20
    helped = set(re.findall(r"--[a-z][a-z_.]+", run([prog, "--help"], process_env()).stdout))
    missing = set(mapped.values()) - helped
    assert not missing, f"{script} maps to flags {prog} does not have: {sorted(missing)}"
    documented = set(re.findall(r"PIRL_[A-Z0-9_]+", text[text.index("usage()") : text.index("TEXT\n}")]))
    assert set(mapped) <= documented, sorted(set(mapped) - documented)  # --help lists every variable


def test_edge_flags_from_environment_and_config_file(stub_bin, tmp_path):
    config = tmp_path / "edge.env"
    config.write_text(
        "# robot-0 on the bench\n"
        "PIRL_LEARNER=file-host:1\n"  # overridden by the environment below
        "PIRL_ROBOT_ID=robot-0\n"
        "PIRL_TOKENS='/etc/pirl/tokens.json'\n"  # one pair of quotes is removed
        'PIRL_POLICY_PATH="/var/lib/pirl/my policy"\n'
        "PIRL_SPOOL_DIR=$HOME/spool\n"  # never expanded: the file is data, not shell
        "\n"
        "PIRL_INSECURE=yes\n"
        "PIRL_EDGE_ARGS=--seed 7 --control.episodes 3\n"
    )
    argv = argv_from(
        stub_bin,
        EDGE,
        "--control.hz",
        "30",
        config=config,
        PIRL_LEARNER="env-host:2",
        PIRL_BACKEND="tensorrt",
        PIRL_METRICS_PORT="9101",
    )
    assert argv == [
        "--link.learner",
        "env-host:2",
        "--link.robot_id",
        "robot-0",
        "--link.tokens",
        "/etc/pirl/tokens.json",
        "--policy.path",
        "/var/lib/pirl/my policy",
        "--link.insecure=true",
        "--policy.backend",
        "tensorrt",
        "--spool.dir",
        "$HOME/spool",
        "--metrics.port",
        "9101",
        "--seed",
        "7",
        "--control.episodes",
        "3",
        "--control.hz",
        "30",
    ]


def test_learner_resumes_by_default_and_maps_switches(stub_bin):
    base = {"PIRL_TOKENS": "/t.json", "PIRL_HEALTH_ADDRESS": "0.0.0.0:8081", "PIRL_WAL_FSYNC": "1"}
    argv = argv_from(stub_bin, LEARNER, **base)
    assert argv == [
        "--tokens",
        "/t.json",
        "--resume=true",
        "--server.health_address",
        "0.0.0.0:8081",
        "--intake.wal_fsync=true",
    ]
    assert "--resume=false" in argv_from(stub_bin, LEARNER, PIRL_RESUME="0", **base)
    assert "--trainer.export_onnx=false" in argv_from(stub_bin, LEARNER, PIRL_NO_EXPORT_ONNX="1", **base)


@pytest.mark.parametrize(
    "script, env, config, needle",
    [
        (EDGE, {"PIRL_ROBOT_ID": "r", "PIRL_TOKENS": "t", "PIRL_POLICY_PATH": "p"}, None, "PIRL_LEARNER is not set"),
        (LEARNER, {}, None, "PIRL_TOKENS is not set"),
        (LEARNER, {"PIRL_TOKENS": "t", "PIRL_INSECURE": "maybe"}, None, "PIRL_INSECURE must be 1/true/yes/on"),
        (LEARNER, {}, "PIRL_TOKENS=t\nexport PIRL_SEED=1\n", "learner.env:2: expected PIRL_NAME=value"),
        (EDGE, {}, "HOME=/root\n", "edge.env:1: expected PIRL_NAME=value"),
    ],
)
def test_user_mistakes_print_one_error_line_and_exit_2(stub_bin, tmp_path, script, env, config, needle):
    e = process_env(**env)
    e["PATH"] = f"{stub_bin}:{e['PATH']}"
    if config is not None:
        path = tmp_path / ("edge.env" if script == EDGE else "learner.env")
        path.write_text(config)
        e["PIRL_CONFIG"] = str(path)
    res = run([script], e)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_a_named_config_file_that_is_missing_is_an_error(stub_bin, tmp_path):
    e = process_env(PIRL_CONFIG=str(tmp_path / "nope.env"), PIRL_TOKENS="t")
    e["PATH"] = f"{stub_bin}:{e['PATH']}"
    res = run([LEARNER], e)
    assert res.returncode == 2 and "nope.env is not readable" in res.stderr


# ------------------------------------------------------------------------------------ real processes


def test_learner_and_edge_through_the_entrypoints_serve_sync_and_pass_healthchecks(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    pki = make_dev_pki(tmp_path / "certs", ["robot-0"])
    health, metrics_learner, metrics_edge = free_port(), free_port(), free_port()
    procs = Processes(tmp_path / "logs")
    try:
        procs.start(
            "learner",
            [LEARNER],
            process_env(
                PIRL_TOKENS=str(pki["tokens"]),
                PIRL_TLS_CERT=str(pki["server_cert"]),
                PIRL_TLS_KEY=str(pki["server_key"]),
                PIRL_POLICY_PATH=str(ckpt),
                PIRL_OUTPUT_DIR=str(tmp_path / "learner"),
                PIRL_ADDRESS="127.0.0.1:0",
                PIRL_PORT_FILE=str(tmp_path / "learner.port"),
                PIRL_HEALTH_ADDRESS=f"127.0.0.1:{health}",
                PIRL_METRICS_PORT=str(metrics_learner),
                PIRL_EPISODES_PER_UPDATE="4",
                PIRL_EVAL_EVERY="0",
                PIRL_MAX_VERSION_LAG="5",
            ),
        )
        port_file = tmp_path / "learner.port"
        port = wait_until(
            lambda: port_file.is_file() and port_file.read_text().strip(),
            180,
            "the learner's port",
            check=lambda: procs.alive("learner"),
        )

        def learner_health(*extra: str) -> subprocess.CompletedProcess:
            return run(
                [sys.executable, str(DOCKER / "healthcheck-learner.py"), *extra],
                process_env(PIRL_HEALTH_ADDRESS=f"0.0.0.0:{health}"),
                timeout=30,
            )

        ok = learner_health()  # the image's HEALTHCHECK: plaintext health port from PIRL_HEALTH_ADDRESS
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
        tls = learner_health("--address", f"127.0.0.1:{port}", "--tls-ca", str(pki["ca_cert"]))
        assert tls.returncode == 0 and "SERVING" in tls.stdout, tls.stdout + tls.stderr

        # the edge reads part of its settings from a config file, like /etc/pirl/edge.env on a robot
        config = tmp_path / "edge.env"
        config.write_text(
            f"PIRL_LEARNER=127.0.0.1:{port}\nPIRL_ROBOT_ID=robot-0\nPIRL_TOKENS={pki['tokens']}\n"
            f"PIRL_TLS_CA={pki['ca_cert']}\nPIRL_MODE=paced\nPIRL_CONTROL_HZ=50\n"
        )
        procs.start(
            "robot-0",
            [EDGE],
            process_env(
                PIRL_CONFIG=str(config),
                PIRL_POLICY_PATH=str(ckpt),
                PIRL_SPOOL_DIR=str(tmp_path / "spool"),
                PIRL_STATS_FILE=str(tmp_path / "edge-stats.json"),
                PIRL_METRICS_PORT=str(metrics_edge),
                PIRL_BACKEND="onnxruntime",
                PIRL_DRAIN_TIMEOUT="60",
            ),
        )
        status = tmp_path / "learner" / "status.json"
        wait_until(
            lambda: status.is_file() and json.loads(status.read_text()).get("version", 0) >= 1,
            240,
            "policy version 1",
            check=lambda: (procs.alive("learner"), procs.alive("robot-0")),
        )

        edge_health = [sys.executable, str(DOCKER / "healthcheck-edge.py")]
        ok = run(edge_health, process_env(PIRL_METRICS_PORT=str(metrics_edge)), timeout=30)
        assert ok.returncode == 0 and "ticks in" in ok.stdout, ok.stdout + ok.stderr

        assert procs.stop("robot-0") == 0, procs.log("robot-0")
        stats = json.loads((tmp_path / "edge-stats.json").read_text())
        assert stats["robot_id"] == "robot-0" and stats["backend"] == "onnxruntime"
        assert stats["records_acked"] > 0 and stats["records_left_in_spool"] == 0
        assert stats["control_hz"] == 50 and stats["policy_version"] >= 1  # the version synced to the robot
        down = run(edge_health, process_env(PIRL_METRICS_PORT=str(metrics_edge)), timeout=30)
        assert down.returncode == 1 and "unhealthy" in down.stdout

        assert procs.stop("learner") == 0, procs.log("learner")
        gone = learner_health()
        assert gone.returncode == 1 and "unhealthy" in gone.stdout
    finally:
        procs.close()
