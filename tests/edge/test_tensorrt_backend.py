"""The TensorRT backend's logic that needs no GPU: cache keys, the engine cache and its integrity
checks, manifest handling, the refit-vs-rebuild order, fallback and its metrics when TensorRT is
absent, and the orchestration of build / refit / cache / published engine inside the edge worker.

The orchestration tests run against ``FakeTRT``, a small stand-in for the part of the TensorRT
Python API that ``pirl.export.trt_engine`` calls (Builder, network, OnnxParser, builder
config, optimization profile, Runtime, Refitter, OnnxParserRefitter). A fake "engine" holds the ONNX
bytes it was built or refitted from, and ``FakeRunner`` evaluates those bytes with ONNX Runtime. So
these tests prove which ONNX each engine was built or refitted from, when a refit / build / cache
hit / published engine is used, that refitted weights are what is served after a swap, the build
flags passed (strongly typed, REFIT, TF32 off, workspace, profile), and that the golden-input check
refuses an engine that does not match its weights. They do NOT prove that TensorRT parses this ONNX,
builds, refits or computes correctly, nor anything about CUDA graphs: that is what the ``-m gpu``
tests in tests/edge/test_tensorrt_gpu.py are for (they need CUDA and TensorRT).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from prometheus_client import REGISTRY

from edge.backend_choice import choose_backend
from edge.backends import GoldenMismatchError
from edge.inference import InferenceWorker
from helpers.policy import shifted, small_policy
from pirl.export import trt_engine
from pirl.export.onnx_export import export_onnx, graph_structure_sha256, load_manifest
from pirl.export.trt_engine import (
    EngineCache,
    EngineKey,
    EngineManager,
    EnginePublisher,
    TensorRTSettings,
    engine_key,
    prepare_order,
    profile_shapes,
)

DEVICE = {"name": "NVIDIA Jetson AGX Orin (fake)", "compute_capability": "8.7"}


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- a fake of the TensorRT API surface trt_engine calls -------------------------------------------


class FakeTRT:
    """Records every call; engines are JSON holding the ONNX bytes they were built / refitted from."""

    __version__ = "10.3.0.fake"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1  # TensorRT 10's value: the flag bit is 1 << 1

    class BuilderFlag:
        REFIT, TF32, FP16, BF16 = "REFIT", "TF32", "FP16", "BF16"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    def __init__(self):
        self.builds: list[dict] = []  # what each build was given
        self.refits = 0
        self.fail_refit = False
        self.fail_parse = False
        trt = self

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return FakeNetwork(flags)

            def create_builder_config(self):
                return FakeConfig()

            def create_optimization_profile(self):
                return FakeProfile()

            def build_serialized_network(self, network, config):
                trt.builds.append(
                    {
                        "flags": network.flags,
                        "config_flags": set(config.flags),
                        "pools": dict(config.pools),
                        "profile": dict(config.profiles[0].shapes),
                    }
                )
                return _plan(network.onnx_bytes, trt.BuilderFlag.REFIT in config.flags)

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                if trt.fail_parse:
                    self.num_errors = 1
                    return False
                self.network.load(path)
                return True

            def get_error(self, i):
                return "fake parser error: unsupported node"

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                try:
                    d = json.loads(bytes(plan))
                except ValueError:
                    return None
                return FakeEngine(base64.b64decode(d["onnx"]), d["refittable"])

        class Refitter:
            def __init__(self, engine, logger):
                if not engine.refittable:
                    raise RuntimeError("engine is not refittable")
                self.engine, self.pending = engine, None

            def get_missing_weights(self):
                return [] if self.pending is not None else ["every weight"]

            def refit_cuda_engine(self):
                self.engine.onnx_bytes, self.engine.generation = self.pending, self.engine.generation + 1
                trt.refits += 1
                return True

        class OnnxParserRefitter:
            def __init__(self, refitter, logger):
                self.refitter, self.num_errors = refitter, 0

            def refit_from_file(self, path):
                data = Path(path).read_bytes()
                same = _structure(data) == _structure(self.refitter.engine.onnx_bytes)
                if trt.fail_refit or not same:
                    self.num_errors = 1
                    return False
                self.refitter.pending = data
                return True

            def get_error(self, i):
                return "fake refit error: weights do not fit the engine"

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime
        self.Refitter, self.OnnxParserRefitter = Refitter, OnnxParserRefitter


def _structure(onnx_bytes: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        f.write(onnx_bytes)
        f.flush()
        return graph_structure_sha256(f.name)


def _plan(onnx_bytes: bytes, refittable: bool) -> bytes:
    return json.dumps({"onnx": base64.b64encode(onnx_bytes).decode(), "refittable": refittable}).encode()


class FakeNetwork:
    def __init__(self, flags):
        self.flags, self.inputs, self.onnx_bytes = flags, [], None

    def load(self, path):
        self.onnx_bytes = Path(path).read_bytes()
        model = onnx.load_from_string(self.onnx_bytes)
        for i in model.graph.input:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim)
            self.inputs.append(argparse.Namespace(name=i.name, shape=dims))

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class FakeConfig:
    def __init__(self):
        self.flags, self.pools, self.profiles = {"TF32"}, {}, []  # TensorRT enables TF32 by default

    def set_flag(self, f):
        self.flags.add(f)

    def clear_flag(self, f):
        self.flags.discard(f)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, p):
        self.profiles.append(p)


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)


class FakeEngine:
    def __init__(self, onnx_bytes, refittable):
        self.onnx_bytes, self.refittable, self.generation = onnx_bytes, refittable, 0

    def serialize(self):
        return _plan(self.onnx_bytes, self.refittable)


class FakeRunner:
    """Evaluates the ONNX bytes the fake engine holds *now* with ONNX Runtime (CPU)."""

    instances: list[FakeRunner] = []

    def __init__(self, trt, engine, settings):
        self.engine, self.session, self.seen, self.graph_resets = engine, None, None, 0
        FakeRunner.instances.append(self)

    def reset_graph(self):
        self.graph_resets += 1

    def run(self, feeds):
        import onnxruntime as ort

        if self.seen != (id(self.engine.onnx_bytes), self.engine.generation):
            self.session = ort.InferenceSession(self.engine.onnx_bytes, providers=["CPUExecutionProvider"])
            self.seen = (id(self.engine.onnx_bytes), self.engine.generation)
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds), strict=True))


@pytest.fixture
def fake_trt(monkeypatch):
    """TensorRT 'present' (the fake) with a fake CUDA device, and the fake runner in the edge backend."""
    import edge.tensorrt_backend

    fake = FakeTRT()
    monkeypatch.setattr(trt_engine, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_engine, "cuda_device", lambda: dict(DEVICE))
    monkeypatch.setattr(edge.tensorrt_backend, "EngineRunner", FakeRunner)
    FakeRunner.instances = []
    return fake


@pytest.fixture
def no_trt(monkeypatch):
    def absent():
        raise trt_engine.TensorRTUnavailableError(
            "import tensorrt failed (ModuleNotFoundError: No module named 'tensorrt')"
        )

    monkeypatch.setattr(trt_engine, "import_tensorrt", absent)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exports of one small policy: v0, v1 (other weights), and v0's weights with K=2 (other graph)."""
    root = tmp_path_factory.mktemp("exports")
    policy, _, _ = small_policy()
    export_onnx(policy, root / "v0", version=0)
    policy.load_state_dict(shifted(policy, 0.05, 1))
    export_onnx(policy, root / "v1", version=1)
    other, _, _ = small_policy(num_denoise_steps=2)
    export_onnx(other, root / "k2", version=0)
    return {name: load_manifest(root / name) for name in ("v0", "v1", "k2")}


