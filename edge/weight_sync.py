"""Chunked, resumable, hash-checked download of a policy version (the edge half of learner.versions).

A chunked version's announcement lists every artifact with its size, its sha256 and the sha256 of
each of its chunks. Each artifact is downloaded into a staging file ``<root>/v<version>/<name>.part``:
every chunk is checked against the announcement before it is written (a bad one is refused and
fetched again, at most ``chunk_retries`` times, after which the version is refused and the robot
keeps serving the one it has). After a disconnect or a learner restart the download resumes at the
end of the chunks already staged, re-verified from disk first (a torn write is cut off). A complete
file must match the artifact's sha256 before it is renamed to ``<name>`` and may be loaded (as
safetensors only). Old versions' folders are pruned.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from google.protobuf.message import DecodeError

from pirl.v1 import pirl_pb2

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 16 << 20  # a learner announcing larger chunks is refused (messages stay a few MB)
PART = ".part"
DIGEST = ".sha256"  # beside a verified file: its sha256, so a later version can tell it is unchanged cheaply


class VersionRefusedError(ValueError):
    """The version cannot be used (bad announcement, chunks that keep failing their hash, a file
    that does not match its sha256): the robot keeps serving the version it has."""


def _safe_name(name: str) -> bool:
    """An artifact name is a relative path inside the version's folder (no '..', not absolute)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and p.parts[0] != ""


