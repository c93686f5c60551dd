"""A reduced-size LeRobot pi0 through the real runtime: a learner and two edges as processes over
gRPC + TLS, camera images and the task instruction (tokenized on the edge) in every record, the
paced robot on ONNX Runtime (the learner's export of every version, hash- and golden-checked),
trained-only versions applied on both robots, every record accepted exactly once."""

import time

import pytest
import torch

from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_pre_post_processors
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy
from pirl.security import make_dev_pki
from test_runtime import ROBOTS, Cluster, assert_every_record_accepted_once


@pytest.fixture
def cluster(tmp_path):
    torch.manual_seed(0)
    cfg = PiRLConfig(device="cpu", push_to_hub=False, backbone="pi0", backbone_reduced={},
                     backbone_config={"tokenizer_max_length": 16}, chunk_size=8, n_action_steps=4, max_action_dim=4,
                     input_features={"observation.image": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
                                     "observation.state": PolicyFeature(FeatureType.STATE, (6,))},
                     output_features={"action": PolicyFeature(FeatureType.ACTION, (3,))})
    stats = {"observation.state": {"mean": torch.zeros(6), "std": torch.ones(6)},
             "action": {"mean": torch.zeros(3), "std": torch.ones(3)}}
    policy = PiRLPolicy(cfg)
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    ckpt = tmp_path / "policy"
    for part in (policy, pre, post):
        part.save_pretrained(ckpt)
    c = Cluster(tmp_path, ckpt, make_dev_pki(tmp_path / "certs", ROBOTS), "vla")
    yield c
    c.close()


def test_reduced_pi0_learner_and_two_edges(cluster):
    c = cluster
    c.learner("--max-updates", "2")
    c.edge("robot-0", "paced", "--control-hz", "50", "--backend", "onnxruntime")
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
