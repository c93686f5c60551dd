"""Edge inference backends: ONNX Runtime and torch sample the same chunks; swaps re-export."""

import copy

import numpy as np
import pytest
import torch

from edge.backend_choice import make_backend
from edge.backends import OnnxRuntimeBackend, TorchBackend
from edge.inference import InferenceWorker
from helpers.policy import builtin_policy


def policy_and_processors(seed=0):
    policy, pre, post = builtin_policy(seed)
    return policy.eval(), pre, post


def trained_copy(policy, seed=1):
    """What the learner publishes after an update: the same frozen weights, new trained tensors."""
    newer = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in newer.rl_actor_parameters() + newer.rl_critic_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return newer


def test_onnxruntime_backend_matches_torch(tmp_path):
    policy, _, _ = policy_and_processors()
    ort = OnnxRuntimeBackend(policy, tmp_path)
    ort.prepare(0)
    obs = {"observation.state": torch.randn(4, 6)}
    noise = policy.draw_noise(4, generator=torch.Generator().manual_seed(0))
    level = torch.full((4,), 0.5)
    with torch.no_grad():
        a, b = TorchBackend(policy).sample(obs, *noise, level), ort.sample(obs, *noise, level)
    for name in ("actions", "chain", "log_prob", "value"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(a.stochastic, b.stochastic)
    (tmp_path / "v-unrelated").mkdir()
    ort.prepare(1)  # a newer version: the older export is deleted once the new session serves
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v-unrelated", "v000001"]


def test_unknown_backend_is_an_error_and_tensorrt_falls_back(caplog, monkeypatch):
    from pirl.export import trt_engine

    def absent():
        raise trt_engine.TensorRTUnavailableError("import tensorrt failed (ModuleNotFoundError: test)")

    monkeypatch.setattr(trt_engine, "import_tensorrt", absent)  # the same on a machine that has it
    policy, _, _ = policy_and_processors()
    with pytest.raises(ValueError, match="--backend"):
        make_backend("cuda-magic", policy)
    assert make_backend("tensorrt", policy).name == "onnxruntime"
    assert "tensorrt backend unavailable (TensorRTUnavailableError: import tensorrt failed" in caplog.text


def test_worker_swaps_onnx_sessions_at_chunk_boundaries():
    policy, pre, post = policy_and_processors()
    worker = InferenceWorker(policy, pre, post, robot_id="t", backend="onnxruntime")
    assert worker.backend == "onnxruntime"
    raw = {"agent_pos": np.zeros((1, 6), np.float32)}
    before = worker.decide(raw)[0]
    new_weights = {k: v + 0.05 for k, v in policy.state_dict().items()}
    assert worker.offer(1, new_weights)
    assert worker.version == 0  # nothing changes until the next decision (a chunk boundary)
    after = worker.decide(raw)[0]
    assert worker.version == 1 and after.version == 1 and before.version == 0
    assert not np.allclose(before.value, after.value)
    # a version that does not fit the policy is refused and the active one keeps serving
    assert not worker.offer(2, {"bogus": torch.zeros(1)})
    assert worker.decide(raw)[0].version == 1


def test_worker_loads_the_learners_onnx_export(tmp_path):
    from learner.trainer import policy_update_message

    policy, pre, post = policy_and_processors()
    worker = InferenceWorker(policy, pre, post, robot_id="t", backend="onnxruntime")
    newer = trained_copy(policy)
    msg = policy_update_message(newer, 1, tmp_path / "artifacts")
    names = {a.name for a in msg.manifest.artifacts}
    assert {"model.safetensors", "onnx/model.onnx", "onnx/manifest.json"} <= names
    from safetensors.torch import load

    assert msg.trained_only and msg.frozen_sha256 == worker.frozen_sha256
    assert worker.offer(1, load(msg.weights), dict(msg.files), frozen_sha256=msg.frozen_sha256)
    raw = {"agent_pos": np.ones((1, 6), np.float32)}
    d = worker.decide(raw)[0]
    with torch.no_grad():
        expected = newer.predict_value({"observation.state": torch.ones(1, 6)})
    assert d.version == 1 and abs(d.value - float(expected[0])) < 1e-5


def test_corrupted_artifact_is_refused_and_the_old_policy_keeps_serving(tmp_path):
    from edge.link import LearnerAddress, Subscriber, SyncClock
    from learner.trainer import policy_update_message

    policy, pre, post = policy_and_processors()
    worker = InferenceWorker(policy, pre, post, robot_id="t", backend="onnxruntime")
    sub = Subscriber(LearnerAddress("127.0.0.1:1", "t", "token"), worker, SyncClock("t"))
    newer = trained_copy(policy)
    raw = {"agent_pos": np.ones((1, 6), np.float32)}
    good_value = worker.decide(raw)[0].value

    bad_weights = policy_update_message(newer, 1, tmp_path / "a1")
    bad_weights.weights = bad_weights.weights[:-1] + bytes([bad_weights.weights[-1] ^ 1])
    bad_onnx = policy_update_message(newer, 2, tmp_path / "a2")
    bad_onnx.files["onnx/model.onnx"] = b"not an onnx model"
    for update in (bad_weights, bad_onnx):
        sub._apply(update)
    assert sub.rejected == 2
    d = worker.decide(raw)[0]
    assert d.version == 0 and d.value == good_value  # the old version still serves

    sub._apply(policy_update_message(newer, 3, tmp_path / "a3"))
    assert worker.decide(raw)[0].version == 3 and sub.rejected == 2


def test_trained_only_updates_need_the_same_frozen_weights_and_trained_set(tmp_path):
    """A version carries only what PI-RL trains; a robot whose frozen weights differ from the
    learner's (another SFT checkpoint), or that trains other tensors (another noise method), refuses it."""
    from safetensors.torch import load

    from learner.trainer import policy_update_message

    policy, pre, post = policy_and_processors()
    worker = InferenceWorker(policy, pre, post, robot_id="t", backend="torch")
    raw = {"agent_pos": np.ones((1, 6), np.float32)}
    trained = set(policy.rl_state_names())
    assert trained and all(n.startswith(("backbone.trunk.", "backbone.velocity_head.", "value_head.")) for n in trained)

    # same frozen weights (the learner's copy of the SFT checkpoint), new trained tensors: accepted
    learner_copy = copy.deepcopy(policy)
    with torch.no_grad():
        for p in learner_copy.rl_actor_parameters() + learner_copy.rl_critic_parameters():
            p.add_(0.01)
    msg = policy_update_message(learner_copy, 1)
    assert set(load(msg.weights)) == trained  # the frozen prefix encoder does not travel
    assert worker.offer(1, load(msg.weights), frozen_sha256=msg.frozen_sha256)
    assert worker.decide(raw)[0].version == 1
    state = worker.policy.state_dict()
    for k, v in learner_copy.state_dict().items():
        assert torch.equal(state[k], v), k

    # a learner started from another checkpoint: its frozen weights differ
    other, _, _ = policy_and_processors(seed=1)
    msg = policy_update_message(other, 2)
    assert not worker.offer(2, load(msg.weights), frozen_sha256=msg.frozen_sha256)
    # the trained set differs (the learner trains the Flow-Noise head, this robot does not)
    noisy = copy.deepcopy(learner_copy)
    noisy.config.noise_method = "flow_noise"
    msg = policy_update_message(noisy, 3, frozen_sha256=worker.frozen_sha256)
    assert not worker.offer(3, load(msg.weights), frozen_sha256=msg.frozen_sha256)
    assert worker.decide(raw)[0].version == 1  # version 1 keeps serving


def test_a_steered_version_reaches_the_edge_and_its_chains_replay(tmp_path):
    """noise_steer through the runtime's own path: the learner publishes the steering head and the critic (with
    the ONNX export), the edge's ONNX Runtime sampler serves them, and the learner replays its chains to ratio 1."""
    from safetensors.torch import load

    from learner.trainer import policy_update_message

    policy, pre, post = policy_and_processors()
    policy.start_noise_steering()
    worker = InferenceWorker(copy.deepcopy(policy), pre, post, robot_id="t", backend="onnxruntime")
    newer = trained_copy(policy)  # the steering head and the critic moved
    msg = policy_update_message(newer, 1, tmp_path / "artifacts")
    assert set(load(msg.weights)) == set(policy.rl_state_names())
    assert all(n.startswith(("steer_head.", "value_head.")) for n in load(msg.weights))
    assert worker.offer(1, load(msg.weights), dict(msg.files), frozen_sha256=msg.frozen_sha256)
    raw = {"agent_pos": np.ones((1, 6), np.float32)}
    d = worker.decide(raw)[0]
    assert d.version == 1 and worker.backend == "onnxruntime" and not d.stochastic.any()
    with torch.no_grad():
        ev = newer.evaluate_chains(
            {k: torch.from_numpy(v)[None] for k, v in d.observation.items()},
            torch.from_numpy(d.chain)[None],
            torch.from_numpy(d.stochastic)[None],
        )
    assert d.log_prob != 0 and abs(float(ev.log_prob[0]) - d.log_prob) < 1e-4
