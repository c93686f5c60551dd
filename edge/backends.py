"""Inference backends behind one interface: sample one chunk per row from normalised observations
and explicit noise tensors (so every backend computes the same pure function).

Interface: ``prepare(version, files)`` makes the backend serve ``version`` (called off the control
thread, after the version's weights are in ``policy``); ``sample(obs, initial, step, stochastic,
noise_level) -> Sampled``; ``spare(policy)`` a fresh, unprepared backend of the same kind and
settings for the worker's spare slot; ``golden_tolerance`` (None for torch) the tolerances of the
golden-input check.

``torch``: the policy's own ``sample_chains``. ``onnxruntime``: the sampler exported to ONNX
(``pirl.export.onnx_export``), run by ONNX Runtime with its CUDA provider when that is
available, else on CPU; each version is the learner's export when it came with the update, else
exported on the edge off the control thread. The learner's export is a refit export: the graph and
frozen data (kept by the edge's staging across versions while their sha256 stay the same) with the
trained data file written here from the version's trained tensors (``ExportStore.refit_trained``). ``tensorrt`` (``edge.tensorrt_backend``): an engine
built, cached or refitted from the same export.

``auto`` = TensorRT when ``tensorrt`` (with builder and ONNX parser) imports and a CUDA device is
present, else ONNX Runtime, else torch. A backend that cannot load, or whose first version fails
the golden-input check, falls back to the next one with a logged reason; ``choose_backend``
(``edge.backend_choice``) reports
which failures count in ``pirl_edge_backend_fallbacks_total`` (see its docstring).

**Golden-input check** (``check_golden``, one mechanism for every backend but torch): before a newly
prepared backend may serve (the first version, and every version offered later), its outputs on a
fixed seeded input are compared with the PyTorch policy holding the same weights; a mismatch refuses
the version (the running one keeps serving). It catches an artifact that does not belong to the
weights (another version's export, a partly applied refit, a miscompiled engine) whenever that
changes the outputs by more than the tolerance; it cannot tell apart two versions whose outputs on
that input differ by less.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
GOLDEN_SEED = 20240611
OUTPUTS = ("actions", "chain", "log_prob", "value")

# (rtol, atol) per output of the golden-input check, against PyTorch FP32 on CPU.
# CPU FP32 (ONNX Runtime CPU): the parity tests hold every output to 1e-5 (log-prob 8e-6 absolute
# observed at |log_prob| ~ 50); the check keeps a 10x margin. GPU FP32 (ONNX Runtime CUDA, TensorRT
# with TF32 off): other kernels and summation orders; design values, not measured here (no GPU).
# TF32 (TensorRTSettings.tf32): 10-bit mantissa inner products. The log-prob sums up to
# K * H * D Gaussian terms, so its absolute tolerance is larger.
GOLDEN_TOLERANCES = {
    "cpu_fp32": {"actions": (1e-4, 1e-4), "chain": (1e-4, 1e-4), "log_prob": (1e-4, 1e-3), "value": (1e-4, 1e-4)},
    "gpu_fp32": {"actions": (1e-3, 1e-3), "chain": (1e-3, 1e-3), "log_prob": (1e-3, 1e-2), "value": (1e-3, 1e-3)},
    "gpu_tf32": {"actions": (1e-2, 1e-2), "chain": (1e-2, 1e-2), "log_prob": (1e-2, 1e-1), "value": (1e-2, 1e-2)},
}


class BackendUnavailableError(RuntimeError):
    """A backend's prerequisites (module, device) are missing."""


class GoldenMismatchError(ValueError):
    """A prepared backend disagrees with the PyTorch policy on the golden input."""


@dataclass
class Sampled:
    """One chunk per row, whichever backend computed it."""

    actions: torch.Tensor  # [B, H, D] normalised
    chain: torch.Tensor  # [B, K + 1, H, D]
    stochastic: torch.Tensor  # [B, K] bool
    log_prob: torch.Tensor  # [B]
    value: torch.Tensor  # [B]
    noise_level: torch.Tensor  # [B]


@dataclass
class Fallback:
    """A backend that could not serve. ``counted``: it goes into pirl_edge_backend_fallbacks_total."""

    backend: str
    reason: str
    counted: bool


