"""The learner's behaviour-cloning data: teleoperator interventions and offline demonstrations.

With ``--algorithm.bc_coef > 0`` every PPO minibatch adds ``bc_coef`` times the policy's flow-matching loss
on one BC batch (``PiRLAlgorithm.demo_iterator``). Its samples come from two sources:

* **interventions**: a macro-step whose first tick a person's teleoperator drove (``teleop[0]``) is one
  sample: the record's normalised observation at decision time, and the teleoperated actions from tick 0
  up to the first tick the policy drove again, normalised with the policy's own action statistics (its
  pre-processor) and padded to ``chunk_size`` (``action_is_pad``). Samples join the buffer when their
  episode is taken for an update (complete, within the version lag, not aborted: an aborted episode is
  never trained on); the bounded buffer keeps the newest ``bc.buffer_size``. It is saved with every
  checkpoint (``bc_buffer.safetensors``, hashed in the manifest like the rest) and restored at ``--resume``:
  a person's corrections are the scarcest data a robot has, and a learner restart must not throw them away.
  Such a macro-step is never a PPO sample (its chunk is not what ran).
* **offline demonstrations** (``--offline_dataset.root=DIR``): a local LeRobotDataset, loaded with the
  policy's delta timestamps and run through its pre-processor exactly as ``lerobot-train`` feeds SFT.

Under ``noise_steer`` (the flow policy frozen, a steering head choosing its initial noise x_1) the term trains the
steering head instead: with ``bc.successes`` each macro-step of a successful episode is a sample of the x_1 its
chunk was sampled from (the record's chain[0]), and the loss is the head's negative log-likelihood of it
(``PiRLPolicy.steer_imitation_loss``): reward-weighted regression in noise space. Teleoperated chunks and offline
demonstrations have no initial noise, so under ``noise_steer`` interventions are not buffered and an offline set
is refused.

Each BC batch takes ``bc.offline_fraction`` of its ``bc.batch_size`` samples from the offline set and the
rest from the buffer when both have data; with one source, all of them from it; with none yet (no
intervention so far, no offline set) the iterator yields None and the minibatch has no BC term.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from learner import metrics
from lerobot_policy_pi_rl.samplers import INITIAL_NOISE, NOISE_STEER
from pirl.cli import require

log = logging.getLogger(__name__)

ACTION, PAD = "action", "action_is_pad"
BUFFER_FILE = "bc_buffer.safetensors"  # the buffer inside a learner checkpoint


@dataclass
class OfflineDatasetConfig:
    """Offline demonstrations for the BC term: a local LeRobotDataset (``--offline_dataset.root=DIR``)."""

    # a local LeRobotDataset directory (meta/, data/) whose frames join the BC term (algorithm.bc_coef > 0) or a
    # chunk critic's replay (steer_update=q, q_critic_input=action); its features must hold the policy's inputs
    # and its action (None: no offline demonstrations)
    root: str | None = None
    # the dataset's repo id, as LeRobot names it (read from ROOT only, never downloaded)
    repo_id: str = "local/offline_demos"

    def __post_init__(self):
        if self.root is not None and not (Path(self.root) / "meta" / "info.json").is_file():
            raise ValueError(
                f"offline_dataset.root: {self.root} is not a LeRobotDataset (no meta/info.json); give the directory "
                "lerobot-record or LeRobotDataset.create wrote"
            )


@dataclass
class BCSettings:
    """Where the BC term's samples come from (``algorithm.bc_coef > 0``): interventions and offline demos."""

    # samples in one BC batch (one BC batch per PPO minibatch)
    batch_size: int = 32
    # share of a BC batch taken from the offline dataset when both sources have data (the rest: interventions);
    # with only one source the whole batch comes from it
    offline_fraction: float = 0.5
    # intervention samples kept for BC (the oldest are dropped first); saved with every checkpoint and restored
    # at --resume
    buffer_size: int = 4096
    # also imitate the policy's own successes (self-imitation, success-filtered BC): every macro-step of an
    # episode that ended in success, not intervened, joins the buffer with the chunk the policy sampled and ran
    # (its chain's x_0, already normalised); under noise_method=noise_steer, the initial noise x_1 it was sampled
    # from, imitated by the steering head (required there). Off: only what people did is imitated
    successes: bool = False

    def __post_init__(self):
        require(self, "bc", at_least={"batch_size": 1, "buffer_size": 1})
        if not 0.0 <= self.offline_fraction <= 1.0:
            raise ValueError(f"bc.offline_fraction: must be in [0, 1] (got {self.offline_fraction})")


