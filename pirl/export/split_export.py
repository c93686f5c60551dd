"""The sampler as two ONNX graphs with the denoising loop on the host: the alternative to the
one-graph export (``export.py``) that the export issue asked to measure. ``pirl-bench infer`` times
it beside the one-graph export (column ``onnxruntime_cpu_split``); the figures and the choice are in
BENCHMARKS.md.

    prefix.onnx     observations -> prefix tensors: the pooled features and the prefix cache (a VLA's
                    per-layer keys / values, its pad mask, pi0's state), once per decision
    velocity.onnx   prefix tensors, x_t [B, H, D], t [B] -> velocity [B, H, D], expert features [B, H, E]:
                    one denoise step, run K times

``SplitSampler`` runs the policy's own ``sample_from_prefix`` (the samplers.py loop, the noise head
and the critic, in PyTorch) with velocity.onnx as its velocity field, so the sampler math stays in
one module here too. Every graph's sha256 is checked against split_manifest.json before loading.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pirl.export.onnx_export import (
    BATCH_AXIS,
    MAX_OPSET,
    MIN_OPSET,
    ArtifactIntegrityError,
    _export_symbolics,
    example_observations,
    input_name,
    observation_keys,
    sha256_file,
)

PREFIX_FILE, VELOCITY_FILE, SPLIT_MANIFEST = "prefix.onnx", "velocity.onnx", "split_manifest.json"


class PrefixGraph(nn.Module):
    """``forward(*observations)`` -> the prefix as tensors (``Prefix.tensors()``)."""

    def __init__(self, policy):
        super().__init__()
        self.policy, self.keys = policy, observation_keys(policy.config)

    def forward(self, *obs: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.policy.backbone.embed_prefix(dict(zip(self.keys, obs, strict=True))).tensors())


class VelocityGraph(nn.Module):
    """``forward(*prefix_tensors, x_t, t)`` -> (velocity, expert features) of one denoise step."""

    def __init__(self, policy, template):
        super().__init__()
        self.policy, self.template = policy, template  # template: a Prefix giving the tensor layout

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        *tensors, x_t, t = inputs
        prefix = self.template.rebuild(list(tensors))
        rows = torch.arange(x_t.shape[0], device=x_t.device)
        return self.policy.backbone.denoise_step(prefix, x_t, t, rows)


def export_split(policy, out_dir: str | Path, *, opset: int = 17) -> dict:
    """Write prefix.onnx, velocity.onnx and split_manifest.json (sha256 of both) to ``out_dir``."""
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SPLIT_MANIFEST).unlink(missing_ok=True)
    c = policy.config
    obs = example_observations(policy, 2, torch.Generator().manual_seed(0))  # batch 2: keep the axis dynamic
    obs = {k: v.to(policy.action_mask.device) for k, v in obs.items()}
    obs_names = [input_name(k) for k in obs]
    was_training = policy.training
    policy.eval()
    started = time.perf_counter()
    backbone_context = getattr(policy.backbone, "export_context", None)
    try:
        with (
            torch.no_grad(),
            warnings.catch_warnings(),
            _export_symbolics(opset),
            backbone_context() if backbone_context else contextlib.nullcontext(),
        ):
            warnings.simplefilter("ignore")  # the tracer's warnings: see export.export_onnx
            template = policy.backbone.embed_prefix(obs)
            prefix_tensors = template.tensors()
            prefix_names = [f"prefix__{i}" for i in range(len(prefix_tensors))]
            axes = {n: {0: BATCH_AXIS} for n in obs_names + prefix_names}
            torch.onnx.export(
                PrefixGraph(policy),
                tuple(obs.values()),
                str(out / PREFIX_FILE),
                dynamo=False,
                opset_version=opset,
                input_names=obs_names,
                output_names=prefix_names,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
            x_t = torch.randn(2, c.chunk_size, c.model_action_dim, device=policy.action_mask.device)
            t = torch.full((2,), 0.75, device=policy.action_mask.device)
            names = prefix_names + ["x_t", "t"]
            axes = {n: {0: BATCH_AXIS} for n in names + ["velocity", "expert"]}
            torch.onnx.export(
                VelocityGraph(policy, template),
                (*prefix_tensors, x_t, t),
                str(out / VELOCITY_FILE),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=["velocity", "expert"],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        for f in (PREFIX_FILE, VELOCITY_FILE):
            onnx.checker.check_model(str(out / f), full_check=True)
    finally:
        policy.train(was_training)
    manifest = {
        "format": "pirl-onnx-split/1",
        "opset": opset,
        "num_prefix_tensors": len(prefix_names),
        "export_seconds": round(time.perf_counter() - started, 3),
        "artifacts": {
            f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size} for f in (PREFIX_FILE, VELOCITY_FILE)
        },
    }
    (out / SPLIT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


class SplitSampler:
    """The split export on ONNX Runtime, with ``policy`` (the same weights) for the host loop, the
    noise head and the critic. ``run`` has ``OnnxSampler.run``'s signature and outputs."""

    def __init__(self, policy, path: str | Path, *, noise_method: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.policy, self.noise_method, root = policy, noise_method, Path(path)
        manifest = json.loads((root / SPLIT_MANIFEST).read_text())
        for name, info in manifest["artifacts"].items():
            if sha256_file(root / name) != info["sha256"]:
                raise ArtifactIntegrityError(
                    f"{root / name}: sha256 does not match {SPLIT_MANIFEST}; refusing to load it"
                )
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.prefix = ort.InferenceSession(
            str(root / PREFIX_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.velocity = ort.InferenceSession(
            str(root / VELOCITY_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._obs_inputs = {i.name for i in self.prefix.get_inputs()}
        self._vel_inputs = {i.name for i in self.velocity.get_inputs()}
        self._template = None

    def run(self, obs: dict, initial_noise, step_noise, stochastic, noise_level=None) -> dict[str, np.ndarray]:
        policy = self.policy
        feeds = {input_name(k): np.asarray(v) for k, v in obs.items() if input_name(k) in self._obs_inputs}
        prefix_arrays = self.prefix.run(None, feeds)
        if self._template is None:  # the cache layout (number of layers, state or not) of this policy
            with torch.no_grad():
                self._template = policy.backbone.embed_prefix(
                    {k: torch.as_tensor(np.asarray(v))[:1] for k, v in obs.items()}
                )
        prefix = self._template.rebuild([torch.from_numpy(a) for a in prefix_arrays])
        # the exporter drops prefix tensors the velocity graph never reads (e.g. the pooled features)
        fixed = {f"prefix__{i}": a for i, a in enumerate(prefix_arrays) if f"prefix__{i}" in self._vel_inputs}

        def velocity(x_t: Tensor, t: Tensor, rows: Tensor):  # rows: every row, in order, while sampling
            out = self.velocity.run(None, {**fixed, "x_t": x_t.numpy(), "t": t.numpy()})
            return torch.from_numpy(out[0]), torch.from_numpy(out[1])

        as_t = lambda x, dtype=None: torch.as_tensor(np.asarray(x), dtype=dtype)  # noqa: E731
        with torch.no_grad():
            s = policy.sample_from_prefix(
                prefix,
                as_t(initial_noise),
                as_t(step_noise),
                as_t(stochastic, torch.bool),
                noise_level=as_t(noise_level),
                noise_method=self.noise_method,
                denoise_fn=velocity,
            )
        return {
            "actions": s.actions.numpy(),
            "chain": s.chain.chain.numpy(),
            "log_prob": s.chain.log_prob.numpy(),
            "value": s.value.numpy(),
        }
