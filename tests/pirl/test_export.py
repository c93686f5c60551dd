"""ONNX export of the sampler: ONNX Runtime agrees with PyTorch, the learner can replay its chains,
and the artifacts are integrity-checked.

Tolerances (FP32): outputs agree within rtol 1e-5, atol 1e-5; the PPO ratio of an ONNX-sampled
chain re-evaluated by PyTorch is 1 within 1e-4. Observed on CPU over these configs: actions and
chains <= 4e-7 absolute, values <= 2e-8, log-probs <= 8e-6 absolute at |log_prob| up to ~50 (the
sum of up to K * n_action_steps * action_dim Gaussian terms, so the absolute error grows with it;
relative <= 1e-5), |ratio - 1| <= 8e-6.
"""

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_pre_post_processors

from helpers.export_cases import ACTION_DIM, CASES, STATE, make_policy, random_inputs
from lerobot_policy_pi_rl.configuration_pi_rl import PiRLConfig
from lerobot_policy_pi_rl.modeling_pi_rl import PiRLPolicy
from pirl.export import onnx_export as export
from pirl.export.onnx_export import ArtifactIntegrityError, OnnxSampler, SamplerGraph, export_onnx

RTOL = ATOL = 1e-5
RATIO_TOL = 1e-4


def run_both(policy, sampler, batch_size, seed):
    obs, initial, steps, stochastic, level = random_inputs(policy, batch_size, seed)
    with torch.no_grad():
        ref = policy.sample_chains(obs, initial, steps, stochastic, noise_level=level)
    out = sampler.run(
        {k: v.numpy() for k, v in obs.items()}, initial.numpy(), steps.numpy(), stochastic.numpy(), level.numpy()
    )
    return obs, stochastic, level, ref, out


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def exported(request, tmp_path_factory):
    name, overrides, with_image = request.param
    policy = make_policy(overrides, with_image)
    out = tmp_path_factory.mktemp(name)
    manifest = export_onnx(policy, out, version=7)  # dynamic batch, traced at batch 2
    return policy, out, manifest


@pytest.mark.parametrize("batch_size,seed", [(5, 1), (1, 2)])
def test_onnxruntime_matches_pytorch(exported, batch_size, seed):
    """Every output agrees on fresh inputs, at batch sizes other than the traced one (dynamic axis)."""
    policy, out, _ = exported
    sampler = OnnxSampler(out)
    _, stochastic, _, ref, got = run_both(policy, sampler, batch_size, seed)
    expected = {"actions": ref.actions, "chain": ref.chain.chain, "log_prob": ref.chain.log_prob, "value": ref.value}
    for key, want in expected.items():
        assert got[key].shape == tuple(want.shape), key
        torch.testing.assert_close(
            torch.from_numpy(got[key]), want, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}"
        )
    c = policy.config
    if c.noise_method == "noise_steer":  # the steered x_1 is the decision: never a zero log-prob
        assert not stochastic.any() and np.all(np.abs(got["log_prob"]) > 0)
    elif c.noise_method == "flow_ode" or not stochastic.any():
        assert np.all(got["log_prob"] == 0)
    else:
        assert np.all(np.abs(got["log_prob"]) > 0)
    if c.max_action_dim:
        assert got["actions"].shape[-1] == c.max_action_dim


def test_learner_replays_onnx_chains(exported):
    """A chain sampled by ONNX Runtime, re-evaluated by the learner in PyTorch: ratio 1."""
    policy, out, _ = exported
    sampler = OnnxSampler(out)
    obs, stochastic, level, _, got = run_both(policy, sampler, 6, 3)
    with torch.no_grad():
        ev = policy.evaluate_chains(obs, torch.from_numpy(got["chain"]), stochastic, noise_level=level)
    ratio = torch.exp(ev.log_prob - torch.from_numpy(got["log_prob"]))
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=RATIO_TOL)