def action_normalizer(preprocessor):
    """``f(actions [..., action_dim] robot units) -> normalised`` with the pre-processor's own statistics
    (its NormalizerProcessorStep, what SFT normalised the dataset's actions with)."""
    from lerobot.processor import NormalizerProcessorStep, TransitionKey
    from lerobot.processor.converters import create_transition

    steps = [s for s in getattr(preprocessor, "steps", []) if isinstance(s, NormalizerProcessorStep)]
    if not steps:
        raise ValueError("the policy's pre-processor has no normalisation step: cannot normalise teleoperated actions")
    step = steps[-1]
    return lambda actions: step(create_transition(action=actions))[TransitionKey.ACTION]


class OfflineDemos:
    """Random frames of a local LeRobotDataset as pre-processed SFT batches (what lerobot-train feeds)."""

    def __init__(self, cfg: OfflineDatasetConfig, policy, preprocessor, keys: list[str], generator: torch.Generator):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local dataset: never reach for the hub
        from lerobot.datasets.factory import resolve_delta_timestamps
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

        meta = LeRobotDatasetMetadata(cfg.repo_id, root=cfg.root)
        needed = [*(policy.config.input_features or {}), ACTION]
        missing = [k for k in needed if k not in meta.features]
        if missing:
            raise ValueError(
                f"offline_dataset.root: {cfg.root} has no {missing} (the policy reads {needed}; the dataset has "
                f"{sorted(meta.features)})"
            )
        action_shape = tuple(meta.features[ACTION]["shape"])
        if action_shape != (policy.config.action_dim,):
            raise ValueError(
                f"offline_dataset.root: {cfg.root}'s actions have shape {action_shape}; the policy's are "
                f"({policy.config.action_dim},): demonstrations of another robot or action space"
            )
        self.dataset = LeRobotDataset(
            cfg.repo_id, root=cfg.root, delta_timestamps=resolve_delta_timestamps(policy.config, meta)
        )
        if len(self.dataset) == 0:
            raise ValueError(f"offline_dataset.root: {cfg.root} holds no frames")
        from lerobot.utils.collate import lerobot_collate_fn
        from torch.utils.data import default_collate

        self.collate = lerobot_collate_fn if meta.has_language_columns else default_collate
        self.pre, self.keys, self.generator = preprocessor, keys, generator

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, n: int) -> dict[str, Tensor]:
        return self.frames(torch.randint(len(self.dataset), (n,), generator=self.generator).tolist())

    def frames(self, indices: list[int]) -> dict[str, Tensor]:
        """These frames (dataset indices), pre-processed, with their action chunks."""
        batch = self.pre(self.collate([self.dataset[i] for i in indices]))
        return {k: batch[k] for k in self.keys}

    def episodes(self) -> list[np.ndarray]:
        """The dataset indices of each episode's frames, in order."""
        cols = self.dataset.hf_dataset.select_columns(["episode_index", "index"]).with_format("numpy")
        episode, index = np.asarray(cols["episode_index"]).reshape(-1), np.asarray(cols["index"]).reshape(-1)
        return [np.sort(index[episode == e]) for e in np.unique(episode)]


