"""A reduced-size LeRobot pi0 through the real runtime: a learner and two edges as processes over
gRPC + TLS, camera images and the task instruction (tokenized on the edge) in every record, the
paced robot on ONNX Runtime (the learner's export of every version, hash- and golden-checked),
trained-only versions applied on both robots, every record accepted exactly once."""

import time

import pytest
from lerobot.configs.types import FeatureType, PolicyFeature

from helpers.cluster import ROBOTS, Cluster, assert_every_record_accepted_once
from helpers.policy import STATE_DIM, builtin_policy, save_checkpoint
from pirl.security import make_dev_pki

pytestmark = pytest.mark.slow  # learner and edges as real processes


@pytest.fixture
def cluster(tmp_path):
    ckpt = save_checkpoint(
        tmp_path / "policy",
        *builtin_policy(
            0,
            backbone="pi0",
            backbone_reduced={},
            backbone_config={"tokenizer_max_length": 16},
            chunk_size=8,
            n_action_steps=4,
            max_action_dim=4,
            input_features={
                "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
                "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
            },
        ),
    )
    c = Cluster(tmp_path, ckpt, make_dev_pki(tmp_path / "certs", ROBOTS), "vla")
    yield c
    c.close()


def test_reduced_pi0_learner_and_two_edges(cluster):
    c = cluster
    c.learner("--trainer.max_updates", "2")
    c.edge("robot-0", "paced", "--control.hz", "50", "--policy.backend", "onnxruntime")
    c.edge("robot-1", "unpaced")
    c.wait_version(2, timeout=300)
    time.sleep(1.0)
    for robot in ROBOTS:
        assert c.stop(robot) == 0
    c.stop("learner")
    status = c.status()
    assert status["version"] == 2
    assert_every_record_accepted_once(c, status)
    paced, sim = c.edge_stats("robot-0"), c.edge_stats("robot-1")
    assert paced["backend"] == "onnxruntime" and paced["ticks"] > 0
    assert paced["versions_rejected"] == 0 and sim["versions_rejected"] == 0
    assert sim["policy_swaps"] >= 1  # trained-only versions loaded (their frozen sha256 matched)
    log = (c.dir / "robot-0.log").read_text()
    assert "golden-input max abs errors" in log
