"""Inference backends behind one interface: sample one chunk per row from normalised observations
and explicit noise tensors (so every backend computes the same pure function).

``torch``: the policy's own ``sample_chains``. ``onnxruntime``: the sampler exported to ONNX
(``lerobot_policy_pi_rl.export``) and run by ONNX Runtime; every new policy version is re-exported
on the edge off the control thread (about half a second for the small MLP) and the session is
built before the swap. ``auto`` picks ONNX Runtime when it loads and falls back to torch with a
logged reason. (TensorRT is not built yet: asking for it falls back the same way.)
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


@dataclass
class Sampled:
    """One chunk per row, whichever backend computed it."""

    actions: torch.Tensor  # [B, H, D] normalised
    chain: torch.Tensor  # [B, K + 1, H, D]
    stochastic: torch.Tensor  # [B, K] bool
    log_prob: torch.Tensor  # [B]
    value: torch.Tensor  # [B]
    noise_level: torch.Tensor  # [B]


class TorchBackend:
    name = "torch"

    def __init__(self, policy):
        self.policy = policy

    def prepare(self, version: int, files: dict[str, bytes] | None = None) -> None:
        """Called after new weights are loaded into ``policy`` (off the control thread)."""

    def sample(self, obs, initial, step, stochastic, noise_level) -> Sampled:
        s = self.policy.sample_chains(obs, initial, step, stochastic, noise_level=noise_level)
        return Sampled(s.actions, s.chain.chain, s.chain.stochastic, s.chain.log_prob, s.value, s.noise_level)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, policy, workdir: Path | None = None, providers=None):
        self.policy = policy
        self.providers = providers
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pirl-onnx-")
        self.workdir = Path(workdir or self._tmp.name)
        self.session = None

    def prepare(self, version: int, files: dict[str, bytes] | None = None) -> None:
        """Load the learner's export of ``version`` when it came with the update (hash-checked by the
        subscriber, and again against its own manifest by OnnxSampler), else export locally."""
        from lerobot_policy_pi_rl.export import MODEL_FILE, OnnxSampler, export_onnx

        out = self.workdir / f"v{version:06d}"
        exported = {name.removeprefix("onnx/"): data for name, data in (files or {}).items() if name.startswith("onnx/")}
        if MODEL_FILE in exported and "manifest.json" in exported:
            out.mkdir(parents=True, exist_ok=True)
            for name, data in exported.items():
                (out / Path(name).name).write_bytes(data)  # file names only, never a path from the wire
        else:
            export_onnx(self.policy, out, version=version)
        session = OnnxSampler(out, providers=self.providers, threads=1)
        self._warm_up(session)
        self.session = session

    def _warm_up(self, session) -> None:
        """Run the new session once here, off the control thread: ONNX Runtime finishes setting a
        session up on its first run, which would otherwise land on the first chunk after a swap."""
        c = self.policy.config
        obs = {k: torch.zeros(1, *ft.shape) for k, ft in c.input_features.items()}
        initial, step, stochastic = self.policy.draw_noise(1, generator=torch.Generator().manual_seed(0))
        session.run({k: v.numpy() for k, v in obs.items()}, initial.numpy(), step.numpy(), stochastic.numpy(),
                    torch.full((1,), float(c.noise_level)).numpy())

    def sample(self, obs, initial, step, stochastic, noise_level) -> Sampled:
        out = self.session.run({k: v.numpy() for k, v in obs.items()}, initial.numpy(), step.numpy(),
                               stochastic.numpy(), noise_level.numpy())
        t = {k: torch.from_numpy(v) for k, v in out.items()}
        return Sampled(t["actions"], t["chain"], stochastic, t["log_prob"], t["value"], noise_level)


def make_backend(name: str, policy, version: int = 0, workdir: Path | None = None):
    """The requested backend, prepared for ``version``; falls back (logged) when it cannot load."""
    if name not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {name!r}")
    if name == "tensorrt":
        log.warning("the TensorRT backend is not built yet: falling back to ONNX Runtime")
        name = "auto"
    if name in ("auto", "onnxruntime"):
        try:
            backend = OnnxRuntimeBackend(policy, workdir)
            backend.prepare(version)
            return backend
        except Exception as e:  # noqa: BLE001  any failure to export/load means: use torch
            if name == "onnxruntime":
                log.warning("ONNX Runtime backend unavailable (%s): falling back to torch", e)
            else:
                log.info("ONNX Runtime backend unavailable (%s): using torch", e)
    return TorchBackend(policy)

