"""ONNX export of the PI-RL sampler, and an ONNX Runtime sampler that serves it.

The exported graph is the policy's own ``sample_chains`` traced through ``samplers.py`` (no second
implementation of the sampler math): observations and every random tensor are graph inputs, so the
ONNX model is the same pure function of (observation, noise) as the PyTorch policy, and a chain
sampled by ONNX Runtime (or TensorRT, built from this file) can be re-evaluated by the learner in
PyTorch with ``PiRLPolicy.evaluate_chains``.

Graph signature (``SamplerGraph.forward`` / the ONNX model), all float32, ``B`` = the batch axis
(named ``batch``, dynamic unless ``batch_size`` is given at export)::

    inputs   obs__<feature key>  one per observation feature, in sorted key order, e.g.
                                 obs__observation.state [B, S], obs__observation.image [B, C, H, W];
                                 the NORMALISED policy inputs (what the pre-processor produces)
             initial_noise       [B, H, D]     x_1 of the chain
             step_noise          [B, K, H, D]  per-step Gaussian noise
             stochastic          [B, K]        1.0 = stochastic step, 0.0 = ODE step (a float mask;
                                               the graph converts it with ``> 0.5``)
             noise_level         [B]           Flow-SDE ``a`` (ignored by flow_ode / flow_noise)
    outputs  actions             [B, H, D]     normalised, padded chunk (real dims: [..., :action_dim])
             chain               [B, K + 1, H, D]
             log_prob            [B]
             value               [B]

``H`` = chunk size, ``K`` = denoise steps, ``D`` = the model's (possibly ``max_action_dim``-padded)
action dim. Observation input names are ``"obs__" + feature key`` (the key's dots are kept; ONNX
names may contain them), so a key can be recovered by stripping the prefix. The exporter drops
inputs a noise method never reads (flow_ode: ``stochastic`` and ``noise_level``; flow_noise:
``noise_level``); the manifest lists the model's actual inputs and the dropped ones under
``unused_inputs``, and ``OnnxSampler.run`` accepts (and ignores) them either way.

An export directory holds ``model.onnx`` (+ ``model.onnx.data`` when the model is over the 2 GB
protobuf limit), ``model.safetensors`` and ``config.json`` (the policy, loadable by
``PiRLPolicy.from_pretrained``) and ``manifest.json``: every artifact with its sha256 and size, the
policy type / version, opset, noise method, K, chunk size, action dims, every input / output
with dtype and shape, the precision of the graph (``"fp32"``: every export is FP32) and
``graph_structure_sha256``, a hash of the graph with the weight *values* left out (two versions of a
policy share it when only their weights differ: TensorRT refits instead of rebuilding then).
``OnnxSampler`` refuses to load a directory whose files do not match it.

A *refit* export (``refit=True``, what the learner publishes per version) holds model.onnx with every
initializer external, in two files: ``frozen.onnx.data`` (everything PI-RL does not train: its bytes,
like model.onnx's, are the same for every version of one graph) and ``trained.onnx.data`` (the trained
tensors, in float32, transposed where constant folding transposed them), plus a manifest whose
``refit`` entry maps each trained initializer to its ``rl_state_dict`` key (``split_weights``). An edge
that holds the graph and frozen data of a version writes the trained file of the next one from that
version's model.safetensors (``write_trained_data``) and checks it against the manifest's sha256. A TensorRT engine built
from the export (``pirl.export.trt_engine``) may be added as ``engine.plan`` with its own
``tensorrt_engine`` manifest entry (sha256 and cache-key fields).

The legacy TorchScript exporter is used (``dynamo=False``) with opset <= 20 (TensorRT 10.3 parses
up to opset 20).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lerobot_policy_pi_rl.samplers import NOISE_METHODS, NOISE_STEER, check_noise_method

log = logging.getLogger(__name__)

OBS_PREFIX = "obs__"
NOISE_INPUTS = ("initial_noise", "step_noise", "stochastic", "noise_level")
OUTPUTS = ("actions", "chain", "log_prob", "value")
BATCH_AXIS = "batch"
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# a refit export (``export_onnx(..., refit=True)``) splits the weights in two files beside model.onnx
FROZEN_DATA_FILE = "frozen.onnx.data"  # every initializer that is not a trained tensor: same bytes every version
TRAINED_DATA_FILE = "trained.onnx.data"  # the trained tensors, rebuilt from model.safetensors by write_trained_data
MANIFEST_FORMAT = "pirl-onnx-sampler/1"
MIN_OPSET, MAX_OPSET = 13, 20  # 20: the newest opset TensorRT 10.3's ONNX parser accepts
# A protobuf message cannot exceed 2 GiB; keep the weights inline only well below that.
MAX_INLINE_BYTES = 2**31 - 2**27

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ArtifactIntegrityError(ValueError):
    """An exported artifact is missing or its sha256 does not match manifest.json."""


def observation_keys(config) -> list[str]:
    """The policy's observation keys (``PiRLConfig.observation_spec``), in graph-input order."""
    return list(config.observation_spec())


