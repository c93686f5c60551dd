"""Inference off the control thread, and atomic policy swaps at chunk boundaries.

The worker owns two copies of the policy: the active one and a spare. A new version's weights are
hash-checked and loaded into the spare by the subscriber thread, the spare backend is prepared for
it (a new ONNX Runtime session, a TensorRT refit / build / cached engine) and must pass the
golden-input check against the spare PyTorch policy; the worker swaps the two before its next job
(one job = one chunk = a chunk boundary), so the control loop never runs a half-loaded policy and
never waits for a load.
"""

from __future__ import annotations

import collections
import copy
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from edge import metrics
from edge.backend_choice import choose_backend
from edge.backends import check_golden
from edge.records import Decision
from lerobot_policy_pi_rl.rollout import PolicyRunner

log = logging.getLogger(__name__)


class InferenceWorker:
    def __init__(
        self,
        policy,
        preprocessor,
        postprocessor,
        *,
        robot_id: str,
        version: int = 0,
        backend: str = "torch",
        seed: int = 0,
        task: str | None = None,
        env_processor=None,
        tensorrt_settings=None,
        golden_check: bool = True,
    ):
        """``backend``: one of edge.backend_choice.BACKENDS (with fallback, see ``choose_backend``);
        ``task``: the language instruction tokenized with every observation (VLA backbones);
        ``env_processor``: a LeRobot env type's observation processor (``PolicyRunner``);
        ``tensorrt_settings``: pirl.export.trt_engine.TensorRTSettings for the TensorRT
        backend; ``golden_check``: compare every newly prepared backend with the PyTorch policy on a
        fixed input before it may serve (refusing the version on a mismatch)."""
        self.robot_id = robot_id
        self.golden_check = golden_check
        self._active = PolicyRunner(policy, preprocessor, postprocessor, task=task, env_processor=env_processor)
        self._spare = PolicyRunner(
            _spare_copy(policy), preprocessor, postprocessor, task=task, env_processor=env_processor
        )
        self._active_backend, self.fallbacks = choose_backend(
            backend, self._active.policy, version, tensorrt_settings=tensorrt_settings, golden_check=golden_check
        )
        self.backend = self._active_backend.name  # what actually runs (after any fallback)
        self._spare_backend = self._active_backend.spare(self._spare.policy)
        # the last offered versions: how each was prepared (method, seconds, golden errors) or why refused
        self.prepare_log: collections.deque[dict] = collections.deque(maxlen=256)
        self.refused = 0  # offered versions refused here (weights, backend prepare, golden-input check)
        self.version = version
        # a trained-only update replaces these tensors; everything else must match the learner's
        self.rl_state_names = set(policy.rl_state_names())
        self.frozen_sha256 = policy.frozen_sha256()
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
        # exported at 0 from the start: the requested backend, and what auto may count as failed
        for name in {backend, *(("tensorrt", "onnxruntime") if backend == "auto" else ())}:
            metrics.BACKEND_FALLBACKS.labels(robot_id, name)
        for f in self.fallbacks:
            if f.counted:
                metrics.BACKEND_FALLBACKS.labels(robot_id, f.backend).inc()

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

    def offer(
        self,
        version: int,
        state_dict: dict[str, torch.Tensor],
        files: dict[str, bytes] | None = None,
        frozen_sha256: str | None = None,
    ) -> bool:
        """Load ``state_dict`` into the spare and prepare the spare backend for it (caller's thread);
        it serves from the next chunk on.

        ``frozen_sha256`` given: ``state_dict`` holds exactly the tensors PI-RL trains (a trained-only
        update) and the rest of this robot's policy must hash to it. Otherwise it is a full state dict.
        Returns False (and counts a swap failure) when the weights do not fit the policy, the
        backend cannot be prepared, or the prepared backend fails the golden-input check; the active
        policy keeps serving either way.
        """
        # Hold the lock only to claim the spare: loading and preparing (an ONNX Runtime session can
        # take 100 ms) happen outside it, so the worker's swap check at a chunk boundary never waits.
        with self._swap_lock:
            if version <= max(self.version, self._pending or -1):
                return False
            self._pending = None  # a loaded-but-unswapped older version is replaced by this one
        backend = self._spare_backend
        entry = {"version": version, "backend": backend.name}
        started = time.perf_counter()
        try:
            if frozen_sha256 is not None:
                _check_trained_only(state_dict, self.rl_state_names, frozen_sha256, self.frozen_sha256)
            else:  # a full state dict: frozen tensors it changes must stop being shared with the active copy
                _own_changed_frozen(self._spare.policy, state_dict, self.rl_state_names)
            self._spare.policy.load_state_dict(state_dict, strict=frozen_sha256 is None)
            backend.prepare(version, files)  # e.g. a new ONNX Runtime session, a TensorRT refit
            entry["prepare_seconds"] = round(time.perf_counter() - started, 4)
            entry.update(backend.last_prepare)
            if self.golden_check:
                entry["golden_max_abs_err"] = check_golden(backend, self._spare.policy)
        except Exception as e:  # noqa: BLE001  a version that cannot be served is refused, not fatal
            metrics.SWAP_FAILURES.labels(self.robot_id).inc()
            self.refused += 1
            entry["refused"] = f"{type(e).__name__}: {e}"
            self.prepare_log.append(entry)
            log.error("policy version %d refused: %s", version, e)
            return False
        metrics.record_prepare(self.robot_id, backend.name, entry)
        self.prepare_log.append(entry)
        log.info("policy version %d prepared: %s", version, entry)
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

    def submit(
        self,
        raw_obs: dict[str, np.ndarray],
        done: Callable[[Decision | None], None],
        after: Callable[[], None] | None = None,
    ) -> None:
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


