"""pirl-bench fleet at a toy size: a real pirl-learner over TLS, two simulated robots (the edge's spool,
uploader and subscriber) and LeRobot's transport with the same records; fleet.json has every figure,
nothing lost, nothing counted twice. Bad input is one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pirl.cli import parse_config
from pirl_tools.bench_fleet import BenchFleetConfig, RecordMaker, run

FIELDS = (
    "robots",
    "records_per_s",
    "mb_per_s",
    "ack_latency_p50_s",
    "ack_latency_p99_s",
    "publish_fanout_p99_s",
    "learner_cpu_s_per_1k_records",
    "lost",
    "duplicates",
    "lerobot_transport_ratio",
)


@pytest.mark.slow
def test_a_tiny_fleet_writes_every_figure_and_loses_nothing(tmp_path):
    out = tmp_path / "fleet"
    args = [
        f"--out={out}",
        "--robots=[2]",
        "--duration=6",
        "--rate_hz=4",
        "--episode_len=4",
        "--episodes_per_update=2",  # an update (and a version to fan out) every second of the run
        "--image_side=16",
        "--burst_records=8",
        "--lerobot_tls=false",
    ]
    cfg = parse_config(BenchFleetConfig, prog="pirl-bench fleet", args=args)
    assert run(cfg, "pirl-bench fleet (test)") == 0
    report = json.loads((out / "fleet.json").read_text())
    assert report["command"] == "pirl-bench fleet (test)" and len(report["load_average_1_5_15_before"]) == 3
    (e,) = report["fleet"]
    missing = [k for k in FIELDS if e.get(k) is None]
    assert not missing, (missing, e)
    assert e["robots"] == 2 and e["lost"] == 0 and e["duplicates"] == 0
    assert e["robots_with_sequence_mismatch"] == [] and e["refused"] == 0
    # every record the robots spooled reached the learner once: paced + burst, as the learner counted them
    assert e["records_spooled"] == e["records_acked"] > 0
    assert e["learner_accepted"] == e["records_acked"] + e["burst"]["acked"]
    assert e["burst"]["acked"] == e["burst"]["records"] == 16 and e["lerobot"]["plaintext"]["received"] == 16
    assert e["lerobot"]["plaintext"]["bytes_received"] == e["burst"]["bytes"]  # the very same records
    assert e["versions_reaching_every_robot"] >= 1 and e["learner_updates"] >= 1
    assert 0 < e["ack_latency_p50_s"] <= e["ack_latency_p99_s"] and e["mb_per_s"] > 0
    assert "lerobot_transport_ratio_tls" not in e and (out / "fleet.png").stat().st_size > 0


def test_records_have_the_size_the_camera_gives_and_are_seeded():
    small = RecordMaker("robot-00", 16, 4, seed=1).make(0, "e", 0, 0, ends=False)
    big = RecordMaker("robot-00", 96, 4, seed=1).make(0, "e", 0, 0, ends=False)
    pixels = 3 * (96 * 96 - 16 * 16) * 4  # float32; plus a few bytes of larger varints (shape, lengths)
    assert pixels <= len(big) - len(small) <= pixels + 16
    assert RecordMaker("robot-00", 16, 4, seed=1).make(0, "e", 0, 0, ends=False) == small


@pytest.mark.parametrize(
    "args,message",
    [
        (["--robots=[0,8]"], "robots: a list of robot counts, each >= 1"),
        (["--robots=[8,8]"], "robots: each count once"),
        (["--duration=0"], "duration: must be > 0"),
        (["--image_side=4"], "image_side: must be >= 8"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, args, message):
    bench = Path(sys.executable).parent / "pirl-bench"
    p = subprocess.run(
        [str(bench), "fleet", f"--out={tmp_path / 'x'}", *args], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "x").exists()
