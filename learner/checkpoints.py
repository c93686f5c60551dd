"""Checkpoint integrity and the high-water mark of published policy versions.

Why this exists: a checkpoint is what a restarted learner publishes again, under the version number
it was saved with. A checkpoint damaged on disk (one flipped bit in a tensor) would otherwise load
silently and reach robots under a number they already hold with other weights; a damaged header
would stop the learner with a traceback although an older intact checkpoint sits next to it.

- ``write_manifest``: the sha256 and size of every file of a checkpoint, in ``manifest.json``,
  written (and fsynced) LAST. A checkpoint without one was never completed.
- ``verify``: re-hashes every file against the manifest before a resume trusts it.
- ``CheckpointPicker``: the numbered checkpoints newest first, each hashed at most once; a refused
  one is logged (one line), counted (``pirl_learner_checkpoints_refused_total{reason}``) and the
  next older one is tried.
- ``read_high_water`` / ``write_high_water``: the highest version ever published, written before
  each publish, so that weights restored from an older checkpoint are published under a NEW number.

Hashes are computed in 1 MiB chunks: a VLA checkpoint holds files of several GB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from learner import metrics

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PARTIAL = ".partial"  # a checkpoint being written: <version>.partial/, renamed to <version>/ once complete
REFUSED = ".refused"  # a refused checkpoint set aside (kept for inspection, never resumed from)
HIGH_WATER = "published_version.json"
_CHUNK = 1 << 20
T = TypeVar("T")


class CheckpointRefusedError(Exception):
    """A checkpoint that must not be resumed from; ``reason`` is the metric label (low cardinality)."""

    def __init__(self, reason: str, message: str):
        assert reason in metrics.CHECKPOINT_REFUSE_REASONS, reason
        super().__init__(message)
        self.reason, self.message = reason, message


class NoIntactCheckpointError(ValueError):
    """Every checkpoint was refused (a ValueError: the CLI prints it as one ``error:`` line, exit 2)."""


# --- files ----------------------------------------------------------------------------------------


def _files(directory: Path) -> list[str]:
    """Relative POSIX paths of every file under ``directory`` except the manifest, sorted."""
    out = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            rel = (Path(root) / name).relative_to(directory).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _hash(path: Path, *, sync: bool = False) -> tuple[str, int]:
    """(sha256 hex, size) of a file, streamed; ``sync``: also fsync it (the manifest must never reach
    the disk before the data it vouches for)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest(), size


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (created, renamed) durable, not only their contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """``path`` replaced atomically (tmp + fsync + rename + fsync of the folder): old or new, never torn."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --- manifest -------------------------------------------------------------------------------------


def write_manifest(directory: str | Path) -> dict:
    """Hash (and fsync) every file of the checkpoint in ``directory``, then write ``manifest.json``
    last. Call it when nothing else will be written into the checkpoint."""
    directory = Path(directory)
    files = {}
    for rel in _files(directory):
        digest, size = _hash(directory / rel, sync=True)
        files[rel] = {"sha256": digest, "size": size}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    for root, _dirs, _names in os.walk(directory):  # the names of the files, not only their bytes
        fsync_dir(Path(root))
    write_durably(directory / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _read_manifest(directory: Path) -> dict[str, dict]:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointRefusedError(
            "missing_manifest", f"no {MANIFEST} (the save never completed, or the checkpoint predates manifests)"
        )
    try:
        doc = json.loads(path.read_bytes())
        files = doc["files"]
        if doc.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {doc.get('format')!r}, expected {MANIFEST_FORMAT}")
        for rel, entry in files.items():
            # paths are compared with what is on disk: one that climbs out of the folder is not ours
            if rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError(f"path {rel!r} leaves the checkpoint")
            if not (isinstance(entry["sha256"], str) and isinstance(entry["size"], int)):
                raise ValueError(f"entry of {rel!r} is not {{sha256, size}}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError, UnicodeDecodeError too
        raise CheckpointRefusedError("bad_manifest", f"{MANIFEST} is unreadable ({e})") from None
    return files


def verify(directory: str | Path) -> None:
    """Return if every file of the checkpoint matches its manifest (no file missing, none added,
    same sizes and sha256); else raise CheckpointRefusedError naming the first difference."""
    directory = Path(directory)
    files = _read_manifest(directory)
    present = set(_files(directory))
    missing = sorted(set(files) - present)
    if missing:
        raise CheckpointRefusedError(
            "missing_file", f"{missing[0]} is missing ({len(missing)} file(s) listed in {MANIFEST} are absent)"
        )
    extra = sorted(present - set(files))
    if extra:  # written after the manifest: the checkpoint is not what was saved
        raise CheckpointRefusedError("unexpected_file", f"{extra[0]} is not in {MANIFEST} ({len(extra)} such file(s))")
    for rel in sorted(files):  # sizes first: cheap, and a truncated file needs no hashing
        size = (directory / rel).stat().st_size
        if size != files[rel]["size"]:
            raise CheckpointRefusedError(
                "hash_mismatch", f"{rel} has {size} bytes, {MANIFEST} says {files[rel]['size']}"
            )
    for rel in sorted(files):
        if _hash(directory / rel)[0] != files[rel]["sha256"]:
            raise CheckpointRefusedError("hash_mismatch", f"{rel} sha256 mismatch")


# --- the checkpoints folder -----------------------------------------------------------------------


def numbered(directory: str | Path) -> list[Path]:
    """Completed checkpoints (folders named by their version), newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name), reverse=True
    )