class BCData:
    """The intervention buffer and the optional offline set; ``iter(bc_data)`` is the algorithm's
    ``demo_iterator`` (it yields a batch on the policy's device, or None while there is no data)."""

    def __init__(
        self,
        policy,
        preprocessor,
        settings: BCSettings,
        offline: OfflineDatasetConfig | None = None,
        seed: int = 0,
    ):
        c = policy.config
        self.settings = settings
        self.device = policy.action_mask.device  # the policy's: where the BC loss runs
        self.chunk_size, self.action_dim = c.chunk_size, c.action_dim
        self.obs_keys = list(c.observation_spec())  # what a record carries, and all the policy reads
        self.normalize = action_normalizer(preprocessor)
        self.generator = torch.Generator().manual_seed(seed)
        # noise_steer: the samples are successful episodes' initial noises, imitated by the steering head
        self.steered = c.noise_method == NOISE_STEER
        if self.steered and not settings.successes:
            raise ValueError(
                "algorithm.bc_coef > 0 with noise_method=noise_steer: the flow policy is frozen, so the BC term can "
                "only imitate the initial noises of the policy's own successes; set --bc.successes=true (or "
                "algorithm.bc_coef=0)"
            )
        if self.steered and offline is not None and offline.root is not None:
            raise ValueError(
                "offline_dataset.root: under noise_method=noise_steer the BC term imitates initial noises, and "
                "offline demonstrations have none; leave offline_dataset.root unset"
            )
        # (observation, normalised actions [chunk_size, action_dim], action_is_pad [chunk_size], source) on the
        # CPU; source: "intervention", or "success" (bc.successes)
        self.buffer: deque[tuple[dict[str, Tensor], Tensor, Tensor, str]] = deque(maxlen=settings.buffer_size)
        self.offline = None
        if offline is not None and offline.root is not None:
            self.offline = OfflineDemos(offline, policy, preprocessor, [*self.obs_keys, ACTION, PAD], self.generator)
            log.info("BC: %d offline demonstration frames from %s", len(self.offline), offline.root)
        for source in metrics.BC_SOURCES:
            metrics.BC_SAMPLES.labels(source=source)

    # --- interventions --------------------------------------------------------------------------

    def sample_of(self, step) -> tuple[dict[str, Tensor], Tensor, Tensor] | None:
        """The BC sample of one macro-step (``learner.store.Step``), or None when its first tick was not
        teleoperated (the observation at decision time is then not what the operator acted on)."""
        if self.steered or step.teleop is None or not step.teleop.size or not step.teleop[0]:
            return None  # (a teleoperated chunk has no initial noise for a steering head to imitate)
        ran = int(np.argmin(step.teleop)) if not step.teleop.all() else step.teleop.size  # up to the first policy tick
        n = min(ran, self.chunk_size)
        executed = torch.from_numpy(np.ascontiguousarray(step.executed[:n], dtype=np.float32))
        with torch.no_grad():
            normalised = self.normalize(executed.to(self.device)).float().cpu()
        actions = torch.zeros(self.chunk_size, self.action_dim)
        actions[:n] = normalised
        pad = torch.ones(self.chunk_size, dtype=torch.bool)
        pad[:n] = False
        obs = {k: torch.from_numpy(step.observation[k]) for k in self.obs_keys}
        return obs, actions, pad

    def success_sample_of(self, step) -> tuple[dict[str, Tensor], Tensor, Tensor] | None:
        """The self-imitation sample of one macro-step of a successful episode: the policy's own chunk (the
        chain's last state, x_0, in the normalised action space) over the ticks it ran; under ``noise_steer`` the
        initial noise x_1 it was sampled from (chain[0], every chunk position: x_1 shapes the whole chunk).
        None when intervened."""
        if step.intervened or step.env_steps < 1:
            return None
        obs = {k: torch.from_numpy(step.observation[k]) for k in self.obs_keys}
        if self.steered:
            x_1 = torch.from_numpy(np.ascontiguousarray(step.chain[0, :, : self.action_dim], dtype=np.float32))
            return obs, x_1, torch.zeros(self.chunk_size, dtype=torch.bool)
        n = min(int(step.env_steps), self.chunk_size)
        actions = torch.zeros(self.chunk_size, self.action_dim)
        actions[:n] = torch.from_numpy(np.ascontiguousarray(step.chain[-1, :n, : self.action_dim], dtype=np.float32))
        pad = torch.ones(self.chunk_size, dtype=torch.bool)
        pad[:n] = False
        return obs, actions, pad

    def add_episodes(self, episodes) -> int:
        """Buffer the intervention samples of ``episodes`` (complete, not aborted), and with ``bc.successes`` the
        policy's own macro-steps of the successful ones; how many were added."""
        added = 0
        for ep in episodes:
            success = self.settings.successes and any(s.success for s in ep.steps)
            for step in ep.steps:
                sample = self.sample_of(step)
                source = "intervention"
                if sample is None and success:
                    sample, source = self.success_sample_of(step), "success"
                if sample is not None:
                    self.buffer.append((*sample, source))
                    added += 1
        metrics.BC_BUFFER.set(len(self.buffer))
        return added

    # --- checkpoints ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """The buffer as safetensors (never pickle): ``obs.<key>`` [N, ...], ``action`` [N, chunk_size,
        action_dim], ``action_is_pad`` [N, chunk_size] and ``source`` (an index into ``metrics.BC_SOURCES``);
        its metadata names what ``action`` holds (``target``: actions, or initial noises under ``noise_steer``).
        An empty buffer writes nothing."""
        from safetensors.torch import save_file

        if not self.buffer:
            return
        items = list(self.buffer)
        tensors = {f"obs.{k}": torch.stack([obs[k] for obs, *_ in items]).contiguous() for k in self.obs_keys}
        tensors[ACTION] = torch.stack([actions for _, actions, _, _ in items]).contiguous()
        tensors[PAD] = torch.stack([pad for _, _, pad, _ in items]).contiguous()
        tensors["source"] = torch.tensor([metrics.BC_SOURCES.index(src) for *_, src in items], dtype=torch.uint8)
        save_file(tensors, str(path), metadata={"target": self._target})

    def read(self, path: Path) -> list[tuple[dict[str, Tensor], Tensor, Tensor, str]]:
        """The samples ``save`` wrote to ``path``, checked against this policy's observation keys and action
        shape; ValueError naming what does not fit (the checkpoint is then refused like any unloadable one)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # one read: the metadata, then the tensors
            target = (f.metadata() or {}).get("target", ACTION)
            if target != self._target:
                raise ValueError(
                    f"{path.name} holds {target} targets and this learner imitates {self._target} (noise_method "
                    "noise_steer imitates initial noises): a buffer from a run with another noise_method"
                )
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
        want = {f"obs.{k}" for k in self.obs_keys} | {ACTION, PAD, "source"}
        if set(t) != want:
            raise ValueError(f"{path.name} holds {sorted(t)}, not this policy's {sorted(want)}")
        n = len(t["source"])
        shapes_fit = (
            tuple(t[ACTION].shape) == (n, self.chunk_size, self.action_dim)
            and tuple(t[PAD].shape) == (n, self.chunk_size)
            and t[PAD].dtype == torch.bool
            and all(len(t[f"obs.{k}"]) == n for k in self.obs_keys)
            and (n == 0 or int(t["source"].max()) < len(metrics.BC_SOURCES))
        )
        if not shapes_fit:
            raise ValueError(
                f"{path.name}: its action is {tuple(t[ACTION].shape)}, not [N, {self.chunk_size}, "
                f"{self.action_dim}], or its pads, observations or sources do not line up"
            )
        sources = [metrics.BC_SOURCES[i] for i in t["source"].tolist()]
        return [({k: t[f"obs.{k}"][i] for k in self.obs_keys}, t[ACTION][i], t[PAD][i], sources[i]) for i in range(n)]

    def restore(self, samples: list[tuple[dict[str, Tensor], Tensor, Tensor, str]]) -> None:
        """Replace the buffer with ``samples`` (``read``'s); the newest ``bc.buffer_size`` are kept."""
        self.buffer.clear()
        self.buffer.extend(samples)
        metrics.BC_BUFFER.set(len(self.buffer))

    @property
    def _target(self) -> str:
        return INITIAL_NOISE if self.steered else ACTION

    # --- batches --------------------------------------------------------------------------------

    def split(self) -> tuple[int, int]:
        """(offline, intervention) samples of the next BC batch."""
        b = self.settings.batch_size
        if self.offline is None:
            return 0, b if self.buffer else 0
        if not self.buffer:
            return b, 0
        off = round(b * self.settings.offline_fraction)
        return off, b - off

    def next_batch(self) -> dict[str, Tensor] | None:
        n_off, n_int = self.split()
        if n_off + n_int == 0:
            return None
        parts: list[dict[str, Tensor]] = []
        if n_int:
            idx = torch.randint(len(self.buffer), (n_int,), generator=self.generator).tolist()
            picked = [self.buffer[i] for i in idx]
            part = {k: torch.stack([p[0][k] for p in picked]) for k in self.obs_keys}
            part[ACTION] = torch.stack([p[1] for p in picked])
            part[PAD] = torch.stack([p[2] for p in picked])
            parts.append({k: v.to(self.device) for k, v in part.items()})
            for source in {p[3] for p in picked}:
                metrics.BC_SAMPLES.labels(source=source).inc(sum(p[3] == source for p in picked))
        if n_off:
            parts.append({k: v.to(self.device) for k, v in self.offline.batch(n_off).items()})
            metrics.BC_SAMPLES.labels(source="offline").inc(n_off)
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.steered:  # what the steering head imitates: x_1 over every position (no padding)
            batch[INITIAL_NOISE] = batch.pop(ACTION)
            del batch[PAD]
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()
