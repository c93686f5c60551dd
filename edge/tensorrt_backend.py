"""The TensorRT inference backend of the edge.

Each version is served by an engine for that version's ONNX export (the learner's, hash-checked, or
exported here): ``EngineManager.prepare`` takes the learner's published engine when its key is this
edge's (TensorRT version, GPU, settings, weights), else a cached engine of exactly this key, else
refits this backend's own engine (it is the worker's spare, so nothing runs on it) or a cached
refittable engine of the same graph structure, else builds one (and caches it). How it was obtained
and how long it took are in ``last_prepare`` (the worker logs them, exports
``pirl_edge_backend_prepare_seconds`` and counts refits / builds / loads). After a refit the CUDA
graph is captured again, on the warm-up run here, off the control thread.

Prerequisites: ``tensorrt`` with its builder and ONNX parser, and a CUDA device; without them the
constructor raises ``TensorRTUnavailableError`` and ``choose_backend`` falls back to ONNX Runtime.
Which tests cover it with and without a GPU: pirl/export/trt_engine.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from edge.backends import GOLDEN_TOLERANCES, ExportStore, Sampled
from pirl.export.trt_engine import EngineManager, EngineRunner, PreparedEngine, TensorRTSettings

log = logging.getLogger(__name__)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(
        self,
        policy,
        workdir: Path | None = None,
        *,
        settings: TensorRTSettings | None = None,
        manager: EngineManager | None = None,
        runner_factory=None,
    ):
        self.policy = policy
        self.settings = settings or (manager.settings if manager is not None else TensorRTSettings())
        self.manager = manager if manager is not None else EngineManager(self.settings)  # TensorRTUnavailableError
        self.runner_factory = runner_factory or EngineRunner
        self.exports = ExportStore(workdir)
        self.manifest: dict | None = None
        self._prepared: PreparedEngine | None = None
        self._runner = None
        self.last_prepare: dict = {}

    @property
    def golden_tolerance(self):
        return GOLDEN_TOLERANCES["gpu_tf32" if self.settings.tf32 else "gpu_fp32"]

    @property
    def golden_batch(self) -> int:
        return self.settings.batch_opt

    def spare(self, policy) -> TensorRTBackend:
        """An unprepared backend sharing this one's manager (TensorRT runtime, cache, settings)."""
        return TensorRTBackend(policy, settings=self.settings, manager=self.manager, runner_factory=self.runner_factory)

    def prepare(self, version: int, files: dict[str, bytes] | None = None) -> None:
        from pirl.export.onnx_export import load_manifest, verify_artifacts

        started = time.perf_counter()
        root, manifest = load_manifest(self.exports.materialise(self.policy, version, files))
        verify_artifacts(root, manifest)  # hashes before anything is parsed or deserialised
        previous = self._prepared
        try:
            prepared = self.manager.prepare(root, manifest, current=previous)
        except Exception:
            if previous is not None and not previous.valid:  # a failed refit left it half-updated
                self._prepared, self._runner = None, None
            raise
        if previous is not None and prepared.engine is previous.engine and self._runner is not None:
            self._runner.reset_graph()  # refitted in place: the old graph is not reused
        else:
            self._runner = None  # release the old context before creating the new one
            self._runner = self.runner_factory(self.manager.trt, prepared.engine, self.settings)
        self._prepared, self.manifest = prepared, manifest
        self._warm_up()  # first enqueue, then the CUDA graph capture when the batch is fixed
        self.exports.prune(keep=root)
        self.last_prepare = {**prepared.info(), "total_seconds": round(time.perf_counter() - started, 4)}

    def _warm_up(self) -> None:
        from edge.backends import golden_inputs

        obs, initial, step, stochastic, level = golden_inputs(self.policy, self.golden_batch, seed=0)
        self.sample(obs, initial, step, stochastic, level)

    def sample(self, obs, initial, step, stochastic, noise_level) -> Sampled:
        from pirl.export.onnx_export import make_feeds

        feeds = make_feeds(
            self.manifest,
            {k: v.cpu().numpy() for k, v in obs.items()},
            initial.cpu().numpy(),
            step.cpu().numpy(),
            stochastic.cpu().numpy(),
            noise_level.cpu().numpy(),
        )
        out = self._runner.run(feeds)
        t = {k: torch.from_numpy(v) for k, v in out.items()}
        return Sampled(t["actions"], t["chain"], stochastic, t["log_prob"], t["value"], noise_level)