def input_name(key: str) -> str:
    """ONNX input name of observation feature ``key`` (``observation.state`` -> ``obs__observation.state``)."""
    return OBS_PREFIX + key


class SamplerGraph(nn.Module):
    """``forward(*observations, initial_noise, step_noise, stochastic, noise_level)`` ->
    ``(actions, chain, log_prob, value)``, by calling ``policy.sample_chains``.

    Observations come first, one tensor per feature in ``observation_keys(policy.config)`` order.
    ``stochastic`` is a float ``[B, K]`` mask (1.0 = stochastic step) so the graph has no bool
    input; ``noise_level`` is ``[B]``. The noise method is fixed at construction (the policy's
    configured one by default).
    """

    def __init__(self, policy, noise_method: str | None = None):
        super().__init__()
        self.policy = policy
        self.noise_method = noise_method or policy.config.noise_method
        check_noise_method(self.noise_method)
        if self.noise_method == NOISE_STEER and getattr(policy, "steer_head", None) is None:
            raise ValueError(
                "noise_method=noise_steer needs a policy with a steering head: load it with "
                "load_policy(path, noise_method='noise_steer')"
            )
        self.observation_keys = observation_keys(policy.config)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n_obs = len(self.observation_keys)
        if len(inputs) != n_obs + len(NOISE_INPUTS):
            raise TypeError(
                f"SamplerGraph takes {n_obs} observation tensors ({self.observation_keys}) then "
                f"{', '.join(NOISE_INPUTS)}; got {len(inputs)} tensors"
            )
        obs = dict(zip(self.observation_keys, inputs[:n_obs], strict=True))
        initial_noise, step_noise, stochastic, noise_level = inputs[n_obs:]
        sample = self.policy.sample_chains(
            obs, initial_noise, step_noise, stochastic > 0.5, noise_level=noise_level, noise_method=self.noise_method
        )
        return sample.actions, sample.chain.chain, sample.chain.log_prob, sample.value


