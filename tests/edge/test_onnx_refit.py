"""ONNX export as graph + external weights, refitted per version (issue 18): the learner's version
store (learner.versions) publishes a refit export (pirl.export.onnx_export, ``refit=True``); the edge
(edge.weight_sync staging + edge.backends.OnnxRuntimeBackend) keeps the graph and the frozen data
across versions by their sha256 and writes the trained data from each version's model.safetensors.
The small built-in policy (a frozen state encoder, a trained velocity network and critic), chunks of
1 KiB."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edge.backends import OnnxRuntimeBackend, check_golden, golden_inputs
from edge.inference import InferenceWorker
from edge.weight_sync import WeightStaging
from helpers.policy import builtin_policy
from learner.versions import VersionStore
from pirl.export.onnx_export import (
    FROZEN_DATA_FILE,
    MODEL_FILE,
    TRAINED_DATA_FILE,
    ArtifactIntegrityError,
    OnnxSampler,
    export_onnx,
)

CHUNK = 1024
GRAPH, FROZEN, TRAINED = "onnx/" + MODEL_FILE, "onnx/" + FROZEN_DATA_FILE, "onnx/" + TRAINED_DATA_FILE


def moved(policy, seed: int, delta: float = 0.01):
    """``policy`` with every trained tensor moved (a new version; the frozen part unchanged)."""
    g = torch.Generator().manual_seed(seed)
    names = set(policy.rl_state_names())
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n in names:
                p.add_(delta * torch.randn(p.shape, generator=g))
    return policy


def local_stream(store: VersionStore, version: int):
    """FetchArtifact without a server: the store's serialized chunks (the wire format)."""

    def open_stream(name, offset):
        return (c.SerializeToString() for c in store.read_chunks(version, name, offset))

    return open_stream


def fetch(staging: WeightStaging, store: VersionStore, ann) -> tuple[dict, dict, int]:
    """(trained state, files as the subscriber offers them, bytes downloaded) for announcement ``ann``."""
    before = staging.stats["bytes_received"]
    paths = staging.fetch(ann, local_stream(store, ann.version))
    state = load_file(str(paths["model.safetensors"]))
    files = {name: p.read_bytes() for name, p in paths.items() if name != "model.safetensors"}
    return state, files, staging.stats["bytes_received"] - before


def run_golden(sampler: OnnxSampler, policy) -> dict:
    obs, initial, step, stochastic, level = golden_inputs(policy, batch=2)
    return sampler.run(
        {k: v.numpy() for k, v in obs.items()}, initial.numpy(), step.numpy(), stochastic.numpy(), level.numpy()
    )


def test_refit_export_keeps_graph_and_frozen_bytes_and_records_the_folded_transpose(tmp_path):
    policy = builtin_policy(0)[0].eval()
    m1 = export_onnx(policy, tmp_path / "v1", version=1, refit=True)
    m2 = export_onnx(moved(policy, 1), tmp_path / "v2", version=2, refit=True)
    a1, a2 = m1["artifacts"], m2["artifacts"]
    assert set(a1) == {MODEL_FILE, FROZEN_DATA_FILE, TRAINED_DATA_FILE}  # no full state dict travels
    assert a1[MODEL_FILE]["sha256"] == a2[MODEL_FILE]["sha256"]  # no version inside the graph file
    assert a1[FROZEN_DATA_FILE]["sha256"] == a2[FROZEN_DATA_FILE]["sha256"]
    assert a1[FROZEN_DATA_FILE]["bytes"] > 0  # the frozen state encoder is there
    assert a1[TRAINED_DATA_FILE]["sha256"] != a2[TRAINED_DATA_FILE]["sha256"]
    assert m1["graph_structure_sha256"] == m2["graph_structure_sha256"]
    refit = m2["refit"]
    # every trained tensor is an initializer, as is or transposed by constant folding (the velocity
    # head is applied to [B, H, 32]: a MatMul on the folded transpose, renamed onnx::MatMul_<n>)
    assert refit["unmatched_trained_keys"] == []
    assert {e["key"] for e in refit["tensors"]} == set(policy.rl_state_names())
    folded = [e for e in refit["tensors"] if e["key"] == "backbone.velocity_head.weight"]
    assert folded and folded[0]["transform"] == "transpose" and folded[0]["initializer"].startswith("onnx::")
    # the same outputs as a classic full export of the same weights, bit for bit
    full = OnnxSampler(export_onnx(policy, tmp_path / "full", version=2) and tmp_path / "full")
    got, want = run_golden(OnnxSampler(tmp_path / "v2"), policy), run_golden(full, policy)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_second_version_fetches_only_the_trained_tensors_and_refits_the_session(tmp_path):
    learner_policy = builtin_policy(0)[0].eval()
    edge_policy = builtin_policy(0)[0].eval()
    store = VersionStore(tmp_path / "artifacts", keep=2, chunk_bytes=CHUNK)
    staging = WeightStaging(tmp_path / "edge")

    ann1 = store.publish(learner_policy, 1, export_onnx=True)
    names = {a.name for a in ann1.manifest.artifacts}
    assert {GRAPH, FROZEN, "onnx/manifest.json", "model.safetensors"} <= names and TRAINED not in names
    state1, files1, got1 = fetch(staging, store, ann1)
    assert got1 == sum(a.size_bytes for a in ann1.manifest.artifacts)  # the first version: all of it

    ann2 = store.publish(moved(learner_policy, 2), 2, export_onnx=True)
    sizes = {a.name: a.size_bytes for a in ann2.manifest.artifacts}
    by_name1 = {a.name: a.sha256 for a in ann1.manifest.artifacts}
    assert all(a.sha256 == by_name1[a.name] for a in ann2.manifest.artifacts if a.name in (GRAPH, FROZEN))
    reused = staging.stats["bytes_reused"]
    state2, files2, got2 = fetch(staging, store, ann2)
    # only what changed travels: the trained tensors and the small per-version manifest; the graph and
    # the frozen data are linked from version 1's staged files (their sha256 is unchanged)
    assert got2 == sizes["model.safetensors"] + sizes["onnx/manifest.json"]
    assert staging.stats["bytes_reused"] - reused == sizes[GRAPH] + sizes[FROZEN]
    # the learner holds one copy of the unchanged files (hard links), not one per version
    for name in (GRAPH, FROZEN):
        assert (store.folder(1) / name).stat().st_ino == (store.folder(2) / name).stat().st_ino

    # the edge: version 2's weights in the policy, the session from the kept graph + frozen data and the
    # trained data written here from model.safetensors; checked against PyTorch and against a full export
    edge_policy.load_state_dict(state2, strict=False)
    backend = OnnxRuntimeBackend(edge_policy, workdir=tmp_path / "ort")
    backend.prepare(2, files2)
    assert backend.last_prepare["method"] == "refit"
    errors = check_golden(backend, edge_policy)
    assert errors is not None and max(errors.values()) < 1e-4
    full = OnnxSampler(export_onnx(learner_policy, tmp_path / "full2", version=2) and tmp_path / "full2")
    got, want = run_golden(backend.session, edge_policy), run_golden(full, learner_policy)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])

    # pruning version 1 (keep=2 after version 3) leaves the shared files of the kept versions intact
    ann3 = store.publish(moved(learner_policy, 3), 3, export_onnx=True)
    assert store.versions() == [2, 3]
    for v in (2, 3):
        frozen = (store.folder(v) / FROZEN).read_bytes()
        assert hashlib.sha256(frozen).hexdigest() == by_name1[FROZEN]
    _, _, got3 = fetch(staging, store, ann3)
    sizes3 = {a.name: a.size_bytes for a in ann3.manifest.artifacts}
    assert got3 == sizes3["model.safetensors"] + sizes3["onnx/manifest.json"]


