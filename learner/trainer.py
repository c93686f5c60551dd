"""The learner's update loop: wait for a full batch -> PI-RL update -> new version -> checkpoint ->
publish -> (optionally) evaluate. Runs in its own thread beside the gRPC server."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from learner import checkpoints, metrics
from learner.bc_data import BUFFER_FILE
from learner.service import Publisher
from learner.store import RolloutStore, episodes_to_batch
from learner.wal import read_entries, write_entries
from lerobot_policy_pi_rl.algorithm import PiRLAlgorithm, load_checkpoint, save_checkpoint
from pirl.cli import require
from pirl.v1 import pirl_pb2

log = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    """The update loop: the ``trainer`` group of ``pirl-learner`` (``--trainer.<field>=...``)."""

    # complete episodes per PI-RL update (one batch)
    episodes_per_update: int = 64
    # stop updating after this many updates (0: run until stopped)
    max_updates: int = 0
    # deterministic evaluation every this many versions (0: off)
    eval_every: int = 5
    # the simulated env the evaluation runs on: the built-in task 'pirl_reach', a vector env another installed
    # plugin registers (e.g. 'pirl_sim', the simulated robot's task from lerobot_robot_pirl_sim), or a gymnasium
    # id. None: the built-in task when the policy fits it, else no evaluation (with a warning at start). An env
    # that does not fit the policy (its observations or actions) is refused at start, with the reason
    eval_env: str | None = None
    # keyword arguments of trainer.eval_env (gymnasium.make's for a gymnasium id, e.g. '{env_name: reach-v3}'; a
    # registered env's or the built-in task's constructor arguments); --env.type takes its own as --env.<field>
    eval_env_kwargs: dict = field(default_factory=dict)
    # run the evaluation envs of a gymnasium id or --env.type in subprocesses (gymnasium's AsyncVectorEnv)
    eval_async_envs: bool = False
    # the info key the evaluation env (--env.type or a gymnasium id) reports success under: LeRobot's 'is_success';
    # MetaWorld's gymnasium envs say 'success'
    eval_success_key: str = "is_success"
    # episodes per deterministic evaluation
    eval_episodes: int = 200
    # stop updating once the deterministic evaluation reaches this success rate (None: never)
    target_success: float | None = None
    # checkpoints (and exported versions) kept; the write-ahead log is kept from the oldest one on
    keep_checkpoints: int = 3
    # publish the ONNX export of every version (edges on ONNX Runtime load it); off: weights only, and
    # edges on ONNX Runtime export each version themselves
    export_onnx: bool = True
    # also build a TensorRT engine of every version and publish it with the export (needs export_onnx,
    # tensorrt with its builder and a GPU here; edges use it only when their TensorRT version, GPU and
    # tensorrt settings match: give the learner the same --tensorrt.* values as the edges)
    export_tensorrt: bool = False
    # refuse (FAILED_PRECONDITION, reason no_outcome) an episode's last record that carries no outcome label
    # (pirl.v1.EpisodeLabel: an operator's verdict, a success detector's, or the time limit): on a real robot an
    # episode nobody judged has no trustworthy success or reward. Edges then need an outcome source (operator
    # labels or a success detector); off: the records' own reward and success are taken as they are
    require_outcome: bool = False

    def __post_init__(self):
        one, zero = ("episodes_per_update", "eval_episodes", "keep_checkpoints"), ("max_updates", "eval_every")
        require(self, "trainer", at_least={**dict.fromkeys(one, 1), **dict.fromkeys(zero, 0)})
        if self.target_success is not None and not 0 < self.target_success <= 1:
            raise ValueError(f"trainer.target_success: must be in (0, 1] (got {self.target_success})")
        if self.export_tensorrt and not self.export_onnx:
            raise ValueError(
                "trainer.export_tensorrt: the engine is built from the ONNX export: keep trainer.export_onnx on"
            )


def policy_update_message(
    policy, version: int, export_dir: Path | None = None, frozen_sha256: str | None = None, engines=None
) -> pirl_pb2.PolicyUpdate:
    """The tensors PI-RL trains as a safetensors blob (``trained_only``: a VLA's frozen VLM never
    travels; robots check their copy against ``frozen_sha256``, computed here when not given), the
    ONNX export of the sampler when ``export_dir`` is given (written to ``export_dir/v<version>``,
    the learner's versioned artifact store), a TensorRT engine of it when ``engines`` (a
    ``trt_engine.EnginePublisher``) is given (``engine.plan``, listed with its key fields in the
    export's manifest), and a manifest with the sha256 of every file.

    Everything inline in one message: for in-process use and tests. The learner publishes through
    ``learner.versions.VersionStore`` (on disk, announced, fetched by robots in chunks)."""
    blob = safetensors_bytes(policy.rl_state_dict())
    files: dict[str, bytes] = {}
    if export_dir is not None:
        from pirl.export.onnx_export import export_onnx

        out = Path(export_dir) / f"v{version:06d}"
        manifest = export_onnx(policy, out, version=version)
        if engines is not None:
            from learner.versions import publish_engine

            publish_engine(engines, out, manifest, version)
        # every exported file (the ONNX graph embeds the weights: they are already 'weights' too, a
        # duplicate that is cheap for the small backbone; large VLAs will want a refit-only path)
        files = {f"onnx/{p.name}": p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    manifest = pirl_pb2.Manifest(
        policy_version=version,
        artifacts=[
            pirl_pb2.Artifact(name=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
            for name, data in {"model.safetensors": blob, **files}.items()
        ],
    )
    return pirl_pb2.PolicyUpdate(
        version=version,
        weights=blob,
        manifest=manifest,
        files=files,
        published_unix_s=time.time(),
        trained_only=True,
        frozen_sha256=frozen_sha256 or policy.frozen_sha256(),
    )


class Trainer:
    def __init__(
        self,
        algorithm: PiRLAlgorithm,
        store: RolloutStore,
        publisher: Publisher,
        output_dir: Path,
        settings: TrainerSettings,
        preprocessor=None,
        postprocessor=None,
        evaluator=None,
        tensorrt=None,  # pirl.export.trt_engine.TensorRTSettings of the engines (settings.export_tensorrt)
        bc_data=None,  # learner.bc_data.BCData: interventions of every batch join its buffer (algorithm.bc_coef > 0)
        group=None,  # learner.distributed.Group under torchrun (this is rank 0): every batch goes to every rank
    ):
        self.algo, self.store, self.publisher = algorithm, store, publisher
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.pre, self.post = preprocessor, postprocessor
        self.evaluator = evaluator  # callable(policy) -> success in [0, 1], or None
        self.bc_data = bc_data
        self.group = group
        c = algorithm.config
        self.normalize_actions = None  # the chunk critic learns from takeovers: their actions, normalised
        if c.chunk_critic and c.q_interventions and preprocessor is not None:
            from learner.bc_data import action_normalizer

            self.normalize_actions = action_normalizer(preprocessor)
        self.version = 0
        self.frozen_sha256 = algorithm.policy.frozen_sha256()  # what RL never changes: hashed once
        self.engines = None
        if settings.export_tensorrt:
            from pirl.export.trt_engine import EngineManager, EnginePublisher, TensorRTSettings

            # TensorRTUnavailableError where it cannot build
            self.engines = EnginePublisher(EngineManager(tensorrt or TensorRTSettings()))
        self.history: list[dict] = []
        self.eval_curve: list[tuple[int, int, float]] = []  # (version, env_steps, success)
        self.env_steps = 0
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._restored: int | None = None  # version of the checkpoint resume() restored
        self._published: int | None = None  # highest version ever published (checkpoints.HIGH_WATER)
        for reason in metrics.CHECKPOINT_REFUSE_REASONS:  # exported at 0 from the start
            metrics.LEARNER_CHECKPOINTS_REFUSED.labels(reason=reason)

    # --- checkpoints ------------------------------------------------------------------------------

    @property
    def _fsdp2(self) -> bool:
        return self.group is not None and getattr(self.algo.shard, "inference", None) is not None

    @property
    def policy(self):
        """The policy used outside updates (batches' value bootstrap, publishing, evaluation): the algorithm's,
        or under fsdp2 rank 0's plain inference copy, refreshed after every update (learner/distributed.py)."""
        inference = getattr(self.algo.shard, "inference", None)
        return self.algo.policy if inference is None else inference

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def save(self) -> None:
        """checkpoints/<version>/, atomic as a whole: everything (the algorithm's checkpoint, the
        records not yet used, the learner state) is written into ``<version>.partial/``, then the
        manifest of their hashes, then the folder is renamed into place and ``last`` re-pointed. A
        crash leaves the whole checkpoint or a partial folder, removed at the next start."""
        name = f"{self.version:06d}"
        partial = self.checkpoints_dir / f"{name}{checkpoints.PARTIAL}"
        shutil.rmtree(partial, ignore_errors=True)
        store_state, pending = self.store.checkpoint_snapshot(self.version)
        if self._fsdp2:  # every rank gathers its shards of the optimizer states; rank 0 writes them whole
            from learner.distributed import SAVE

            self.group.command(SAVE)
            save_checkpoint(partial, self.algo.shard.consolidated(self.algo), self.pre, self.post)
            self.algo.shard.release()
        else:
            save_checkpoint(partial, self.algo, self.pre, self.post)
        write_entries(partial / "pending_records.log", pending)  # accepted, not yet used by an update
        if self.bc_data is not None:  # people's corrections survive a restart
            self.bc_data.save(partial / BUFFER_FILE)
        state = {
            "version": self.version,
            "env_steps": self.env_steps,
            "store": store_state,
            "eval_curve": self.eval_curve,
        }
        (partial / "learner_state.json").write_text(json.dumps(state))
        checkpoints.write_manifest(partial)  # last: it vouches for everything above
        checkpoints.commit(partial, self.checkpoints_dir / name)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest ``keep_checkpoints``; keep the write-ahead log from the OLDEST kept one on,
        so that a resume that has to fall back to it (newer ones refused) still replays every record
        accepted after it (edges deleted those records once acked)."""
        kept = checkpoints.numbered(self.checkpoints_dir)
        for p in kept[self.settings.keep_checkpoints :]:
            shutil.rmtree(p, ignore_errors=True)
        kept = kept[: self.settings.keep_checkpoints]
        if self.store.wal is not None and kept:
            self.store.wal.drop_before(int(kept[-1].name))

    def resume(self, picker: checkpoints.CheckpointPicker | None = None) -> bool:
        """Restore the newest intact checkpoint and replay the write-ahead log since it; False when
        there is no checkpoint. A checkpoint that does not match its manifest or does not load is
        refused (one log line, counted) and the previous one is tried; NoIntactCheckpointError (a
        ValueError) when none is left. ``picker``: the one ``pirl-learner`` loaded the policy with."""
        picker = picker or checkpoints.CheckpointPicker(self.checkpoints_dir)
        if not picker.total:
            return False
        state, pending, bc_samples = picker.load(self._read_checkpoint)
        ckpt = picker.current()
        self.version = int(state["version"])
        self.env_steps = int(state.get("env_steps", 0))
        self.eval_curve = [tuple(x) for x in state.get("eval_curve", [])]
        self.store.load_state(state["store"])
        self.store.set_version(self.version)
        restored = sum(self.store.restore(r, raw, pending=True) for r, raw in pending)
        replayed = 0
        if self.store.wal is not None:
            replayed = sum(self.store.restore(r, raw, pending=False) for r, raw in self.store.wal.replay(self.version))
            self.store.wal.start_segment(max(self.version, *self.store.wal.segments()))
        if bc_samples is not None:
            self.bc_data.restore(bc_samples)
            log.info("restored %d BC samples (interventions, successes) from the checkpoint", len(bc_samples))
        self._restored = self.version
        picker.set_refused_aside()
        log.info("restored %d pending records from the checkpoint and %d from the write-ahead log", restored, replayed)
        log.info("resumed from %s at policy version %d", ckpt.resolve(), self.version)
        return True

    def _read_checkpoint(self, ckpt: Path) -> tuple[dict, list[tuple[str, bytes]], list | None]:
        """Everything that can fail to load, before the store is touched: (learner state, pending
        records, BC buffer samples or None), with the weights, optimizer states and RNG loaded in place."""
        state = json.loads((ckpt / "learner_state.json").read_text())
        if int(state["version"]) != int(ckpt.name):  # the folder's name is the version it is published as
            raise ValueError(f"learner_state.json holds version {state['version']}")
        if not isinstance(state["store"], dict):
            raise ValueError("learner_state.json holds no store state")
        pending = read_entries(ckpt / "pending_records.log")
        bc_samples = None
        if self.bc_data is not None and (ckpt / BUFFER_FILE).is_file():
            bc_samples = self.bc_data.read(ckpt / BUFFER_FILE)
        load_checkpoint(ckpt, self.algo)
        return state, pending, bc_samples

    def _settle_version(self) -> bool:
        """Make sure no version number is published with other weights than robots got under it.
        True when the current weights need a checkpoint under a (new) number before publishing.

        The restored checkpoint's number is reused only if no higher one was ever published; else
        (an older checkpoint restored after refusing newer ones, or no checkpoint left) the weights
        are published under high-water + 1."""
        high = checkpoints.read_high_water(self.output_dir)
        self._published = high
        if high is None or (self._restored is not None and high <= self._restored):
            return self._restored is None  # a fresh start still needs its first checkpoint
        new = high + 1
        if self._restored is not None:
            log.warning(
                "versions up to %d were already published, not all with the weights of checkpoint %06d: the "
                "weights of checkpoint %06d are republished as version %d",
                high,
                self._restored,
                self._restored,
                new,
            )
        else:
            log.warning(
                "versions up to %d were published from %s before: this policy is published as version %d",
                high,
                self.output_dir,
                new,
            )
        self.version = new
        self.store.set_version(new)
        return True

    def _publish(self) -> None:
        """The current version to every robot, after recording it as published (durably)."""
        msg = self._message()
        if self._published is None or self.version > self._published:
            checkpoints.write_high_water(self.output_dir, self.version)
            self._published = self.version
        self.publisher.publish(msg)

    # --- the loop ---------------------------------------------------------------------------------

    def start(self) -> None:
        checkpoints.remove_partials(self.checkpoints_dir)
        if self._settle_version():
            self.save()  # before publishing: a restart finds these weights under this number
        metrics.LEARNER_VERSION.set(self.version)
        self._publish()
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
                    if self.group is not None:  # the other ranks wait in a collective: keep it from timing out
                        self.group.keepalive()
                    continue
                # all or none: when some were stale or aborted (dropped), the fresh ones wait for more
                episodes = self.store.take_episodes(s.episodes_per_update, whole=True)
                if len(episodes) < s.episodes_per_update:
                    continue
                self._update(episodes)
                if self._reached_target():
                    log.info("deterministic success reached the target %.2f: updates stop", s.target_success)
                    break
        except Exception:
            log.exception("the update loop failed")
            raise
        finally:
            if self.group is not None:  # the other ranks leave their loop (learner/distributed.py: follow)
                from learner.distributed import STOP

                self.group.command(STOP)
            self.done.set()
            self._write_status()

    def _message(self) -> pirl_pb2.PolicyUpdate:
        """The current version written to the versioned store (output_dir/artifacts/v<version>, kept
        like the checkpoints) and its announcement: robots fetch its files in chunks from there. After
        a restart the version already on disk is announced again, byte for byte the same."""
        versions = self.publisher.version_store(self.output_dir / "artifacts", self.settings.keep_checkpoints)
        return versions.publish(
            self.policy,
            self.version,
            frozen_sha256=self.frozen_sha256,
            export_onnx=self.settings.export_onnx,
            engines=self.engines,
        )

    def _reached_target(self) -> bool:
        t = self.settings.target_success
        return t is not None and bool(self.eval_curve) and self.eval_curve[-1][2] >= t

    def _update(self, episodes) -> None:
        start = time.monotonic()
        if self.bc_data is not None:  # before the update: this batch's interventions are BC data at once
            self.bc_data.add_episodes(episodes)
        batch = episodes_to_batch(episodes, self.policy, self.normalize_actions)
        if self.group is not None:  # every rank updates on this batch, each on its slice of every minibatch
            self.group.update(batch)
        level = self.algo.policy.config.noise_level_at(self.algo.num_updates)
        stats = self.algo.update_on(batch)
        if self.group is not None:  # fsdp2: every rank gathers the trained tensors into rank 0's inference copy
            self.algo.shard.after_update(self.algo)
        metrics.LEARNER_UPDATE_SECONDS.observe(time.monotonic() - start)
        if stats.extra.get("skipped"):
            log.warning("update skipped (%s); version stays %d", stats.extra, self.version)
            return
        self.env_steps += batch.env_steps
        publish_start = time.monotonic()
        self.version += 1
        self.store.set_version(self.version)
        self.save()
        self._publish()
        metrics.LEARNER_PUBLISH_SECONDS.observe(time.monotonic() - publish_start)
        metrics.LEARNER_VERSION.set(self.version)
        d = stats.to_log_dict()
        for gauge, key in (
            (metrics.PPO_APPROX_KL, "approx_kl"),
            (metrics.PPO_CLIP_FRACTION, "clip_fraction"),
            (metrics.PPO_ENTROPY, "entropy"),
            (metrics.PPO_VALUE_LOSS, "value_loss"),
            (metrics.PPO_EXPLAINED_VARIANCE, "explained_variance"),
            (metrics.PPO_POLICY_LOSS, "policy_loss"),
            (metrics.PPO_BC_LOSS, "bc_loss"),
            (metrics.STEER_Q_LOSS, "q_loss"),
            (metrics.STEER_HEAD_Q, "head_q"),
            (metrics.STEER_STD, "steer_std"),
            (metrics.STEER_REPLAY, "replay"),
        ):
            if key in d and d[key] == d[key]:
                gauge.set(d[key])
        metrics.ROLLOUT_SUCCESS.set(batch.success_rate)
        metrics.EPISODE_RETURN.set(float(batch.episode_returns.mean()))
        row = {
            "version": self.version,
            "env_steps": self.env_steps,
            "episodes": len(episodes),
            "rollout_success": batch.success_rate,
            "noise_level": level,
            **d,
        }
        self.history.append(row)
        bc = ""
        if "q_loss" in d:  # steer_update=q: no PPO ratio; its critic's fit and the head's Q instead
            bc = (
                f" (of the policy loss; {int(d.get('replay_takeovers', 0))} in the critic's replay), q_loss "
                f"{d['q_loss']:.4f}, head Q {d.get('head_q', float('nan')):.3f}, steer std {d['steer_std']:.3f}"
            )
        if self.algo.config.bc_coef > 0:  # the BC term's loss and what it trained on (none yet: no data)
            bc = f", bc_loss {d.get('bc_loss', float('nan')):.4f} on {int(d.get('bc_samples', 0))} samples"
        log.info(
            "version %d: rollout success %.3f, approx_kl %.4f, clip %.3f, %d intervened steps left out%s (%.2fs)",
            self.version,
            batch.success_rate,
            d.get("approx_kl", float("nan")),
            d.get("clip_fraction", float("nan")),
            int(d.get("intervened", 0)),
            bc,
            time.monotonic() - start,
        )
        if self.evaluator is not None and self.settings.eval_every and self.version % self.settings.eval_every == 0:
            self._evaluate()
        self._write_status()

    def _evaluate(self) -> None:
        success = float(self.evaluator(self.policy))
        self.eval_curve.append((self.version, self.env_steps, success))
        metrics.EVAL_SUCCESS.set(success)
        log.info("version %d: deterministic success %.3f", self.version, success)
        self._write_status()

    def _write_status(self) -> None:
        store_state = self.store.state()
        status = {
            "version": self.version,
            "env_steps": self.env_steps,
            "eval_curve": self.eval_curve,
            "counts": store_state["counts"],
            "acked": store_state["acked"],
            "updates": self.algo.num_updates,
            "history_tail": self.history[-3:],
            "done": self.done.is_set(),
        }
        tmp = self.output_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.output_dir / "status.json")


def make_evaluator(
    preprocessor,
    postprocessor,
    episodes: int,
    seed: int = 1_000_000,
    policy_config=None,
    env_name="pirl_reach",
    success_key: str = "is_success",
    env_kwargs: dict | None = None,
    field_name: str = "trainer.eval_env",
    async_envs: bool = False,
):
    """Deterministic success on ``env_name`` (the built-in task observed the way ``policy_config`` reads it, a
    registered vector env, a gymnasium id, or a LeRobot ``EnvConfig``), for the learner's own progress figure."""
    from lerobot_policy_pi_rl.envs import open_sim_env, sim_env_kwargs
    from lerobot_policy_pi_rl.rollout import PolicyRunner, evaluate_success

    kwargs = sim_env_kwargs(env_name, policy_config, success_key, env_kwargs, async_envs)
    env = open_sim_env(env_name, min(episodes, 500), field_name, autoreset=False, **kwargs)

    def evaluate(policy) -> float:
        with torch.no_grad():
            return evaluate_success(
                PolicyRunner.for_env(policy, preprocessor, postprocessor, env), env, episodes=episodes, seed=seed
            )

    evaluate.env, evaluate.seed = env, seed  # what it runs on: its env, and the seed of its episodes and noise
    return evaluate


def choose_evaluator(settings: TrainerSettings, policy, preprocessor, postprocessor, env_cfg=None):
    """The learner's evaluator, or None: ``eval_every=0``; or no env given (neither ``env_cfg``, a LeRobot
    ``EnvConfig`` from ``--env.type``, nor ``eval_env``) and the policy does not fit the built-in task (a
    warning says so). A given env that is unknown or does not fit the policy is a ValueError naming the field
    and the reason."""
    from lerobot_policy_pi_rl.envs import require_known_env
    from lerobot_policy_pi_rl.rollout import PolicyRunner, env_mismatch

    if not settings.eval_every:
        return None
    given = env_cfg is not None or settings.eval_env is not None
    if settings.eval_async_envs and not given:
        raise ValueError("trainer.eval_async_envs: applies to an evaluation env you give (--env.type or eval_env)")
    target = env_cfg if env_cfg is not None else settings.eval_env or "pirl_reach"
    field_name = f"env.type={env_cfg.type}" if env_cfg is not None else f"trainer.eval_env={target}"
    require_known_env(target, "trainer.eval_env", "; --trainer.eval_every=0 turns evaluation off")
    try:
        evaluator = make_evaluator(
            preprocessor,
            postprocessor,
            settings.eval_episodes,
            policy_config=policy.config,
            env_name=target,
            success_key=settings.eval_success_key,
            env_kwargs=settings.eval_env_kwargs,
            field_name=field_name,
            async_envs=settings.eval_async_envs,
        )
    except ValueError as e:
        if given:  # the env it was told to evaluate on cannot be built: the message names the field and why
            raise
        evaluator, why = None, str(e)  # the built-in task cannot even be observed the way this policy reads
    else:
        why = env_mismatch(PolicyRunner.for_env(policy, preprocessor, postprocessor, evaluator.env), evaluator.env)
    if why is None:
        return evaluator
    if not given:
        logging.getLogger(__name__).warning(
            "evaluation off: the policy does not fit the built-in task (%s); give --env.type=... or "
            "--trainer.eval_env=<your task's env> to evaluate on it",
            why,
        )
        return None
    raise ValueError(f"{field_name} does not fit the policy: {why}; --trainer.eval_every=0 turns evaluation off")