def example_observations(policy, batch_size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random normalised observations of ``policy.config.observation_spec()`` (CPU): images in [0, 1],
    other floats N(0, 1), token ids below the VLM's vocabulary, attention masks of a half-length
    prompt. For tracing exports, warming runtimes up and golden-input checks."""
    c = policy.config
    obs = {}
    for key, (dtype, shape) in c.observation_spec().items():
        shape = (batch_size, *shape)
        if dtype == "int64":  # token ids
            obs[key] = torch.randint(0, policy.backbone.vocab_size, shape, generator=generator)
        elif dtype == "bool":  # attention mask: a prompt, then padding
            obs[key] = torch.arange(shape[-1]).expand(shape) < max(1, shape[-1] // 2)
        elif key in c.image_features:
            obs[key] = torch.rand(shape, generator=generator)
        else:
            obs[key] = torch.randn(shape, generator=generator)
    return obs


def example_inputs(policy, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """Random inputs with the graph's signature (observations, then the noise tensors)."""
    c = policy.config
    device = policy.action_mask.device
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    obs = [x.to(device) for x in example_observations(policy, batch_size, g).values()]
    k, h, d = c.num_denoise_steps, c.chunk_size, c.model_action_dim
    initial = torch.randn(batch_size, h, d, generator=g).to(device)
    steps = torch.randn(batch_size, k, h, d, generator=g).to(device)
    stochastic = (torch.rand(batch_size, k, generator=g) > 0.5).float().to(device)
    level = torch.full((batch_size,), float(c.noise_level), device=device)
    return (*obs, initial, steps, stochastic, level)


def io_spec(policy, batch_size: int | None = None) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs): name, dtype and shape of every graph input / output (``"batch"`` when dynamic)."""
    c = policy.config
    b = BATCH_AXIS if batch_size is None else batch_size
    k, h, d = c.num_denoise_steps, c.chunk_size, c.model_action_dim
    inputs = [
        {"name": input_name(key), "feature": key, "dtype": dtype, "shape": [b, *shape]}
        for key, (dtype, shape) in c.observation_spec().items()
    ]
    inputs += [
        {"name": "initial_noise", "dtype": "float32", "shape": [b, h, d]},
        {"name": "step_noise", "dtype": "float32", "shape": [b, k, h, d]},
        {"name": "stochastic", "dtype": "float32", "shape": [b, k]},
        {"name": "noise_level", "dtype": "float32", "shape": [b]},
    ]
    outputs = [
        {"name": "actions", "dtype": "float32", "shape": [b, h, d]},
        {"name": "chain", "dtype": "float32", "shape": [b, k + 1, h, d]},
        {"name": "log_prob", "dtype": "float32", "shape": [b]},
        {"name": "value", "dtype": "float32", "shape": [b]},
    ]
    for spec in inputs + outputs:
        spec["shape"] = [int(x) if not isinstance(x, str) else x for x in spec["shape"]]
    return inputs, outputs


def _cumsum_symbolic(g, self, dim, dtype):
    """aten::cumsum for the legacy exporter, casting a bool input to int64 first.

    PyTorch promotes a bool ``cumsum`` to int64 (LeRobot's VLAs build position ids and 2-D attention
    masks as cumulative sums of bool masks); the stock symbolic emits ONNX ``CumSum`` on the bool
    tensor, which ONNX does not define (the checker refuses the model).
    """
    import onnx

    if dtype is not None and not dtype.node().mustBeNone():
        raise RuntimeError("pirl-export: cumsum with an explicit dtype is not expected in a sampler graph")
    axis = g.op("Constant", value_t=torch.tensor(dim, dtype=torch.int64))
    if self.type().scalarType() == "Bool":
        self = g.op("Cast", self, to_i=onnx.TensorProto.INT64)
    return g.op("CumSum", self, axis)


def _full_symbolic(g, sizes, value, dtype, layout, device, pin_memory=False):
    """aten::full for the legacy exporter, giving an integer fill value its integer dtype.

    ``torch.full(shape, 0)`` is int64 in PyTorch; the stock symbolic makes every dtype-less ``full``
    float32, so SmolVLM's patch position ids (a ``torch.full`` scattered into) come out as floats and
    ONNX refuses the graph. We pass the dtype PyTorch infers and let the stock symbolic do the rest.
    """
    from torch.onnx import symbolic_helper
    from torch.onnx.symbolic_opset9 import full as stock_full

    try:
        from torch.onnx._internal.torchscript_exporter import _type_utils
    except ImportError:  # older torch
        from torch.onnx import _type_utils

    fill = symbolic_helper._maybe_get_const(value, "t")
    if symbolic_helper._is_none(dtype) and isinstance(fill, torch.Tensor) and not fill.is_floating_point():
        dtype = g.op("Constant", value_t=torch.tensor(int(_type_utils.JitScalarType.from_dtype(fill.dtype))))
    return stock_full(g, sizes, value, dtype, layout, device, pin_memory)


@contextlib.contextmanager
def _export_symbolics(opset: int):
    from torch.onnx import symbolic_helper

    functions = {
        "aten::cumsum": symbolic_helper.parse_args("v", "i", "none")(_cumsum_symbolic),
        "aten::full": _full_symbolic,
    }
    for name, fn in functions.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in functions:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def graph_structure_sha256(onnx_path: str | Path) -> str:
    """sha256 of an ONNX model with the weight values left out: nodes, attributes, inputs, outputs,
    and each initializer's name, dtype and dims, but not its data or the model metadata (which holds
    the version). Equal for two exports of the same policy code and config that differ only in
    weights; any change of structure changes it."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for init in model.graph.initializer:
        for field in (
            "raw_data",
            "float_data",
            "int32_data",
            "string_data",
            "int64_data",
            "double_data",
            "uint64_data",
            "external_data",
            "data_location",
        ):
            init.ClearField(field)
    del model.metadata_props[:]
    model.graph.ClearField("doc_string")
    model.ClearField("doc_string")
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def write_manifest(root: str | Path, manifest: dict) -> None:
    """(Re)write ``root/manifest.json`` atomically (temporary file + rename)."""
    tmp = Path(root) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(Path(root) / MANIFEST)


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def export_onnx(
    policy,
    out_dir: str | Path,
    *,
    opset: int = 17,
    batch_size: int | None = None,
    noise_method: str | None = None,
    version: int | str = 0,
    external_data: bool | None = None,
    refit: bool = False,
) -> dict:
    """Export ``policy``'s sampler to ``out_dir``; return the manifest (also written as manifest.json).

    Args:
        policy: a ``PiRLPolicy`` (its device is used for tracing; it is left in its original mode).
        out_dir: created if needed; model.onnx, model.safetensors, config.json, manifest.json are
            (over)written, and a stale model.onnx.data is removed.
        opset: ONNX opset, 13..20.
        batch_size: ``None`` exports a dynamic batch axis; an int fixes it.
        noise_method: sampler baked into the graph; the policy's configured one by default.
        version: policy version recorded in the manifest (and the ONNX metadata).
        external_data: store the weights in model.onnx.data. ``None`` (default) does so only when
            they would not fit the 2 GB protobuf limit.
        refit: graph + external weights split for refitting (see ``split_weights``): frozen.onnx.data
            (bytes that depend only on the frozen weights), trained.onnx.data (the trained tensors,
            rebuilt from ``rl_state_dict`` by ``write_trained_data``) and the manifest's ``refit`` map;
            model.onnx carries no version, so two versions of one graph share model.onnx byte for
            byte. No model.safetensors / config.json: the edge has its own policy (a VLA's full
            state dict is what must not travel every version).
    """
    import onnx

    c = policy.config
    noise_method = noise_method or c.noise_method
    check_noise_method(noise_method)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] (TensorRT 10.3 parses up to {MAX_OPSET}), got {opset}"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (dynamic), got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a manifest exists only for a complete export

    if external_data is None:
        external_data = _state_bytes(policy) > MAX_INLINE_BYTES
    graph = SamplerGraph(policy, noise_method)
    inputs, outputs = io_spec(policy, batch_size)
    in_names, out_names = [s["name"] for s in inputs], [s["name"] for s in outputs]
    # batch 2 for a dynamic export: a traced size-1 dim could be specialised by broadcasting
    args = example_inputs(policy, batch_size or 2)
    dynamic_axes = None if batch_size is not None else {n: {0: BATCH_AXIS} for n in in_names + out_names}

    was_training = policy.training
    policy.eval()
    started = time.perf_counter()
    # a backbone may need tracer-friendly stand-ins for library code while tracing (see vla.py)
    backbone_context = getattr(policy.backbone, "export_context", contextlib.nullcontext)
    try:
        with (
            tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp,
            torch.no_grad(),
            warnings.catch_warnings(),
            backbone_context(),
        ):
            # Benign for this graph (tests vary every input against PyTorch): the tracer flags the
            # Python shape check in sample_chain and ``torch.as_tensor`` on tensors that are already
            # graph values; the legacy exporter is chosen on purpose (TensorRT-friendly graphs).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            raw = Path(tmp) / MODEL_FILE
            with _export_symbolics(opset):
                torch.onnx.export(
                    graph,
                    args,
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                    export_params=True,
                )
            model = onnx.load(str(raw), load_external_data=True)
        # the legacy exporter drops graph inputs the noise method never reads (flow_ode: stochastic
        # and noise_level; flow_noise: noise_level): the manifest lists the model's real inputs
        graph_inputs = {i.name for i in model.graph.input}
        dropped = [s["name"] for s in inputs if s["name"] not in graph_inputs]
        inputs = [s for s in inputs if s["name"] in graph_inputs]
        model.producer_name = "lerobot_policy_pi_rl"
        meta = {
            "policy_type": c.type,
            "version": str(version),
            "noise_method": noise_method,
            "num_denoise_steps": str(c.num_denoise_steps),
            "chunk_size": str(c.chunk_size),
        }
        if refit:
            del meta["version"]  # per version it is in manifest.json: model.onnx stays the same bytes
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        if not external_data and model.ByteSize() > MAX_INLINE_BYTES:
            external_data = True
        for stale in (EXTERNAL_DATA_FILE, FROZEN_DATA_FILE, TRAINED_DATA_FILE):
            (out / stale).unlink(missing_ok=True)
        refit_map = None
        if refit:
            external_data = True
            refit_map = split_weights(model, out, policy.rl_state_dict())
            onnx.save_model(model, str(out / MODEL_FILE))  # every initializer already points to its file
        else:
            onnx.save_model(
                model,
                str(out / MODEL_FILE),
                save_as_external_data=external_data,
                all_tensors_to_one_file=True,
                location=EXTERNAL_DATA_FILE,
                size_threshold=1024,
            )
        del model
        onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)
    finally:
        policy.train(was_training)
    export_seconds = time.perf_counter() - started

    if refit:
        files = [MODEL_FILE, FROZEN_DATA_FILE, TRAINED_DATA_FILE]
    else:
        policy.save_pretrained(out)  # config.json + model.safetensors
        files = [MODEL_FILE] + ([EXTERNAL_DATA_FILE] if external_data else []) + ["model.safetensors", "config.json"]
    manifest = {
        "format": MANIFEST_FORMAT,
        "policy_type": c.type,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "exporter": f"torch {torch.__version__} (legacy TorchScript, dynamo=False), onnx {onnx.__version__}",
        "opset": opset,
        "precision": "fp32",
        "graph_structure_sha256": graph_structure_sha256(out / MODEL_FILE),
        "noise_method": noise_method,
        "hybrid": bool(c.hybrid),
        "noise_level": float(c.noise_level),
        "num_denoise_steps": c.num_denoise_steps,
        "chunk_size": c.chunk_size,
        "n_action_steps": c.n_action_steps,
        "action_dim": c.action_dim,
        "model_action_dim": c.model_action_dim,
        "critic_placement": c.critic_placement,
        "batch_size": batch_size,
        "external_data": external_data,
        "observation_inputs": {key: input_name(key) for key in observation_keys(c)},
        "inputs": inputs,
        "unused_inputs": dropped,
        "outputs": outputs,
        "export_seconds": round(export_seconds, 3),
        "artifacts": {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size} for f in files},
    }
    if refit_map is not None:
        manifest["refit"] = refit_map
    write_manifest(out, manifest)
    return manifest