def golden_inputs(policy, batch: int = 1, seed: int = GOLDEN_SEED):
    """A fixed input (normalised observations, noise, mask, noise level), CPU tensors."""
    from pirl.export.onnx_export import example_observations

    c = policy.config
    g = torch.Generator().manual_seed(seed)
    obs = example_observations(policy, batch, g)
    initial, step, stochastic = policy.draw_noise(batch, generator=g, device="cpu")
    return obs, initial, step, stochastic, torch.full((batch,), float(c.noise_level))


def check_golden(backend, policy, seed: int = GOLDEN_SEED) -> dict[str, float] | None:
    """Compare ``backend`` with ``policy.sample_chains`` on the golden input; the max abs error per
    output, or GoldenMismatchError naming the first output out of tolerance. None for torch (nothing to
    compare: it is the reference)."""
    tolerance = backend.golden_tolerance
    if tolerance is None:
        return None
    obs, initial, step, stochastic, level = golden_inputs(policy, getattr(backend, "golden_batch", 1), seed)
    device = policy.action_mask.device
    with torch.no_grad():
        ref = policy.sample_chains(
            {k: v.to(device) for k, v in obs.items()},
            initial.to(device),
            step.to(device),
            stochastic.to(device),
            noise_level=level.to(device),
        )
        got = backend.sample(obs, initial, step, stochastic, level)
    want = {"actions": ref.actions, "chain": ref.chain.chain, "log_prob": ref.chain.log_prob, "value": ref.value}
    errors = {}
    for name in OUTPUTS:
        a, b = getattr(got, name).detach().cpu().double(), want[name].detach().cpu().double()
        if a.shape != b.shape:
            raise GoldenMismatchError(f"golden-input check: {name} has shape {list(a.shape)}, PyTorch {list(b.shape)}")
        if not torch.isfinite(a).all():
            raise GoldenMismatchError(f"golden-input check: {name} has non-finite values")
        err = (a - b).abs()
        errors[name] = float(err.max()) if err.numel() else 0.0
        rtol, atol = tolerance[name]
        if bool((err > atol + rtol * b.abs()).any()):
            raise GoldenMismatchError(
                f"golden-input check failed: {backend.name} {name} differs from PyTorch by up to {errors[name]:.3g} "
                f"(tolerance rtol {rtol:g}, atol {atol:g}): the artifact does not match the weights"
            )
    return errors


class TorchBackend:
    name = "torch"
    golden_tolerance = None

    def __init__(self, policy):
        self.policy = policy
        self.last_prepare: dict = {}

    def spare(self, policy) -> TorchBackend:
        return TorchBackend(policy)

    def prepare(self, version: int, files: dict[str, bytes] | None = None) -> None:
        """Called after new weights are loaded into ``policy`` (off the control thread)."""

    def sample(self, obs, initial, step, stochastic, noise_level) -> Sampled:
        s = self.policy.sample_chains(obs, initial, step, stochastic, noise_level=noise_level)
        return Sampled(s.actions, s.chain.chain, s.chain.stochastic, s.chain.log_prob, s.value, s.noise_level)


