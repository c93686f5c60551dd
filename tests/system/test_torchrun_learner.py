"""pirl-learner under ``torchrun --nproc_per_node 2`` (gloo, CPU) with one edge over gRPC + TLS: versions are
published, every record is accepted exactly once, and both ranks took part in every update (docs/scale.md)."""

from __future__ import annotations

import re

import pytest

from helpers.cluster import BIN

pytestmark = pytest.mark.slow  # a torchrun learner (two ranks) and an edge as real processes

ROBOT = "robot-0"


# 2 ranks on this machine (--standalone: a free rendezvous port)
TORCHRUN = (str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python")


def test_torchrun_two_ranks_and_an_edge_complete_versions_and_resume(cluster):
    c = cluster
    # delivery across the restart is under test, not freshness: accept any version lag
    args = ("--trainer.export_onnx", "false", "--intake.max_version_lag", "1000")
    c.learner(*args, launcher=TORCHRUN)
    c.edge(ROBOT, "unpaced")
    c.wait_version(2)
    c.stop("learner")  # SIGTERM to torchrun, which signals both ranks: rank 0 finishes and sends STOP
    first = c.status()["version"]  # its last checkpoint
    # the same world size again, from the checkpoint (the edge spools meanwhile and sends it all afterwards)
    c.learner(*args, "--resume=true", launcher=TORCHRUN)
    c.wait_version(first + 1)
    assert c.stop(ROBOT) == 0
    c.stop("learner")
    status = c.status()
    assert status["updates"] == status["version"] > first
    log = (c.dir / "learner.log").read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" in log
    assert f"rank 1: resumed from checkpoint {first:06d}, as rank 0" in log, log[-3000:]
    # rank 1 ran every update with rank 0, in both runs, and left on rank 0's STOP each time
    runs = [int(n) for n in re.findall(r"rank 1: rank 0 says stop after (\d+) updates", log)]
    assert sum(runs) == status["updates"] and len(runs) == 2, (runs, log[-3000:])
    assert "Traceback" not in log.split("Received 15 death signal")[0]  # torchrun's own exit prints one
    # every record the edge allocated was accepted, exactly once (the checks of helpers.cluster's
    # assert_every_record_accepted_once, for the one robot here)
    stats = c.edge_stats(ROBOT)
    assert stats["records_left_in_spool"] == 0 and stats["records_refused"] == {}, stats
    from edge.spool import Spool

    with Spool(c.dir / ROBOT / "spool") as spool:
        allocated = spool.next_sequence
    assert allocated >= 32  # two updates of 16 episodes at least
    assert status["acked"][ROBOT] == {"below": allocated, "above": []}
    assert status["counts"]["accepted"] == allocated
    assert status["counts"].get("duplicate", 0) == 0
    assert not any(k.startswith("rejected_") for k in status["counts"]), status["counts"]