def _tensor_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _trained_bytes(tensor: Tensor, transform: str) -> bytes:
    """The bytes of trained tensor ``tensor`` as the exported graph holds it: float32, transposed when
    the exporter's constant folding transposed it (a Linear applied to a 3-D input becomes MatMul
    with the folded transpose of its weight as a new initializer)."""
    t = tensor.detach().to("cpu", torch.float32)
    if transform == "transpose":
        t = t.t()
    elif transform != "identity":
        raise ValueError(f"unknown refit transform {transform!r}")
    return t.contiguous().numpy().tobytes()


def split_weights(model, out: Path, trained: dict[str, Tensor]) -> dict:
    """Move every initializer of ``model`` (an in-memory ONNX model) to one of two external files in
    ``out`` and return the refit map for the manifest.

    An initializer whose bytes are those of a trained tensor (``trained``: ``rl_state_dict``), as is or
    transposed, goes to TRAINED_DATA_FILE and is mapped to that tensor's key; everything else goes to
    FROZEN_DATA_FILE in graph order, so that file's bytes depend only on the frozen weights and the
    graph. Matching by value, not by name, is what survives the exporter's constant folding (which
    renames a transposed weight ``onnx::MatMul_<n>``) and its merging of equal initializers; an
    initializer folded from a trained tensor in another way would land in the frozen file, which
    then changes every version (correct, only not saved: ``unmatched_trained_keys`` lists trained
    tensors found nowhere, and the learner logs them). The trained file is written by
    ``write_trained_data`` from ``trained`` itself, the very function the edge runs on a version's
    model.safetensors, so a version's trained file is that function of its trained tensors."""
    from onnx import TensorProto, numpy_helper

    by_digest: dict[str, tuple[str, str]] = {}
    digests: dict[str, set[str]] = {}  # key -> its digests (as is, transposed)
    for key, tensor in trained.items():
        if not tensor.is_floating_point():
            continue
        digests[key] = {_tensor_digest(_trained_bytes(tensor, "identity"))}
        if tensor.dim() == 2:
            t = _tensor_digest(_trained_bytes(tensor, "transpose"))
            digests[key].add(t)
            by_digest.setdefault(t, (key, "transpose"))
        by_digest[_tensor_digest(_trained_bytes(tensor, "identity"))] = (key, "identity")  # preferred on a tie
    entries, found, offset = [], set(), 0
    with open(out / FROZEN_DATA_FILE, "wb") as frozen:
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            if array.size == 0:
                continue  # nothing to store: stays inline (and identical every version)
            data = np.ascontiguousarray(array).tobytes()
            match = by_digest.get(_tensor_digest(data)) if init.data_type == TensorProto.FLOAT else None
            if match is not None:
                key, transform = match
                entries.append(
                    {"initializer": init.name, "key": key, "transform": transform, "offset": 0, "length": len(data)}
                )
                found.add(_tensor_digest(data))
                location, where = TRAINED_DATA_FILE, None
            else:
                location, where = FROZEN_DATA_FILE, frozen.tell()
                frozen.write(data)
            _point_to_file(init, location, where, len(data))
    for entry in entries:  # trained file: the graph's order, packed
        entry["offset"] = offset
        offset += entry["length"]
    by_name = {e["initializer"]: e for e in entries}
    for init in model.graph.initializer:
        if init.name in by_name:
            e = by_name[init.name]
            _point_to_file(init, TRAINED_DATA_FILE, e["offset"], e["length"])
    sha = write_trained_data(trained, entries, out / TRAINED_DATA_FILE)
    return {
        "frozen_data": FROZEN_DATA_FILE,
        "trained_data": TRAINED_DATA_FILE,
        "trained_data_sha256": sha,
        "tensors": entries,
        # trained tensors whose values are in no initializer (as is or transposed): folded into others.
        # Equal trained tensors (e.g. norm weights still at their init) are found in one shared
        # initializer (the exporter merges equal ones); once they differ the graph changes with them.
        "unmatched_trained_keys": sorted(k for k, d in digests.items() if not d & found),
    }