# --- keys, settings, profiles, order ---------------------------------------------------------------


def test_engine_key_is_stable_and_changes_with_what_the_engine_depends_on(exports):
    s = TensorRTSettings()
    key = engine_key(*exports["v0"], s, "10.3.0", DEVICE)
    assert key == engine_key(*exports["v0"], TensorRTSettings(), "10.3.0", dict(DEVICE))
    assert key.id == engine_key(*exports["v0"], s, "10.3.0", DEVICE).id and len(key.id) == 64
    other_weights = engine_key(*exports["v1"], s, "10.3.0", DEVICE)
    assert other_weights.id != key.id and other_weights.structure_id == key.structure_id
    other_graph = engine_key(*exports["k2"], s, "10.3.0", DEVICE)
    assert other_graph.structure_id != key.structure_id
    variants = [
        engine_key(*exports["v0"], s, "10.13.3", DEVICE),  # TensorRT version
        engine_key(*exports["v0"], s, "10.3.0", {**DEVICE, "compute_capability": "11.0"}),  # Thor
        engine_key(*exports["v0"], s, "10.3.0", {**DEVICE, "name": "NVIDIA H100"}),
        engine_key(*exports["v0"], TensorRTSettings(batch_max=8), "10.3.0", DEVICE),
        engine_key(*exports["v0"], TensorRTSettings(batch_opt=2, batch_max=2), "10.3.0", DEVICE),
        engine_key(*exports["v0"], TensorRTSettings(refit=False), "10.3.0", DEVICE),
        engine_key(*exports["v0"], TensorRTSettings(tf32=True), "10.3.0", DEVICE),
        engine_key(*exports["v0"], TensorRTSettings(workspace_mib=512), "10.3.0", DEVICE),
        engine_key(exports["v0"][0], {**exports["v0"][1], "precision": "fp16"}, s, "10.3.0", DEVICE),
    ]
    ids = {v.id for v in variants} | {key.id}
    assert len(ids) == len(variants) + 1
    assert all(v.structure_id != key.structure_id for v in variants)
    # settings that only change how an engine runs, not the engine, are not in the key
    assert engine_key(*exports["v0"], TensorRTSettings(cuda_graph=False, cache_entries=9), "10.3.0", DEVICE) == key