def test_noise_level_and_mask_are_live_inputs(exported):
    """The stochastic mask and the per-sample noise level are graph inputs, not trace-time constants
    (for flow_ode and noise_steer, which read neither, the outputs do not depend on them)."""
    policy, out, manifest = exported
    sampler = OnnxSampler(out)
    obs, initial, steps, stochastic, level = random_inputs(policy, 4, 4)
    o = {k: v.numpy() for k, v in obs.items()}
    a = sampler.run(o, initial.numpy(), steps.numpy(), stochastic.numpy(), level.numpy())
    ode = sampler.run(o, initial.numpy(), steps.numpy(), np.zeros_like(stochastic.numpy()), level.numpy())
    if manifest["noise_method"] in ("flow_ode", "noise_steer"):
        b = sampler.run(o, initial.numpy(), steps.numpy(), stochastic.numpy(), 2 * level.numpy())
        for key in a:
            np.testing.assert_array_equal(a[key], ode[key], err_msg=key)
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        # noise_steer's decision is the steered x_1: it has a log-prob, the ODE steps add none
        assert np.all(a["log_prob"] == 0) == (manifest["noise_method"] == "flow_ode")
        return
    assert np.all(ode["log_prob"] == 0) and not np.allclose(a["actions"], ode["actions"])
    with torch.no_grad():
        ref = policy.sample_chains(obs, initial, steps, torch.zeros_like(stochastic), noise_level=level)
    torch.testing.assert_close(torch.from_numpy(ode["actions"]), ref.actions, rtol=RTOL, atol=ATOL)
    if manifest["noise_method"] == "flow_sde":
        b = sampler.run(o, initial.numpy(), steps.numpy(), stochastic.numpy(), 2 * level.numpy())
        assert not np.allclose(a["actions"], b["actions"])


def test_manifest_lists_every_artifact(exported):
    policy, out, manifest = exported
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    files = {p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["artifacts"]) == files >= {"model.onnx", "model.safetensors", "config.json"}
    for name, info in manifest["artifacts"].items():
        assert info["sha256"] == export.sha256_file(out / name)
        assert info["bytes"] == (out / name).stat().st_size
    c = policy.config
    assert manifest["policy_type"] == "pi_rl" and manifest["version"] == 7
    assert manifest["noise_method"] == c.noise_method and manifest["num_denoise_steps"] == c.num_denoise_steps
    assert manifest["chunk_size"] == c.chunk_size and manifest["action_dim"] == ACTION_DIM
    assert manifest["model_action_dim"] == c.model_action_dim and manifest["external_data"] is False
    sess = OnnxSampler(out).session
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [(s["name"], s["shape"]) for s in manifest["inputs"]]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [(s["name"], s["shape"]) for s in manifest["outputs"]]
    assert all(s["dtype"] == "float32" for s in manifest["inputs"] + manifest["outputs"])
    obs_names = [f"obs__{k}" for k in sorted(c.input_features)]
    assert [s["name"] for s in manifest["inputs"]][: len(obs_names)] == obs_names
    assert manifest["observation_inputs"] == {k: f"obs__{k}" for k in sorted(c.input_features)}


def test_saved_opset_at_most_20(exported):
    _, out, manifest = exported
    model = onnx.load(str(out / "model.onnx"))
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == manifest["opset"] == 17
    assert all(v <= 20 for v in opsets.values())
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["policy_type"] == "pi_rl" and meta["version"] == "7"