def _point_to_file(init, location: str, offset: int | None, length: int) -> None:
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        init.ClearField(field)
    del init.external_data[:]
    init.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        if v is not None:
            entry = init.external_data.add()
            entry.key, entry.value = k, str(v)


def write_trained_data(trained: dict[str, Tensor], entries: list[dict], path: str | Path) -> str:
    """Write the trained data file of a refit export from trained tensors (``rl_state_dict`` or a
    version's model.safetensors) and the manifest's ``refit.tensors`` map; return its sha256. A key the
    map names but ``trained`` lacks, or a tensor of another size, is a ValueError (the version does
    not belong to this graph)."""
    h = hashlib.sha256()
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        for e in sorted(entries, key=lambda e: e["offset"]):
            if e["key"] not in trained:
                raise ValueError(f"refit: trained tensor {e['key']!r} (initializer {e['initializer']!r}) is missing")
            data = _trained_bytes(trained[e["key"]], e["transform"])
            if len(data) != e["length"] or f.tell() != e["offset"]:
                raise ValueError(
                    f"refit: {e['key']} gives {len(data)} bytes at {f.tell()}, the graph expects "
                    f"{e['length']} at {e['offset']}"
                )
            f.write(data)
            h.update(data)
    tmp.replace(path)
    return h.hexdigest()


