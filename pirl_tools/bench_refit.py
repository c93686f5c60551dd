"""pirl-bench refit: bytes that travel per policy version with the sampler's ONNX export, the full export
(every weight in the export, every version) beside the refit export (graph + frozen data kept by hash,
trained data written on the edge from model.safetensors).

    pirl-bench refit --out=DIR [--backbone=smolvla --size=reduced --smolvlm_config=offline]

In one process, no network: the learner's own version store (learner.versions, ``export_onnx``) and
the edge's own staging (edge.weight_sync, FetchArtifact's chunks read from the store) and ONNX Runtime
backend (edge.backends, golden-input check against PyTorch). Version 2 is version 1 with every trained
tensor moved, version 3 is version 2 moved again; ``bytes_after_first`` is version 3's. For the full
export, what an edge downloads for a version is model.safetensors plus every export file whose sha256
changed (the staging reuses files by hash in both cases: the comparison is of the export layouts, not
of the reuse). Writes DIR/refit.json.
"""

from __future__ import annotations

import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

from pirl.cli import write_json


@dataclass
class BenchRefitConfig:
    """pirl-bench refit: bytes per version of the full ONNX export vs the refit export; writes OUT/refit.json."""

    # output directory (required)
    out: str | None = None
    # the policy: mlp (the built-in task's default pi_rl policy) or a VLA (pi0, pi05, smolvla), randomly initialised
    backbone: str = "mlp"
    # VLA size: full (the released architecture) or reduced (the tests' CPU size); default: full with CUDA
    size: str | None = None
    # SmolVLA: SmolVLM2-500M's architecture from the hub or from the offline copy (offline: no network)
    smolvlm_config: str = "offline"
    # VLA cameras (default 3 at full size, 1 reduced)
    cameras: int | None = None
    # VLA K (default 10 at full size, 4 reduced)
    num_denoise_steps: int | None = None
    # policy init seed
    seed: int = 0
    # the learner's chunk size (--sync.chunk_bytes); a version no bigger than one chunk rides whole, inline
    chunk_bytes: int = 2 << 20

    def __post_init__(self):
        from learner.versions import check_chunk_bytes
        from pirl_tools.common import check_policy_choice

        check_chunk_bytes(self.chunk_bytes, "chunk_bytes")

        if not self.out:
            raise ValueError("out: required (the output directory)")
        check_policy_choice(self.backbone, self.size, self.smolvlm_config)


def _move(policy, seed: int) -> None:
    """A new version: every trained tensor moves (a seeded step), the frozen ones stay."""
    import torch

    trained = set(policy.rl_state_names())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name in trained:
                p.add_((1e-3 * torch.randn(p.shape, generator=g)).to(p.dtype))


VERSIONS = (1, 2, 3)  # 1: the start; 2 and 3: updates (2 also shows the first update's graph change, if any)