def remove_partials(directory: str | Path) -> None:
    """Remove what an interrupted save left: ``<version>.partial/`` and ``*.tmp`` (folders, files, the
    ``last.tmp`` link). None of it was ever a checkpoint: its manifest or final rename never happened."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.endswith((PARTIAL, ".tmp")):
            log.info("removing %s, left by an interrupted checkpoint save", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def point_last(directory: Path, name: str) -> None:
    """``directory/last`` -> ``name``, replaced atomically (a relative link: the folder can move)."""
    link_tmp = directory / "last.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(name)
    os.replace(link_tmp, directory / "last")
    fsync_dir(directory)


def commit(partial: Path, final: Path) -> None:
    """Rename a complete ``partial`` checkpoint (manifest written) to ``final`` and point ``last`` at it."""
    trash = None
    if final.exists():  # the same version saved again: a rename cannot replace a non-empty folder
        trash = final.with_name(final.name + ".replaced.tmp")
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
    partial.rename(final)
    fsync_dir(final.parent)
    point_last(final.parent, final.name)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


class CheckpointPicker:
    """The numbered checkpoints of a folder, newest first, each verified (hashed) at most once.

    ``--resume`` loads in two steps from the same checkpoint: the policy (``pirl-learner``'s
    ``load_policy``), then the trainer's state. Both go through ``load``, so a checkpoint that
    verifies but does not load (a bad safetensors header under a matching hash) is refused too and
    the next older one is tried, without hashing any checkpoint twice.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        remove_partials(self.directory)
        self._queue = numbered(self.directory)
        self.total = len(self._queue)
        self._current: Path | None = None
        self.refused: list[tuple[Path, CheckpointRefusedError]] = []

    def current(self) -> Path | None:
        """The newest checkpoint not refused so far that verifies; None when none is left."""
        while self._current is None and self._queue:
            ckpt = self._queue.pop(0)
            try:
                verify(ckpt)
            except CheckpointRefusedError as e:
                self._refuse(ckpt, e)
            else:
                self._current = ckpt
        return self._current

    def load(self, loader: Callable[[Path], T]) -> T:
        """``loader(checkpoint)`` for the newest intact checkpoint it succeeds on; raise
        NoIntactCheckpointError when every checkpoint is refused."""
        while (ckpt := self.current()) is not None:
            try:
                return loader(ckpt)
            except Exception as e:  # noqa: BLE001  whatever a loader raises, this checkpoint is unusable
                self._current = None
                self._refuse(ckpt, CheckpointRefusedError("load_error", f"it does not load ({type(e).__name__}: {e})"))
        reasons = ", ".join(f"{p.name}: {e.reason}" for p, e in self.refused)
        unsigned = [p for p, e in self.refused if e.reason == "missing_manifest"]
        adopt = (
            (
                f"; a checkpoint written before checkpoints carried manifests can be trusted explicitly, after "
                f'checking it yourself: python -c "from learner.checkpoints import write_manifest; '
                f"write_manifest('{unsigned[0]}')\""
            )
            if unsigned
            else ""
        )
        raise NoIntactCheckpointError(
            f"--resume: none of the {self.total} checkpoint(s) in {self.directory} is intact ({reasons}); restore "
            f"one from a backup, or move the folder away and start from --policy-path (version numbers continue "
            f"above the last published one, recorded in {self.directory.parent / HIGH_WATER}){adopt}"
        )

    def _refuse(self, ckpt: Path, e: CheckpointRefusedError) -> None:
        self.refused.append((ckpt, e))
        metrics.LEARNER_CHECKPOINTS_REFUSED.labels(reason=e.reason).inc()
        then = "trying the previous one" if self._queue else "no older checkpoint left"
        log.error("checkpoint %s refused: %s; %s", ckpt.name, e.message, then)

    def set_refused_aside(self) -> None:
        """Once an older checkpoint is restored: rename each refused one to ``<version>.refused[.n]``,
        kept for inspection but no longer counted among the checkpoints to keep (pruning would
        otherwise delete the intact older ones first) nor tried again."""
        moved = []
        for ckpt, _ in self.refused:
            target, n = ckpt.with_name(ckpt.name + REFUSED), 1
            while target.exists():
                target, n = ckpt.with_name(f"{ckpt.name}{REFUSED}.{n}"), n + 1
            ckpt.rename(target)
            moved.append(target.name)
        if moved:
            log.warning(
                "refused checkpoint(s) set aside in %s as %s (kept for inspection: delete them when done)",
                self.directory,
                ", ".join(moved),
            )
        self.refused.clear()
        if self._current is not None:
            point_last(self.directory, self._current.name)