def load_manifest(path: str | Path) -> tuple[Path, dict]:
    """(export directory, manifest) for an export directory or its model.onnx."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {root}: not a pirl-export directory (export it with pirl-export)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{mpath}: unsupported manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        )
    return root, manifest


def verify_artifacts(root: str | Path, manifest: dict) -> None:
    """Raise ArtifactIntegrityError unless every artifact listed in the manifest matches its sha256."""
    root = Path(root)
    for name, info in manifest["artifacts"].items():
        file = root / name
        if not file.is_file():
            raise ArtifactIntegrityError(f"{file}: listed in {MANIFEST} but missing")
        got = sha256_file(file)
        if got != info["sha256"]:
            raise ArtifactIntegrityError(
                f"{file}: sha256 mismatch (manifest {info['sha256']}, file {got}): the artifact is corrupted "
                "or was modified after export; refusing to load it (re-export with pirl-export)"
            )


def _resolve_providers(providers) -> list[str]:
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    available = set(ort.get_available_providers())
    chosen = []
    for p in providers:
        name = _PROVIDER_ALIASES.get(p.lower(), p) if isinstance(p, str) else p
        if name not in available:
            log.warning("onnxruntime provider %s is not available (have %s); skipping it", name, sorted(available))
            continue
        if name not in chosen:
            chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # fallback for ops another provider does not take
    return chosen


def make_feeds(
    manifest: dict, obs: dict, initial_noise, step_noise, stochastic, noise_level=None
) -> dict[str, np.ndarray]:
    """The graph's input dict (name -> contiguous array of the manifest's dtype: float32, and for VLA
    backbones int64 token ids and a bool attention mask), validated against the manifest's shapes;
    usable with any runtime of the exported model (ONNX Runtime, TensorRT). Inputs the graph does
    not read (``unused_inputs``) are left out; ``noise_level`` may be a scalar, ``[B]`` or None (the
    manifest's default)."""
    keys = list(manifest["observation_inputs"])
    shapes = {s["name"]: s["shape"] for s in manifest["inputs"]}
    dtypes = {s["name"]: s["dtype"] for s in manifest["inputs"]}
    missing = [k for k in keys if k not in obs]
    if missing:
        raise KeyError(f"observation is missing {missing}; the exported sampler takes {keys}")
    batch = np.shape(initial_noise)[0]
    if noise_level is None:
        noise_level = manifest["noise_level"]
    level = np.asarray(noise_level, dtype=np.float32)
    if level.ndim == 0:
        level = np.full((batch,), float(level), dtype=np.float32)
    raw = {input_name(k): obs[k] for k in keys}
    raw.update(initial_noise=initial_noise, step_noise=step_noise, stochastic=np.asarray(stochastic), noise_level=level)
    feeds = {}
    for name, value in raw.items():
        if name not in shapes:
            continue
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtypes[name]))
        want = shapes[name]
        if arr.ndim != len(want) or any(
            not isinstance(w, str) and w != a for w, a in zip(want, arr.shape, strict=False)
        ):
            raise ValueError(f"input {name!r}: expected shape {want}, got {list(arr.shape)}")
        if arr.shape[0] != batch:
            raise ValueError(f"input {name!r} has batch {arr.shape[0]}, initial_noise has {batch}")
        feeds[name] = arr
    return feeds


