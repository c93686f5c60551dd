"""deploy/edge/pirl-flash: --dry-run prints every command in order and never a secret; a real run
executes exactly those commands (here against stand-ins for ssh and docker that record what they
get), sending only this robot's token; user mistakes print one error line and exit 2."""

from __future__ import annotations

import gzip
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest

from helpers.deploy import ROOT
from pirl.security import make_dev_pki

FLASH = ROOT / "deploy" / "edge" / "pirl-flash"


@pytest.fixture
def inputs(tmp_path):
    pki = make_dev_pki(tmp_path / "certs", ["robot-0", "robot-3"])
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text('{"type": "pi_rl"}')
    (policy / "model.safetensors").write_bytes(b"weights")
    tokens = json.loads(pki["tokens"].read_text())
    return pki, policy, tokens


def flash(pki, policy, *extra, env=None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(FLASH),
        "--host",
        "pirl@robot-3.local",
        "--robot-id",
        "robot-3",
        "--image",
        "pirl-edge:jp6",
        "--learner",
        "learner.example.com:50051",
        "--tokens",
        str(pki["tokens"]),
        "--ca",
        str(pki["ca_cert"]),
        "--policy",
        str(policy),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def remote(line: str) -> str:
    """The remote command of an ssh line."""
    return shlex.split(line.split(" | ")[-1].split(" < ")[0])[-1]


def test_dry_run_prints_every_command_in_order_and_no_secret(inputs):
    pki, policy, tokens = inputs
    res = flash(pki, policy, "--env", "PIRL_CONTROL_HZ=30", "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    ssh = "ssh pirl@robot-3.local"
    assert lines[0] == f"{ssh} 'sudo --non-interactive docker version'"
    assert lines[1] == f"docker save pirl-edge:jp6 | gzip -1 | {ssh} 'sudo --non-interactive docker load'"
    remotes = [remote(line) for line in lines]
    sudo = "sudo --non-interactive "
    # secrets: created 0600 for the container's uid before any byte is written
    i = remotes.index(sudo + "install -m 0600 -o 10001 -g 10001 /dev/null /etc/pirl/tokens.json")
    assert remotes[i + 1] == sudo + "dd of=/etc/pirl/tokens.json status=none"
    assert "robot-3's entry" in lines[i + 1] and "not shown" in lines[i + 1]
    for name in ("edge.env", "ca.pem", "compose.env"):
        assert sudo + f"dd of=/etc/pirl/{name} status=none" in remotes
    assert lines.index(next(x for x in lines if x.startswith("tar -C "))) > remotes.index(
        sudo + "rm -rf /var/lib/pirl/policy"
    )
    assert remotes[-4:] == [
        sudo + "systemctl daemon-reload",
        sudo + "systemctl enable pirl-edge.service",
        sudo + "systemctl restart pirl-edge.service",
        "systemctl is-active pirl-edge.service",
    ]
    assert len(lines) == 22
    for token in tokens.values():
        assert token not in res.stdout
    assert res.stderr == ""


def test_dry_run_with_pull_and_mutual_tls(inputs, tmp_path):
    pki, policy, _ = inputs
    res = flash(
        pki,
        policy,
        "--pull",
        "--no-sudo",
        "--client-cert",
        str(tmp_path / "certs" / "client-robot-3.pem"),
        "--client-key",
        str(tmp_path / "certs" / "client-robot-3.key"),
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr
    remotes = [remote(line) for line in res.stdout.splitlines()]
    assert "docker pull pirl-edge:jp6" in remotes and not any("docker save" in x for x in res.stdout.splitlines())
    assert "install -m 0600 -o 10001 -g 10001 /dev/null /etc/pirl/client.key" in remotes
    assert not any(r.startswith("sudo") for r in remotes)
    assert "BEGIN" not in res.stdout  # no key material


def test_a_real_run_sends_exactly_the_planned_commands_and_only_this_robots_token(inputs, tmp_path):
    pki, policy, tokens = inputs
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    recorder = (
        f"#!{sys.executable}\nimport json, sys\nrec = {{'argv': sys.argv[1:], 'stdin': sys.stdin.buffer.read().hex()}}\n"
        f"open({str(log)!r}, 'a').write(json.dumps(rec) + '\\n')\n"
    )
    (bin_dir / "ssh").write_text(recorder)
    (bin_dir / "docker").write_text("#!/bin/sh\nprintf 'IMAGE-TAR-OF-%s' \"$2\"\n")  # `docker save IMAGE`
    for name in ("ssh", "docker"):
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    planned = flash(pki, policy, "--dry-run", env=env).stdout.splitlines()
    res = flash(pki, policy, env=env)
    assert res.returncode == 0, res.stderr
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert [c["argv"][-1] for c in calls] == [remote(line) for line in planned]
    by_remote = {c["argv"][-1]: bytes.fromhex(c["stdin"]) for c in calls}
    sent = json.loads(by_remote["sudo --non-interactive dd of=/etc/pirl/tokens.json status=none"])
    assert sent == {"robot-3": tokens["robot-3"]}  # never the fleet's other tokens
    assert gzip.decompress(by_remote["sudo --non-interactive docker load"]) == b"IMAGE-TAR-OF-pirl-edge:jp6"
    with tarfile.open(
        fileobj=io.BytesIO(by_remote["sudo --non-interactive tar -x --no-same-owner -C /var/lib/pirl/policy -f -"])
    ) as tar:
        assert sorted(n.lstrip("./") for n in tar.getnames() if n != ".") == ["config.json", "model.safetensors"]
    env_file = by_remote["sudo --non-interactive dd of=/etc/pirl/edge.env status=none"].decode()
    assert "PIRL_ROBOT_ID=robot-3\n" in env_file and "PIRL_LEARNER=learner.example.com:50051\n" in env_file
    assert (
        by_remote["sudo --non-interactive dd of=/opt/pirl/compose.yaml status=none"]
        == (ROOT / "deploy" / "edge" / "compose.yaml").read_bytes()
    )
    for token in tokens.values():
        assert token not in res.stdout + res.stderr


def test_a_failing_step_stops_the_run(inputs, tmp_path):
    pki, policy, _ = inputs
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (bin_dir / "ssh").chmod(0o755)
    res = flash(pki, policy, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert res.returncode == 1 and "step 1 failed" in res.stderr and "[2/" not in res.stdout


@pytest.mark.parametrize(
    "change, needle",
    [
        (("--robot-id", "robot-9"), "no token for robot 'robot-9'"),
        (("--policy", "/nonexistent"), "is not a policy directory"),
        (("--env", "HOME=/root"), "expected PIRL_NAME=value"),
        (("--ca", "/nonexistent/ca.pem"), "--ca: no such file"),
    ],
)
def test_user_mistakes_print_one_error_line_and_exit_2(inputs, change, needle):
    pki, policy, _ = inputs
    res = flash(pki, policy, *change, "--dry-run")  # a repeated option: the later value wins
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and needle in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_help():
    res = subprocess.run([sys.executable, str(FLASH), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "usage: pirl-flash" in res.stdout and "--dry-run" in res.stdout
