"""pirl-bench schedule: a paced edge with real-VLA inference latency, across swaps, replayed to ratio 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pirl_tools.bench_schedule import BenchScheduleConfig, run


@pytest.mark.slow  # two paced runs of a few seconds each
def test_schedule_bench_writes_its_figures_and_every_record_replays_to_ratio_one(tmp_path):
    cfg = BenchScheduleConfig(out=str(tmp_path), latency_ms=60, control_hz=50, swaps=3, duration_s=4.0)
    assert run(cfg, "pirl-bench schedule (test)") == 0
    result = json.loads((tmp_path / "schedule.json").read_text())
    base = result["baseline_one_tick"]
    for r in (result, base):
        assert r["swaps"] == 3 and r["ticks"] > 100
        assert r["record_versions"] == [0, 1, 2, 3]  # records of every version, each replayed with its weights
        assert r["replay_max_abs_ratio_minus_1"] < 1e-5
    assert result["lead"] == "measured" and 4 <= result["lead_ticks_final"] <= 8  # 60 ms at 20 ms a tick
    assert base["lead_ticks_final"] == 1
    # inference 3 ticks long misses ticks at every chunk boundary on the one-tick schedule, not on the measured one
    assert base["deadline_misses"] > 20 and result["deadline_misses"] < base["deadline_misses"] / 10
    assert {"deadline_miss_ratio", "settings", "command", "machine", "date"} <= set(result)


def test_schedule_bench_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="out: required"):
        BenchScheduleConfig()
    with pytest.raises(ValueError, match="latency_ms: must be > 0"):
        BenchScheduleConfig(out=str(tmp_path), latency_ms=0)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pirl_tools.bench import main; main()",
            "schedule",
            f"--out={tmp_path}",
            "--jitter=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "jitter: must be below 1" in proc.stderr and "Traceback" not in proc.stderr