class OnnxSampler:
    """Run an exported sampler with ONNX Runtime.

    ``path``: an export directory or its model.onnx. Every artifact's sha256 is checked against
    manifest.json before the model is loaded (``ArtifactIntegrityError`` on mismatch).
    ``providers``: ONNX Runtime providers (names or ``"cpu"``/``"cuda"``/``"tensorrt"``); CPU by
    default, unavailable ones are skipped with a warning and CPU is always the last fallback.
    ``threads``: intra-op threads (ONNX Runtime's default when None).
    """

    def __init__(self, path: str | Path, providers=None, *, threads: int | None = None):
        import onnxruntime as ort

        self.root, self.manifest = load_manifest(path)
        verify_artifacts(self.root, self.manifest)
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.root / MODEL_FILE), sess_options=opts, providers=_resolve_providers(providers)
        )
        self.providers = self.session.get_providers()
        self.observation_keys = list(self.manifest["observation_inputs"])

    def feeds(self, obs: dict, initial_noise, step_noise, stochastic, noise_level=None) -> dict[str, np.ndarray]:
        """The ONNX Runtime input dict, validated against the manifest (``make_feeds``)."""
        return make_feeds(self.manifest, obs, initial_noise, step_noise, stochastic, noise_level)

    def run(self, obs: dict, initial_noise, step_noise, stochastic, noise_level=None) -> dict[str, np.ndarray]:
        """One batch of chunks: ``{"actions", "chain", "log_prob", "value"}`` (numpy float32).

        ``obs`` maps feature keys (``"observation.state"``) to normalised arrays; ``stochastic`` may be
        bool or float; ``noise_level`` a scalar or ``[B]`` (the manifest's default when None).
        """
        results = self.session.run(list(OUTPUTS), self.feeds(obs, initial_noise, step_noise, stochastic, noise_level))
        return dict(zip(OUTPUTS, results, strict=True))


