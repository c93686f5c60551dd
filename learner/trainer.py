"""The learner's update loop: wait for a full batch -> PI-RL update -> new version -> checkpoint ->
publish -> (optionally) evaluate. Runs in its own thread beside the gRPC server."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from learner import metrics
from learner.service import Publisher
from learner.store import RolloutStore, episodes_to_batch
from learner.wal import read_entries, write_entries
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, load_checkpoint, save_checkpoint
from pirl.v1 import pirl_pb2

log = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    episodes_per_update: int = 64
    max_updates: int = 0  # 0: run until stopped
    eval_every: int = 5  # updates; 0: never
    eval_episodes: int = 200
    target_success: float | None = None  # stop updating once deterministic eval reaches it
    keep_checkpoints: int = 3
    export_onnx: bool = True  # publish the ONNX export of every version (edges on ONNX Runtime load it)


def policy_update_message(policy, version: int, export_dir: Path | None = None) -> pirl_pb2.PolicyUpdate:
    """The weights as a safetensors blob, the ONNX export of the sampler when ``export_dir`` is given
    (written to ``export_dir/v<version>``, the learner's versioned artifact store), and a manifest
    with the sha256 of every file."""
    blob = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()})
    files: dict[str, bytes] = {}
    if export_dir is not None:
        from lerobot_policy_pi_rl.export import export_onnx

        out = Path(export_dir) / f"v{version:06d}"
        export_onnx(policy, out, version=version)
        # every exported file (the ONNX graph embeds the weights: they are already 'weights' too, a
        # duplicate that is cheap for the small backbone; large VLAs will want a refit-only path)
        files = {f"onnx/{p.name}": p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    manifest = pirl_pb2.Manifest(policy_version=version, artifacts=[
        pirl_pb2.Artifact(name=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        for name, data in {"model.safetensors": blob, **files}.items()
    ])
    return pirl_pb2.PolicyUpdate(version=version, weights=blob, manifest=manifest, files=files,
                                 published_unix_s=time.time())


class Trainer:
    def __init__(self, algorithm: PiRLAlgorithm, store: RolloutStore, publisher: Publisher, output_dir: Path,
                 settings: TrainerSettings, preprocessor=None, postprocessor=None, evaluator=None):
        self.algo, self.store, self.publisher = algorithm, store, publisher
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.pre, self.post = preprocessor, postprocessor
        self.evaluator = evaluator  # callable(policy) -> success in [0, 1], or None
        self.version = 0
        self.history: list[dict] = []
        self.eval_curve: list[tuple[int, int, float]] = []  # (version, env_steps, success)
        self.env_steps = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save(self) -> None:
        """checkpoints/<version>/ written atomically, then ``last`` re-pointed atomically."""
        ckpt = self.checkpoints_dir / f"{self.version:06d}"
        store_state, pending = self.store.checkpoint_snapshot(self.version)
        save_checkpoint(ckpt, self.algo, self.pre, self.post)
        write_entries(ckpt / "pending_records.log", pending)  # accepted, not yet used by an update
        state = {"version": self.version, "env_steps": self.env_steps, "store": store_state,
                 "eval_curve": self.eval_curve}
        tmp = ckpt / "learner_state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(ckpt / "learner_state.json")
        link_tmp = self.checkpoints_dir / "last.tmp"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        link_tmp.symlink_to(ckpt.name)
        os.replace(link_tmp, self.checkpoints_dir / "last")
        if self.store.wal is not None:  # records before this checkpoint are in it now
            self.store.wal.drop_before(self.version)
        old = sorted(p for p in self.checkpoints_dir.iterdir() if p.name.isdigit())[: -self.settings.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)

    def resume(self) -> bool:
        last = self.checkpoints_dir / "last"
        if not (last / "learner_state.json").is_file():
            return False
        load_checkpoint(last, self.algo)
        state = json.loads((last / "learner_state.json").read_text())
        self.version = int(state["version"])
        self.env_steps = int(state.get("env_steps", 0))
        self.eval_curve = [tuple(x) for x in state.get("eval_curve", [])]
        self.store.load_state(state["store"])
        self.store.set_version(self.version)
        restored = sum(self.store.restore(r, raw, pending=True) for r, raw in read_entries(last / "pending_records.log"))
        replayed = 0
        if self.store.wal is not None:
            replayed = sum(self.store.restore(r, raw, pending=False) for r, raw in self.store.wal.replay(self.version))
            self.store.wal.start_segment(max(self.version, *self.store.wal.segments()))
        log.info("restored %d pending records from the checkpoint and %d from the write-ahead log", restored, replayed)
        log.info("resumed from %s at policy version %d", last.resolve(), self.version)
        return True

    # --- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        metrics.LEARNER_VERSION.set(self.version)
        self.publisher.publish(self._message())
        if not (self.checkpoints_dir / "last").exists():
            self.save()
        if self.evaluator is not None and not self.eval_curve and self.settings.eval_every:
            self._evaluate()
        self._thread = threading.Thread(target=self._run, name="pirl-trainer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self._write_status()

    def _run(self) -> None:
        s = self.settings
        try:
            while not self._stop.is_set():
                if s.max_updates and self.algo.num_updates >= s.max_updates:
                    break
                metrics.LEARNER_EPISODES_PENDING.set(self.store.pending_episodes())
                if not self.store.wait_for_episodes(s.episodes_per_update, timeout=0.5):
                    continue
                episodes = self.store.take_episodes(s.episodes_per_update)
                if len(episodes) < s.episodes_per_update:
                    continue  # some were stale; wait for fresh ones
                self._update(episodes)
                if self._reached_target():
                    log.info("deterministic success reached the target %.2f: updates stop", s.target_success)
                    break
        except Exception:
            log.exception("the update loop failed")
            raise
        finally:
            self.done.set()
            self._write_status()

    def _message(self) -> pirl_pb2.PolicyUpdate:
        artifacts = self.output_dir / "artifacts" if self.settings.export_onnx else None
        msg = policy_update_message(self.algo.policy, self.version, artifacts)
        if artifacts is not None:  # keep the artifact store bounded like the checkpoints
            for old in sorted(p for p in artifacts.iterdir() if p.name.startswith("v"))[: -self.settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return msg

    def _reached_target(self) -> bool:
        t = self.settings.target_success
        return t is not None and bool(self.eval_curve) and self.eval_curve[-1][2] >= t

    def _update(self, episodes) -> None:
        start = time.monotonic()
        batch = episodes_to_batch(episodes, self.algo.policy)
        level = self.algo.policy.config.noise_level_at(self.algo.num_updates)
        stats = self.algo.update_on(batch)
        metrics.LEARNER_UPDATE_SECONDS.observe(time.monotonic() - start)
        if stats.extra.get("skipped"):
            log.warning("update skipped (%s); version stays %d", stats.extra, self.version)
            return
        self.env_steps += batch.env_steps
        publish_start = time.monotonic()
        self.version += 1
        self.store.set_version(self.version)
        self.save()
        self.publisher.publish(self._message())
        metrics.LEARNER_PUBLISH_SECONDS.observe(time.monotonic() - publish_start)
        metrics.LEARNER_VERSION.set(self.version)
        d = stats.to_log_dict()
        for gauge, key in ((metrics.PPO_APPROX_KL, "approx_kl"), (metrics.PPO_CLIP_FRACTION, "clip_fraction"),
                           (metrics.PPO_ENTROPY, "entropy"), (metrics.PPO_VALUE_LOSS, "value_loss"),
                           (metrics.PPO_EXPLAINED_VARIANCE, "explained_variance"),
                           (metrics.PPO_POLICY_LOSS, "policy_loss")):
            if key in d and d[key] == d[key]:
                gauge.set(d[key])
        metrics.ROLLOUT_SUCCESS.set(batch.success_rate)
        metrics.EPISODE_RETURN.set(float(batch.episode_returns.mean()))
        row = {"version": self.version, "env_steps": self.env_steps, "episodes": len(episodes),
               "rollout_success": batch.success_rate, "noise_level": level, **d}
        self.history.append(row)
        log.info("version %d: rollout success %.3f, approx_kl %.4f, clip %.3f (%.2fs)", self.version,
                 batch.success_rate, d.get("approx_kl", float("nan")), d.get("clip_fraction", float("nan")),
                 time.monotonic() - start)
        if self.evaluator is not None and self.settings.eval_every and self.version % self.settings.eval_every == 0:
            self._evaluate()
        self._write_status()

    def _evaluate(self) -> None:
        success = float(self.evaluator(self.algo.policy))
        self.eval_curve.append((self.version, self.env_steps, success))
        metrics.EVAL_SUCCESS.set(success)
        log.info("version %d: deterministic success %.3f", self.version, success)
        self._write_status()

    def _write_status(self) -> None:
        store_state = self.store.state()
        status = {"version": self.version, "env_steps": self.env_steps, "eval_curve": self.eval_curve,
                  "counts": store_state["counts"], "acked": store_state["acked"], "updates": self.algo.num_updates, "history_tail": self.history[-3:],
                  "done": self.done.is_set()}
        tmp = self.output_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.output_dir / "status.json")


def make_evaluator(preprocessor, postprocessor, episodes: int, seed: int = 1_000_000, policy_config=None):
    """Deterministic success on the built-in task (observed the way ``policy_config`` reads it),
    for the learner's own progress figure."""
    from lerobot_policy_pi_rl.envs import ReachGraspVecEnv, builtin_obs_kwargs
    from lerobot_policy_pi_rl.rollout import PolicyRunner, evaluate_success

    obs = builtin_obs_kwargs(policy_config) if policy_config is not None else {}
    env = ReachGraspVecEnv(min(episodes, 500), autoreset=False, **obs)

    def evaluate(policy) -> float:
        with torch.no_grad():
            return evaluate_success(PolicyRunner(policy, preprocessor, postprocessor), env, episodes=episodes, seed=seed)

    return evaluate