def measure(policy, work: Path, chunk_bytes: int = 2 << 20) -> dict:
    """Versions 1..3 of ``policy`` (moved in place) through both layouts; the bytes of each update and
    the edge's refit of the last version (its golden-input check against PyTorch)."""
    from safetensors.torch import load, load_file, save_file

    from edge.backends import OnnxRuntimeBackend, check_golden
    from edge.weight_sync import WeightStaging
    from learner.versions import VersionStore
    from pirl.export.onnx_export import export_onnx

    last = VERSIONS[-1]
    version_1 = {k: t.detach().clone() for k, t in policy.rl_state_dict().items()}
    # full export (what every version carried before)
    full, full_bytes, full_changed = {}, {}, {}
    for v in VERSIONS:
        if v > 1:
            _move(policy, v)
        d = work / "full" / f"v{v}"
        started = time.perf_counter()
        full[v] = export_onnx(policy, d / "onnx", version=v)
        full[v]["_seconds"] = time.perf_counter() - started
        save_file(policy.rl_state_dict(), str(d / "model.safetensors"))
        if v > 1:
            full_changed[v] = {
                n: a["bytes"]
                for n, a in full[v]["artifacts"].items()
                if full[v - 1]["artifacts"].get(n, {}).get("sha256") != a["sha256"]
            }
            full_bytes[v] = (d / "model.safetensors").stat().st_size + sum(full_changed[v].values())
    trained_bytes = (work / "full" / f"v{last}" / "model.safetensors").stat().st_size
    full_version_bytes = sum(a["bytes"] for a in full[last]["artifacts"].values()) + trained_bytes

    # refit export through the learner's store and the edge's staging
    policy.load_state_dict(version_1, strict=False)  # back to version 1's weights
    store = VersionStore(work / "store", keep=2, chunk_bytes=chunk_bytes)
    staging = WeightStaging(work / "edge")
    received, inline, seconds, anns = {}, {}, {}, {}
    for v in VERSIONS:
        if v > 1:
            _move(policy, v)
        started = time.perf_counter()
        anns[v] = store.publish(policy, v, export_onnx=True)
        seconds[v] = time.perf_counter() - started
        if not anns[v].chunked:  # a version no bigger than one chunk rides whole in its announcement
            received[v], inline[v] = anns[v].ByteSize(), True
            continue
        before = staging.stats["bytes_received"]
        staging.fetch(
            anns[v],
            lambda name, offset, v=v: (c.SerializeToString() for c in store.read_chunks(v, name, offset)),
        )
        received[v], inline[v] = staging.stats["bytes_received"] - before, False
    refit_listed = {a.name: a.size_bytes for a in anns[last].manifest.artifacts}
    learner_disk_last = sum(
        p.stat().st_size for p in store.folder(last).rglob("*") if p.is_file() and p.stat().st_nlink == 1
    )

    # the edge's refit of the last version: the policy holds its weights, the session its graph + frozen data
    if inline[last]:
        state, files = load(anns[last].weights), dict(anns[last].files)
    else:
        folder = staging.folder(last)
        state = load_file(str(folder / "model.safetensors"))
        files = {
            a.name: (folder / a.name).read_bytes()
            for a in anns[last].manifest.artifacts
            if a.name != "model.safetensors"
        }
    if sorted(state) != sorted(policy.rl_state_dict()):
        raise RuntimeError("the staged model.safetensors does not hold the trained tensors")
    policy.load_state_dict(state, strict=False)  # what the edge's worker does before preparing its backend
    backend = OnnxRuntimeBackend(policy, workdir=work / "ort")
    started = time.perf_counter()
    backend.prepare(last, files)
    prepare_seconds = time.perf_counter() - started
    errors = check_golden(backend, policy)  # GoldenMismatchError if the refit were not this version
    refit = backend.session.manifest["refit"]
    return {
        "trained_bytes": trained_bytes,
        "full_export": {
            "version_bytes": full_version_bytes,
            "bytes_per_update": full_bytes,
            "bytes_after_first": full_bytes[last],
            "changed_files": full_changed[last],
            "export_seconds": round(full[last]["_seconds"], 2),
        },
        "refit_export": {
            "version_bytes": sum(refit_listed.values()),
            "listed": refit_listed,
            "bytes_first": received[1],
            "bytes_per_update": {v: received[v] for v in VERSIONS[1:]},
            "bytes_after_first": received[last],
            "inline": inline[last],
            "bytes_reused_on_edge": staging.stats["bytes_reused"],
            "learner_disk_bytes_not_shared": learner_disk_last,
            "publish_seconds": round(seconds[last], 2),
            "edge_prepare_seconds": round(prepare_seconds, 3),
            "edge_prepare_method": backend.last_prepare.get("method"),
            "golden_max_abs_error": max(errors.values()) if errors else None,
            "unmatched_trained_keys": refit["unmatched_trained_keys"],
            "transposed_by_folding": sum(e["transform"] == "transpose" for e in refit["tensors"]),
        },
    }


def run(cfg: BenchRefitConfig, command: str) -> int:
    from pirl_tools.bench import _infer_policy
    from pirl_tools.common import run_report

    args = types.SimpleNamespace(
        policy_path=None,
        backbone=cfg.backbone,
        size=cfg.size,
        smolvlm_config=cfg.smolvlm_config,
        cameras=cfg.cameras,
        num_denoise_steps=cfg.num_denoise_steps,
        seed=cfg.seed,
    )
    policy, description = _infer_policy(args)
    policy.eval()
    with tempfile.TemporaryDirectory(prefix="pirl-bench-refit-") as tmp:
        figures = measure(policy, Path(tmp), cfg.chunk_bytes)
    result = {**run_report(command), "policy": description, "chunk_bytes": cfg.chunk_bytes, **figures}
    write_json(Path(cfg.out) / "refit.json", result)
    f, r = figures["full_export"], figures["refit_export"]
    print(
        f"{description}: per version after the first, full export {f['bytes_after_first']:,d} B, "
        f"refit {r['bytes_after_first']:,d} B (trained tensors {figures['trained_bytes']:,d} B); "
        f"edge refit {r['edge_prepare_seconds']} s, golden max error {r['golden_max_abs_error']:.2g}"
    )
    return 0