def test_a_corrupted_frozen_file_or_foreign_trained_tensors_are_refused(tmp_path):
    policy = builtin_policy(0)[0].eval()
    store = VersionStore(tmp_path / "artifacts", keep=2, chunk_bytes=CHUNK)
    staging = WeightStaging(tmp_path / "edge")
    ann = store.publish(policy, 1, export_onnx=True)
    state, files, _ = fetch(staging, store, ann)

    bad = dict(files)
    frozen = bytearray(bad[FROZEN])
    frozen[len(frozen) // 2] ^= 0x01
    bad[FROZEN] = bytes(frozen)
    backend = OnnxRuntimeBackend(builtin_policy(0)[0].eval(), workdir=tmp_path / "ort")
    with pytest.raises(ArtifactIntegrityError, match=FROZEN_DATA_FILE):
        backend.prepare(1, bad)
    assert backend.session is None

    # trained tensors that are not this version's (another checkpoint in the edge's policy): the trained
    # data written from them does not hash to the learner's, refused before any session is built
    other = builtin_policy(1)[0].eval()
    backend = OnnxRuntimeBackend(other, workdir=tmp_path / "ort2")
    with pytest.raises(ArtifactIntegrityError, match=TRAINED_DATA_FILE):
        backend.prepare(1, files)

    # an edge worker offered the corrupted export refuses the version and keeps serving its own
    policy_e, pre, post = builtin_policy(0)
    worker = InferenceWorker(policy_e.eval(), pre, post, robot_id="r", backend="onnxruntime")
    assert not worker.offer(1, state, bad, frozen_sha256=ann.frozen_sha256)
    assert worker.version == 0 and worker.refused == 1
    assert worker.offer(1, state, files, frozen_sha256=ann.frozen_sha256)
    assert worker.prepare_log[-1].get("method") == "refit"


def test_a_changed_graph_travels_in_full(tmp_path):
    policy = builtin_policy(0)[0].eval()
    store = VersionStore(tmp_path / "artifacts", keep=2, chunk_bytes=CHUNK)
    staging = WeightStaging(tmp_path / "edge")
    ann1 = store.publish(policy, 1, export_onnx=True)
    fetch(staging, store, ann1)

    policy.config.noise_method = "flow_ode"  # another sampler: another graph, the same weights
    ann2 = store.publish(moved(policy, 2), 2, export_onnx=True)
    sha1 = {a.name: a.sha256 for a in ann1.manifest.artifacts}
    sizes = {a.name: a.size_bytes for a in ann2.manifest.artifacts}
    assert {a.name: a.sha256 for a in ann2.manifest.artifacts}[GRAPH] != sha1[GRAPH]
    state, files, got = fetch(staging, store, ann2)
    assert got >= sizes[GRAPH] + sizes["model.safetensors"]  # the new graph is downloaded
    m1 = json.loads((store.folder(1) / "onnx/manifest.json").read_text())
    m2 = json.loads(files["onnx/manifest.json"])
    assert m1["graph_structure_sha256"] != m2["graph_structure_sha256"]

    edge_policy = builtin_policy(0)[0].eval()
    edge_policy.config.noise_method = "flow_ode"
    edge_policy.load_state_dict(state, strict=False)
    backend = OnnxRuntimeBackend(edge_policy, workdir=tmp_path / "ort")
    backend.prepare(2, files)
    assert backend.session.manifest["noise_method"] == "flow_ode"
    assert check_golden(backend, edge_policy) is not None