def check_announcement(update: pirl_pb2.PolicyUpdate) -> None:
    """VersionRefusedError unless ``update`` is a well-formed chunked announcement."""
    cb = update.chunk_bytes
    if not update.chunked or not 0 < cb <= MAX_CHUNK_BYTES:
        raise VersionRefusedError(f"chunk size {cb} outside (0, {MAX_CHUNK_BYTES}]")
    if update.manifest.policy_version != update.version:
        raise VersionRefusedError(f"manifest of version {update.manifest.policy_version} announced as {update.version}")
    names = [a.name for a in update.manifest.artifacts]
    if "model.safetensors" not in names or len(set(names)) != len(names):
        raise VersionRefusedError(f"manifest lists {names}: needs model.safetensors once, no duplicates")
    for a in update.manifest.artifacts:
        if not _safe_name(a.name):
            raise VersionRefusedError(f"artifact name {a.name!r} is not a relative path inside the version")
        if a.size_bytes < 0 or len(a.chunk_sha256) != -(-a.size_bytes // cb):
            raise VersionRefusedError(f"{a.name}: {len(a.chunk_sha256)} chunk hashes for {a.size_bytes} bytes")


class WeightStaging:
    """Staged versions under ``root``; ``fetch`` downloads one version's artifacts (see module doc)."""

    def __init__(self, root: str | Path, *, keep: int = 2, chunk_retries: int = 3):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep, self.chunk_retries = max(1, keep), chunk_retries
        # what the downloads did (bench and tests): bytes received and chunks refused (in total), bytes
        # found staged and verified when the last fetch started (a resume), the largest message received
        self.stats = {
            "bytes_received": 0,
            "resumed_from_bytes": 0,
            "bad_chunks": 0,
            "max_message_bytes": 0,
            "bytes_reused": 0,  # artifacts unchanged since a staged version: linked, not downloaded
        }

    def folder(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def fetch(
        self,
        update: pirl_pb2.PolicyUpdate,
        open_stream: Callable[[str, int], Iterable[bytes]],
        on_chunk: Callable[[str, int], None] | None = None,
    ) -> dict[str, Path]:
        """Download every artifact of ``update`` (a chunked announcement) and return {name: verified
        file}. ``open_stream(name, offset)``: the serialized ArtifactChunk messages from ``offset`` on
        (a gRPC call: its errors propagate, the staged bytes stay for the next attempt);
        ``on_chunk(name, end_offset)``: called after each chunk is written. VersionRefusedError: the
        version cannot be used."""
        check_announcement(update)
        folder = self.folder(update.version)
        folder.mkdir(parents=True, exist_ok=True)
        self.stats["resumed_from_bytes"] = 0
        out = {}
        for art in update.manifest.artifacts:
            out[art.name] = self._fetch_artifact(folder, art, update.chunk_bytes, open_stream, on_chunk)
        return out

    def _fetch_artifact(self, folder: Path, art, cb: int, open_stream, on_chunk) -> Path:
        final = folder / art.name
        if final.is_file() and _sha256_file(final) == art.sha256:
            return final  # complete from an earlier attempt (e.g. offered, not yet swapped, then restarted)
        final.unlink(missing_ok=True)
        if self._reuse(final, art):
            return final
        part = folder / (art.name + PART)
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = _verified_prefix(part, art, cb)
        self.stats["resumed_from_bytes"] += offset
        if offset:
            log.info(
                "resuming %s at byte %d of %d (chunks already staged and verified)", art.name, offset, art.size_bytes
            )
        failures = 0
        with open(part, "r+b" if part.exists() else "w+b") as f:
            f.truncate(offset)
            f.seek(offset)
            while offset < art.size_bytes:
                stream = open_stream(art.name, offset)
                try:
                    for raw in stream:
                        self.stats["max_message_bytes"] = max(self.stats["max_message_bytes"], len(raw))
                        chunk, why = _check_chunk(raw, offset, art, cb)
                        if why is not None:
                            failures += 1
                            self.stats["bad_chunks"] += 1
                            log.warning("%s: chunk at byte %d refused (%s)", art.name, offset, why)
                            if failures > self.chunk_retries:
                                raise VersionRefusedError(f"{art.name}: {failures} chunks refused, the last one: {why}")
                            break  # fetch again from the last verified offset
                        data = chunk.data
                        f.write(data)
                        offset += len(data)
                        self.stats["bytes_received"] += len(data)
                        if on_chunk is not None:
                            f.flush()
                            on_chunk(art.name, offset)
                        if offset >= art.size_bytes:
                            break
                    else:
                        if offset < art.size_bytes:  # the learner ended the stream early: ask again
                            failures += 1
                            if failures > self.chunk_retries:
                                raise VersionRefusedError(
                                    f"{art.name}: the learner kept ending the download at {offset}"
                                )
                finally:
                    cancel = getattr(stream, "cancel", None)
                    if cancel is not None:
                        cancel()
            f.flush()
            os.fsync(f.fileno())
        got = _sha256_file(part)
        if got != art.sha256:  # every chunk matched, yet the file does not: refuse, start over next time
            part.unlink(missing_ok=True)
            raise VersionRefusedError(f"{art.name}: sha256 {got[:12]} is not the announced {art.sha256[:12]}")
        part.replace(final)
        final.with_name(final.name + DIGEST).write_text(art.sha256)
        return final

    def _reuse(self, final: Path, art) -> bool:
        """An artifact an earlier staged version already holds with the same sha256 (a file that did not
        change between versions, e.g. a frozen part of an export) is linked, not downloaded again."""
        for other in sorted(self.root.glob(f"v*/{art.name}"), reverse=True):
            if other == final or not other.is_file() or other.stat().st_size != art.size_bytes:
                continue
            noted = other.with_name(other.name + DIGEST)  # written when it was verified: no hashing to rule it out
            if not noted.is_file() or noted.read_text().strip() != art.sha256 or _sha256_file(other) != art.sha256:
                continue
            final.parent.mkdir(parents=True, exist_ok=True)  # e.g. onnx/ of a version not staged before
            try:
                os.link(other, final)  # same bytes, no copy; pruning the old version leaves this link
            except OSError:
                shutil.copyfile(other, final)
            final.with_name(final.name + DIGEST).write_text(art.sha256)
            self.stats["bytes_reused"] += art.size_bytes
            log.info(
                "%s: unchanged since %s (sha256 %s), not downloaded again", art.name, other.parent.name, art.sha256[:12]
            )
            return True
        return False

    def prune(self, keep_versions: Iterable[int]) -> None:
        """Remove staged versions other than the newest ``keep`` of ``keep_versions`` and newer ones
        still being downloaded."""
        keep = sorted({int(v) for v in keep_versions})[-self.keep :]
        for p in self.root.iterdir():
            if not (p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit()):
                continue
            v = int(p.name[1:])
            if v not in keep and v < max(keep, default=-1):
                shutil.rmtree(p, ignore_errors=True)


def _check_chunk(raw: bytes, offset: int, art, cb: int) -> tuple[pirl_pb2.ArtifactChunk | None, str | None]:
    """(the parsed chunk, why it cannot be the one at ``offset`` of ``art``: None when it is)."""
    try:
        chunk = pirl_pb2.ArtifactChunk.FromString(raw)
    except DecodeError as e:
        return None, f"malformed chunk: {e}"
    expected_len = min(cb, art.size_bytes - offset)
    if chunk.offset != offset:
        return chunk, f"offset {chunk.offset}, expected {offset}"
    if len(chunk.data) != expected_len:
        return chunk, f"{len(chunk.data)} bytes, expected {expected_len}"
    digest = hashlib.sha256(chunk.data).hexdigest()
    want = art.chunk_sha256[offset // cb]  # the announcement's list is what counts, not the chunk's own field
    if digest != want or chunk.sha256 != digest:
        return chunk, f"sha256 {digest[:12]} is not the announced {want[:12]}"
    return chunk, None


def _verified_prefix(part: Path, art, cb: int) -> int:
    """Bytes at the start of ``part`` made of whole chunks matching the announcement (0 if none)."""
    if not part.is_file():
        return 0
    offset = 0
    with open(part, "rb") as f:
        for want in art.chunk_sha256:
            data = f.read(cb)
            expected_len = min(cb, art.size_bytes - offset)
            if len(data) != expected_len or hashlib.sha256(data).hexdigest() != want:
                break
            offset += len(data)
    return offset


def _sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()