@dataclass
class ExportConfig:
    """pirl-export: export a pi_rl policy's sampler to ONNX (+ weights and a sha256 manifest)."""

    # a LeRobot pretrained_model directory (required)
    policy_path: str | None = None
    # output directory (required)
    out: str | None = None
    # sampler baked into the graph (default: the policy's configured one)
    noise_method: str | None = None
    # ONNX opset
    opset: int = 17
    # fix the batch axis (default: dynamic)
    batch_size: int | None = None
    # policy version recorded in the manifest
    version: int = 0

    def __post_init__(self):
        for name in ("policy_path", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        if self.noise_method is not None and self.noise_method not in NOISE_METHODS:
            raise ValueError(f"noise_method: must be one of {NOISE_METHODS} (got {self.noise_method!r})")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"opset: must be in [{MIN_OPSET}, {MAX_OPSET}] (got {self.opset})")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1 (got {self.batch_size})")


def main() -> None:
    from pirl.cli import parse_config, run_cli

    args = parse_config(ExportConfig, prog="pirl-export")

    def _run() -> int:
        from lerobot_policy_pi_rl.sft import load_policy

        # the edge's rule: a sampler override is applied at load (noise_steer gives a checkpoint without one a
        # fresh steering head)
        policy, _, _ = load_policy(
            args.policy_path, **({"noise_method": args.noise_method} if args.noise_method else {})
        )
        started = time.perf_counter()
        manifest = export_onnx(
            policy,
            args.out,
            opset=args.opset,
            batch_size=args.batch_size,
            noise_method=args.noise_method,
            version=args.version,
        )
        total = time.perf_counter() - started
        out = Path(args.out)
        print(
            f"exported {manifest['policy_type']} v{manifest['version']} sampler ({manifest['noise_method']}, "
            f"K={manifest['num_denoise_steps']}, chunk {manifest['chunk_size']}, opset {manifest['opset']}, "
            f"batch {manifest['batch_size'] or 'dynamic'}) to {out}"
        )
        for name, info in manifest["artifacts"].items():
            print(f"  {name:<20} {info['bytes']:>12,d} B  sha256 {info['sha256'][:16]}...")
        print(f"  {MANIFEST}")
        print(f"export took {manifest['export_seconds']:.2f}s (ONNX trace + check), {total:.2f}s in all")
        return 0

    run_cli(_run)


if __name__ == "__main__":
    main()
