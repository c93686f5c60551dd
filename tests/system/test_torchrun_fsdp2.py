"""pirl-learner under ``torchrun --nproc_per_node 2`` with ``--distributed.strategy=fsdp2`` (gloo, CPU) and one
edge: versions are published from rank 0's gathered inference copy, checkpoints (optimizer states gathered
from both ranks) resume at the same world size, and rank 1 took part in every update (docs/scale.md)."""

from __future__ import annotations

import re

import pytest

from helpers.cluster import BIN

pytestmark = pytest.mark.slow  # a torchrun learner (two ranks) and an edge as real processes

ROBOT = "robot-0"
# as tests/system/test_torchrun_learner.py: 2 ranks on this machine (--standalone: a free rendezvous port)
TORCHRUN = (str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python")


def test_torchrun_fsdp2_two_ranks_publish_checkpoint_and_resume(cluster):
    c = cluster
    args = ("--trainer.export_onnx", "false", "--intake.max_version_lag", "1000", "--distributed.strategy", "fsdp2")
    c.learner(*args, launcher=TORCHRUN)
    c.edge(ROBOT, "unpaced")
    c.wait_version(2)
    c.stop("learner")
    first = c.status()["version"]
    c.learner(*args, "--resume=true", launcher=TORCHRUN)
    c.wait_version(first + 1)
    assert c.stop(ROBOT) == 0
    c.stop("learner")
    status = c.status()
    assert status["updates"] == status["version"] > first
    log = (c.dir / "learner.log").read_text()
    # both ranks sharded the trained modules (each holds part of them), in both runs
    assert len(re.findall(r"rank 1: fsdp2: \d+ trained modules sharded", log)) == 2, log[-3000:]
    assert f"rank 1: resumed from checkpoint {first:06d}, as rank 0" in log, log[-3000:]
    runs = [int(n) for n in re.findall(r"rank 1: rank 0 says stop after (\d+) updates", log)]
    assert sum(runs) == status["updates"] and len(runs) == 2, (runs, log[-3000:])
    assert "Traceback" not in log.split("Received 15 death signal")[0]
    assert status["counts"].get("duplicate", 0) == 0