# --- the high-water mark of published versions ----------------------------------------------------


def write_high_water(output_dir: str | Path, version: int) -> None:
    """Record that ``version`` is about to be published (call before robots can see it)."""
    write_durably(Path(output_dir) / HIGH_WATER, json.dumps({"max_published_version": int(version)}).encode())


def read_high_water(output_dir: str | Path) -> int | None:
    """The highest version ever published from ``output_dir``; None when nothing was.

    The file is the record; version numbers found on disk (checkpoints of every kind, refused ones
    included, and exported artifacts) raise it, since a version is checkpointed before it is
    published: that covers a missing or unreadable file (an output folder from before the file
    existed, or one edited by hand) without ever going below what robots may have received."""
    output_dir = Path(output_dir)
    path = output_dir / HIGH_WATER
    on_disk = _versions_on_disk(output_dir)
    if not path.is_file():
        return on_disk
    try:
        recorded = int(json.loads(path.read_bytes())["max_published_version"])
    except (ValueError, KeyError, TypeError) as e:
        log.warning(
            "%s is unreadable (%s): taking the highest version found on disk, %s, as published", path, e, on_disk
        )
        return on_disk or 0  # the file exists: at least version 0 was published
    return max(recorded, on_disk or 0)


def _versions_on_disk(output_dir: Path) -> int | None:
    found = []
    for folder, pattern in ((output_dir / "checkpoints", r"(\d+)"), (output_dir / "artifacts", r"v(\d+)")):
        if folder.is_dir():
            found += [int(m.group(1)) for p in folder.iterdir() if (m := re.match(pattern, p.name))]
    return max(found, default=None)
