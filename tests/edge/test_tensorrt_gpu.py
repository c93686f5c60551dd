"""TensorRT on a GPU: build, parity with PyTorch for every noise method, refit, CUDA-graph replay,
the engine cache, and the edge backend inside the worker. ``-m gpu``; every test skips (with the
reason) unless ``tensorrt`` (with builder and ONNX parser) imports and a CUDA device is present.

NOT RUN where these were written (no GPU, no TensorRT): they are written against the TensorRT 10
Python API and the code in pirl/export/trt_engine.py, and are the check to run on a Jetson /
GPU machine before relying on the TensorRT backend.

Tolerances (FP32 engine, TF32 off, against PyTorch FP32 on CPU): the golden-check GPU values of
edge.backends.GOLDEN_TOLERANCES (actions / chain / value rtol = atol = 1e-3; log-prob rtol 1e-3,
atol 1e-2, as it sums up to K * H * D Gaussian terms); the PPO ratio of an engine-sampled chain
re-evaluated by PyTorch is 1 within 1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge.backends import GOLDEN_TOLERANCES
from pirl.export.onnx_export import export_onnx, load_manifest, make_feeds
from pirl.export.trt_engine import (
    EngineCache,
    EngineManager,
    EngineRunner,
    TensorRTSettings,
    tensorrt_unavailable_reason,
)

_WHY = tensorrt_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY is not None, reason=f"TensorRT on CUDA unavailable: {_WHY}")]

TOL = GOLDEN_TOLERANCES["gpu_fp32"]
RATIO_TOL = 1e-2


def _cases():
    from helpers.export_cases import CASES

    return CASES


def _policy(overrides, with_image, seed=0):
    from helpers.export_cases import make_policy

    return make_policy(overrides, with_image, seed)


def _inputs(policy, batch, seed):
    from helpers.export_cases import random_inputs

    return random_inputs(policy, batch, seed)


def _run(runner, manifest, obs, initial, steps, stochastic, level):
    feeds = make_feeds(
        manifest,
        {k: v.numpy() for k, v in obs.items()},
        initial.numpy(),
        steps.numpy(),
        stochastic.numpy(),
        level.numpy(),
    )
    return {k: torch.from_numpy(v) for k, v in runner.run(feeds).items()}


def _assert_matches(got, ref):
    want = {"actions": ref.actions, "chain": ref.chain.chain, "log_prob": ref.chain.log_prob, "value": ref.value}
    for name, w in want.items():
        rtol, atol = TOL[name]
        torch.testing.assert_close(got[name], w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _engine(tmp_path, policy, settings, name="v0", version=0, current=None, manager=None):
    export_onnx(policy, tmp_path / name, version=version)
    root, manifest = load_manifest(tmp_path / name)
    manager = manager or EngineManager(settings)
    return manager, manifest, manager.prepare(root, manifest, current=current)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_engine_matches_pytorch_for_every_noise_method(tmp_path, case):
    _, overrides, with_image = case
    policy = _policy(overrides, with_image)
    settings = TensorRTSettings(batch_min=1, batch_opt=4, batch_max=8, cuda_graph=False)
    manager, manifest, prepared = _engine(tmp_path, policy, settings)
    assert prepared.method == "build" and prepared.refittable
    runner = EngineRunner(manager.trt, prepared.engine, settings)
    for batch, seed in ((4, 1), (1, 2), (8, 3)):  # the profile's opt, min and max
        obs, initial, steps, stochastic, level = _inputs(policy, batch, seed)
        with torch.no_grad():
            ref = policy.sample_chains(obs, initial, steps, stochastic, noise_level=level)
        got = _run(runner, manifest, obs, initial, steps, stochastic, level)
        _assert_matches(got, ref)
        with torch.no_grad():  # the learner replays an engine-sampled chain: PPO ratio 1
            ev = policy.evaluate_chains(obs, got["chain"], stochastic, noise_level=level)
        ratio = torch.exp(ev.log_prob - got["log_prob"])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=RATIO_TOL)


def test_refit_serves_the_new_weights_and_the_graph_is_recaptured(tmp_path):
    policy = _policy({"noise_method": "flow_sde"}, False)
    settings = TensorRTSettings(cuda_graph=True)  # batch 1 fixed: CUDA graphs
    manager, manifest, prepared = _engine(tmp_path, policy, settings)
    runner = EngineRunner(manager.trt, prepared.engine, settings)
    inputs = _inputs(policy, 1, 5)
    plain = _run(runner, manifest, *inputs)  # first enqueue, then capture
    replayed = _run(runner, manifest, *inputs)
    assert runner.graph_captures == 1 and runner.graph_replays == 1
    for name in plain:
        torch.testing.assert_close(replayed[name], plain[name], rtol=0, atol=0)
    with torch.no_grad():
        _assert_matches(replayed, policy.sample_chains(*inputs[:4], noise_level=inputs[4]))

    old = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, manifest1, refitted = _engine(
        tmp_path, policy, settings, name="v1", version=1, current=prepared, manager=manager
    )
    assert refitted.method == "refit" and refitted.engine is prepared.engine
    runner.reset_graph()
    first = _run(runner, manifest1, *inputs)
    again = _run(runner, manifest1, *inputs)
    assert runner.graph_captures == 2
    with torch.no_grad():
        ref = policy.sample_chains(*inputs[:4], noise_level=inputs[4])
    _assert_matches(first, ref)
    _assert_matches(again, ref)
    assert not torch.allclose(first["value"], plain["value"], atol=1e-4)  # the old weights are gone
    policy.load_state_dict(old)


def test_engine_cache_is_used_on_restart_and_survives_corruption(tmp_path):
    policy = _policy({"noise_method": "flow_noise"}, False)
    settings = TensorRTSettings(cache_dir=str(tmp_path / "cache"))
    _, _, first = _engine(tmp_path, policy, settings)
    assert first.method == "build"
    _, _, second = _engine(tmp_path, policy, settings, name="again")  # a new process: same key
    assert second.method == "cache"
    cache = EngineCache(tmp_path / "cache")
    plan = next((tmp_path / "cache").glob("*.plan"))
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    _, _, third = _engine(tmp_path, policy, settings, name="third")
    assert third.method == "build" and third.failed[0].startswith("cache:") and cache.rejected == 0


def test_worker_on_tensorrt_swaps_refitted_versions(tmp_path):
    from safetensors.torch import load as load_safetensors

    from edge.inference import InferenceWorker
    from helpers.policy import shifted, small_policy
    from learner.trainer import policy_update_message

    policy, pre, post = small_policy()
    worker = InferenceWorker(
        policy,
        pre,
        post,
        robot_id="gpu-worker",
        backend="tensorrt",
        tensorrt_settings=TensorRTSettings(cache_dir=str(tmp_path / "cache")),
    )
    assert worker.backend == "tensorrt", worker.fallbacks
    raw = {"agent_pos": np.full((1, 6), 0.3, np.float32)}
    for v in (1, 2, 3):
        newer, _, _ = small_policy()
        newer.load_state_dict(shifted(policy, 0.05, v))
        msg = policy_update_message(newer, v, tmp_path / "learner")
        assert worker.offer(v, load_safetensors(msg.weights), dict(msg.files)), worker.prepare_log[-1]
        assert worker.prepare_log[-1]["method"] in ("cache_refit", "refit")
        d = worker.decide(raw)[0]
        with torch.no_grad():
            want = newer.predict_value(worker.observe(raw))
        assert d.version == v and abs(d.value - float(want[0])) < 1e-3


def test_published_engine_is_used_by_a_matching_edge(tmp_path):
    from edge.tensorrt_backend import TensorRTBackend
    from helpers.policy import small_policy
    from learner.trainer import policy_update_message
    from pirl.export.trt_engine import EnginePublisher

    policy, _, _ = small_policy()
    msg = policy_update_message(
        policy, 1, tmp_path / "learner", engines=EnginePublisher(EngineManager(TensorRTSettings()))
    )
    backend = TensorRTBackend(policy, tmp_path / "edge", settings=TensorRTSettings())
    backend.prepare(1, dict(msg.files))
    assert backend.last_prepare["method"] == "published"
