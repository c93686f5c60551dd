"""Inference off the control thread, and atomic policy swaps at chunk boundaries.

The worker owns two copies of the policy: the active one and a spare. A new version's weights are
hash-checked and loaded into the spare by the subscriber thread; the worker swaps the two before
its next job (one job = one chunk = a chunk boundary), so the control loop never runs a
half-loaded policy and never waits for a load.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from edge import metrics
from edge.backends import OnnxRuntimeBackend, TorchBackend, make_backend
from edge.records import Decision
from lerobot_policy_pi_rl.rollout import PolicyRunner

log = logging.getLogger(__name__)


class InferenceWorker:
    def __init__(self, policy, preprocessor, postprocessor, *, robot_id: str, version: int = 0,
                 backend: str = "torch", seed: int = 0, task: str | None = None):
        self.robot_id = robot_id
        # task: the language instruction tokenized with every observation (VLA backbones)
        self._active = PolicyRunner(policy, preprocessor, postprocessor, task=task)
        self._spare = PolicyRunner(copy.deepcopy(policy), preprocessor, postprocessor, task=task)
        self._active_backend = make_backend(backend, self._active.policy, version)
        self.backend = self._active_backend.name  # what actually runs (after any fallback)
        self._spare_backend = (
            OnnxRuntimeBackend(self._spare.policy) if self.backend == "onnxruntime" else TorchBackend(self._spare.policy)
        )
        self.version = version
        self._pending: int | None = None  # version loaded into the spare, waiting for a boundary
        self._swap_lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._generator = torch.Generator().manual_seed(seed)
        self._thread = threading.Thread(target=self._run, name="pirl-inference", daemon=True)
        self._stop = threading.Event()
        self.swap_times: dict[int, float] = {}  # version -> time.time() it started serving
        metrics.POLICY_VERSION.labels(robot_id).set(version)
        metrics.BACKEND.labels(robot_id, self.backend).set(1)
        metrics.BACKEND_REQUESTED.labels(robot_id, backend).set(1)
        fallbacks = metrics.BACKEND_FALLBACKS.labels(robot_id, backend)  # exported at 0 from the start
        if backend != "auto" and backend != self.backend:
            fallbacks.inc()

    @property
    def policy(self):
        return self._active.policy

    @property
    def active_runner(self) -> PolicyRunner:
        return self._active

    def observe(self, raw_obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Normalised policy inputs for ``raw_obs`` (the processors are fixed across versions)."""
        with torch.no_grad():
            return self._active.observe(raw_obs)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        self._thread.join(timeout=5)

    # --- weights ----------------------------------------------------------------------------------

    def offer(self, version: int, state_dict: dict[str, torch.Tensor], files: dict[str, bytes] | None = None) -> bool:
        """Load ``state_dict`` into the spare (caller's thread); it serves from the next chunk on.

        Returns False (and counts a swap failure) when the weights do not fit the policy; the
        active policy keeps serving either way.
        """
        # Hold the lock only to claim the spare: loading and preparing (an ONNX Runtime session can
        # take 100 ms) happen outside it, so the worker's swap check at a chunk boundary never waits.
        with self._swap_lock:
            if version <= max(self.version, self._pending or -1):
                return False
            self._pending = None  # a loaded-but-unswapped older version is replaced by this one
        try:
            self._spare.policy.load_state_dict(state_dict, strict=True)
            self._spare_backend.prepare(version, files)  # e.g. a new ONNX Runtime session
        except Exception as e:  # noqa: BLE001  a version that cannot be served is refused, not fatal
            metrics.SWAP_FAILURES.labels(self.robot_id).inc()
            log.error("policy version %d refused: %s", version, e)
            return False
        with self._swap_lock:
            self._pending = version
        return True

    def swap_if_pending(self) -> None:
        """At a chunk boundary: make the spare active if a new version is loaded."""
        with self._swap_lock:
            if self._pending is None:
                return
            self._active, self._spare = self._spare, self._active
            self._active_backend, self._spare_backend = self._spare_backend, self._active_backend
            self.version, self._pending = self._pending, None
        self.swap_times[self.version] = time.time()
        metrics.POLICY_VERSION.labels(self.robot_id).set(self.version)
        metrics.SWAPS.labels(self.robot_id).inc()
        log.info("now serving policy version %d", self.version)

    # --- decisions --------------------------------------------------------------------------------

    def decide(self, raw_obs: dict[str, np.ndarray], n_action_steps: int | None = None) -> list[Decision]:
        """Sample one chunk per row of ``raw_obs`` with the active policy (any thread)."""
        self.swap_if_pending()
        runner, backend = self._active, self._active_backend
        n_exec = n_action_steps or runner.policy.config.n_action_steps
        start = time.perf_counter()
        with torch.no_grad():
            obs = runner.observe(raw_obs)
            batch = next(iter(obs.values())).shape[0]
            noise = runner.policy.draw_noise(batch, generator=self._generator)
            # the learner's version counts its updates: follow its noise-level anneal
            level = torch.full((batch,), float(runner.policy.config.noise_level_at(self.version)))
            sample = backend.sample(obs, *noise, level)
            actions = runner.to_env_actions(sample.actions)
        metrics.INFERENCE_LATENCY.labels(self.robot_id, self.backend).observe(time.perf_counter() - start)
        return [Decision.from_sample(self.version, obs, sample, actions, i, n_exec) for i in range(batch)]

    def submit(self, raw_obs: dict[str, np.ndarray], done: Callable[[Decision | None], None],
               after: Callable[[], None] | None = None) -> None:
        """Queue one decision for a single env. On the worker thread: sample, call ``done`` with the
        result (None if inference failed), then run ``after`` (e.g. persist the finished step: the
        disk write stays off the path to the next action)."""
        self._jobs.put((raw_obs, done, after))

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                return
            raw_obs, done, after = job
            try:
                done(self.decide(raw_obs)[0])
            except Exception:
                log.exception("inference failed")
                done(None)
            if after is not None:
                try:
                    after()
                except Exception:
                    log.exception("persisting a rollout record failed")
