"""Write-ahead log of accepted rollout records.

A record is appended here (and flushed to the operating system) before the learner acks it, so
an edge deletes a record only once the learner would find it again after a crash. Segments are
named by the checkpoint version they follow (``after-000005.log``): a checkpoint of version v
stores the records not yet used by an update and starts segment v; on resume, segments >= the
checkpoint's version are replayed in order, and older ones are deleted once a newer checkpoint is
committed.

Durability: flushing survives a killed learner process (kill -9, OOM, crash). Surviving a power
loss needs ``fsync=True``, which syncs every record (several ms each on ordinary disks).
Entry format: u32 robot-id length, robot id, u32 record length, record bytes, u32 crc32 of both.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
_U32 = struct.Struct("<I")


def _entries(data: bytes) -> Iterator[tuple[int, str, bytes]]:
    """(end offset, robot id, record) of every intact entry; stops at the first torn or bad one."""

    def chunk(off: int) -> tuple[bytes, int] | None:
        """The u32-length-prefixed bytes at ``off`` and the offset after them (None if torn); the
        4 bytes that always follow (the next length, or the crc) must be there too."""
        if off + 4 > len(data):
            return None
        (n,) = _U32.unpack_from(data, off)
        end = off + 4 + n
        return (data[off + 4 : end], end) if end + 4 <= len(data) else None

    off = 0
    while off + 4 <= len(data):
        start = off
        got = chunk(off)
        if got is None:
            return
        robot, off = got
        got = chunk(off)
        if got is None:
            return
        rec, off = got
        (crc,) = _U32.unpack_from(data, off)
        off += 4
        if zlib.crc32(rec, zlib.crc32(robot)) != crc:
            log.warning("write-ahead log entry at offset %d is corrupt: replay stops there", start)
            return
        yield off, robot.decode(), rec


def entry_parts(robot_id: str, record: bytes) -> tuple[bytes, ...]:
    """One entry as the pieces to write in order. The crc runs over robot id then record incrementally, and the
    record is written as it came: no copy of a (possibly multi-MB) record on the ingest path."""
    robot = robot_id.encode()
    crc = zlib.crc32(record, zlib.crc32(robot))
    return _U32.pack(len(robot)), robot, _U32.pack(len(record)), record, _U32.pack(crc)


def encode_entry(robot_id: str, record: bytes) -> bytes:
    return b"".join(entry_parts(robot_id, record))


def read_entries(path: Path) -> list[tuple[str, bytes]]:
    return [(robot, rec) for _, robot, rec in _entries(path.read_bytes())] if path.is_file() else []


def write_entries(path: Path, entries: list[tuple[str, bytes]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for robot, rec in entries:
            f.write(encode_entry(robot, rec))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RecordLog:
    def __init__(self, directory: str | Path, *, fsync: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._file = None
        self.segment: int | None = None

    def _path(self, version: int) -> Path:
        return self.dir / f"after-{version:06d}.log"

    def segments(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("after-*.log"))

    def start_segment(self, version: int) -> None:
        """Append from now on to segment ``version`` (created, or cut back to its last intact entry)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
            path = self._path(version)
            if path.exists():
                data = path.read_bytes()
                good = max((end for end, _, _ in _entries(data)), default=0)
                if good < len(data):
                    log.warning("cutting a torn tail of %d bytes from %s", len(data) - good, path)
                    with open(path, "r+b") as f:
                        f.truncate(good)
            self._file = open(path, "ab")  # noqa: SIM115  held open across appends, closed by close()
            self.segment = version

    def append(self, robot_id: str, record: bytes) -> None:
        with self._lock:
            if self._file is None:
                raise RuntimeError("RecordLog.append before start_segment")
            self._file.writelines(entry_parts(robot_id, record))
            self._file.flush()
            if self.fsync:
                os.fsync(self._file.fileno())

    def replay(self, from_version: int) -> Iterator[tuple[str, bytes]]:
        """Entries of every segment >= ``from_version``, oldest first."""
        for v in self.segments():
            if v >= from_version:
                yield from read_entries(self._path(v))

    def drop_before(self, version: int) -> None:
        for v in self.segments():
            if v < version:
                self._path(v).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