def test_engine_key_fields_round_trip_and_are_validated(exports):
    key = engine_key(*exports["v0"], TensorRTSettings(), "10.3.0", DEVICE)
    assert EngineKey.from_fields(json.loads(json.dumps(key.fields()))) == key
    with pytest.raises(ValueError, match="exactly"):
        EngineKey.from_fields({k: v for k, v in key.fields().items() if k != "tensorrt_version"})
    with pytest.raises(ValueError, match="batch_profile"):
        EngineKey.from_fields({**key.fields(), "batch_profile": [1, 2]})
    # the structure hash is recomputed from the file when an (older) manifest lacks it
    root, manifest = exports["v0"]
    legacy = {k: v for k, v in manifest.items() if k != "graph_structure_sha256"}
    assert engine_key(root, legacy, TensorRTSettings(), "10.3.0", DEVICE) == key


def test_settings_and_cli_flags_are_validated():
    for bad, field in (
        ({"batch_min": 2, "batch_opt": 1, "batch_max": 2}, "batch_min/opt/max"),
        ({"batch_min": 0}, "batch_min/opt/max"),
        ({"workspace_mib": 0}, "workspace_mib"),
        ({"cache_entries": 0}, "cache_entries"),
    ):
        with pytest.raises(ValueError, match=f"tensorrt.{field}"):
            TensorRTSettings(**bad)
    from edge.configuration import EdgeConfig
    from pirl.cli import parse_config

    required = ["--link.learner=h:1", "--link.robot_id=r", "--link.tokens=t", "--policy.path=p"]
    flags = [
        "--tensorrt.batch_opt=2",
        "--tensorrt.batch_max=4",
        "--tensorrt.refit=false",
        "--tensorrt.workspace_mib=64",
    ]
    s = parse_config(EdgeConfig, prog="pirl-edge", args=[*required, *flags]).tensorrt
    assert (s.batch_min, s.batch_opt, s.batch_max, s.refit, s.workspace_mib, s.cache_dir) == (1, 2, 4, False, 64, None)
    assert not s.fixed_batch and TensorRTSettings().fixed_batch


