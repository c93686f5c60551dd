"""The learner's versioned store of published policy versions, served to robots in chunks.

Each version is a folder ``<root>/v<version>/`` (root: the learner's ``artifacts`` folder) holding
its artifacts (``model.safetensors``: the tensors PI-RL trains, in the policy's own dtype; ``onnx/*``
when the sampler is exported) and ``announce.pb``, the version's announcement (pirl.v1.PolicyUpdate,
chunked: manifest, per-chunk sha256 lists, no bytes). A version is written into
``v<version>.partial/`` and renamed into place once complete, so a crash never leaves a half version
that could be served. Robots fetch the bytes with FetchArtifact, read from disk by offset: the
learner never holds a version's bytes in memory (no second copy of a multi-GB export), and after a
restart (``--resume``) the same version is announced and served again from the same files, bytes
and hashes identical, so a robot resumes a download it had half done. The newest ``keep`` versions
are kept.

The export is a refit export (``pirl.export.onnx_export.export_onnx(refit=True)``): ``onnx/model.onnx``
(the graph, no version inside), ``onnx/frozen.onnx.data`` (every weight PI-RL does not train) and
``onnx/manifest.json``; the trained data file is not kept nor announced (the edge writes it from the
version's model.safetensors with the manifest's map). A file whose name and sha256 a kept version
already has (the graph and frozen data while they do not change) is a hard link to that version's
copy: one copy on disk, and pruning a version removes only its own link.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pirl.v1 import pirl_pb2

log = logging.getLogger(__name__)

# 2 MiB: every gRPC message of a sync stays a few MB at most, whatever the model's size, and a chunk
# is large enough that per-message overhead (TLS record, protobuf framing, one sha256) is negligible
DEFAULT_CHUNK_BYTES = 2 << 20
MIN_CHUNK_BYTES = 1 << 10
MAX_CHUNK_BYTES = 16 << 20  # a chunk is one gRPC message: larger ones are what chunking exists to avoid
ANNOUNCE = "announce.pb"
PARTIAL = ".partial"
_VERSION_DIR = re.compile(r"v(\d+)$")


@dataclass
class SyncSettings:
    """How policy versions travel to robots: the ``sync`` group of ``pirl-learner`` (``--sync.<field>=...``)."""

    # bytes per chunk of a version's files: each FetchArtifact message carries one (a few MB at most, whatever
    # the model's size); a version no bigger than one chunk rides inline in its announcement
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self):
        check_chunk_bytes(self.chunk_bytes, "sync.chunk_bytes")


def check_chunk_bytes(chunk_bytes: int, field_name: str = "chunk_bytes") -> int:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"{field_name}: must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}] bytes (got {chunk_bytes})")
    return chunk_bytes


def hash_file(path: Path, chunk_bytes: int) -> tuple[str, list[str], int]:
    """(sha256 of the whole file, sha256 of each consecutive chunk, size), in one read."""
    whole, chunks, size = hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            whole.update(data)
            chunks.append(hashlib.sha256(data).hexdigest())
            size += len(data)
    return whole.hexdigest(), chunks, size


def version_dir_name(version: int) -> str:
    return f"v{version:06d}"


class VersionStore:
    """Published versions on disk (see the module docstring); thread-safe for concurrent readers."""

    def __init__(self, root: str | Path, *, keep: int = 3, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.chunk_bytes = check_chunk_bytes(int(chunk_bytes))
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.glob(f"*{PARTIAL}"):  # a version whose writing a crash interrupted
            shutil.rmtree(p, ignore_errors=True)

    def folder(self, version: int) -> Path:
        return self.root / version_dir_name(version)

    def versions(self) -> list[int]:
        """Complete versions on disk, oldest first."""
        found = []
        for p in self.root.iterdir() if self.root.is_dir() else ():
            m = _VERSION_DIR.match(p.name)
            if m and (p / ANNOUNCE).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def announcement(self, version: int) -> pirl_pb2.PolicyUpdate | None:
        """The stored announcement of ``version`` (None when it is not on disk)."""
        path = self.folder(version) / ANNOUNCE
        if not path.is_file():
            return None
        return pirl_pb2.PolicyUpdate.FromString(path.read_bytes())

    def publish(
        self,
        policy,
        version: int,
        *,
        frozen_sha256: str | None = None,
        export_onnx: bool = False,
        engines=None,
    ) -> pirl_pb2.PolicyUpdate:
        """Write ``version`` (unless it is already on disk: a restarted learner re-announces the very
        files robots may be half-way through) and return its announcement, published now."""
        announce = self.announcement(version)
        if announce is not None and export_onnx != any(a.name.startswith("onnx/") for a in announce.manifest.artifacts):
            announce = None  # written before with(out) the export the learner now publishes: write it again
        if announce is None:
            announce = self._write(policy, version, frozen_sha256 or policy.frozen_sha256(), export_onnx, engines)
        else:
            log.info("version %d is already in %s: serving the same files again", version, self.folder(version))
        self.prune()
        announce.published_unix_s = time.time()
        if sum(a.size_bytes for a in announce.manifest.artifacts) <= announce.chunk_bytes:
            # the whole version fits in one chunk: it rides in its announcement (one message, no
            # larger than a chunk, and no round trip per artifact)
            announce = self._inline(announce)
        return announce

    def _inline(self, announce: pirl_pb2.PolicyUpdate) -> pirl_pb2.PolicyUpdate:
        msg = pirl_pb2.PolicyUpdate()
        msg.CopyFrom(announce)
        msg.chunked, msg.chunk_bytes = False, 0
        folder = self.folder(announce.version)
        for a in msg.manifest.artifacts:
            del a.chunk_sha256[:]
            data = (folder / a.name).read_bytes()
            if a.name == "model.safetensors":
                msg.weights = data
            else:
                msg.files[a.name] = data
        return msg

    def _write(self, policy, version: int, frozen_sha256: str, export_onnx: bool, engines) -> pirl_pb2.PolicyUpdate:
        from safetensors.torch import save_file

        final = self.folder(version)
        partial = final.with_name(final.name + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a folder without its announcement: never served
        partial.mkdir(parents=True)
        # the trained tensors in the dtype the policy runs them in (bf16 stays bf16), straight to disk
        save_file(policy.rl_state_dict(), str(partial / "model.safetensors"))
        if export_onnx:
            _export(policy, partial / "onnx", version, engines)
        files = [partial / "model.safetensors"]
        if (partial / "onnx").is_dir():
            files += sorted(p for p in (partial / "onnx").iterdir() if p.is_file())
        artifacts, shared = [], 0
        kept = {}  # (name, sha256) -> the file of a kept version holding those bytes
        for v in self.versions():
            old = self.announcement(v)
            if old is not None and old.chunk_bytes == self.chunk_bytes:
                for a in old.manifest.artifacts:
                    kept[(a.name, a.sha256)] = self.folder(v) / a.name
        for path in files:
            sha, chunks, size = hash_file(path, self.chunk_bytes)
            name = path.relative_to(partial).as_posix()
            same = kept.get((name, sha))
            if name != "model.safetensors" and same is not None and _link(same, path):
                shared += size  # e.g. the graph and frozen data of a refit export: one copy on disk
            artifacts.append(pirl_pb2.Artifact(name=name, sha256=sha, size_bytes=size, chunk_sha256=chunks))
        announce = pirl_pb2.PolicyUpdate(
            version=version,
            manifest=pirl_pb2.Manifest(policy_version=version, artifacts=artifacts),
            trained_only=True,
            frozen_sha256=frozen_sha256,
            chunked=True,
            chunk_bytes=self.chunk_bytes,
        )
        (partial / ANNOUNCE).write_bytes(announce.SerializeToString())  # last: it marks the version complete
        partial.rename(final)
        log.info(
            "version %d written to %s: %s (%d B shared with kept versions)",
            version,
            final,
            ", ".join(f"{a.name} {a.size_bytes} B" for a in artifacts),
            shared,
        )
        return announce

    def prune(self) -> None:
        """Keep the newest ``keep`` versions (a robot mid-download of a pruned one gets NOT_FOUND and
        takes the newer announcement)."""
        for v in self.versions()[: -self.keep]:
            shutil.rmtree(self.folder(v), ignore_errors=True)

    def artifact(self, version: int, name: str) -> tuple[Path, pirl_pb2.Artifact, int]:
        """(file, manifest entry, chunk size) of artifact ``name`` of ``version``; KeyError when there is
        none (only names listed in the version's manifest are ever opened: no path from a request). The
        chunk size is the one the version was hashed with (a restart with another sync.chunk_bytes
        serves the versions already written with theirs)."""
        announce = self.announcement(version)
        if announce is None:
            raise KeyError(f"version {version} is not kept by the learner")
        for a in announce.manifest.artifacts:
            if a.name == name:
                return self.folder(version) / a.name, a, announce.chunk_bytes
        raise KeyError(f"version {version} has no artifact {name!r}")

    def read_chunks(self, version: int, name: str, offset: int) -> Iterator[pirl_pb2.ArtifactChunk]:
        """The chunks of an artifact from ``offset`` (a chunk boundary) on, read from disk one at a time.
        KeyError: no such version / artifact; ValueError: a bad offset."""
        path, art, chunk_bytes = self.artifact(version, name)
        if offset < 0 or offset % chunk_bytes or offset > art.size_bytes:
            raise ValueError(
                f"offset {offset} is not a chunk boundary (multiple of {chunk_bytes}) within "
                f"{name} ({art.size_bytes} bytes)"
            )
        with open(path, "rb") as f:  # opened before a prune could remove it: the reads still succeed
            f.seek(offset)
            while data := f.read(chunk_bytes):
                yield pirl_pb2.ArtifactChunk(offset=offset, data=data, sha256=hashlib.sha256(data).hexdigest())
                offset += len(data)


def _export(policy, out: Path, version: int, engines) -> None:
    """The sampler's ONNX export (and a TensorRT engine of it when ``engines`` is given) into ``out``."""
    from pirl.export.onnx_export import export_onnx

    manifest = export_onnx(policy, out, version=version, refit=True)
    refit = manifest["refit"]
    if refit["unmatched_trained_keys"]:  # folded into other initializers: those land in the frozen data
        log.warning(
            "version %d: trained tensors %s are not initializers of the export as they are; the frozen "
            "data file then changes with them and travels every version",
            version,
            refit["unmatched_trained_keys"],
        )
    try:
        if engines is not None:
            publish_engine(engines, out, manifest, version)
    finally:
        # the edge writes the trained data from the version's model.safetensors (the same tensors,
        # onnx_export.write_trained_data): they travel once, in the policy's dtype
        (out / refit["trained_data"]).unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> bool:
    """Replace ``dst`` by a hard link to ``src`` (same bytes, checked by the caller's sha256): a kept
    version's copy is shared, not duplicated. Pruning a version removes only its own link."""
    tmp = dst.with_name(dst.name + ".link")
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or no hard links: keep the copy
        return False
    tmp.replace(dst)
    return True


def publish_engine(engines, out: Path, manifest: dict, version: int) -> None:
    """A TensorRT engine of the export in ``out`` (``trt_engine.EnginePublisher``); a failure is logged, not raised."""
    try:
        entry = engines.publish(out, manifest)
        log.info(
            "version %d: TensorRT engine %s by %s in %.1fs",
            version,
            entry["sha256"][:12],
            entry["method"],
            entry["seconds"],
        )
    except Exception as e:  # noqa: BLE001  the version is still published, without an engine
        log.error(
            "version %d: no TensorRT engine published (%s: %s); edges build their own", version, type(e).__name__, e
        )