@pytest.mark.parametrize("artifact", ["model.onnx", "model.safetensors"])
def test_corrupted_artifact_is_refused(exported, tmp_path, artifact):
    _, out, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / artifact).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / artifact).write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=f"{artifact}: sha256 mismatch"):
        OnnxSampler(bad)
    (bad / artifact).unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        OnnxSampler(bad / "model.onnx")
    (bad / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        OnnxSampler(bad)


def test_static_batch_and_external_data(tmp_path):
    policy = make_policy({"noise_method": "flow_sde"}, False)
    manifest = export_onnx(policy, tmp_path, batch_size=3, external_data=True, opset=20)
    assert manifest["external_data"] and "model.onnx.data" in manifest["artifacts"]
    assert manifest["inputs"][0]["shape"] == [3, STATE] and manifest["opset"] == 20
    sampler = OnnxSampler(tmp_path)
    _, _, _, ref, got = run_both(policy, sampler, 3, 5)
    torch.testing.assert_close(torch.from_numpy(got["chain"]), ref.chain.chain, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="expected shape"):
        run_both(policy, sampler, 4, 5)


def test_graph_module_and_bad_arguments(tmp_path):
    policy = make_policy({"noise_method": "flow_noise"}, False)
    graph = SamplerGraph(policy)
    assert graph.noise_method == "flow_noise" and graph.observation_keys == ["observation.state"]
    args = export.example_inputs(policy, 2)
    with torch.no_grad():
        _actions, chain, _log_prob, _value = graph(*args)
    assert chain.shape == (2, policy.config.num_denoise_steps + 1, policy.config.chunk_size, ACTION_DIM)
    with pytest.raises(TypeError, match="observation tensors"):
        graph(*args[1:])
    with pytest.raises(ValueError, match="opset"):
        export_onnx(policy, tmp_path, opset=21)
    with pytest.raises(ValueError, match="noise_method"):
        export_onnx(policy, tmp_path, noise_method="flow_magic")
    manifest = export_onnx(policy, tmp_path, noise_method="flow_ode")
    assert manifest["noise_method"] == "flow_ode"
    assert set(manifest["unused_inputs"]) == {"stochastic", "noise_level"}
    with pytest.raises(KeyError, match="observation.state"):
        OnnxSampler(tmp_path).run({}, *[a.numpy() for a in args[1:]])


def test_cli_exports_a_pretrained_dir(tmp_path, monkeypatch, capsys):
    policy = make_policy({"noise_method": "flow_sde"}, False)
    stats = {
        "observation.state": {"mean": torch.zeros(STATE), "std": torch.ones(STATE)},
        "action": {"mean": torch.zeros(ACTION_DIM), "std": torch.ones(ACTION_DIM)},
    }
    pre, post = make_pre_post_processors(policy.config, dataset_stats=stats)
    ckpt = tmp_path / "pretrained_model"
    for obj in (policy, pre, post):
        obj.save_pretrained(ckpt)
    out = tmp_path / "onnx"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pirl-export",
            f"--policy_path={ckpt}",
            f"--out={out}",
            "--noise_method=flow_noise",
            "--version=3",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        export.main()
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "model.onnx" in printed and "export took" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["noise_method"] == "flow_noise" and manifest["version"] == 3
    monkeypatch.setattr(sys, "argv", ["pirl-export", f"--policy_path={tmp_path / 'nope'}", f"--out={out}"])
    with pytest.raises(SystemExit) as exc:
        export.main()
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["flow_sde", "flow_noise", "noise_steer"])
def test_split_export_prefix_and_velocity_graphs_match_torch(method, tmp_path):
    """The measured alternative to the one graph: prefix.onnx + velocity.onnx with the sampler loop on
    the host (split_export.SplitSampler) computes the same chunk, log-prob and value as PyTorch."""
    from pirl.export.onnx_export import example_observations
    from pirl.export.split_export import SplitSampler, export_split

    torch.manual_seed(0)
    policy = PiRLPolicy(
        PiRLConfig(
            device="cpu",
            noise_method=method,
            input_features={"observation.state": PolicyFeature(FeatureType.STATE, (6,))},
            output_features={"action": PolicyFeature(FeatureType.ACTION, (3,))},
        )
    ).eval()
    manifest = export_split(policy, tmp_path)
    assert set(manifest["artifacts"]) == {"prefix.onnx", "velocity.onnx"}
    g = torch.Generator().manual_seed(3)
    obs = example_observations(policy, 5, g)
    noise = policy.draw_noise(5, generator=g)
    level = torch.full((5,), 0.5)
    with torch.no_grad():
        ref = policy.sample_chains(obs, *noise, noise_level=level)
    out = SplitSampler(policy, tmp_path).run(
        {k: v.numpy() for k, v in obs.items()}, *(n.numpy() for n in noise), level.numpy()
    )
    np.testing.assert_allclose(out["actions"], ref.actions.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["log_prob"], ref.chain.log_prob.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["value"], ref.value.numpy(), rtol=1e-5, atol=1e-5)
    # a tampered graph is refused before it is loaded
    (tmp_path / "velocity.onnx").write_bytes((tmp_path / "velocity.onnx").read_bytes() + b"\0")
    with pytest.raises(ArtifactIntegrityError):
        SplitSampler(policy, tmp_path)