def test_edge_cli_reports_bad_tensorrt_settings_as_a_user_error(tmp_path, monkeypatch, capsys):
    import edge.main

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"r": "t" * 32}))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pirl-edge",
            "--link.learner",
            "127.0.0.1:1",
            "--link.robot_id",
            "r",
            "--link.tokens",
            str(tokens),
            "--policy.path",
            str(tmp_path),
            "--tensorrt.batch_min=4",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        edge.main.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: tensorrt.batch_min/opt/max: the profile must satisfy 1 <= min <= opt <= max (got 4,1,1)" in err


def test_profile_shapes_only_the_batch_axis_is_dynamic():
    s = TensorRTSettings(batch_min=1, batch_opt=2, batch_max=8)
    assert profile_shapes("x", (-1, 4, 3), s) == ((1, 4, 3), (2, 4, 3), (8, 4, 3))
    assert profile_shapes("x", (4, 3), s) == ((4, 3),) * 3
    with pytest.raises(trt_engine.EngineBuildError, match="outside the profile"):
        profile_shapes("x", (16, 3), s)
    with pytest.raises(trt_engine.EngineBuildError, match="dynamic non-batch axis"):
        profile_shapes("x", (-1, -1), s)


def test_refit_versus_rebuild_order(exports):
    key = engine_key(*exports["v1"], TensorRTSettings(), "10.3.0", DEVICE)
    older = engine_key(*exports["v0"], TensorRTSettings(), "10.3.0", DEVICE)
    other_graph = engine_key(*exports["k2"], TensorRTSettings(), "10.3.0", DEVICE)
    no_refit = engine_key(*exports["v1"], TensorRTSettings(refit=False), "10.3.0", DEVICE)
    kw = {
        "current": None,
        "current_refittable": False,
        "published": None,
        "cached_exact": False,
        "cached_refittable": False,
    }
    assert prepare_order(key, **kw) == ["build"]
    assert prepare_order(key, **{**kw, "current": key, "current_refittable": True})[0] == "current"
    # only weights changed and the engine in hand is refittable: refit it
    assert prepare_order(key, **{**kw, "current": older, "current_refittable": True}) == ["refit", "build"]
    # an engine built for exactly these weights (learner's or cached) beats a refit
    assert prepare_order(
        key, **{**kw, "current": older, "current_refittable": True, "published": key, "cached_exact": True}
    ) == ["published", "cache", "refit", "build"]
    # a published engine with another key (other GPU / TensorRT / weights) is not used
    assert prepare_order(key, **{**kw, "published": older}) == ["build"]
    # graph changed, or the engine was built without REFIT: rebuild (or a cached refittable one)
    assert prepare_order(key, **{**kw, "current": other_graph, "current_refittable": True}) == ["build"]
    assert prepare_order(key, **{**kw, "current": older, "current_refittable": False, "cached_refittable": True}) == [
        "cache_refit",
        "build",
    ]
    # refit off: never refit
    assert prepare_order(
        no_refit, **{**kw, "current": older, "current_refittable": True, "cached_refittable": True}
    ) == ["build"]


# --- the cache ---------------------------------------------------------------------------------------