class ExportStore:
    """The ONNX export of each version a backend serves, in ``workdir/v<version>``: the learner's
    export when it came with the update (file names only, never a path from the wire; the hashes
    were checked by the subscriber and are checked again against the export's own manifest by
    whoever loads it), else exported here from the policy. Older versions' directories are deleted
    once a newer one is prepared (``prune``)."""

    def __init__(self, workdir: Path | None = None):
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pirl-export-")
        self.workdir = Path(workdir or self._tmp.name)

    def materialise(self, policy, version: int, files: dict[str, bytes] | None) -> Path:
        from pirl.export.onnx_export import MANIFEST, MODEL_FILE, export_onnx

        out = self.workdir / f"v{version:06d}"
        exported = {
            name.removeprefix("onnx/"): data for name, data in (files or {}).items() if name.startswith("onnx/")
        }
        if MODEL_FILE in exported and MANIFEST in exported:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for name, data in exported.items():
                (out / Path(name).name).write_bytes(data)
            self.refit_trained(policy, out)
        else:
            export_onnx(policy, out, version=version)
        return out

    @staticmethod
    def refit_trained(policy, out: Path) -> bool:
        """A refit export (graph + frozen data, which the edge keeps across versions, since their sha256
        do not change) comes without its trained data file: write it here from the version's trained
        tensors, already loaded from its model.safetensors into ``policy``, with the manifest's map.
        Whoever loads the export then checks the file against the learner's sha256 like every other
        artifact (and the golden-input check against PyTorch follows): a map or tensor that does not
        belong to the graph is refused, never served. True when it wrote the file."""
        from pirl.export.onnx_export import load_manifest, write_trained_data

        _, manifest = load_manifest(out)
        refit = manifest.get("refit")
        if not refit or (out / refit["trained_data"]).is_file():
            return False  # a full export, or the learner sent the trained data as well
        name = Path(refit["trained_data"]).name  # a bare file name: never a path from the wire
        write_trained_data(policy.rl_state_dict(), refit["tensors"], out / name)
        return True

    def prune(self, keep: Path) -> None:
        for old in self.workdir.iterdir():
            if old.is_dir() and old != keep and re.fullmatch(r"v\d{6,}", old.name):
                shutil.rmtree(old, ignore_errors=True)


def onnxruntime_providers() -> list[str] | None:
    """["cuda"] when this onnxruntime has a CUDA provider and a CUDA device is present, else None (CPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        return ["cuda"]
    return None


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, policy, workdir: Path | None = None, providers=None):
        self.policy = policy
        self.providers = providers
        self.exports = ExportStore(workdir)
        self.session = None
        self.last_prepare: dict = {}

    @property
    def workdir(self) -> Path:
        return self.exports.workdir

    @property
    def golden_tolerance(self):
        on_gpu = self.session is not None and self.session.providers[0] != "CPUExecutionProvider"
        return GOLDEN_TOLERANCES["gpu_fp32" if on_gpu else "cpu_fp32"]

    def spare(self, policy) -> OnnxRuntimeBackend:
        return OnnxRuntimeBackend(policy, providers=self.providers)

    def prepare(self, version: int, files: dict[str, bytes] | None = None) -> None:
        """Load the learner's export of ``version`` when it came with the update (OnnxSampler checks the
        hashes against its manifest), else export locally; build the session and warm it up."""
        from pirl.export.onnx_export import MANIFEST, OnnxSampler

        out = self.exports.materialise(self.policy, version, files)
        session = OnnxSampler(out, providers=self.providers, threads=1)
        self._warm_up(session)
        self.session = session
        self.exports.prune(keep=out)
        # "refit": the learner's graph + frozen data with the trained tensors written here from the
        # version's safetensors; "export": the learner's files as sent; "local": exported here
        manifest = session.manifest
        method = "local" if not files or "onnx/" + MANIFEST not in files else "export"
        if method == "export" and "refit" in manifest and ("onnx/" + manifest["refit"]["trained_data"]) not in files:
            method = "refit"
        self.last_prepare = {
            "providers": list(session.providers),
            "method": method,
            "graph_structure_sha256": manifest.get("graph_structure_sha256"),
        }

    def _warm_up(self, session) -> None:
        """Run the new session once here, off the control thread: ONNX Runtime finishes setting a
        session up on its first run, which would otherwise land on the first chunk after a swap."""
        obs, initial, step, stochastic, level = golden_inputs(self.policy, seed=0)
        session.run(
            {k: v.numpy() for k, v in obs.items()}, initial.numpy(), step.numpy(), stochastic.numpy(), level.numpy()
        )

    def sample(self, obs, initial, step, stochastic, noise_level) -> Sampled:
        out = self.session.run(
            {k: v.cpu().numpy() for k, v in obs.items()},
            initial.cpu().numpy(),
            step.cpu().numpy(),
            stochastic.cpu().numpy(),
            noise_level.cpu().numpy(),
        )
        t = {k: torch.from_numpy(v) for k, v in out.items()}
        return Sampled(t["actions"], t["chain"], stochastic, t["log_prob"], t["value"], noise_level)
