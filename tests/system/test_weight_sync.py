"""pirl-bench sync end to end with the small policy: a learner process and an edge process over loopback TLS,
version 1 synced in chunks, version 2 with the learner killed (SIGKILL) mid-transfer and restarted with
--resume; the edge resumes from its staged chunks and ends up serving the learner's exact weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pirl.cli import parse_config
from pirl_tools.bench_sync import BenchSyncConfig

CHUNK = 4096
FRAMING = 128  # an ArtifactChunk's fields beside its data


def test_config_takes_dashes_and_refuses_bad_values():
    cfg = parse_config(
        BenchSyncConfig, prog="pirl-bench sync", args=["--out=x", "--smolvlm-config=offline", "--chunk-bytes=4096"]
    )
    assert cfg.smolvlm_config == "offline" and cfg.chunk_bytes == CHUNK
    for bad, match in (
        ({"chunk_bytes": 10}, "chunk_bytes"),
        ({"kill_at_fraction": 1.0}, "kill_at_fraction"),
        ({"backbone": "gpt"}, "backbone"),
    ):
        with pytest.raises(ValueError, match=match):
            BenchSyncConfig(out="x", **bad)


@pytest.mark.slow  # a learner and an edge process
def test_bench_sync_survives_a_learner_kill_mid_transfer(tmp_path):
    out = tmp_path / "sync"
    cmd = [
        str(Path(sys.executable).parent / "pirl-bench"),
        "sync",
        f"--out={out}",
        "--backbone=mlp",
        f"--chunk_bytes={CHUNK}",
        "--kill_at_fraction=0.5",
        "--timeout_s=300",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "sync.json").read_text())
    (r,) = report["runs"]
    assert {"seconds", "bytes", "max_message_bytes", "peak_rss_mb_learner", "peak_rss_mb_edge"} <= set(r)
    assert r["bytes"] == r["trained_bytes"] > 50 * CHUNK  # many chunks, each byte once
    # every chunk within the limit; the one larger message is the announcement (a hash per chunk)
    log = (out / "work" / "logs" / "edge.log").read_text()
    assert CHUNK < r["max_chunk_message_bytes"] <= CHUNK + FRAMING
    assert r["max_message_bytes"] == max(r["max_chunk_message_bytes"], r["announce_bytes"])
    assert r["max_message_bytes"] < r["one_message_bytes"] / 10
    assert r["learner_restarts"] == 1 and r["killed_after_bytes_sent"] > 0
    assert 0 < r["resumed_from_bytes"] < r["trained_bytes"] and r["resumed_from_bytes"] % CHUNK == 0
    assert r["bytes_with_restart"] == r["trained_bytes"] and r["bytes_resent"] == 0  # nothing sent twice
    assert "resuming model.safetensors at byte" in log
    assert r["hash_match"] and r["served_version"] == 2 and r["bad_chunks"] == 0
    assert r["learner_kept_versions"] == ["v000001", "v000002"]
    learner_log = (out / "work" / "logs" / "learner-resume.log").read_text()
    assert "version 2 is already in" in learner_log  # served again from disk, not re-written