def test_cache_round_trip_integrity_and_eviction(tmp_path, exports, caplog):
    cache = EngineCache(tmp_path / "c", max_entries=2)
    k0 = engine_key(*exports["v0"], TensorRTSettings(), "10.3.0", DEVICE)
    k1 = engine_key(*exports["v1"], TensorRTSettings(), "10.3.0", DEVICE)
    plan = b"\x00plan-bytes" * 100
    cache.put(k0, plan, source="build", seconds=1.0)
    assert cache.get(k0) == plan and cache.has(k0) and cache.get(k1) is None
    assert not list((tmp_path / "c").glob("*.tmp"))
    meta = json.loads((tmp_path / "c" / f"{k0.id}.json").read_text())
    assert meta["plan_sha256"] and meta["key"] == k0.fields() and meta["structure_id"] == k0.structure_id
    assert cache.refittable_ids(k1) == [k0.id]  # same structure, built with REFIT: can be refitted into k1

    # a flipped byte in the plan: ignored, deleted, logged, counted
    p = tmp_path / "c" / f"{k0.id}.plan"
    data = bytearray(p.read_bytes())
    data[5] ^= 1
    p.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert cache.get(k0) is None
    assert "ignored and deleted" in caplog.text and cache.rejected == 1 and not cache.has(k0) and not p.exists()

    # a JSON whose key was edited (another TensorRT version) no longer matches its name
    cache.put(k0, plan, source="build", seconds=1.0)
    mpath = tmp_path / "c" / f"{k0.id}.json"
    meta = json.loads(mpath.read_text())
    meta["key"]["tensorrt_version"] = "10.99"
    mpath.write_text(json.dumps(meta))
    assert cache.get(k0) is None and cache.rejected == 2
    # a truncated JSON
    cache.put(k0, plan, source="build", seconds=1.0)
    mpath.write_text(mpath.read_text()[:20])
    assert cache.get(k0) is None and cache.rejected == 3

    # eviction: least recently used first, orphaned plans removed
    keys = [engine_key(*exports["v0"], TensorRTSettings(workspace_mib=w), "10.3.0", DEVICE) for w in (1, 2, 3)]
    for i, k in enumerate(keys):
        cache.put(k, plan + bytes([i]), source="build", seconds=0.1)
    assert not cache.has(keys[0]) and cache.has(keys[1]) and cache.has(keys[2])
    assert sorted(p.stem for p in (tmp_path / "c").glob("*.plan")) == sorted(k.id for k in keys[1:])


# --- orchestration against the fake TensorRT ---------------------------------------------------------


def test_build_is_strongly_typed_with_profile_workspace_and_refit(fake_trt, exports, tmp_path):
    """What the builder is given (checked on the fake: it records the calls)."""
    root, manifest = exports["v0"]
    for refit in (True, False):
        m = EngineManager(TensorRTSettings(batch_min=1, batch_opt=2, batch_max=4, workspace_mib=256, refit=refit))
        m.build_plan(root / "model.onnx")
        b = fake_trt.builds[-1]
        assert b["flags"] == 1 << FakeTRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED
        assert ("REFIT" in b["config_flags"]) is refit
        assert not {"TF32", "FP16", "BF16"} & b["config_flags"]  # precision from the ONNX types only
        assert b["pools"] == {"WORKSPACE": 256 << 20}
        names = [s["name"] for s in manifest["inputs"]]
        assert list(b["profile"]) == names
        init = b["profile"]["initial_noise"]
        h, d = manifest["chunk_size"], manifest["model_action_dim"]
        assert init == ((1, h, d), (2, h, d), (4, h, d))
    fake_trt.fail_parse = True
    with pytest.raises(trt_engine.EngineBuildError, match="fake parser error"):
        EngineManager(TensorRTSettings()).build_plan(root / "model.onnx")