def _spare_copy(policy):
    """The spare copy of ``policy``: its own copies of the tensors PI-RL trains, the frozen ones (a VLA's
    VLM) shared with ``policy``, so a hot swap costs one extra copy of the trained set, not of the whole
    model. Nothing writes the shared tensors: a trained-only version loads the trained ones alone, and a
    full state dict that changes a frozen tensor gets a private copy of it first (_own_changed_frozen)."""
    trained = set(policy.rl_state_names())
    named = [*policy.named_parameters(), *policy.named_buffers()]
    memo = {id(t): t for name, t in named if name not in trained}  # deepcopy keeps these as they are
    return copy.deepcopy(policy, memo)


def _own_changed_frozen(policy, state: dict, trained: set[str]) -> None:
    """Give ``policy`` a private copy of every frozen tensor ``state`` changes (it may be shared with the
    active copy, which must not change under the control loop); unchanged ones stay shared."""
    for name, value in state.items():
        if name in trained or not isinstance(value, torch.Tensor):
            continue
        module_name, _, leaf = name.rpartition(".")
        try:
            module = policy.get_submodule(module_name)
        except AttributeError:
            continue  # not one of the policy's tensors: load_state_dict refuses the dict
        current = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
        if current is None or (current.shape == value.shape and torch.equal(current, value.to(current.dtype))):
            continue
        private = current.detach().clone()
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(private, requires_grad=current.requires_grad)
        else:
            module._buffers[leaf] = private


def _check_trained_only(state: dict, expected: set[str], frozen_sha256: str, own_frozen_sha256: str) -> None:
    """A trained-only update fits only a robot with the same frozen weights and trained-tensor set."""
    if frozen_sha256 != own_frozen_sha256:
        raise ValueError(
            f"the update's frozen weights (sha256 {frozen_sha256[:12]}) are not this robot's "
            f"({own_frozen_sha256[:12]}): a different base model or SFT checkpoint"
        )
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(
            f"the update does not hold exactly the trained tensors (missing {missing}, unexpected "
            f"{extra}): learner and robot disagree on what PI-RL trains (noise method?)"
        )