def test_worker_builds_once_then_refits_and_rebuilds_only_on_graph_change(fake_trt, tmp_path):
    from learner.trainer import policy_update_message

    rid = "trt-fake-worker"
    policy, pre, post = small_policy()
    settings = TensorRTSettings(cache_dir=str(tmp_path / "cache"))
    worker = InferenceWorker(policy, pre, post, robot_id=rid, backend="tensorrt", tensorrt_settings=settings)
    assert worker.backend == "tensorrt" and worker.fallbacks == [] and len(fake_trt.builds) == 1
    raw = {"agent_pos": np.full((1, 6), 0.3, np.float32)}

    def serve(version, state, files=None):
        newer, _, _ = small_policy()
        newer.load_state_dict(state)
        if files is None:
            files = dict(policy_update_message(newer, version, tmp_path / "learner").files)
        assert worker.offer(version, state, files), worker.prepare_log[-1]
        d = worker.decide(raw)[0]
        with torch.no_grad():
            want = newer.predict_value(worker.observe(raw))
        assert d.version == version and abs(d.value - float(want[0])) < 1e-5

    # v1: the spare has no engine yet: v0's cached (refittable) engine is loaded and refitted
    serve(1, shifted(policy, 0.05, 1))
    assert worker.prepare_log[-1]["method"] == "cache_refit" and len(fake_trt.builds) == 1
    # v2, v3: the spare holds the engine of two versions ago: refitted in place, graph recaptured
    for v in (2, 3):
        serve(v, shifted(policy, 0.05, v))
        assert worker.prepare_log[-1]["method"] == "refit" and len(fake_trt.builds) == 1
    assert sum(r.graph_resets for r in FakeRunner.instances) == 2
    assert metric("pirl_edge_tensorrt_refits_total", robot_id=rid) == 3
    assert metric("pirl_edge_tensorrt_builds_total", robot_id=rid) == 0
    assert metric("pirl_edge_backend_prepare_seconds_count", robot_id=rid, backend="tensorrt") == 3
    # a refit that fails falls through to a rebuild (counted), and the version still serves
    fake_trt.fail_refit = True
    serve(4, shifted(policy, 0.05, 4))
    assert worker.prepare_log[-1]["method"] == "build" and len(fake_trt.builds) == 2
    assert metric("pirl_edge_tensorrt_refit_failures_total", robot_id=rid) == 2  # refit, then cache_refit
    assert metric("pirl_edge_tensorrt_builds_total", robot_id=rid) == 1
    fake_trt.fail_refit = False
    # the learner's export changes graph (another opset) for the same kind of weights: no refit, a build
    state5 = shifted(policy, 0.05, 5)
    newer, _, _ = small_policy()
    newer.load_state_dict(state5)
    export_onnx(newer, tmp_path / "opset18", version=5, opset=18)
    files = {f"onnx/{p.name}": p.read_bytes() for p in (tmp_path / "opset18").iterdir() if p.is_file()}
    serve(5, state5, files)
    assert worker.prepare_log[-1]["method"] == "build" and len(fake_trt.builds) == 3
    # an export of another graph that does not compute this policy's sampler (K = 2): built, then
    # refused on its first run (its noise inputs have another shape); v5 keeps serving
    other_k, _, _ = small_policy(num_denoise_steps=2)
    other_k.load_state_dict(state5)
    files = dict(policy_update_message(other_k, 6, tmp_path / "learner-k2").files)
    assert not worker.offer(6, state5, files)
    assert (
        "input 'step_noise': expected shape ['batch', 2, 8, 3], got [1, 4, 8, 3]" in worker.prepare_log[-1]["refused"]
    )
    assert worker.decide(raw)[0].version == 5


def test_engine_that_does_not_match_its_weights_is_refused_by_the_golden_check(fake_trt, tmp_path):
    """A hash-consistent export of *other* weights (a learner bug) is refitted, then refused."""
    from learner.trainer import policy_update_message

    rid = "trt-fake-golden"
    policy, pre, post = small_policy()
    worker = InferenceWorker(
        policy,
        pre,
        post,
        robot_id=rid,
        backend="tensorrt",
        tensorrt_settings=TensorRTSettings(cache_dir=str(tmp_path / "cache")),
    )
    raw = {"agent_pos": np.full((1, 6), 0.3, np.float32)}
    before = worker.decide(raw)[0]
    failures = metric("pirl_edge_swap_failures_total", robot_id=rid)
    v1, other = shifted(policy, 0.05, 1), small_policy(seed=7)[0]
    msg = policy_update_message(other, 1, tmp_path / "learner")  # ONNX of other weights, hashes consistent
    assert not worker.offer(1, v1, dict(msg.files))
    assert "golden-input check failed" in worker.prepare_log[-1]["refused"]
    assert metric("pirl_edge_swap_failures_total", robot_id=rid) == failures + 1 and worker.refused == 1
    after = worker.decide(raw)[0]
    assert after.version == 0 and after.value == pytest.approx(before.value, abs=1e-6)
    # the same weights with their own export are accepted (the spare's engine is refitted again)
    newer, _, _ = small_policy()
    newer.load_state_dict(v1)
    msg = policy_update_message(newer, 2, tmp_path / "learner")
    assert worker.offer(2, v1, dict(msg.files)) and worker.decide(raw)[0].version == 2


def test_golden_check_on_a_backend_that_lies(fake_trt, tmp_path):
    from edge.backends import check_golden
    from edge.tensorrt_backend import TensorRTBackend

    policy, _, _ = small_policy()
    backend = TensorRTBackend(policy, tmp_path / "w", settings=TensorRTSettings())
    backend.prepare(0)
    errors = check_golden(backend, policy)
    assert set(errors) == {"actions", "chain", "log_prob", "value"} and max(errors.values()) < 1e-5
    with torch.no_grad():
        for p in policy.value_head.parameters():
            p.add_(0.01)  # the PyTorch weights move, the engine does not
    with pytest.raises(GoldenMismatchError, match="value differs from PyTorch"):
        check_golden(backend, policy)


def test_learner_publishes_an_engine_and_the_edge_uses_it_only_when_the_key_matches(fake_trt, tmp_path):
    from edge.tensorrt_backend import TensorRTBackend
    from learner.trainer import policy_update_message

    policy, _, _ = small_policy()
    publisher = EnginePublisher(EngineManager(TensorRTSettings()))
    msg = policy_update_message(policy, 3, tmp_path / "learner", engines=publisher)
    names = {a.name for a in msg.manifest.artifacts}
    assert {"onnx/engine.plan", "onnx/manifest.json", "onnx/model.onnx"} <= names
    manifest = json.loads(msg.files["onnx/manifest.json"])
    entry = manifest["tensorrt_engine"]
    assert entry["file"] == "engine.plan" and entry["method"] == "build"
    assert entry["key"]["tensorrt_version"] == FakeTRT.__version__ and entry["key"]["compute_capability"] == "8.7"
    assert entry["key"]["onnx_sha256"] == trt_engine.export_onnx_sha256(manifest)
    builds = len(fake_trt.builds)

    same_edge = TensorRTBackend(policy, tmp_path / "e1", settings=TensorRTSettings())
    same_edge.prepare(3, dict(msg.files))
    assert same_edge.last_prepare["method"] == "published" and len(fake_trt.builds) == builds

    other_gpu = TensorRTBackend(
        policy,
        tmp_path / "e2",
        manager=EngineManager(
            TensorRTSettings(), device={"name": "NVIDIA Jetson AGX Thor (fake)", "compute_capability": "11.0"}
        ),
    )
    other_gpu.prepare(3, dict(msg.files))
    assert other_gpu.last_prepare["method"] == "build" and len(fake_trt.builds) == builds + 1

    # a published plan whose bytes do not match its entry is not deserialised: built instead
    files = dict(msg.files)
    files["onnx/engine.plan"] = files["onnx/engine.plan"][:-2] + b"}}"
    tampered = TensorRTBackend(policy, tmp_path / "e3", settings=TensorRTSettings())
    tampered.prepare(3, files)
    assert tampered.last_prepare["method"] == "build"
    assert "published: " in tampered.last_prepare["failed"][0] and "sha256" in tampered.last_prepare["failed"][0]

    # the learner's next version refits its own engine
    policy.load_state_dict(shifted(policy, 0.05, 9))
    msg4 = policy_update_message(policy, 4, tmp_path / "learner", engines=publisher)
    assert json.loads(msg4.files["onnx/manifest.json"])["tensorrt_engine"]["method"] == "refit"
    # an engine the learner cannot build does not stop the version from being published
    fake_trt.fail_parse, fake_trt.fail_refit = True, True
    msg5 = policy_update_message(
        policy, 5, tmp_path / "learner", engines=EnginePublisher(EngineManager(TensorRTSettings()))
    )
    assert "onnx/model.onnx" in msg5.files and "onnx/engine.plan" not in msg5.files
    assert "tensorrt_engine" not in json.loads(msg5.files["onnx/manifest.json"])


# --- fallback and metrics without TensorRT -----------------------------------------------------------


def test_tensorrt_absent_falls_back_and_counts_only_when_asked_for(no_trt, caplog):
    policy, pre, post = small_policy()
    rid = "trt-absent"
    caplog.set_level(logging.INFO)
    w = InferenceWorker(policy, pre, post, robot_id=rid, backend="tensorrt")
    assert w.backend == "onnxruntime"
    assert [(f.backend, f.counted) for f in w.fallbacks] == [("tensorrt", True)]
    assert "No module named 'tensorrt'" in w.fallbacks[0].reason
    assert metric("pirl_edge_backend_fallbacks_total", robot_id=rid, backend="tensorrt") == 1
    assert metric("pirl_edge_backend_requested_info", robot_id=rid, backend="tensorrt") == 1
    assert metric("pirl_edge_backend_info", robot_id=rid, backend="onnxruntime") == 1

    rid = "trt-absent-auto"
    w = InferenceWorker(policy, pre, post, robot_id=rid, backend="auto")
    assert w.backend == "onnxruntime" and [(f.backend, f.counted) for f in w.fallbacks] == [("tensorrt", False)]
    for label in ("auto", "tensorrt", "onnxruntime"):  # exported at 0, none counted
        assert REGISTRY.get_sample_value("pirl_edge_backend_fallbacks_total", {"robot_id": rid, "backend": label}) == 0
    assert "auto backend: TensorRT not used" in caplog.text


def test_present_tensorrt_that_fails_is_a_counted_fallback_in_auto(fake_trt):
    policy, pre, post = small_policy()
    fake_trt.fail_parse = True  # TensorRT is there, but cannot build this graph
    rid = "trt-present-fails"
    w = InferenceWorker(policy, pre, post, robot_id=rid, backend="auto")
    assert w.backend == "onnxruntime"
    assert [(f.backend, f.counted) for f in w.fallbacks] == [("tensorrt", True)]
    assert "fake parser error" in w.fallbacks[0].reason
    assert metric("pirl_edge_backend_fallbacks_total", robot_id=rid, backend="tensorrt") == 1
    fake_trt.fail_parse = False
    backend, fallbacks = choose_backend("auto", policy)
    assert backend.name == "tensorrt" and fallbacks == []


def test_learner_export_tensorrt_without_tensorrt_is_a_user_error(no_trt, tmp_path, monkeypatch, capsys):
    import learner.main

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"r": "t" * 32}))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pirl-learner",
            "--policy_path",
            str(tmp_path),
            "--tokens",
            str(tokens),
            "--output_dir",
            str(tmp_path / "out"),
            "--trainer.export_tensorrt=true",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        learner.main.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: trainer.export_tensorrt: TensorRT cannot build engines here: import tensorrt failed" in err
